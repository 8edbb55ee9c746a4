"""Load-test step runners on a fake client: counting, warm-up, open-loop schedule and bounds."""

from __future__ import annotations

import asyncio
import itertools
import random
import statistics
from collections import Counter
from typing import Any

import grpc
import numpy as np
import pytest

from kernelgen_client.errors import Unavailable
from kernelgen_client.results import KernelResult, ServerReport
from kernelgen_loadtest.correctness import Reservoir
from kernelgen_loadtest.runner import Progress, StepPlan, StepRunner, schedule
from kernelgen_loadtest.workload import ModelMix, ModelTarget, ResolvedWorkload, RowRange, Workload

RESOLVED = ResolvedWorkload(
    Workload(models=(ModelMix("m"),), seq_lens=((2, 2),), rows=RowRange(1, 2), unconditioned=0.3),
    (ModelTarget("m", 1.0, ((2, 2),), 4),),
)


class FakeClient:
    """Answers after ``latency`` seconds, or when ``gate`` opens; fails every ``fail_every``-th call."""

    def __init__(self, latency: float = 0.002, fail_every: int = 0, crash: bool = False) -> None:
        self.latency = latency
        self.fail_every = fail_every
        self.crash = crash
        self.gate: asyncio.Event | None = None
        self.calls = self.inflight = self.peak = 0
        self.representations: Counter[str] = Counter()

    async def generate(
        self,
        model: str,
        seq_lens: Any,
        conditioning: Any = None,
        *,
        dtype: str,
        with_report: bool,
        stream: Any,
        representation: str,
    ) -> KernelResult[Any]:
        assert with_report and model == "m" and tuple(seq_lens) == (2, 2) and dtype == "float32"
        self.representations[representation] += 1
        self.calls += 1
        number = self.calls
        self.inflight += 1
        self.peak = max(self.peak, self.inflight)
        try:
            if self.gate is not None:
                await self.gate.wait()
            else:
                await asyncio.sleep(self.latency)
        finally:
            self.inflight -= 1
        if self.crash:
            raise RuntimeError("decoder broke")
        if self.fail_every and number % self.fail_every == 0:
            raise Unavailable("server went away", code=grpc.StatusCode.UNAVAILABLE)
        rows = 1 if conditioning is None else len(conditioning)
        kernel = np.full((rows, 3, 3, 2), float(number), np.float32)
        report = ServerReport(conditioning is None, rows, 1, 0.5, 1.5, "hash")
        return KernelResult(kernel, None, report, "float32", memoryview(kernel.tobytes()), False, 1.0)


def plan(**kwargs: Any) -> StepPlan:
    defaults: dict[str, Any] = {"mode": "closed", "level": 3, "duration_s": 0.3, "warmup_s": 0.0}
    return StepPlan(**{**defaults, **kwargs})


async def test_closed_loop_keeps_n_in_flight_and_counts_every_send() -> None:
    client = FakeClient()
    progress = Progress()
    s = await StepRunner(client, RESOLVED).run(plan(level=3, warmup_s=0.1, keep=4), progress)
    assert client.peak == 3
    assert s.sent == s.scheduled == s.ok > 0 and not s.errors and s.dropped == 0
    assert client.calls > s.sent  # the warm-up calls were made but not counted
    assert progress.snapshot() == (s.sent, s.ok, 0, 0, 0)
    assert s.window_s == 0.3
    assert min(s.latencies_s) >= 0.002
    assert s.kernels >= s.ok and s.bytes == s.kernels * 3 * 3 * 2 * 4
    assert s.unconditioned > 0 and s.cache_hits == s.unconditioned
    assert len(s.batch_rows) == s.ok - s.cache_hits and set(s.batch_requests) == {1}
    assert len(s.kept) == 4 and len(s.cpu_util) == 1
    for kept in s.kept:
        assert kept.kernel.dtype == np.float32 and kept.content_hash == "hash"
        assert kept.kernel.shape[0] == (1 if kept.conditioning is None else len(kept.conditioning))


async def test_closed_loop_by_request_count() -> None:
    s = await StepRunner(FakeClient(), RESOLVED).run(plan(level=4, duration_s=None, requests=25))
    assert s.sent == s.ok == 25
    assert s.window_s > 0


async def test_errors_are_counted_by_code_with_an_example() -> None:
    s = await StepRunner(FakeClient(fail_every=3), RESOLVED).run(plan(duration_s=None, requests=30))
    assert s.sent == 30 and s.ok + s.errors["UNAVAILABLE"] == 30 and s.errors["UNAVAILABLE"] >= 9
    assert s.error_examples == {"UNAVAILABLE": "server went away"}
    crash = await StepRunner(FakeClient(crash=True), RESOLVED).run(plan(duration_s=None, requests=5))
    assert crash.errors == {"CLIENT_RuntimeError": 5} and crash.ok == 0


async def test_open_loop_sends_the_schedule_and_excludes_warm_up() -> None:
    client = FakeClient()
    step = plan(mode="open", level=100, duration_s=0.5, warmup_s=0.2, distribution="constant")
    s = await StepRunner(client, RESOLVED).run(step)
    # Offsets k/100 in [0.2, 0.7): 50 sends measured, the 20 before are warm-up.
    assert s.scheduled == s.sent == s.ok == 50 and client.calls == 70
    assert s.window_s >= 0.5


async def test_open_loop_by_request_count() -> None:
    step = plan(mode="open", level=200, duration_s=None, requests=40)
    s = await StepRunner(FakeClient(), RESOLVED).run(step)
    assert s.scheduled == s.sent == s.ok == 40


async def test_open_loop_drops_beyond_max_inflight() -> None:
    client = FakeClient()
    client.gate = asyncio.Event()
    progress = Progress()
    step = plan(mode="open", level=200, duration_s=0.1, max_inflight=3, distribution="constant")
    task = asyncio.create_task(StepRunner(client, RESOLVED).run(step, progress))
    while progress.sent + progress.dropped < 20:  # every send of the window is decided
        await asyncio.sleep(0.01)
    client.gate.set()
    s = await task
    assert client.peak == 3
    assert (s.scheduled, s.sent, s.dropped, s.ok) == (20, 3, 17, 3)


async def test_cancelling_a_step_cancels_its_calls() -> None:
    client = FakeClient()
    client.gate = asyncio.Event()  # never opens
    progress = Progress()
    task = asyncio.create_task(StepRunner(client, RESOLVED).run(plan(mode="open", level=100), progress))
    while progress.sent < 5:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0)
    assert client.inflight == 0


def test_schedules() -> None:
    constant = schedule(4.0, "constant", random.Random(0))
    assert [next(constant) for _ in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    poisson = schedule(50.0, "poisson", random.Random(1))
    offsets = [next(poisson) for _ in range(20001)]
    gaps = [b - a for a, b in itertools.pairwise(offsets)]
    assert offsets[0] == 0.0 and min(gaps) >= 0
    assert statistics.mean(gaps) == pytest.approx(1 / 50, rel=0.03)
    assert statistics.stdev(gaps) == pytest.approx(1 / 50, rel=0.05)  # exponential: sd = mean


def test_plan_validation_and_shares() -> None:
    for bad in (
        {"duration_s": None},
        {"requests": 5},
        {"level": 0},
        {"level": 2.5},
        {"warmup_s": -1},
        {"duration_s": 0},
        {"max_inflight": 0},
    ):
        with pytest.raises(ValueError, match=r"must|not both|a duration"):
            plan(**bad)
    closed = plan(level=5, duration_s=None, requests=11, keep=3)
    shares = [closed.share(i, 2) for i in range(2)]
    assert [(s.level, s.requests, s.keep) for s in shares if s] == [(3, 6, 2), (2, 5, 1)]
    assert [closed.share(i, 8) is None for i in range(8)] == [False] * 5 + [True] * 3
    opened = plan(mode="open", level=90.0, max_inflight=100).share(1, 3)
    assert opened is not None and opened.level == 30.0 and opened.max_inflight == 33


def test_reservoir_keeps_a_uniform_sample() -> None:
    hits = [0] * 10
    for seed in range(2000):
        reservoir: Reservoir[int] = Reservoir(2, seed=seed)
        for item in range(10):
            reservoir.offer(lambda item=item: item)  # type: ignore[misc]
        assert len(reservoir.items) == 2 and reservoir.seen == 10
        for item in reservoir.items:
            hits[item] += 1
    assert all(330 < h < 470 for h in hits)  # 400 expected for each
    built = []
    empty: Reservoir[int] = Reservoir(0)
    empty.offer(lambda: built.append(1) or 1)  # type: ignore[func-returns-value]
    assert empty.items == [] and built == []
