"""TLS, mutual TLS and bearer-token authentication, with certificates made at test time."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kernelgen_server.transport.security import BearerTokenInterceptor, load_tokens
from kernelgen_wire.v1 import kernelgen_pb2 as pb
from kernelgen_wire.v1 import kernelgen_pb2_grpc as pb_grpc

from support import free_port, run_server


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def read(self, name: str) -> bytes:
        return Path(getattr(self, name)).read_bytes()


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca_key = _key()
    ca = _cert("kernelgen test CA", ca_key, None, ca_key, ca=True)
    server_key, client_key = _key(), _key()
    server = _cert("localhost", server_key, ca, ca_key, server=True)
    client = _cert("kernelgen client", client_key, ca, ca_key)
    files = {
        "ca.pem": ca.public_bytes(serialization.Encoding.PEM),
        "server.pem": server.public_bytes(serialization.Encoding.PEM),
        "server.key": _pem_key(server_key),
        "client.pem": client.public_bytes(serialization.Encoding.PEM),
        "client.key": _pem_key(client_key),
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    return Pki(
        root / "ca.pem", root / "server.pem", root / "server.key", root / "client.pem", root / "client.key"
    )


async def generate(
    channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...] = ()
) -> pb.GenerateKernelResponse:
    stub = pb_grpc.KernelGeneratorStub(channel)
    return await stub.GenerateKernel(
        pb.GenerateKernelRequest(model="long-1d", seq_lens=[5]), metadata=metadata, timeout=10
    )


async def test_tls(pki: Pki) -> None:
    async with run_server(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key)) as server:
        creds = grpc.ssl_channel_credentials(root_certificates=pki.read("ca"))
        async with grpc.aio.secure_channel(f"localhost:{server.port}", creds) as channel:
            reply = await generate(channel)
            assert list(reply.kernel.shape) == [1, 9, 256]
        # A plaintext client cannot talk to a TLS server.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await generate(channel)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls(pki: Pki) -> None:
    async with run_server(
        tls_cert=str(pki.server_cert), tls_key=str(pki.server_key), tls_client_ca=str(pki.ca)
    ) as server:
        with_cert = grpc.ssl_channel_credentials(
            root_certificates=pki.read("ca"),
            private_key=pki.read("client_key"),
            certificate_chain=pki.read("client_cert"),
        )
        async with grpc.aio.secure_channel(f"localhost:{server.port}", with_cert) as channel:
            assert list((await generate(channel)).kernel.shape) == [1, 9, 256]
        without_cert = grpc.ssl_channel_credentials(root_certificates=pki.read("ca"))
        async with grpc.aio.secure_channel(f"localhost:{server.port}", without_cert) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await generate(channel)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_bearer_tokens(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# accepted tokens\nalpha-secret-1\n\nbeta-secret-2\n")
    async with run_server(auth_token_file=str(tokens)) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            for metadata in [
                (),
                (("authorization", "Bearer wrong"),),
                (("authorization", "Basic alpha-secret-1"),),
            ]:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await generate(channel, metadata)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # Streaming calls are refused the same way.
            stub = pb_grpc.KernelGeneratorStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stub.StreamKernel(pb.GenerateKernelRequest(model="long-1d", seq_lens=[5])):
                    pass
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            for token in ("alpha-secret-1", "beta-secret-2"):
                reply = await generate(channel, (("authorization", f"Bearer {token}"),))
                assert list(reply.kernel.shape) == [1, 9, 256]
            # Health stays open for probes.
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert "alpha-secret-1" not in caplog.text
    assert "wrong" not in caplog.text


def test_token_file_must_hold_a_token(tmp_path: Path) -> None:
    empty = tmp_path / "tokens"
    empty.write_text("# nothing here\n\n")
    with pytest.raises(ValueError, match="holds no token"):
        load_tokens(empty)
    assert BearerTokenInterceptor([b"t"])._authorized((("authorization", "bearer t"),))
    assert not BearerTokenInterceptor([b"t"])._authorized((("authorization", "Bearer tt"),))


async def test_concurrent_call_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio
    import time

    async with run_server(max_concurrent_rpcs=1) as server:
        engine = server.service._engines["long-1d"]
        original = engine.unconditioned

        def slow(*args: object, **kwargs: object) -> object:
            time.sleep(0.5)
            return original(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(engine, "unconditioned", slow)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.KernelGeneratorStub(channel)
            first = asyncio.ensure_future(
                stub.GenerateKernel(pb.GenerateKernelRequest(model="long-1d", seq_lens=[7]))
            )
            await asyncio.sleep(0.2)  # the first call holds the only slot
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.GenerateKernel(pb.GenerateKernelRequest(model="long-1d", seq_lens=[8]))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert list((await first).kernel.shape) == [1, 13, 256]


async def test_request_size_limit_fits_the_largest_legal_conditioning() -> None:
    import numpy as np

    async with run_server(max_conditioning_rows=64) as server:
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{server.port}", options=[("grpc.max_send_message_length", -1)]
        ) as channel:
            stub = pb_grpc.KernelGeneratorStub(channel)

            def request(rows: int) -> pb.GenerateKernelRequest:
                cond = np.zeros((rows, 384), dtype="<f4")
                tensor = pb.Tensor(shape=[rows, 384], dtype=pb.DTYPE_FLOAT32, data=cond.tobytes())
                return pb.GenerateKernelRequest(model="hyena-2d", seq_lens=[2, 2], conditioning=tensor)

            # 64 rows x 384 floats is the largest legal request: accepted.
            reply = await stub.GenerateKernel(request(64))
            assert reply.kernel.shape[0] == 64
            # Far past it, gRPC refuses the message before it is parsed.
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.GenerateKernel(request(4096))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def _get(url: str, token: str | None = None, ca: Path | None = None) -> tuple[int, bytes]:
    import ssl
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    context = ssl.create_default_context(cafile=str(ca)) if ca else None
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), b""


async def test_metrics_want_the_same_token(tmp_path: Path) -> None:
    import asyncio

    tokens = tmp_path / "tokens"
    tokens.write_text("metrics-secret\n")
    settings = {"auth_token_file": str(tokens), "metrics_port": free_port(), "host": "127.0.0.1"}
    async with run_server(**settings) as server:
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        status, _ = await asyncio.to_thread(_get, url)
        assert status == 401
        status, _ = await asyncio.to_thread(_get, url, "wrong")
        assert status == 401
        status, body = await asyncio.to_thread(_get, url, "metrics-secret")
        assert status == 200 and b"kernelgen_requests_total" in body


async def test_metrics_over_tls(pki: Pki) -> None:
    import asyncio

    settings = {"tls_cert": str(pki.server_cert), "tls_key": str(pki.server_key), "metrics_port": free_port()}
    async with run_server(**settings) as server:
        url = f"https://127.0.0.1:{server.metrics_port}/metrics"
        status, body = await asyncio.to_thread(_get, url, None, pki.ca)
        assert status == 200 and b"kernelgen_inflight_bytes" in body
