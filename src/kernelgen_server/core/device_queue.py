"""One device thread with two classes of work: small requests first, bulk slices between them.

Every tensor operation of a device runs on its one thread, so the device sees
one ordered stream. Work comes in two classes:

- **interactive**: batches of conditioned requests, cache misses, grids,
  warm-up: what a caller is waiting on as a whole;
- **bulk**: the tiles of large streamed kernels, each a bounded slice of
  device time.

The thread always takes the oldest waiting interactive job first, and a bulk
job only when no interactive job waits; within a class, jobs run in
submission order. A stream submits its next tile only once its previous one
is done, so streams take turns, and a small request waits at most for the
one tile in progress. ``shutdown`` runs whatever was queued before it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["BULK", "INTERACTIVE", "DeviceQueue"]

T = TypeVar("T")

INTERACTIVE, BULK = 0, 1
_STOP = 2  # after everything queued before it


class DeviceQueue:
    """A single worker thread taking interactive jobs before bulk ones."""

    def __init__(self, name: str, initializer: Callable[[], None] | None = None) -> None:
        self._jobs: queue.PriorityQueue[tuple[int, int, Any, Any]] = queue.PriorityQueue()
        self._order = itertools.count()
        self._initializer = initializer
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], T], priority: int = INTERACTIVE) -> asyncio.Future[T]:
        """Run ``fn`` on the thread; cancelling the returned future before it starts skips it."""
        if priority not in (INTERACTIVE, BULK):
            raise ValueError(f"unknown priority {priority}")
        job: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._jobs.put((priority, next(self._order), fn, job))
        return asyncio.wrap_future(job)

    def shutdown(self) -> None:
        """Run the jobs queued so far, then stop the thread; returns once it has."""
        self._jobs.put((_STOP, next(self._order), None, None))
        self._thread.join()

    def _run(self) -> None:
        if self._initializer is not None:
            self._initializer()
        while True:
            _priority, _order, fn, job = self._jobs.get()
            if fn is None:
                return
            if not job.set_running_or_notify_cancel():
                continue  # its caller went away before it started
            try:
                result = fn()
            except BaseException as exc:
                job.set_exception(exc)
            else:
                job.set_result(result)
