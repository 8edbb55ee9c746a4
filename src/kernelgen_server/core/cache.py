"""Byte-bounded LRU cache of encoded unconditioned kernels, with single-flight misses.

An unconditioned kernel depends only on (model, seq_lens, dtype), so the
service computes and encodes it once and serves the bytes from here. The
bound is total bytes, never an entry count: one 3D kernel can weigh as much as
a thousand small 1D ones.

Concurrent misses for one key share one computation (single flight). The
computation runs as its own task, so cancelling any waiter, the first one
included, never cancels it for the others. Pure asyncio: no gRPC, no torch;
metrics reach the outside through an injected observer.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

__all__ = [
    "ByteLRUCache",
    "CacheObserver",
    "CacheStats",
    "NullCacheObserver",
    "SizedValue",
]


class SizedValue(Protocol):
    """A cacheable value: it knows what it weighs."""

    @property
    def nbytes(self) -> int: ...


K = TypeVar("K", bound=Hashable)
V = TypeVar("V", bound=SizedValue)


class CacheObserver(Protocol):
    """Metrics sink; the service binds Prometheus counters and gauges to it.

    Callbacks run synchronously on the event loop and must not block.
    """

    def on_hit(self) -> None:
        """A lookup was served from a stored entry."""

    def on_miss(self) -> None:
        """A lookup found no stored entry (it started or joined a computation)."""

    def on_eviction(self, nbytes: int) -> None:
        """One entry of ``nbytes`` bytes was evicted to make room."""

    def on_bytes(self, total_bytes: int, entries: int) -> None:
        """The stored total changed; a gauge update."""


class NullCacheObserver:
    """The default observer: records nothing."""

    def on_hit(self) -> None:
        pass

    def on_miss(self) -> None:
        pass

    def on_eviction(self, nbytes: int) -> None:
        pass

    def on_bytes(self, total_bytes: int, entries: int) -> None:
        pass


@dataclass(frozen=True, slots=True)
class CacheStats:
    """A snapshot of the cache's counters.

    ``misses`` counts every lookup not served from a stored entry;
    ``computations`` counts the computations actually started, so
    ``misses - computations`` is the number of lookups that joined one in flight.
    """

    entries: int
    bytes: int
    max_bytes: int
    hits: int
    misses: int
    computations: int
    evictions: int


class ByteLRUCache(Generic[K, V]):
    """LRU cache bounded by the total ``nbytes`` of its values.

    Invariants (between awaits):
    - ``_bytes == sum(v.nbytes for v in _entries.values()) <= _max_bytes``;
    - ``_entries`` is ordered least- to most-recently used;
    - a key is in ``_inflight`` only while its computation task is running,
      and never in ``_inflight`` and ``_entries`` at once;
    - every computation task is referenced from ``_tasks`` until it is done;
    - ``max_bytes == 0`` stores nothing (concurrent misses are still coalesced).
    """

    def __init__(self, max_bytes: int, *, observer: CacheObserver | None = None) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be an integer >= 0, got {max_bytes!r}")
        self._max_bytes = max_bytes
        self._observer: CacheObserver = observer if observer is not None else NullCacheObserver()
        self._entries: OrderedDict[K, V] = OrderedDict()
        self._bytes = 0
        self._inflight: dict[K, asyncio.Task[V]] = {}
        self._tasks: set[asyncio.Task[V]] = set()
        # Bumped by clear(): a computation started before a clear() does not store.
        self._generation = 0
        self._hits = 0
        self._misses = 0
        self._computations = 0
        self._evictions = 0

    @property
    def max_bytes(self) -> int:
        return self._max_bytes

    async def get_or_compute(self, key: K, compute: Callable[[], Awaitable[V]]) -> tuple[V, bool]:
        """Return ``(value, hit)``; on a miss, compute it once for all concurrent callers.

        ``hit`` is True only when the value came from a stored entry. If the
        computation raises, every caller waiting on it gets the exception and
        nothing is stored. Cancelling this caller leaves the computation
        running for the others (and it still stores its value).
        """
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
            self._hits += 1
            self._observer.on_hit()
            return value, True

        self._misses += 1
        self._observer.on_miss()
        task = self._inflight.get(key)
        if task is None:
            self._computations += 1
            task = asyncio.get_running_loop().create_task(self._compute(key, compute, self._generation))
            self._inflight[key] = task
            self._tasks.add(task)
            task.add_done_callback(self._task_done)
        # shield(): a cancelled waiter stops waiting; the task runs on.
        return await asyncio.shield(task), False

    async def _compute(self, key: K, compute: Callable[[], Awaitable[V]], generation: int) -> V:
        try:
            value = await compute()
        finally:
            # Synchronous from here to the store below: no caller can observe
            # the key neither in flight nor stored after a successful compute.
            if self._inflight.get(key) is asyncio.current_task():
                del self._inflight[key]
        if generation == self._generation:
            self._store(key, value)
        return value

    def _store(self, key: K, value: V) -> None:
        nbytes = value.nbytes
        if nbytes < 0:
            raise ValueError(f"cache value reports negative nbytes ({nbytes})")
        if self._max_bytes == 0 or nbytes > self._max_bytes:
            return  # returned to its callers, never stored
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old.nbytes
        while self._bytes + nbytes > self._max_bytes:
            _, victim = self._entries.popitem(last=False)
            self._bytes -= victim.nbytes
            self._evictions += 1
            self._observer.on_eviction(victim.nbytes)
        self._entries[key] = value
        self._bytes += nbytes
        self._observer.on_bytes(self._bytes, len(self._entries))

    def _task_done(self, task: asyncio.Task[V]) -> None:
        self._tasks.discard(task)
        # Retrieve the outcome even when every waiter has gone, so a failure
        # nobody awaited is not logged as "never retrieved".
        if not task.cancelled():
            task.exception()

    def smallest_stored(self, matching: Callable[[K], bool]) -> V | None:
        """The stored value of fewest bytes whose key ``matching`` accepts, or None.

        Counts as a use of that entry (it moves to the most-recently-used end), not
        as a hit or a miss. Scans every entry: for the miss path, not the hit path.
        """
        found: tuple[K, V] | None = None
        for key, value in self._entries.items():
            if matching(key) and (found is None or value.nbytes < found[1].nbytes):
                found = key, value
        if found is None:
            return None
        self._entries.move_to_end(found[0])
        return found[1]

    def stats(self) -> CacheStats:
        return CacheStats(
            entries=len(self._entries),
            bytes=self._bytes,
            max_bytes=self._max_bytes,
            hits=self._hits,
            misses=self._misses,
            computations=self._computations,
            evictions=self._evictions,
        )

    def clear(self) -> None:
        """Drop every stored entry. Computations in flight finish for their
        waiters but do not store their result. Counters are kept."""
        self._entries.clear()
        self._bytes = 0
        self._generation += 1
        self._inflight.clear()
        self._observer.on_bytes(0, 0)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        """True if ``key`` is stored (not merely in flight); does not touch the LRU order."""
        return key in self._entries
