"""Unit tests for the byte-bounded single-flight LRU cache (pure asyncio)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from kernelgen_server.core.cache import ByteLRUCache, CacheStats


@dataclass(frozen=True)
class Blob:
    tag: str
    nbytes: int


@dataclass
class Recorder:
    hits: int = 0
    misses: int = 0
    evicted: list[int] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)

    def on_hit(self) -> None:
        self.hits += 1

    def on_miss(self) -> None:
        self.misses += 1

    def on_eviction(self, nbytes: int) -> None:
        self.evicted.append(nbytes)

    def on_bytes(self, total_bytes: int, entries: int) -> None:
        self.sizes.append((total_bytes, entries))


class Counter:
    """A compute function factory that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def of(self, tag: str, nbytes: int) -> Callable[[], Awaitable[Blob]]:
        async def compute() -> Blob:
            self.calls += 1
            return Blob(tag, nbytes)

        return compute


async def test_hit_does_no_compute() -> None:
    cache: ByteLRUCache[str, Blob] = ByteLRUCache(100)
    counter = Counter()
    first, hit1 = await cache.get_or_compute("k", counter.of("a", 10))
    second, hit2 = await cache.get_or_compute("k", counter.of("b", 10))
    assert (hit1, hit2) == (False, True)
    assert first is second
    assert counter.calls == 1
    assert "k" in cache
    assert len(cache) == 1
    assert cache.stats() == CacheStats(
        entries=1, bytes=10, max_bytes=100, hits=1, misses=1, computations=1, evictions=0
    )


async def test_concurrent_misses_compute_once() -> None:
    cache: ByteLRUCache[tuple[str, int], Blob] = ByteLRUCache(1000)
    release = asyncio.Event()
    calls = 0

    async def slow() -> Blob:
        nonlocal calls
        calls += 1
        await release.wait()
        return Blob("v", 8)

    tasks = [asyncio.create_task(cache.get_or_compute(("m", 3), slow)) for _ in range(20)]
    await asyncio.sleep(0)
    release.set()
    results = await asyncio.gather(*tasks)
    assert calls == 1
    assert all(value is results[0][0] for value, _ in results)
    assert all(hit is False for _, hit in results)
    stats = cache.stats()
    assert (stats.misses, stats.computations, stats.hits) == (20, 1, 0)


async def test_failure_reaches_every_waiter_and_is_not_cached() -> None:
    cache: ByteLRUCache[str, Blob] = ByteLRUCache(1000)
    release = asyncio.Event()
    calls = 0

    async def failing() -> Blob:
        nonlocal calls
        calls += 1
        await release.wait()
        raise ValueError("boom")

    tasks = [asyncio.create_task(cache.get_or_compute("k", failing)) for _ in range(5)]
    await asyncio.sleep(0)
    release.set()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    assert calls == 1
    assert all(isinstance(o, ValueError) and str(o) == "boom" for o in outcomes)
    assert "k" not in cache
    assert cache.stats().bytes == 0
    # The next lookup computes afresh.
    counter = Counter()
    value, hit = await cache.get_or_compute("k", counter.of("ok", 4))
    assert (value.tag, hit, counter.calls) == ("ok", False, 1)


async def test_cancelling_first_waiter_leaves_computation_running() -> None:
    cache: ByteLRUCache[str, Blob] = ByteLRUCache(1000)
    release = asyncio.Event()
    calls = 0

    async def slow() -> Blob:
        nonlocal calls
        calls += 1
        await release.wait()
        return Blob("v", 8)

    first = asyncio.create_task(cache.get_or_compute("k", slow))
    await asyncio.sleep(0)
    others = [asyncio.create_task(cache.get_or_compute("k", slow)) for _ in range(3)]
    await asyncio.sleep(0)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    release.set()
    results = await asyncio.gather(*others)
    assert calls == 1
    assert [v.tag for v, _ in results] == ["v", "v", "v"]
    assert "k" in cache


async def test_all_waiters_cancelled_still_stores() -> None:
    cache: ByteLRUCache[str, Blob] = ByteLRUCache(1000)
    release = asyncio.Event()
    done = asyncio.Event()

    async def slow() -> Blob:
        await release.wait()
        done.set()
        return Blob("v", 8)

    waiter = asyncio.create_task(cache.get_or_compute("k", slow))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    release.set()
    await done.wait()
    await asyncio.sleep(0)
    counter = Counter()
    value, hit = await cache.get_or_compute("k", counter.of("other", 1))
    assert (value.tag, hit, counter.calls) == ("v", True, 0)


async def test_byte_bound_evicts_least_recently_used() -> None:
    recorder = Recorder()
    cache: ByteLRUCache[str, Blob] = ByteLRUCache(100, observer=recorder)
    counter = Counter()
    await cache.get_or_compute("a", counter.of("a", 40))
    await cache.get_or_compute("b", counter.of("b", 40))
    await cache.get_or_compute("a", counter.of("a", 40))  # touch: b is now the LRU
    await cache.get_or_compute("c", counter.of("c", 30))  # 110 > 100: evict b
    assert "b" not in cache
    assert "a" in cache
    assert "c" in cache
    assert cache.stats().bytes == 70
    await cache.get_or_compute("d", counter.of("d", 90))  # evicts a (LRU), then c
    assert [k for k in "abcd" if k in cache] == ["d"]
    assert recorder.evicted == [40, 40, 30]
    stats = cache.stats()
    assert (stats.entries, stats.bytes, stats.evictions) == (1, 90, 3)
    assert counter.calls == 4


async def test_contains_does_not_touch_lru_order() -> None:
    cache: ByteLRUCache[str, Blob] = ByteLRUCache(100)
    counter = Counter()
    await cache.get_or_compute("a", counter.of("a", 50))
    await cache.get_or_compute("b", counter.of("b", 50))
    assert "a" in cache
    await cache.get_or_compute("c", counter.of("c", 50))
    assert "a" not in cache
    assert "b" in cache


async def test_oversize_value_returned_not_cached() -> None:
    cache: ByteLRUCache[str, Blob] = ByteLRUCache(100)
    counter = Counter()
    await cache.get_or_compute("small", counter.of("s", 60))
    value, hit = await cache.get_or_compute("big", counter.of("big", 101))
    assert (value.tag, value.nbytes, hit) == ("big", 101, False)
    assert "big" not in cache
    assert "small" in cache  # nothing was evicted for a value that cannot fit
    await cache.get_or_compute("big", counter.of("big", 101))
    assert counter.calls == 3


async def test_value_of_exactly_the_budget_is_cached() -> None:
    cache: ByteLRUCache[str, Blob] = ByteLRUCache(100)
    counter = Counter()
    await cache.get_or_compute("a", counter.of("a", 100))
    assert "a" in cache
    assert cache.stats().bytes == 100


async def test_zero_budget_disables_caching() -> None:
    recorder = Recorder()
    cache: ByteLRUCache[str, Blob] = ByteLRUCache(0, observer=recorder)
    counter = Counter()
    for _ in range(3):
        _, hit = await cache.get_or_compute("k", counter.of("v", 0))
        assert hit is False
    assert counter.calls == 3
    assert len(cache) == 0
    assert recorder.sizes == []


async def test_observer_sees_hits_misses_and_bytes() -> None:
    recorder = Recorder()
    cache: ByteLRUCache[str, Blob] = ByteLRUCache(50, observer=recorder)
    counter = Counter()
    await cache.get_or_compute("a", counter.of("a", 30))
    await cache.get_or_compute("a", counter.of("a", 30))
    await cache.get_or_compute("b", counter.of("b", 30))
    assert (recorder.hits, recorder.misses) == (1, 2)
    assert recorder.evicted == [30]
    assert recorder.sizes == [(30, 1), (30, 1)]
    cache.clear()
    assert recorder.sizes[-1] == (0, 0)


async def test_clear_drops_entries_and_inflight_results() -> None:
    cache: ByteLRUCache[str, Blob] = ByteLRUCache(100)
    counter = Counter()
    await cache.get_or_compute("a", counter.of("a", 10))
    release = asyncio.Event()

    async def slow() -> Blob:
        await release.wait()
        return Blob("late", 10)

    waiter = asyncio.create_task(cache.get_or_compute("b", slow))
    await asyncio.sleep(0)
    cache.clear()
    assert len(cache) == 0
    assert "a" not in cache
    release.set()
    value, _ = await waiter
    assert value.tag == "late"  # the waiter still gets its value...
    assert "b" not in cache  # ...but a pre-clear computation does not store
    stats = cache.stats()
    assert (stats.entries, stats.bytes) == (0, 0)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "10"])
def test_rejects_bad_budget(bad: object) -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        ByteLRUCache(bad)  # type: ignore[arg-type]
