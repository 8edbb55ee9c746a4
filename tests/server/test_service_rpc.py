"""The kernel service in-process on port 0, through a real gRPC channel."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from kernelgen_wire.v1 import kernelgen_pb2 as pb
from kernelgen_wire.v1 import kernelgen_pb2_grpc as pb_grpc

from support import generate, run_server

EMBEDDED = {"hyena-2d": (15, 15), "long-1d": (300,), "volume-3d": (3, 5, 4)}


@pytest.fixture
async def stub(server: Any) -> AsyncIterator[pb_grpc.KernelGeneratorStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.KernelGeneratorStub(channel)


def decode(tensor: pb.Tensor) -> np.ndarray:
    dtype = {pb.DTYPE_FLOAT32: "<f4", pb.DTYPE_FLOAT16: "<f2"}[tensor.dtype]
    return np.frombuffer(tensor.data, dtype=dtype).reshape(tuple(tensor.shape))


def cond_tensor(array: np.ndarray) -> pb.Tensor:
    array = np.ascontiguousarray(array, dtype="<f4")
    return pb.Tensor(shape=array.shape, dtype=pb.DTYPE_FLOAT32, data=array.tobytes())


def reference(server: Any, name: str, lens: tuple[int, ...], cond: np.ndarray | None = None) -> np.ndarray:
    module = server.repository.ready[name].module
    with torch.no_grad():
        kernel, _ = module(lens, None if cond is None else torch.from_numpy(cond))
    return kernel.numpy()


def close(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()


@pytest.mark.parametrize("name", sorted(EMBEDDED))
async def test_served_kernels_equal_the_model(server: Any, stub: Any, name: str) -> None:
    lens = EMBEDDED[name]
    reply, report = await generate(
        stub, pb.GenerateKernelRequest(model=name, seq_lens=lens, return_grid=True)
    )
    close(decode(reply.kernel), reference(server, name, lens))
    module = server.repository.ready[name].module
    np.testing.assert_array_equal(decode(reply.grid), module.grid(lens).numpy())
    assert report.content_hash == server.repository.ready[name].content_hash
    if module.cond_dim is not None:
        cond = np.random.default_rng(0).standard_normal((3, module.cond_dim)).astype(np.float32)
        reply, report = await generate(
            stub, pb.GenerateKernelRequest(model=name, seq_lens=lens, conditioning=cond_tensor(cond))
        )
        kernel = decode(reply.kernel)
        close(kernel, reference(server, name, lens, cond))
        assert kernel.shape[0] == 3
        assert report.batch_size >= 3
        assert not report.cache_hit


async def test_float16_and_bfloat16_outputs(server: Any, stub: Any) -> None:
    # Each is the float32 kernel served, rounded to nearest even (on any device).
    full = await stub.GenerateKernel(pb.GenerateKernelRequest(model="hyena-2d", seq_lens=[6, 6]))
    want = decode(full.kernel)
    close(want, reference(server, "hyena-2d", (6, 6)))
    half = await stub.GenerateKernel(pb.GenerateKernelRequest(model="hyena-2d", seq_lens=[6, 6], dtype=2))
    assert half.kernel.dtype == pb.DTYPE_FLOAT16
    np.testing.assert_array_equal(decode(half.kernel), want.astype(np.float16))
    bf = await stub.GenerateKernel(pb.GenerateKernelRequest(model="hyena-2d", seq_lens=[6, 6], dtype=3))
    bits = np.frombuffer(bf.kernel.data, dtype="<u2").astype(np.uint32) << 16
    expected = torch.from_numpy(want.copy()).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(bits.view(np.float32).reshape(want.shape), expected)


async def test_cache_hit_does_no_compute(server: Any, stub: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = server.service._engines["long-1d"]
    calls = []
    original = engine.unconditioned

    def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(engine, "unconditioned", counted)
    request = pb.GenerateKernelRequest(model="long-1d", seq_lens=[777])
    first, first_report = await generate(stub, request)
    second, second_report = await generate(stub, request)
    assert len(calls) == 1
    assert not first_report.cache_hit
    assert second_report.cache_hit
    assert second.kernel.data == first.kernel.data
    # Another dtype is another entry.
    await stub.GenerateKernel(pb.GenerateKernelRequest(model="long-1d", seq_lens=[777], dtype=2))
    assert len(calls) == 2
    hits = server.service.metrics.registry.get_sample_value("kernelgen_cache_hits_total")
    assert hits == 1.0


async def test_concurrent_misses_compute_once(
    server: Any, stub: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = server.service._engines["long-1d"]
    calls = []
    original = engine.unconditioned

    def slow(*args: Any, **kwargs: Any) -> torch.Tensor:
        import time

        calls.append(args)
        time.sleep(0.2)  # long enough for every caller to arrive during the miss
        return original(*args, **kwargs)

    monkeypatch.setattr(engine, "unconditioned", slow)
    request = pb.GenerateKernelRequest(model="long-1d", seq_lens=[1234])
    results = await asyncio.gather(*(generate(stub, request) for _ in range(20)))
    replies = [reply for reply, _ in results]
    assert len(calls) == 1
    assert len({r.kernel.data for r in replies}) == 1
    assert sum(not report.cache_hit for _, report in results) == 1


async def test_streaming_a_kernel_over_64_mib(server: Any, stub: Any) -> None:
    lens = (33000,)  # 65999 points x 256 channels x 4 bytes = 67.6 MB
    chunks = [c async for c in stub.StreamKernel(pb.GenerateKernelRequest(model="long-1d", seq_lens=lens))]
    header = chunks[0].header
    assert header.kernel_bytes == 65999 * 256 * 4 > 64 << 20
    buffer = bytearray(header.kernel_bytes)
    for chunk in chunks[1:]:
        assert len(chunk.data) <= 1 << 20
        buffer[chunk.offset : chunk.offset + len(chunk.data)] = chunk.data
    assert sum(len(c.data) for c in chunks[1:]) == header.kernel_bytes
    kernel = np.frombuffer(buffer, dtype="<f4").reshape(tuple(header.kernel_shape))
    close(kernel, reference(server, "long-1d", lens))


async def test_stream_carries_grid_after_kernel(server: Any, stub: Any) -> None:
    request = pb.GenerateKernelRequest(model="volume-3d", seq_lens=[3, 4, 5], return_grid=True)
    chunks = [c async for c in stub.StreamKernel(request)]
    header = chunks[0].header
    data = b"".join(c.data for c in chunks[1:])
    grid = np.frombuffer(data[header.kernel_bytes :], dtype="<f4").reshape(tuple(header.grid_shape))
    np.testing.assert_array_equal(grid, server.repository.ready["volume-3d"].module.grid((3, 4, 5)).numpy())


async def test_flop_count_and_models(server: Any, stub: Any) -> None:
    for name, lens in EMBEDDED.items():
        module = server.repository.ready[name].module
        for inference in (False, True):
            reply = await stub.FlopCount(pb.FlopCountRequest(model=name, seq_lens=lens, inference=inference))
            assert reply.flops == module.flop_count(lens, inference=inference)
            assert reply.grid_points == np.prod([2 * n - 1 for n in lens])
            assert reply.kernel_bytes == reply.grid_points * module.out_dim * 4
            assert reply.cacheable == (module.film_generator is None)
    listing = await stub.ListModels(pb.ListModelsRequest())
    assert [m.name for m in listing.models] == sorted(EMBEDDED)
    info = await stub.GetModel(pb.GetModelRequest(model="hyena-2d"))
    assert info.ready
    assert info.config.out_dim == 384
    assert list(info.config.L_cache) == [15, 15]
    assert info.config.film.cond_dim == 384
    assert info.parameter_count == server.repository.ready["hyena-2d"].parameter_count
    assert info.content_hash == server.repository.ready["hyena-2d"].content_hash


async def test_health_and_reflection(server: Any) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "kernelgen.v1.KernelGenerator", *EMBEDDED):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await health.Check(health_pb2.HealthCheckRequest(service="no-such-model"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND

        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = refl.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = [s.name async for r in responses for s in r.list_services_response.service]
        assert "kernelgen.v1.KernelGenerator" in names
        assert "grpc.health.v1.Health" in names


async def test_metrics_count_requests_by_code(server: Any, stub: Any) -> None:
    await stub.GenerateKernel(pb.GenerateKernelRequest(model="hyena-2d", seq_lens=[3, 3]))
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.GenerateKernel(pb.GenerateKernelRequest(model="nope", seq_lens=[3, 3]))
    registry = server.service.metrics.registry
    ok = {"model": "hyena-2d", "method": "GenerateKernel", "code": "OK"}
    # A name the server does not serve is never a label: clients cannot grow the label set.
    missing = {"model": "", "method": "GenerateKernel", "code": "NOT_FOUND"}
    assert registry.get_sample_value("kernelgen_requests_total", ok) == 1.0
    assert registry.get_sample_value("kernelgen_requests_total", missing) == 1.0
    assert registry.get_sample_value("kernelgen_inflight_requests") == 0.0
    latency = registry.get_sample_value(
        "kernelgen_request_latency_seconds_count", {"model": "hyena-2d", "method": "GenerateKernel"}
    )
    assert latency == 1.0


async def test_metrics_endpoint_serves_text() -> None:
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with run_server(metrics_port=port) as running:
        assert running.metrics_port == port
        body = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        )
    assert "kernelgen_inflight_requests" in body
    assert 'kernelgen_model_ready{model="hyena-2d"} 1.0' in body
