"""Start-up health, and graceful drain with calls in flight."""

from __future__ import annotations

import asyncio
import shutil
import threading
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kernelgen_server.settings import load_settings
from kernelgen_server.transport.server import ModelsFailedError, create_server
from kernelgen_wire.v1 import kernelgen_pb2 as pb
from kernelgen_wire.v1 import kernelgen_pb2_grpc as pb_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def broken_repo(tmp_path: Path, embedded_repo: Path) -> Path:
    shutil.copytree(embedded_repo / "hyena-2d", tmp_path / "hyena-2d")
    shutil.copytree(embedded_repo / "long-1d", tmp_path / "bad")
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"not a safetensors file")
    return tmp_path


async def status(channel: grpc.aio.Channel, service: str) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service))
    return int(reply.status)


async def test_health_before_and_after_start_and_a_failed_model(tmp_path: Path, embedded_repo: Path) -> None:
    settings = load_settings(
        {
            "host": "127.0.0.1",
            "port": 0,
            "metrics_port": 0,
            "model_repo": str(broken_repo(tmp_path, embedded_repo)),
        }
    )
    server, port = create_server(settings)
    assert server.repository.failed.keys() == {"bad"}
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert await status(channel, "") == SERVING
            assert await status(channel, "hyena-2d") == SERVING
            assert await status(channel, "bad") == NOT_SERVING
            listing = await pb_grpc.KernelGeneratorStub(channel).ListModels(pb.ListModelsRequest())
            bad = next(m for m in listing.models if m.name == "bad")
            assert not bad.ready
            assert "model.safetensors" in bad.reason
    finally:
        await server.stop(grace=1)


async def test_strict_refuses_a_failed_model(tmp_path: Path, embedded_repo: Path) -> None:
    settings = load_settings(
        {
            "port": 0,
            "metrics_port": 0,
            "strict": True,
            "model_repo": str(broken_repo(tmp_path, embedded_repo)),
        }
    )
    with pytest.raises(ModelsFailedError, match="1 model\\(s\\) failed to load: bad"):
        create_server(settings)


async def test_drain_finishes_calls_in_flight(server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = server.service._engines["hyena-2d"]
    original = engine.conditioned
    started = asyncio.Event()
    release = threading.Event()  # the batches wait on the device until the drain has begun
    loop = asyncio.get_running_loop()

    def slow(*args: Any, **kwargs: Any) -> torch.Tensor:
        loop.call_soon_threadsafe(started.set)
        release.wait(timeout=30)
        return original(*args, **kwargs)

    monkeypatch.setattr(engine, "conditioned", slow)
    rng = np.random.default_rng(0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.KernelGeneratorStub(channel)
        requests = []
        for i in range(12):
            cond = rng.standard_normal((1 + i % 3, 384)).astype("<f4")
            tensor = pb.Tensor(shape=cond.shape, dtype=pb.DTYPE_FLOAT32, data=cond.tobytes())
            requests.append(pb.GenerateKernelRequest(model="hyena-2d", seq_lens=[4, 4], conditioning=tensor))
        calls = [asyncio.ensure_future(stub.GenerateKernel(r)) for r in requests]
        await started.wait()  # a batch is on the device
        registry = server.service.metrics.registry
        while registry.get_sample_value("kernelgen_inflight_requests") < len(calls):
            await asyncio.sleep(0.01)  # every call has reached the server: all are in flight
        stopping = asyncio.ensure_future(server.stop(grace=10))
        await asyncio.sleep(0.05)
        assert server.service.draining
        release.set()
        replies = await asyncio.gather(*calls)  # none lost
        await stopping
    for request, reply in zip(requests, replies, strict=True):
        assert reply.kernel.shape[0] == request.conditioning.shape[0]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pb_grpc.KernelGeneratorStub(channel).GenerateKernel(
                pb.GenerateKernelRequest(model="long-1d", seq_lens=[3]), timeout=2
            )
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
