"""``KernelClient`` against a real in-process server (run on its own event-loop thread)."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kernelgen_client import (
    HealthStatus,
    KernelClient,
    KernelResult,
    ModelNotFound,
    TLSConfig,
    Unauthenticated,
)

from support import threaded_server


def calls(server: Any, model: str, method: str, code: str = "OK") -> float:
    """Finished calls the server counted for a model, method and status code."""
    labels = {"model": model, "method": method, "code": code}
    return server.service.metrics.registry.get_sample_value("kernelgen_requests_total", labels) or 0.0


def reference(server: Any, model: str, seq_lens: list[int], conditioning: Any = None) -> np.ndarray:
    module = server.repository.ready[model].module
    cond = None if conditioning is None else torch.as_tensor(np.asarray(conditioning, np.float32))
    with torch.no_grad():
        kernel, _grid = module(seq_lens, cond)
    return kernel.numpy()


def close(actual: np.ndarray, expected: np.ndarray, rel: float = 1e-4) -> bool:
    return bool(np.abs(actual - expected).max() <= rel * np.abs(expected).max())


@pytest.fixture(scope="module")
def server() -> Iterator[Any]:
    with threaded_server() as running:
        yield running


@pytest.fixture
def client(server: Any) -> Iterator[KernelClient]:
    with KernelClient(f"127.0.0.1:{server.port}", timeout=30) as kernel_client:
        yield kernel_client


def test_generate_unconditioned_numpy_matches_the_model(client: KernelClient, server: Any) -> None:
    kernel = client.generate("hyena-2d", [9, 9])
    assert kernel.shape == (1, 17, 17, 384)
    assert kernel.dtype == np.float32
    assert not kernel.flags.writeable  # a view of the received message
    assert close(kernel, reference(server, "hyena-2d", [9, 9]))
    owned = client.generate("hyena-2d", [9, 9], copy=True)
    assert owned.flags.writeable
    assert np.array_equal(owned, kernel)


@pytest.mark.parametrize(
    "make",
    [
        lambda rows: rows,  # numpy
        lambda rows: rows.tolist(),  # nested lists
        lambda rows: torch.from_numpy(rows),  # torch
    ],
    ids=["numpy", "list", "torch"],
)
def test_conditioning_in_every_form(client: KernelClient, server: Any, make: Any) -> None:
    rows = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
    kernel = client.generate("volume-3d", [3, 4, 2], make(rows))
    assert kernel.shape == (3, 5, 7, 3, 32)
    assert close(kernel, reference(server, "volume-3d", [3, 4, 2], rows))


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_each_dtype_by_numpy_and_torch(client: KernelClient, server: Any, dtype: str, stream: bool) -> None:
    rows = np.random.default_rng(2).standard_normal((2, 384)).astype(np.float32)
    expected = reference(server, "hyena-2d", [5, 5], rows)
    as_numpy = client.generate("hyena-2d", [5, 5], rows, dtype=dtype, stream=stream)
    as_torch = client.generate("hyena-2d", [5, 5], rows, dtype=dtype, stream=stream, as_torch=True)
    # numpy has no bfloat16: it comes back widened to float32; torch keeps the wire dtype.
    assert as_numpy.dtype == (np.float16 if dtype == "float16" else np.float32)
    assert as_torch.dtype == getattr(torch, dtype)
    assert as_numpy.shape == tuple(as_torch.shape) == (2, 9, 9, 384)
    rounding = {"float32": 1e-4, "float16": 1e-3, "bfloat16": 1e-2}[dtype]
    assert close(as_numpy.astype(np.float32), expected, rounding)
    assert np.array_equal(as_torch.float().numpy(), as_numpy.astype(np.float32))


def test_report_grid_and_cache(client: KernelClient, server: Any) -> None:
    first = client.generate("long-1d", [300], return_grid=True, with_report=True)
    second = client.generate("long-1d", [300], return_grid=True, with_report=True)
    assert isinstance(first, KernelResult)
    assert first.shape == (1, 599, 256)
    assert first.grid is not None
    assert first.grid.shape == (1, 599, 1)
    assert not first.report.cache_hit
    assert first.report.batch_size == 1
    assert second.report.cache_hit
    assert second.report.batch_size == 0
    assert first.report.content_hash == server.repository.ready["long-1d"].content_hash
    assert first.wire_dtype == "float32"
    assert first.nbytes == 599 * 256 * 4
    assert first.elapsed_ms > 0
    assert np.array_equal(first.kernel, second.kernel)
    _kernel, grid = client.generate("long-1d", [300], return_grid=True)
    assert np.array_equal(grid, first.grid)
    assert grid[0, 0, 0] == pytest.approx(-299 / 4095)  # step 1/(L_cache - 1)


def test_large_kernels_stream_into_a_writable_buffer(client: KernelClient, server: Any) -> None:
    before = calls(server, "long-1d", "StreamKernel")
    result = client.generate("long-1d", [5000], with_report=True)  # 10.2 MB: over the unary limit
    assert result.streamed
    assert result.kernel.shape == (1, 9999, 256)
    assert result.kernel.flags.writeable
    assert calls(server, "long-1d", "StreamKernel") == before + 1
    assert calls(server, "long-1d", "GenerateKernel", "RESOURCE_EXHAUSTED") == 0  # predicted, not tried
    unary = client.generate("long-1d", [500], with_report=True)
    assert not unary.streamed
    assert np.array_equal(unary.kernel, client.generate("long-1d", [500], stream=True))
    torch_kernel = client.generate("long-1d", [5000], as_torch=True)
    assert torch.equal(torch_kernel, torch.from_numpy(result.kernel))


def test_an_oversize_unary_call_falls_back_to_one_stream_and_is_never_retried() -> None:
    # The server's one-message limit is below the client's prediction threshold, so the
    # client's first try is unary and refused (pushback -1): gRPC must not retry it.
    with threaded_server(max_message_bytes="1MiB", stream_chunk_bytes="256KiB") as server:
        with KernelClient(f"127.0.0.1:{server.port}") as client:
            result = client.generate("long-1d", [1000], with_report=True)  # 2.0 MB > 1 MiB
            assert result.streamed
            assert result.kernel.shape == (1, 1999, 256)
            assert calls(server, "long-1d", "GenerateKernel", "RESOURCE_EXHAUSTED") == 1
            assert calls(server, "long-1d", "StreamKernel") == 1


def test_metadata_calls(client: KernelClient, server: Any) -> None:
    models = client.list_models()
    assert [m.name for m in models] == ["hyena-2d", "long-1d", "volume-3d"]
    hyena = client.get_model("hyena-2d")
    assert hyena.ready
    assert hyena.config is not None
    assert hyena.config.out_dim == 384
    assert hyena.config.cond_dim == 384
    assert hyena.config.L_cache == (15, 15)
    assert hyena.content_hash == server.repository.ready["hyena-2d"].content_hash
    long_1d = client.get_model("long-1d")
    assert long_1d.config is not None
    assert long_1d.config.film is None
    report = client.flop_count("hyena-2d", [29, 29])
    module = server.repository.ready["hyena-2d"].module
    assert report.flops == module.flop_count([29, 29])
    assert report.grid_points == 57 * 57
    assert report.kernel_bytes == 57 * 57 * 384 * 4
    assert report.film
    assert not client.flop_count("long-1d", 100).film
    assert client.flop_count("long-1d", 100, inference=True).flops == 0  # cached at inference
    with pytest.raises(ModelNotFound, match="nope"):
        client.get_model("nope")
    assert client.health() is HealthStatus.SERVING
    assert client.health("volume-3d") is HealthStatus.SERVING
    assert client.health("nope") is HealthStatus.SERVICE_UNKNOWN


def test_bearer_token(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("s3cret\n")
    with threaded_server(auth_token_file=str(tokens)) as server:
        target = f"127.0.0.1:{server.port}"
        with KernelClient(target) as anonymous:
            with pytest.raises(Unauthenticated):
                anonymous.list_models()
            assert anonymous.health() is HealthStatus.SERVING  # probes need no token
        with KernelClient(target, token="wrong") as wrong, pytest.raises(Unauthenticated):
            wrong.generate("long-1d", [3])
        with KernelClient(target, token="s3cret") as client:
            assert client.generate("long-1d", [3]).shape == (1, 5, 256)
        with KernelClient(target, metadata={"authorization": "Bearer s3cret"}) as client:
            assert len(client.list_models()) == 3


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kernelgen.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("kernelgen.test"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "server.pem", tmp_path / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


def test_tls(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    with threaded_server(tls_cert=str(cert), tls_key=str(key)) as server:
        target = f"127.0.0.1:{server.port}"
        with KernelClient(target, tls=TLSConfig(root_certificates=cert)) as client:
            assert client.generate("long-1d", [3]).shape == (1, 5, 256)
        named = TLSConfig(root_certificates=cert.read_text(), server_name_override="kernelgen.test")
        with KernelClient(target, tls=named) as client:
            assert client.health() is HealthStatus.SERVING
