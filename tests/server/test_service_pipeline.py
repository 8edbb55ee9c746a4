"""Pipelined batches in the service core (no gRPC): a batch's encoding overlaps the next batch."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
import torch

from kernelgen_server.core.service import KernelService
from kernelgen_server.repository.store import ModelRepository
from kernelgen_wire.v1 import kernelgen_pb2 as pb

from support import assert_same_kernel, kernel_service

LENS = (6, 5)


@pytest.fixture
async def pipelined(embedded_models: ModelRepository) -> AsyncIterator[KernelService]:
    service = kernel_service(embedded_models, pipeline_batches=True, max_batch_size=1)
    yield service
    await service.close()


class Timeline:
    """When each batch's device stage began and each encoding ended (slowed down)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, service: KernelService, encode_s: float) -> None:
        self.lock = threading.Lock()
        self.computed: list[float] = []
        self.encoded: list[float] = []
        self.threads: set[str] = set()
        engine = service._engines["hyena-2d"]
        conditioned, encode = engine.conditioned, service._encoder

        def timed_conditioned(*args: Any, **kwargs: Any) -> torch.Tensor:
            with self.lock:
                self.computed.append(time.monotonic())
            return conditioned(*args, **kwargs)

        def slow_encode(payload: Any, *args: Any) -> Any:
            time.sleep(encode_s)
            with self.lock:
                self.encoded.append(time.monotonic())
                self.threads.add(threading.current_thread().name)
            return encode(payload, *args)

        monkeypatch.setattr(engine, "conditioned", timed_conditioned)
        monkeypatch.setattr(service, "_encoder", slow_encode)


def rows(seed: int, n: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 384)).astype(np.float32)


def kernel_of(result: Any) -> np.ndarray:
    data = np.frombuffer(result.kernel.payload.data, "<f4")
    return data.reshape(result.kernel.payload.shape)


async def test_next_batch_computes_while_the_previous_one_encodes(
    pipelined: KernelService, monkeypatch: pytest.MonkeyPatch
) -> None:
    timeline = Timeline(monkeypatch, pipelined, encode_s=0.2)
    conds = [rows(i) for i in range(3)]
    results = await asyncio.gather(
        *(pipelined.generate("hyena-2d", LENS, c, pb.DTYPE_FLOAT32, False) for c in conds)
    )
    assert len(timeline.computed) == 3
    # Batch 2's device stage began before batch 1's encoding was over: the stages overlapped.
    assert timeline.computed[1] < timeline.encoded[0]
    assert timeline.threads == {"kernelgen-host_0"}
    engine = pipelined._engines["hyena-2d"]
    for cond, result in zip(conds, results, strict=True):
        alone = engine.conditioned(LENS, [torch.from_numpy(cond)], torch.float32).numpy()
        np.testing.assert_array_equal(kernel_of(result), alone)
        assert result.report.batch_size == 1


async def test_unpipelined_service_encodes_on_the_device_thread(
    embedded_models: ModelRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = kernel_service(embedded_models, pipeline_batches=False, max_batch_size=1)
    try:
        timeline = Timeline(monkeypatch, service, encode_s=0.05)
        await asyncio.gather(
            *(service.generate("hyena-2d", LENS, rows(i), pb.DTYPE_FLOAT32, False) for i in range(3))
        )
        assert timeline.threads == {"kernelgen-device"}
        # One stage per batch: each batch computed only after the previous one was encoded.
        assert all(c > e for c, e in zip(timeline.computed[1:], timeline.encoded, strict=False))
    finally:
        await service.close()


@pytest.mark.parametrize("pipeline", [True, False])
async def test_batched_results_match_alone_either_way(
    embedded_models: ModelRepository, pipeline: bool
) -> None:
    service = kernel_service(embedded_models, pipeline_batches=pipeline, max_batch_size=16)
    try:
        conds = [rows(10 + i, n=1 + i % 3) for i in range(12)]
        results = await asyncio.gather(
            *(service.generate("hyena-2d", LENS, c, pb.DTYPE_FLOAT16, False) for c in conds)
        )
        engine = service._engines["hyena-2d"]
        for cond, result in zip(conds, results, strict=True):
            alone = engine.conditioned(LENS, [torch.from_numpy(cond)], torch.float16).numpy()
            got = np.frombuffer(result.kernel.payload.data, "<f2").reshape(alone.shape)
            assert_same_kernel(got, alone, bitwise=not engine.batched)
        assert max(r.report.batch_requests for r in results) > 1
    finally:
        await service.close()


async def test_an_encoding_error_fails_only_its_own_batch(
    pipelined: KernelService, monkeypatch: pytest.MonkeyPatch
) -> None:
    encode = pipelined._encoder
    poisoned = rows(99)

    def failing(payload: Any, *args: Any) -> Any:
        data = np.frombuffer(payload.data, "<f4")
        if data.size and np.array_equal(data[:4], first_values):
            raise RuntimeError("encoding failed (test)")
        return encode(payload, *args)

    engine = pipelined._engines["hyena-2d"]
    first_values = engine.conditioned(LENS, [torch.from_numpy(poisoned)], torch.float32).numpy().ravel()[:4]
    monkeypatch.setattr(pipelined, "_encoder", failing)
    outcomes = await asyncio.gather(
        *(
            pipelined.generate("hyena-2d", LENS, c, pb.DTYPE_FLOAT32, False)
            for c in (rows(1), poisoned, rows(2))
        ),
        return_exceptions=True,
    )
    assert isinstance(outcomes[1], RuntimeError)
    assert not isinstance(outcomes[0], BaseException)
    assert not isinstance(outcomes[2], BaseException)


async def test_close_waits_for_encodings_in_flight(
    embedded_models: ModelRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = kernel_service(embedded_models, pipeline_batches=True, max_batch_size=1)
    timeline = Timeline(monkeypatch, service, encode_s=0.1)
    calls = [
        asyncio.create_task(service.generate("hyena-2d", LENS, rows(i), pb.DTYPE_FLOAT32, False))
        for i in range(4)
    ]
    while not timeline.computed:  # the first batch is on the device
        await asyncio.sleep(0.005)
    await service.close(drain=True)
    results = await asyncio.gather(*calls)  # every accepted request was answered
    assert len(results) == 4
    assert len(timeline.encoded) == 4


async def test_a_caller_gone_during_encoding_harms_no_other(
    pipelined: KernelService, monkeypatch: pytest.MonkeyPatch
) -> None:
    timeline = Timeline(monkeypatch, pipelined, encode_s=0.15)
    calls = [
        asyncio.create_task(pipelined.generate("hyena-2d", LENS, rows(i), pb.DTYPE_FLOAT32, False))
        for i in range(3)
    ]
    while not timeline.computed:  # the first batch is on the device, then encodes for 0.15 s
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.05)
    calls[0].cancel()
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    assert isinstance(outcomes[0], asyncio.CancelledError)
    assert all(not isinstance(o, BaseException) for o in outcomes[1:])
    assert len(timeline.encoded) == 3  # its encoding still finished, and was dropped
