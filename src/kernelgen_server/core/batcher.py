"""Dynamic batcher for FiLM-conditioned requests: requests in, futures out.

Requests are grouped into buckets by key (the service uses (model, seq_lens,
dtype)); only requests of one bucket can share a device batch. A bucket is
ready when its rows reach ``max_batch_size`` (or its output bytes reach
``max_batch_bytes``), or when its oldest request has waited
``max_queue_delay_s``. One scheduler task takes ready buckets one at a time,
in the order they became ready, and awaits ``run_batch`` for each: batches
form one ordered stream for the device, and while one runs the others fill up.

Pure asyncio: no gRPC, no torch. Policy, clock and metrics are injected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Generic, TypeVar

from kernelgen_server import errors
from kernelgen_server.core.batch_policy import (
    BatcherObserver,
    BatchItem,
    BatchOutcome,
    BatchOutOfMemory,
    BatchPolicy,
    NullBatcherObserver,
    PendingCounts,
)
from kernelgen_server.settings import flag

__all__ = [
    "BatchItem",
    "BatchOutOfMemory",
    "BatchOutcome",
    "BatchPolicy",
    "BatcherObserver",
    "DynamicBatcher",
    "NullBatcherObserver",
    "PendingCounts",
]

_log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
I = TypeVar("I", bound=BatchItem)  # noqa: E741  (the item type)
R = TypeVar("R")


class _State(Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DROPPED = "dropped"


@dataclass(slots=True, eq=False)
class _Request(Generic[K, I, R]):
    bucket: _Bucket[K, I, R]
    item: I
    rows: int
    nbytes: int
    accepted: float  # on the injected clock
    deadline: float | None
    future: asyncio.Future[BatchOutcome[R]]
    state: _State = _State.QUEUED


@dataclass(slots=True, eq=False)
class _Bucket(Generic[K, I, R]):
    """Requests of one key, oldest first.

    Invariants: ``count``, ``rows`` and ``nbytes`` sum over its QUEUED requests
    only; ``queue`` may also hold DROPPED ones (removed lazily, skipped when a
    batch is taken); a bucket whose ``count`` falls to 0 leaves the batcher.
    """

    key: K
    queue: deque[_Request[K, I, R]] = field(default_factory=deque)
    count: int = 0
    rows: int = 0
    nbytes: int = 0
    full_at: float = -math.inf  # when it last became full (read only while full)
    last_run: float = -math.inf  # when a batch was last taken from it

    def oldest(self) -> _Request[K, I, R]:
        while self.queue[0].state is not _State.QUEUED:
            self.queue.popleft()
        return self.queue[0]


RunBatch = Callable[[K, list[I]], Awaitable[Sequence[R]]]


class DynamicBatcher(Generic[K, I, R]):
    """Groups ``submit``-ted items by key into batches for ``run_batch``, the one batch function
    it runs, given at construction.

    An item tells its rows and output bytes (``BatchItem``); ``run_batch`` returns
    one result per item, in order, and raises ``BatchOutOfMemory`` for a batch the
    device could not hold, which is then split in halves and retried.

    Invariants (between awaits):
    - ``_queued`` == number of QUEUED requests == sum of bucket counts
      <= ``policy.max_queue_size``;
    - at most one ``run_batch`` call is in flight (the scheduler awaits it);
    - a batch holds items of one key only, and exceeds ``max_batch_size`` rows
      or ``max_batch_bytes`` only when it is a single item;
    - every accepted request's future is resolved once: its result, its
      batch's exception, DeadlineExceeded or ServerDraining, unless its caller
      cancelled it first.
    """

    def __init__(
        self,
        run_batch: RunBatch[K, I, R],
        policy: BatchPolicy,
        *,
        clock: Callable[[], float] = time.monotonic,
        observer: BatcherObserver | None = None,
    ) -> None:
        self._run_batch = run_batch
        self._policy = policy
        self._clock = clock
        self._observer = observer if observer is not None else NullBatcherObserver()
        self._buckets: dict[K, _Bucket[K, I, R]] = {}
        self._queued = 0
        self._running = 0
        self._closing = False
        self._wakeup = asyncio.Event()
        self._scheduler: asyncio.Task[None] | None = None

    @property
    def policy(self) -> BatchPolicy:
        return self._policy

    def pending(self) -> PendingCounts:
        return PendingCounts(self._queued, self._running)

    async def submit(self, key: K, item: I, *, deadline: float | None = None) -> BatchOutcome[R]:
        """Queue ``item`` under ``key`` and wait for its batch's result.

        Raises ``QueueFull`` at once when the queue is at its bound,
        ``ServerDraining`` once ``close()`` began, ``DeadlineExceeded`` when
        ``deadline`` (on the injected clock) passes before its batch starts,
        or whatever ``run_batch`` raised for its batch. Cancelling the caller
        before the batch starts removes the item; it is never computed.
        """
        if self._closing:
            raise errors.ServerDraining("the server is draining and accepts no new requests")
        limit = self._policy.max_queue_size
        if self._queued >= limit:
            raise errors.QueueFull(
                f"the batch queue is full: {self._queued} requests waiting, the server's limit of "
                f"{limit} (set by {flag('max_queue_size')}); retry shortly"
            )
        now = self._clock()
        if deadline is not None and deadline <= now:
            self._observer.on_dropped(key, "expired")
            raise errors.DeadlineExceeded("the deadline expired before the request was queued")
        rows, nbytes = item.rows, item.nbytes
        if rows < 1 or nbytes < 0:
            raise ValueError(f"an item needs rows >= 1 and bytes >= 0, got {rows}, {nbytes}")

        loop = asyncio.get_running_loop()
        if self._scheduler is None:
            self._scheduler = loop.create_task(self._schedule(), name="kernelgen-batcher")
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(key)
        was_full = self._is_full(bucket)
        request = _Request(bucket, item, rows, nbytes, now, deadline, loop.create_future())
        bucket.queue.append(request)
        bucket.count += 1
        bucket.rows += rows
        bucket.nbytes += nbytes
        if not was_full and self._is_full(bucket):
            bucket.full_at = now
        self._queued += 1
        self._observer.on_queue_depth(key, bucket.count)
        self._wakeup.set()
        try:
            return await request.future
        except asyncio.CancelledError:
            if request.state is _State.QUEUED:
                self._drop(request, "cancelled", None)
            raise

    async def close(self, drain: bool = True) -> None:
        """Stop accepting; finish queued work (``drain``) or fail it with ServerDraining.

        A batch already running always completes. Safe to call again, e.g.
        ``close(drain=False)`` after a ``close()`` that took too long.
        """
        self._closing = True
        if not drain:
            self._drop_all_queued("the server is shutting down")
        self._wakeup.set()
        if self._scheduler is not None:
            # wait(), not await: a cancelled close() leaves the scheduler running,
            # and a scheduler cancelled under us does not make close() raise.
            await asyncio.wait([self._scheduler])

    # -- queue bookkeeping (synchronous: no await may split these updates) --

    def _is_full(self, bucket: _Bucket[K, I, R]) -> bool:
        p = self._policy
        return bucket.rows >= p.max_batch_size or bucket.nbytes >= p.max_batch_bytes

    def _unqueue(self, request: _Request[K, I, R], state: _State) -> None:
        """Take a QUEUED request out of the counts (a dropped one stays in the deque)."""
        bucket = request.bucket
        request.state = state
        bucket.count -= 1
        bucket.rows -= request.rows
        bucket.nbytes -= request.nbytes
        self._queued -= 1
        if bucket.count == 0 and self._buckets.get(bucket.key) is bucket:
            del self._buckets[bucket.key]
        self._observer.on_queue_depth(bucket.key, bucket.count)

    def _drop(self, request: _Request[K, I, R], reason: str, exc: BaseException | None) -> None:
        self._unqueue(request, _State.DROPPED)
        if exc is not None and not request.future.done():
            request.future.set_exception(exc)
        self._observer.on_dropped(request.bucket.key, reason)

    def _drop_all_queued(self, message: str) -> None:
        for bucket in list(self._buckets.values()):
            for request in bucket.queue:
                if request.state is _State.QUEUED:
                    self._drop(request, "draining", errors.ServerDraining(message))

    # -- scheduling -------------------------------------------------------

    def _ready_at(self, bucket: _Bucket[K, I, R]) -> float:
        """When the bucket became (or will become) ready, on the injected clock.

        Never earlier than its last batch: a bucket that just ran goes behind
        every bucket that was already ready, so none starves.
        """
        oldest = bucket.oldest()
        if self._closing:
            since = oldest.accepted
        elif self._is_full(bucket):
            since = bucket.full_at
        else:
            since = oldest.accepted + self._policy.max_queue_delay_s
        return max(since, bucket.last_run)

    def _next_bucket(self) -> tuple[_Bucket[K, I, R] | None, float | None]:
        """The ready bucket that became ready first, else how long until one may be."""
        now = self._clock()
        best: _Bucket[K, I, R] | None = None
        best_at = math.inf
        wait: float | None = None
        for bucket in self._buckets.values():
            at = self._ready_at(bucket)
            if at > now:
                wait = at - now if wait is None else min(wait, at - now)
            elif at < best_at:  # strict: on a tie the older bucket (dict order) wins
                best, best_at = bucket, at
        return best, wait

    def _take_batch(self, bucket: _Bucket[K, I, R]) -> list[_Request[K, I, R]]:
        """Pop the oldest live requests of ``bucket`` that fit the limits.

        The first live request is always taken, so an item over a limit runs
        alone. Requests whose deadline passed are failed here, never computed.
        """
        p = self._policy
        now = self._clock()
        bucket.last_run = now
        batch: list[_Request[K, I, R]] = []
        rows = nbytes = 0
        while bucket.queue and rows < p.max_batch_size:
            request = bucket.queue[0]
            if request.state is not _State.QUEUED:
                bucket.queue.popleft()
                continue
            if request.deadline is not None and request.deadline <= now:
                bucket.queue.popleft()
                expired = errors.DeadlineExceeded("the deadline expired while the request was queued")
                self._drop(request, "expired", expired)
                continue
            if batch and (
                rows + request.rows > p.max_batch_size or nbytes + request.nbytes > p.max_batch_bytes
            ):
                break
            bucket.queue.popleft()
            self._unqueue(request, _State.RUNNING)
            batch.append(request)
            rows += request.rows
            nbytes += request.nbytes
            self._observer.on_queue_time(bucket.key, now - request.accepted)
        if self._is_full(bucket):
            bucket.full_at = now  # still full: ready again, but behind the others
        return batch

    async def _schedule(self) -> None:
        """The one scheduler task: wait for a ready bucket, run its batch, repeat."""
        try:
            while True:
                bucket, wait = self._next_bucket()
                if bucket is None:
                    if self._closing and self._queued == 0:
                        return
                    # No await since _next_bucket(): no submit can have slipped in unseen.
                    self._wakeup.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(wait):
                            await self._wakeup.wait()
                    continue
                batch = self._take_batch(bucket)
                if batch:  # empty when every candidate had expired
                    self._running = len(batch)
                    try:
                        await self._run(bucket.key, batch, self._clock())
                    except BaseException:  # the batcher is stopping under this batch
                        _fail(batch, errors.ServerDraining("the batcher stopped"))
                        raise
                    finally:
                        self._running = 0
        except asyncio.CancelledError:
            self._closing = True
            self._drop_all_queued("the batcher stopped")
            raise
        except Exception:  # a bug: log it, refuse new work, fail what waits
            _log.exception("the batch scheduler failed")
            self._closing = True
            self._drop_all_queued("the batcher stopped")

    async def _run(self, key: K, batch: list[_Request[K, I, R]], started: float) -> None:
        """Compute ``batch`` and resolve its futures; on OOM, split in halves and retry.

        ``started`` is when the first attempt began: queue time ends there.
        """
        start = self._clock()
        try:
            results = await self._run_batch(key, [r.item for r in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} items")
        except Exception as exc:
            if len(batch) > 1 and isinstance(exc, BatchOutOfMemory):
                self._observer.on_oom_split(key, sum(r.rows for r in batch))
                half = len(batch) // 2
                await self._run(key, batch[:half], started)
                await self._run(key, batch[half:], started)
            else:
                _fail(batch, exc)  # this batch's items only
            return
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the batcher itself is being stopped; _schedule fails the batch
            # Cancelled below us (e.g. the device thread shut down): fail this batch only.
            _fail(batch, errors.Cancelled("the computation was cancelled"))
            return
        compute_s = self._clock() - start
        rows = sum(r.rows for r in batch)
        self._observer.on_batch(key, rows, len(batch), compute_s)
        for request, result in zip(batch, results, strict=True):
            if not request.future.done():  # its caller may have cancelled meanwhile
                request.future.set_result(
                    BatchOutcome(result, rows, len(batch), started - request.accepted, compute_s)
                )


def _fail(batch: Sequence[_Request[K, I, R]], exc: BaseException) -> None:
    for request in batch:
        if not request.future.done():
            request.future.set_exception(exc)
