"""Unit tests for the dynamic batcher (pure asyncio, fake device).

No test asserts on wall-clock durations: "held" batches wait on an Event, and
"not flushed yet" is only checked where the delay is far too long to elapse.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernelgen_server import errors
from kernelgen_server.core.batcher import BatchOutcome, BatchOutOfMemory, BatchPolicy, DynamicBatcher

T = TypeVar("T")
Key = Hashable
Result = list[tuple[int, int]]

LONG = 60.0  # a delay no test ever waits out


@dataclass(frozen=True)
class Req:
    id: int
    rows: int = 1
    nbytes: int = 10


class FakeOOM(BatchOutOfMemory):
    """What a batch function raises for a batch the device could not hold."""


class Device:
    """A fake ``run_batch``: records every call; can be held on a gate and made to fail."""

    def __init__(self) -> None:
        self.batches: list[tuple[Key, list[Req]]] = []
        self.started = asyncio.Event()
        self.gate: asyncio.Event | None = None
        self.fail: Callable[[Key, list[Req]], BaseException | None] | None = None

    async def __call__(self, key: Key, items: list[Req]) -> list[Result]:
        self.batches.append((key, list(items)))
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None and (exc := self.fail(key, items)) is not None:
            raise exc
        return [expected(item) for item in items]

    def ids(self, key: Key | None = None) -> list[list[int]]:
        return [[r.id for r in items] for k, items in self.batches if key is None or k == key]


def expected(item: Req) -> Result:
    """The rows an item's caller must get back: its own, in order."""
    return [(item.id, row) for row in range(item.rows)]


@dataclass
class Recorder:
    batches: list[tuple[Key, int, int]] = field(default_factory=list)
    queue_times: list[float] = field(default_factory=list)
    depth: dict[Key, int] = field(default_factory=dict)
    splits: list[int] = field(default_factory=list)
    dropped: list[tuple[Key, str]] = field(default_factory=list)

    def on_batch(self, key: Key, rows: int, requests: int, compute_s: float) -> None:
        self.batches.append((key, rows, requests))

    def on_queue_time(self, key: Key, seconds: float) -> None:
        self.queue_times.append(seconds)

    def on_queue_depth(self, key: Key, depth: int) -> None:
        self.depth[key] = depth

    def on_oom_split(self, key: Key, rows: int) -> None:
        self.splits.append(rows)

    def on_dropped(self, key: Key, reason: str) -> None:
        self.dropped.append((key, reason))


def make(
    device: Device,
    *,
    max_batch_size: int = 8,
    max_queue_delay_s: float = 0.0,
    max_queue_size: int = 1000,
    max_batch_bytes: int = 10_000,
    **kwargs: Any,
) -> DynamicBatcher[Key, Req, Result]:
    policy = BatchPolicy(max_batch_size, max_queue_delay_s, max_queue_size, max_batch_bytes)
    return DynamicBatcher(device, policy, **kwargs)


async def within(aw: Awaitable[T], seconds: float = 5.0) -> T:
    """Guard against hangs only; never a timing assertion."""
    async with asyncio.timeout(seconds):
        return await aw


def spawn(
    batcher: DynamicBatcher[Key, Req, Result], key: Key, *items: Req, **kw: Any
) -> list[asyncio.Task[BatchOutcome[Result]]]:
    return [asyncio.create_task(batcher.submit(key, item, **kw)) for item in items]


async def hold(batcher: DynamicBatcher[Key, Req, Result], device: Device) -> asyncio.Task[Any]:
    """Start a batch that blocks the device until ``device.gate`` is set."""
    device.gate = asyncio.Event()
    [task] = spawn(batcher, "hold", Req(-1, rows=batcher.policy.max_batch_size))
    await within(device.started.wait())
    return task


class Ticker:
    """A clock that advances by one on every read: orderings without ties."""

    def __init__(self) -> None:
        self._count = itertools.count()

    def __call__(self) -> float:
        return float(next(self._count))


# -- policy -----------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_batch_size": 0},
        {"max_batch_size": True},
        {"max_batch_size": 2.0},
        {"max_queue_delay_s": -0.1},
        {"max_queue_delay_s": float("inf")},
        {"max_queue_delay_s": float("nan")},
        {"max_queue_size": 0},
        {"max_batch_bytes": 0},
    ],
)
def test_policy_rejects_invalid(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        BatchPolicy(**kwargs)


# -- flushing -----------------------------------------------------------------


async def test_flush_on_size() -> None:
    device = Device()
    batcher = make(device, max_batch_size=4, max_queue_delay_s=LONG)
    outcomes = await within(asyncio.gather(*spawn(batcher, "k", *map(Req, range(4)))))
    assert device.ids() == [[0, 1, 2, 3]]
    assert all((o.batch_rows, o.batch_requests) == (4, 4) for o in outcomes)

    waiting = spawn(batcher, "k", *map(Req, range(4, 7)))
    await asyncio.sleep(0.05)
    assert not any(t.done() for t in waiting)  # 3 rows < 4 and the delay is a minute
    waiting += spawn(batcher, "k", Req(7))
    await within(asyncio.gather(*waiting))
    assert device.ids() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    await within(batcher.close())


async def test_flush_on_delay() -> None:
    device = Device()
    batcher = make(device, max_batch_size=100, max_queue_delay_s=0.01)
    outcomes = await within(asyncio.gather(*spawn(batcher, "k", *map(Req, range(3)))))
    assert device.ids() == [[0, 1, 2]]
    assert [o.batch_rows for o in outcomes] == [3, 3, 3]
    assert all(o.queue_s >= 0 and o.compute_s >= 0 for o in outcomes)
    await within(batcher.close())


async def test_each_caller_gets_its_own_rows() -> None:
    device = Device()
    batcher = make(device, max_batch_size=10, max_queue_delay_s=LONG)
    items = [Req(0, rows=1), Req(1, rows=3), Req(2, rows=2), Req(3, rows=4)]
    outcomes = await within(asyncio.gather(*spawn(batcher, "k", *items)))
    assert [o.result for o in outcomes] == [expected(i) for i in items]
    assert all((o.batch_rows, o.batch_requests) == (10, 4) for o in outcomes)
    await within(batcher.close())


async def test_buckets_by_key_never_mixed() -> None:
    device = Device()
    batcher = make(device, max_batch_size=3, max_queue_delay_s=LONG)
    tasks = [
        task
        for i in range(9)
        for task in spawn(batcher, ("model", i % 3), Req(i))  # interleaved keys
    ]
    outcomes = await within(asyncio.gather(*tasks))
    assert sorted(device.ids()) == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]
    for key, items in device.batches:
        assert {r.id % 3 for r in items} == {key[1]}  # type: ignore[index]
    assert [o.result for o in outcomes] == [expected(Req(i)) for i in range(9)]


async def test_item_over_max_rows_runs_alone() -> None:
    device = Device()
    batcher = make(device, max_batch_size=4, max_queue_delay_s=0.01)
    items = [Req(0, rows=1), Req(1, rows=6), Req(2, rows=1)]
    outcomes = await within(asyncio.gather(*spawn(batcher, "k", *items)))
    assert device.ids() == [[0], [1], [2]]
    assert [o.result for o in outcomes] == [expected(i) for i in items]
    assert outcomes[1].batch_rows == 6


async def test_max_batch_bytes_splits_batches() -> None:
    device = Device()
    batcher = make(device, max_batch_size=10, max_batch_bytes=100, max_queue_delay_s=0.01)
    items = [Req(i, nbytes=40) for i in range(5)] + [Req(5, nbytes=150)]
    outcomes = await within(asyncio.gather(*spawn(batcher, "k", *items)))
    assert device.ids() == [[0, 1], [2, 3], [4], [5]]  # 150 B runs alone
    assert [o.result for o in outcomes] == [expected(i) for i in items]


async def test_batching_off_with_size_one() -> None:
    device = Device()
    batcher = make(device, max_batch_size=1, max_queue_delay_s=LONG)
    await within(asyncio.gather(*spawn(batcher, "k", *map(Req, range(3)))))
    assert device.ids() == [[0], [1], [2]]


# -- back-pressure, deadlines, cancellation -----------------------------------


async def test_queue_full_is_refused_at_once() -> None:
    device = Device()
    batcher = make(device, max_batch_size=1, max_queue_size=2)
    held = await hold(batcher, device)
    queued = spawn(batcher, "k", Req(0), Req(1))
    await asyncio.sleep(0)
    assert batcher.pending() == (2, 1)
    with pytest.raises(errors.QueueFull, match=r"limit of 2 \(set by --max-queue-size\)"):
        await batcher.submit("k", Req(2))
    assert device.gate is not None
    device.gate.set()
    await within(asyncio.gather(held, *queued))
    assert device.ids() == [[-1], [0], [1]]
    assert batcher.pending() == (0, 0)


async def test_deadline_already_passed_is_refused() -> None:
    device = Device()
    recorder = Recorder()
    batcher = make(device, observer=recorder)
    with pytest.raises(errors.DeadlineExceeded):
        await batcher.submit("k", Req(0), deadline=time.monotonic() - 1)
    assert device.batches == []
    assert recorder.dropped == [("k", "expired")]


async def test_deadline_expiring_in_queue_is_dropped_not_computed() -> None:
    now = [100.0]
    device = Device()
    recorder = Recorder()
    batcher = make(device, max_batch_size=1, clock=lambda: now[0], observer=recorder)
    held = await hold(batcher, device)
    [late] = spawn(batcher, "k", Req(0), deadline=105.0)
    [fine] = spawn(batcher, "k", Req(1), deadline=500.0)
    await asyncio.sleep(0)
    now[0] = 110.0
    assert device.gate is not None
    device.gate.set()
    with pytest.raises(errors.DeadlineExceeded):
        await within(late)
    assert (await within(fine)).result == expected(Req(1))
    await within(held)
    assert device.ids() == [[-1], [1]]
    assert recorder.dropped == [("k", "expired")]


async def test_cancelled_before_start_is_never_computed() -> None:
    device = Device()
    recorder = Recorder()
    batcher = make(device, max_batch_size=1, observer=recorder)
    held = await hold(batcher, device)
    [gone] = spawn(batcher, "k", Req(0))
    [kept] = spawn(batcher, "k", Req(1))
    await asyncio.sleep(0)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert batcher.pending() == (1, 1)
    assert device.gate is not None
    device.gate.set()
    assert (await within(kept)).result == expected(Req(1))
    await within(held)
    assert device.ids() == [[-1], [1]]
    assert recorder.dropped == [("k", "cancelled")]


async def test_cancelled_after_start_batch_completes_for_others() -> None:
    device = Device()
    device.gate = asyncio.Event()
    batcher = make(device, max_batch_size=2)
    first, second = spawn(batcher, "k", Req(0), Req(1))
    await within(device.started.wait())
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    device.gate.set()
    outcome = await within(second)
    assert (outcome.result, outcome.batch_requests) == (expected(Req(1)), 2)
    assert device.ids() == [[0, 1]]


# -- failures -----------------------------------------------------------------


async def test_exception_fails_only_its_own_batch() -> None:
    device = Device()
    device.fail = lambda key, items: ValueError("bad batch") if key == "bad" else None
    batcher = make(device, max_batch_size=2, max_queue_delay_s=0.01)
    bad = spawn(batcher, "bad", Req(0), Req(1))
    good = spawn(batcher, "good", Req(2), Req(3))
    results = await within(asyncio.gather(*bad, *good, return_exceptions=True))
    assert all(isinstance(r, ValueError) for r in results[:2])
    assert [r.result for r in results[2:]] == [expected(Req(2)), expected(Req(3))]  # type: ignore[union-attr]
    # A failing batch does not poison the next batch of the same key.
    device.fail = lambda key, items: ValueError("x") if any(r.id == 4 for r in items) else None
    poisoned = spawn(batcher, "k", Req(4), Req(5))
    healthy = spawn(batcher, "k", Req(6), Req(7))
    results = await within(asyncio.gather(*poisoned, *healthy, return_exceptions=True))
    assert [type(r) for r in results[:2]] == [ValueError, ValueError]
    assert [r.result for r in results[2:]] == [expected(Req(6)), expected(Req(7))]  # type: ignore[union-attr]


async def test_wrong_result_count_fails_the_batch() -> None:
    async def short(key: Key, items: list[Req]) -> list[Result]:
        return []

    policy = BatchPolicy(max_batch_size=2, max_queue_delay_s=0.0)
    batcher: DynamicBatcher[Key, Req, Result] = DynamicBatcher(short, policy)
    with pytest.raises(RuntimeError, match="0 results for 1 items"):
        await within(batcher.submit("k", Req(0)))


async def test_oom_splits_in_halves_and_retries() -> None:
    device = Device()
    device.fail = lambda key, items: FakeOOM("out of memory") if len(items) > 2 else None
    recorder = Recorder()
    batcher = make(
        device,
        max_batch_size=8,
        max_queue_delay_s=LONG,
        observer=recorder,
    )
    items = [Req(i) for i in range(8)]
    outcomes = await within(asyncio.gather(*spawn(batcher, "k", *items)))
    assert [o.result for o in outcomes] == [expected(i) for i in items]
    assert [len(b) for b in device.ids()] == [8, 4, 2, 2, 4, 2, 2]
    assert recorder.splits == [8, 4, 4]
    assert all((o.batch_rows, o.batch_requests) == (2, 2) for o in outcomes)
    assert recorder.batches == [("k", 2, 2)] * 4


async def test_oom_of_a_single_item_fails_just_it() -> None:
    device = Device()
    device.fail = lambda key, items: FakeOOM("oom") if any(r.id == 3 for r in items) else None
    recorder = Recorder()
    batcher = make(
        device,
        max_batch_size=4,
        max_queue_delay_s=LONG,
        observer=recorder,
    )
    results = await within(asyncio.gather(*spawn(batcher, "k", *map(Req, range(4))), return_exceptions=True))
    assert isinstance(results[3], FakeOOM)
    assert [r.result for r in results[:3]] == [expected(Req(i)) for i in range(3)]  # type: ignore[union-attr]
    assert device.ids() == [[0, 1, 2, 3], [0, 1], [2, 3], [2], [3]]
    assert recorder.splits == [4, 2]


@pytest.mark.parametrize("error", [ValueError("nope"), RuntimeError("CUDA out of memory")])
async def test_non_oom_error_is_not_split(error: Exception) -> None:
    """Only ``BatchOutOfMemory`` splits a batch: the batch function says what an OOM is."""
    device = Device()
    device.fail = lambda key, items: error
    batcher = make(device, max_batch_size=2, max_queue_delay_s=LONG)
    results = await within(asyncio.gather(*spawn(batcher, "k", Req(0), Req(1)), return_exceptions=True))
    assert all(r is error for r in results)
    assert device.ids() == [[0, 1]]


async def test_computation_cancelled_below_fails_only_its_batch() -> None:
    device = Device()
    device.fail = lambda key, items: asyncio.CancelledError() if key == "x" else None
    batcher = make(device, max_batch_size=1)
    with pytest.raises(errors.Cancelled):
        await within(batcher.submit("x", Req(0)))
    assert (await within(batcher.submit("y", Req(1)))).result == expected(Req(1))
    assert batcher.pending() == (0, 0)


# -- scheduling ---------------------------------------------------------------


async def test_ready_buckets_take_turns() -> None:
    device = Device()
    batcher = make(device, max_batch_size=1, clock=Ticker())
    held = await hold(batcher, device)
    a = spawn(batcher, "a", *map(Req, range(4)))
    b = spawn(batcher, "b", Req(10))
    await asyncio.sleep(0)
    assert device.gate is not None
    device.gate.set()
    await within(asyncio.gather(held, *a, *b))
    # "a" was ready first, but after its batch it queues behind "b".
    assert device.ids() == [[-1], [0], [10], [1], [2], [3]]


async def test_observer_sees_batches_queue_and_depth() -> None:
    device = Device()
    recorder = Recorder()
    batcher = make(device, max_batch_size=3, max_queue_delay_s=LONG, observer=recorder)
    await within(asyncio.gather(*spawn(batcher, "k", Req(0), Req(1, rows=2))))
    assert recorder.batches == [("k", 3, 2)]
    assert len(recorder.queue_times) == 2
    assert all(t >= 0 for t in recorder.queue_times)
    assert recorder.depth == {"k": 0}
    assert recorder.dropped == []


# -- shutdown -----------------------------------------------------------------


async def test_close_drain_finishes_queued_and_refuses_new() -> None:
    device = Device()
    batcher = make(device, max_batch_size=4, max_queue_delay_s=LONG)
    held = await hold(batcher, device)
    queued = spawn(batcher, "k", *map(Req, range(3)))
    await asyncio.sleep(0)
    closing = asyncio.create_task(batcher.close(drain=True))
    await asyncio.sleep(0)
    with pytest.raises(errors.ServerDraining):
        await batcher.submit("k", Req(9))
    assert device.gate is not None
    device.gate.set()
    await within(closing)
    outcomes = await within(asyncio.gather(held, *queued))
    assert [o.result for o in outcomes[1:]] == [expected(Req(i)) for i in range(3)]
    assert device.ids() == [[-1], [0, 1, 2]]  # queued work ran without waiting the delay
    assert batcher.pending() == (0, 0)


async def test_close_without_drain_fails_queued() -> None:
    device = Device()
    recorder = Recorder()
    batcher = make(device, max_batch_size=4, max_queue_delay_s=LONG, observer=recorder)
    held = await hold(batcher, device)
    queued = spawn(batcher, "k", *map(Req, range(3)))
    await asyncio.sleep(0)
    closing = asyncio.create_task(batcher.close(drain=False))
    await asyncio.sleep(0)
    assert device.gate is not None
    device.gate.set()
    await within(closing)
    assert (await within(held)).result == expected(Req(-1, rows=4))  # the running batch completes
    results = await within(asyncio.gather(*queued, return_exceptions=True))
    assert all(isinstance(r, errors.ServerDraining) for r in results)
    assert device.ids() == [[-1]]
    assert recorder.dropped == [("k", "draining")] * 3


async def test_cancelled_drain_then_close_without_drain() -> None:
    device = Device()
    batcher = make(device, max_batch_size=1)
    held = await hold(batcher, device)
    queued = spawn(batcher, "k", Req(0), Req(1))
    await asyncio.sleep(0)
    draining = asyncio.create_task(batcher.close(drain=True))
    await asyncio.sleep(0)
    draining.cancel()  # e.g. the grace period ran out
    with pytest.raises(asyncio.CancelledError):
        await draining
    stopping = asyncio.create_task(batcher.close(drain=False))
    await asyncio.sleep(0)
    results = await within(asyncio.gather(*queued, return_exceptions=True))
    assert all(isinstance(r, errors.ServerDraining) for r in results)
    assert device.gate is not None
    device.gate.set()
    await within(stopping)
    assert (await within(held)).batch_requests == 1
    assert device.ids() == [[-1]]


async def test_close_idle_batcher() -> None:
    batcher = make(Device())
    await within(batcher.close())
    with pytest.raises(errors.ServerDraining):
        await batcher.submit("k", Req(0))


async def test_stopped_scheduler_fails_running_and_queued_with_draining() -> None:
    device = Device()
    batcher = make(device, max_batch_size=1)
    held = await hold(batcher, device)
    queued = spawn(batcher, "k", Req(0))
    await asyncio.sleep(0)
    scheduler = batcher._scheduler  # as when the event loop shuts down under it
    assert scheduler is not None
    scheduler.cancel()
    results = await within(asyncio.gather(held, *queued, return_exceptions=True))
    assert all(isinstance(r, errors.ServerDraining) for r in results)
    assert batcher.pending() == (0, 0)
    with pytest.raises(errors.ServerDraining):
        await batcher.submit("k", Req(1))
    await within(batcher.close())  # returns quietly


async def test_item_without_rows_is_a_caller_bug() -> None:
    batcher = make(Device())
    with pytest.raises(ValueError, match="rows >= 1"):
        await batcher.submit("k", Req(0, rows=0))
    assert batcher.pending() == (0, 0)


# -- property -----------------------------------------------------------------

_requests = st.lists(
    st.tuples(
        st.integers(0, 2),  # key
        st.integers(1, 6),  # rows
        st.integers(1, 60),  # output bytes
        st.booleans(),  # yield to the loop after submitting
    ),
    min_size=1,
    max_size=30,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    requests=_requests,
    max_batch_size=st.integers(1, 5),
    max_batch_bytes=st.integers(20, 120),
    delay=st.sampled_from([0.0, 0.001]),
)
def test_every_submit_gets_its_own_result_within_limits(
    requests: list[tuple[int, int, int, bool]],
    max_batch_size: int,
    max_batch_bytes: int,
    delay: float,
) -> None:
    async def scenario() -> None:
        device = Device()
        batcher = make(
            device,
            max_batch_size=max_batch_size,
            max_batch_bytes=max_batch_bytes,
            max_queue_delay_s=delay,
        )
        tasks = []
        for i, (key, rows, nbytes, pause) in enumerate(requests):
            tasks += spawn(batcher, key, Req(i, rows=rows, nbytes=nbytes))
            if pause:
                await asyncio.sleep(0)
        outcomes = await within(asyncio.gather(*tasks))
        await within(batcher.close())

        computed = sorted(r.id for _, items in device.batches for r in items)
        assert computed == list(range(len(requests)))  # each exactly once
        batch_of = {r.id: items for _, items in device.batches for r in items}
        for i, ((_, rows, _, _), outcome) in enumerate(zip(requests, outcomes, strict=True)):
            assert outcome.result == expected(Req(i, rows=rows))
            assert outcome.batch_rows == sum(r.rows for r in batch_of[i])
            assert outcome.batch_requests == len(batch_of[i])
        for batch_key, items in device.batches:
            assert {requests[r.id][0] for r in items} == {batch_key}
            if len(items) > 1:
                assert sum(r.rows for r in items) <= max_batch_size
                assert sum(r.nbytes for r in items) <= max_batch_bytes

    asyncio.run(scenario())
