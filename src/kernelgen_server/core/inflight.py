"""The server's budget of response bytes in flight.

Every response holds memory until gRPC has sent it: a unary kernel's bytes
(cached or not: gRPC keeps its own copy until the peer takes it), a streamed
kernel's whole bytes, or a tiled stream's few tiles. Each call reserves what
it may hold before any work starts and returns it when the call ends, so the
memory responses hold stays bounded however many clients ask and however
slowly they read. A call that does not fit gets ``MemoryFull`` (retryable,
with pushback) instead of growing the process; one that could never fit gets
``KernelTooLarge``.

Used from the event loop thread only.
"""

from __future__ import annotations

from collections.abc import Callable

from kernelgen_server.errors import KernelTooLarge, MemoryFull
from kernelgen_server.settings import flag

__all__ = ["InflightBudget", "Reservation"]


class Reservation:
    """Bytes taken from a budget; ``release`` returns them, once however often it is called."""

    def __init__(self, budget: InflightBudget, nbytes: int) -> None:
        self._budget: InflightBudget | None = budget
        self.nbytes = nbytes

    def release(self) -> None:
        budget, self._budget = self._budget, None
        if budget is not None:
            budget._return(self.nbytes)

    @property
    def released(self) -> bool:
        return self._budget is None


class InflightBudget:
    """At most ``limit`` bytes reserved at once; ``observe(used)`` hears every change."""

    def __init__(self, limit: int, observe: Callable[[int], None] | None = None) -> None:
        if limit < 1:
            raise ValueError(f"an in-flight budget needs a positive limit, got {limit}")
        self.limit = limit
        self.used = 0
        self._observe = observe or (lambda used: None)

    def reserve(self, nbytes: int, what: str = "the response") -> Reservation:
        if nbytes > self.limit:
            raise KernelTooLarge(
                f"{what} would hold {nbytes} bytes, over the server's in-flight limit of {self.limit} "
                f"bytes (set by {flag('max_inflight_bytes')})"
            )
        if self.used + nbytes > self.limit:
            raise MemoryFull(
                f"the server holds {self.used} of its {self.limit} bytes of responses in flight; "
                f"{what} needs {nbytes} more: retry shortly"
            )
        self.used += nbytes
        self._observe(self.used)
        return Reservation(self, nbytes)

    def _return(self, nbytes: int) -> None:
        self.used -= nbytes
        self._observe(self.used)
