"""``AsyncKernelClient`` against real in-process servers: concurrency, streaming, round robin."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
import torch

from kernelgen_client import AsyncKernelClient, HealthStatus, KernelResult, ModelNotFound

from support import run_server


def calls(server: Any, model: str, method: str, code: str = "OK") -> float:
    labels = {"model": model, "method": method, "code": code}
    return server.service.metrics.registry.get_sample_value("kernelgen_requests_total", labels) or 0.0


def reference(server: Any, model: str, seq_lens: list[int], conditioning: np.ndarray) -> np.ndarray:
    module = server.repository.ready[model].module
    with torch.no_grad():
        kernel, _grid = module(seq_lens, torch.from_numpy(conditioning))
    return kernel.numpy()


async def test_one_hundred_concurrent_calls(server: Any) -> None:
    rows = np.random.default_rng(3).standard_normal((100, 384)).astype(np.float32)
    async with AsyncKernelClient(f"127.0.0.1:{server.port}", timeout=60) as client:
        results = await asyncio.gather(
            *(client.generate("hyena-2d", [5, 5], rows[i], with_report=True) for i in range(100))
        )
    expected = reference(server, "hyena-2d", [5, 5], rows)
    scale = np.abs(expected).max()
    for i, result in enumerate(results):
        assert isinstance(result, KernelResult)
        assert result.kernel.shape == (1, 9, 9, 384)
        assert np.abs(result.kernel[0] - expected[i]).max() <= 1e-4 * scale
        assert 1 <= result.report.batch_requests <= result.report.batch_size
    assert calls(server, "hyena-2d", "GenerateKernel") == 100


async def test_async_streaming_torch_and_metadata(server: Any) -> None:
    async with AsyncKernelClient(f"127.0.0.1:{server.port}") as client:
        await client.wait_ready(timeout=10)
        result = await client.generate("long-1d", [4000], as_torch=True, with_report=True)
        assert result.streamed
        assert result.kernel.shape == (1, 7999, 256)
        assert result.kernel.dtype == torch.float32
        kernel, grid = await client.generate("long-1d", [4000], return_grid=True, dtype="bfloat16")
        assert kernel.dtype == np.float32  # bfloat16 widened for numpy
        assert grid.shape == (1, 7999, 1)
        assert np.abs(kernel - result.kernel.numpy()).max() <= 1e-2 * np.abs(kernel).max()
        assert [m.name for m in await client.list_models()] == ["hyena-2d", "long-1d", "volume-3d"]
        info = await client.get_model("volume-3d")
        assert info.config is not None
        assert info.config.cond_dim == 16
        report = await client.flop_count("volume-3d", [4, 8, 8])
        assert report.flops == server.repository.ready["volume-3d"].module.flop_count([4, 8, 8])
        assert await client.health() is HealthStatus.SERVING
        assert await client.health("nope") is HealthStatus.SERVICE_UNKNOWN
        with pytest.raises(ModelNotFound):
            await client.generate("nope", [3])


async def test_cancelling_a_task_cancels_the_call(server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = server.service._engines["long-1d"]
    original = engine.unconditioned

    def slow(*args: Any, **kwargs: Any) -> Any:
        import time

        time.sleep(0.3)
        return original(*args, **kwargs)

    monkeypatch.setattr(engine, "unconditioned", slow)
    async with AsyncKernelClient(f"127.0.0.1:{server.port}") as client:
        await client.get_model("long-1d")  # cached: the call below goes straight to GenerateKernel
        task = asyncio.ensure_future(client.generate("long-1d", [77]))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The client stays usable.
        assert (await client.generate("long-1d", [3])).shape == (1, 5, 256)


@pytest.mark.parametrize("form", ["list", "comma-separated"])
async def test_round_robin_over_three_local_servers(form: str) -> None:
    async with (
        run_server(host="127.0.0.1") as one,
        run_server(host="127.0.0.2") as two,
        run_server(host="127.0.0.3") as three,
    ):
        servers = [one, two, three]
        addresses = [f"127.0.0.{i + 1}:{s.port}" for i, s in enumerate(servers)]
        target: Any = addresses if form == "list" else ",".join(addresses)
        async with AsyncKernelClient(target, timeout=10) as client:
            assert client.target == "ipv4:" + ",".join(addresses)
            for _ in range(200):
                await client.flop_count("hyena-2d", [5, 5])
                if all(calls(s, "hyena-2d", "FlopCount") > 0 for s in servers):
                    break
            counts = [calls(s, "hyena-2d", "FlopCount") for s in servers]
            assert all(count > 0 for count in counts), counts
            # Once all three are connected, calls rotate over them.
            before = counts
            await asyncio.gather(*(client.flop_count("hyena-2d", [5, 5]) for _ in range(30)))
            after = [calls(s, "hyena-2d", "FlopCount") for s in servers]
            assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)


async def test_dns_target_passes_through(server: Any) -> None:
    target = f"dns:///localhost:{server.port}"
    async with AsyncKernelClient(target, timeout=10) as client:
        assert client.target == target
        assert (await client.generate("long-1d", [3])).shape == (1, 5, 256)
