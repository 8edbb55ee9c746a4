"""What the serving core answers with: a kernel, a group's kernels, a FLOP count.

These types sit below every module of the core (the service, the batch stage,
streaming) and the transports that read them, so that none of those imports
another to learn a result's shape.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kernelgen_server.core.inflight import Reservation
from kernelgen_server.repository.store import ModelGroup
from kernelgen_wire.kernel_messages import EncodedKernel, Payload
from kernelgen_wire.v1 import kernelgen_pb2 as pb

__all__ = ["Encoder", "FlopSummary", "GeneratedGroup", "GeneratedKernel"]

#: Writes one computed kernel (or its factors, with the output head's hash; empty: dense) as the
#: message its caller sends. The core writes messages only through an encoder it is given: the
#: service's own (whose messages its cache keeps), or one a call brings for its protocol.
Encoder = Callable[[Payload, str], EncodedKernel]


def _nothing() -> None:
    pass


@dataclass(frozen=True)
class GeneratedKernel:
    """One kernel as the service made it: its encoded message, the grid if asked, the report.

    ``reservation`` holds the response's bytes in the server's in-flight budget until
    ``release()`` (the servicer calls it when the call ends; dropping the result does too).
    A group's members have none of their own: the group's reservation holds them all.
    """

    kernel: EncodedKernel
    grid: Payload | None
    report: pb.ServerReport
    reservation: Reservation | None = None

    @property
    def nbytes(self) -> int:
        return self.kernel.nbytes + (0 if self.grid is None else self.grid.nbytes)

    def release(self) -> None:
        if self.reservation is not None:
            self.reservation.release()

    @property
    def releaser(self) -> Callable[[], None]:
        """``release`` without the kernel: what a call's done callback may hold.

        A gRPC call's context, and the done callbacks it holds, can outlive the call
        until the garbage collector frees it; a callback holding this result would keep
        the response's bytes alive as long, and the process's memory would swing by
        hundreds of MB between collections.
        """
        return self.reservation.release if self.reservation is not None else _nothing


@dataclass(frozen=True)
class GeneratedGroup:
    """A group's kernels as the service made them, in the group's member order.

    ``reservation`` holds all their bytes in the in-flight budget until ``release()``.
    """

    group: ModelGroup
    kernels: tuple[GeneratedKernel, ...]
    reservation: Reservation | None = None

    @property
    def nbytes(self) -> int:
        return sum(kernel.nbytes for kernel in self.kernels)

    def release(self) -> None:
        if self.reservation is not None:
            self.reservation.release()


@dataclass(frozen=True)
class FlopSummary:
    """What ``FlopCount`` answers: the reference count, the grid's size and the kernel's."""

    flops: int
    grid_points: int
    kernel_bytes: int
    cacheable: bool
