"""What the dynamic batcher is told and tells: its policy, outcomes and observer.

Kept apart from ``batcher`` so that settings, metrics and tests can name these
types without the scheduler.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, NamedTuple, Protocol, TypeVar

__all__ = [
    "BatchItem",
    "BatchOutOfMemory",
    "BatchOutcome",
    "BatchPolicy",
    "BatcherObserver",
    "NullBatcherObserver",
    "PendingCounts",
]

R = TypeVar("R")


class BatchItem(Protocol):
    """What the batcher needs of an item: its rows (batch size counts them) and its output bytes."""

    @property
    def rows(self) -> int: ...

    @property
    def nbytes(self) -> int: ...


class BatchOutOfMemory(MemoryError):
    """A batch function's way of saying its batch did not fit the device: a smaller one may."""


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    """How requests are gathered into batches.

    - ``max_batch_size``: conditioning rows per batch; 1 turns batching off.
    - ``max_queue_delay_s``: longest a request waits for company; 0 = never wait.
    - ``max_queue_size``: requests waiting (all buckets together) before
      ``submit`` refuses with ``QueueFull``.
    - ``max_batch_bytes``: output bytes of one batch.
    """

    max_batch_size: int = 32
    max_queue_delay_s: float = 0.0
    max_queue_size: int = 1024
    max_batch_bytes: int = 512 * 1024 * 1024

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue_size", "max_batch_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BatchPolicy.{name} must be an integer >= 1, got {value!r}")
        delay = self.max_queue_delay_s
        if isinstance(delay, bool) or not isinstance(delay, int | float) or not 0 <= delay < math.inf:
            raise ValueError(f"BatchPolicy.max_queue_delay_s must be finite and >= 0, got {delay!r}")


@dataclass(frozen=True, slots=True)
class BatchOutcome(Generic[R]):
    """One request's result and how it was served."""

    result: R
    batch_rows: int  # rows of the batch that computed it
    batch_requests: int  # requests in that batch
    queue_s: float  # accepted -> its batch started (first attempt)
    compute_s: float  # run_batch time of that batch


class PendingCounts(NamedTuple):
    queued: int  # accepted, waiting for a batch
    running: int  # in the batch being computed

    @property
    def total(self) -> int:
        return self.queued + self.running


class BatcherObserver(Protocol):
    """Metrics sink (the service binds Prometheus to it). Callbacks run on the
    event loop, synchronously, and must not block. The bodies are no-ops, which
    ``NullBatcherObserver`` inherits."""

    def on_batch(self, key: Hashable, rows: int, requests: int, compute_s: float) -> None:
        """A ``run_batch`` call returned results."""
        return None

    def on_queue_time(self, key: Hashable, seconds: float) -> None:
        """A request left the queue for a batch after waiting ``seconds``."""
        return None

    def on_queue_depth(self, key: Hashable, depth: int) -> None:
        """Requests waiting in the bucket of ``key``; a gauge update."""
        return None

    def on_oom_split(self, key: Hashable, rows: int) -> None:
        """A batch of ``rows`` ran out of memory and was split in halves."""
        return None

    def on_dropped(self, key: Hashable, reason: str) -> None:
        """A request left the queue uncomputed: "expired", "cancelled" or "draining"."""
        return None


class NullBatcherObserver(BatcherObserver):
    """The default observer: records nothing."""
