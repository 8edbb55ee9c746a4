"""Every status code of the contract (docs/architecture.md, "Status codes"), and that a bad call harms
no other."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from kernelgen_wire.v1 import kernelgen_pb2 as pb
from kernelgen_wire.v1 import kernelgen_pb2_grpc as pb_grpc

from support import run_server

Code = grpc.StatusCode


@pytest.fixture
async def stub(server: Any) -> AsyncIterator[pb_grpc.KernelGeneratorStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.KernelGeneratorStub(channel)


def cond(rows: int, width: int, fill: float | None = None) -> pb.Tensor:
    array = np.random.default_rng(0).standard_normal((rows, width)).astype("<f4")
    if fill is not None:
        array[0, 0] = fill
    return pb.Tensor(shape=[rows, width], dtype=pb.DTYPE_FLOAT32, data=array.tobytes())


async def expect(call: Any, code: grpc.StatusCode, match: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() == code, err.value.details()
    assert match in (err.value.details() or ""), err.value.details()
    return err.value


def trailer(err: grpc.aio.AioRpcError, key: str) -> str | None:
    return dict(err.trailing_metadata() or ()).get(key)


@pytest.mark.parametrize(
    ("request_", "match"),
    [
        (pb.GenerateKernelRequest(model="hyena-2d", seq_lens=[15]), "seq_lens needs 2 entries, got 1"),
        (pb.GenerateKernelRequest(model="hyena-2d", seq_lens=[15, 15, 15]), "seq_lens needs 2 entries"),
        (pb.GenerateKernelRequest(model="hyena-2d", seq_lens=[0, 15]), "seq_lens must all be >= 1"),
        (pb.GenerateKernelRequest(model="hyena-2d", seq_lens=[-3, 15]), "seq_lens must all be >= 1"),
        (
            pb.GenerateKernelRequest(model="hyena-2d", seq_lens=[5, 5], conditioning=cond(2, 100)),
            "takes conditioning of width 384, got 100",
        ),
        (
            pb.GenerateKernelRequest(model="hyena-2d", seq_lens=[5, 5], conditioning=cond(2, 384, np.nan)),
            "NaN or Inf",
        ),
        (
            pb.GenerateKernelRequest(model="hyena-2d", seq_lens=[5, 5], conditioning=cond(1, 384, np.inf)),
            "NaN or Inf",
        ),
        (
            pb.GenerateKernelRequest(
                model="hyena-2d", seq_lens=[5, 5], conditioning=pb.Tensor(shape=[2, 384], data=b"\0" * 12)
            ),
            "needs 3072 bytes",
        ),
        (pb.GenerateKernelRequest(model="hyena-2d", seq_lens=[5, 5], dtype=7), "dtype 7 is not supported"),
        (pb.GenerateKernelRequest(model="", seq_lens=[5, 5]), "model name is empty"),
    ],
)
async def test_invalid_argument(stub: Any, request_: pb.GenerateKernelRequest, match: str) -> None:
    err = await expect(stub.GenerateKernel(request_), Code.INVALID_ARGUMENT, match)
    assert trailer(err, "kernelgen-reason") == "invalid-argument"
    # The streaming call validates the same way.
    await expect(_drain(stub.StreamKernel(request_)), Code.INVALID_ARGUMENT, match)


async def _drain(stream: Any) -> None:
    async for _ in stream:
        pass


async def test_not_found(stub: Any) -> None:
    await expect(
        stub.GenerateKernel(pb.GenerateKernelRequest(model="nope", seq_lens=[3])),
        Code.NOT_FOUND,
        "unknown model 'nope'",
    )
    await expect(stub.FlopCount(pb.FlopCountRequest(model="nope", seq_lens=[3])), Code.NOT_FOUND, "nope")
    await expect(stub.GetModel(pb.GetModelRequest(model="nope")), Code.NOT_FOUND, "nope")


async def test_failed_precondition_for_conditioning_without_film(stub: Any) -> None:
    request = pb.GenerateKernelRequest(model="long-1d", seq_lens=[10], conditioning=cond(1, 4))
    err = await expect(stub.GenerateKernel(request), Code.FAILED_PRECONDITION, "has no FiLM generator")
    assert trailer(err, "kernelgen-reason") == "no-film"


async def test_failed_precondition_for_a_model_that_failed_to_load(
    tmp_path: Path, embedded_repo: Path
) -> None:
    import shutil

    shutil.copytree(embedded_repo / "long-1d", tmp_path / "good")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    async with run_server(model_repo=str(tmp_path)) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.KernelGeneratorStub(channel)
            await expect(
                stub.GenerateKernel(pb.GenerateKernelRequest(model="broken", seq_lens=[3])),
                Code.FAILED_PRECONDITION,
                "not ready",
            )
            reply = await stub.GenerateKernel(pb.GenerateKernelRequest(model="good", seq_lens=[3]))
            assert list(reply.kernel.shape) == [1, 5, 256]
            info = await stub.GetModel(pb.GetModelRequest(model="broken"))
            assert not info.ready
            assert "config.json" in info.reason


async def test_resource_exhausted_for_sizes(stub: Any) -> None:
    big = pb.GenerateKernelRequest(model="long-1d", seq_lens=[8192])  # 16.8 MB > 4 MiB unary limit
    err = await expect(stub.GenerateKernel(big), Code.RESOURCE_EXHAUSTED, "16776192 bytes")
    assert "4194304" in (err.details() or "")
    assert "set by --max-message-bytes" in (err.details() or "")
    assert trailer(err, "kernelgen-reason") == "message-too-large"  # the client streams it instead
    assert trailer(err, "grpc-retry-pushback-ms") == "-1"  # never retried
    huge = pb.GenerateKernelRequest(model="volume-3d", seq_lens=[300, 300, 300])
    await expect(
        _drain(stub.StreamKernel(huge)),
        Code.RESOURCE_EXHAUSTED,
        "a grid for seq_lens [300, 300, 300] would be 214921799 points, over the server's limit of 16777216 "
        "points (set by --max-grid-points)",
    )


async def test_resource_exhausted_for_kernel_bytes() -> None:
    async with run_server(max_kernel_bytes="8MiB", max_message_bytes="4MiB") as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.KernelGeneratorStub(channel)
            request = pb.GenerateKernelRequest(model="long-1d", seq_lens=[9000])
            await expect(
                _drain(stub.StreamKernel(request)),
                Code.RESOURCE_EXHAUSTED,
                "the kernel would be 18430976 bytes, over the server's limit of 8388608 bytes "
                "(set by --max-kernel-bytes)",
            )


async def test_resource_exhausted_when_the_queue_is_full(monkeypatch: pytest.MonkeyPatch) -> None:
    async with run_server(max_queue_size=1, max_queue_delay_ms=0, max_batch_size=1) as server:
        engine = server.service._engines["hyena-2d"]
        original = engine.conditioned

        def slow(*args: Any, **kwargs: Any) -> torch.Tensor:
            time.sleep(0.5)
            return original(*args, **kwargs)

        monkeypatch.setattr(engine, "conditioned", slow)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.KernelGeneratorStub(channel)
            request = pb.GenerateKernelRequest(model="hyena-2d", seq_lens=[3, 3], conditioning=cond(1, 384))
            running = asyncio.ensure_future(stub.GenerateKernel(request))
            await asyncio.sleep(0.2)  # the first is computing, the queue is empty
            waiting = asyncio.ensure_future(stub.GenerateKernel(request))
            await asyncio.sleep(0.1)  # the second waits in the queue, which is now full
            err = await expect(stub.GenerateKernel(request), Code.RESOURCE_EXHAUSTED, "queue")
            assert trailer(err, "kernelgen-reason") == "queue-full"
            assert int(trailer(err, "grpc-retry-pushback-ms") or "0") > 0
            # The accepted ones are not lost.
            assert len((await running).kernel.data) == 25 * 384 * 4
            assert len((await waiting).kernel.data) == 25 * 384 * 4


async def test_resource_exhausted_for_too_many_rows() -> None:
    async with run_server(max_conditioning_rows=4) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.KernelGeneratorStub(channel)
            request = pb.GenerateKernelRequest(model="hyena-2d", seq_lens=[3, 3], conditioning=cond(5, 384))
            await expect(stub.GenerateKernel(request), Code.RESOURCE_EXHAUSTED, "5 conditioning rows")


async def test_deadline_exceeded(server: Any, stub: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = server.service._engines["long-1d"]
    original = engine.unconditioned

    def slow(*args: Any, **kwargs: Any) -> torch.Tensor:
        time.sleep(0.5)
        return original(*args, **kwargs)

    monkeypatch.setattr(engine, "unconditioned", slow)
    request = pb.GenerateKernelRequest(model="long-1d", seq_lens=[50])
    await expect(stub.GenerateKernel(request, timeout=0.1), Code.DEADLINE_EXCEEDED, "")


async def test_cancelled(server: Any, stub: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = server.service._engines["hyena-2d"]
    original = engine.conditioned

    def slow(*args: Any, **kwargs: Any) -> torch.Tensor:
        time.sleep(0.3)
        return original(*args, **kwargs)

    monkeypatch.setattr(engine, "conditioned", slow)
    call = stub.GenerateKernel(
        pb.GenerateKernelRequest(model="hyena-2d", seq_lens=[3, 3], conditioning=cond(1, 384))
    )
    await asyncio.sleep(0.1)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert await call.code() == Code.CANCELLED
    labels = {"model": "hyena-2d", "method": "GenerateKernel", "code": "CANCELLED"}
    for _ in range(50):  # the server notices the cancellation asynchronously
        if server.service.metrics.registry.get_sample_value("kernelgen_requests_total", labels):
            break
        await asyncio.sleep(0.05)
    assert server.service.metrics.registry.get_sample_value("kernelgen_requests_total", labels) == 1.0


async def test_unavailable_while_draining(server: Any, stub: Any) -> None:
    server.service.draining = True
    err = await expect(
        stub.GenerateKernel(pb.GenerateKernelRequest(model="long-1d", seq_lens=[3])),
        Code.UNAVAILABLE,
        "shutting down",
    )
    assert trailer(err, "kernelgen-reason") == "draining"


async def test_internal_error_is_generic(
    server: Any, stub: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    engine = server.service._engines["long-1d"]

    def broken(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError("secret detail /srv/models/x")

    monkeypatch.setattr(engine, "unconditioned", broken)
    err = await expect(
        stub.GenerateKernel(pb.GenerateKernelRequest(model="long-1d", seq_lens=[3])),
        Code.INTERNAL,
        "internal server error",
    )
    assert "secret" not in (err.details() or "")
    assert "secret detail" in caplog.text  # the log has it


async def test_a_bad_request_harms_no_other(server: Any, stub: Any) -> None:
    good = pb.GenerateKernelRequest(model="hyena-2d", seq_lens=[4, 4], conditioning=cond(2, 384))
    bad = pb.GenerateKernelRequest(model="hyena-2d", seq_lens=[4, 4], conditioning=cond(2, 384, np.nan))
    results = await asyncio.gather(*(stub.GenerateKernel(r) for r in [good, bad] * 8), return_exceptions=True)
    oks = [r for r in results if isinstance(r, pb.GenerateKernelResponse)]
    errors = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(oks) == 8
    assert all(e.code() == Code.INVALID_ARGUMENT for e in errors)
    assert len(errors) == 8
    assert len({r.kernel.data for r in oks}) == 1  # identical conditioning, identical kernels
