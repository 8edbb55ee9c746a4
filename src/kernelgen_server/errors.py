"""The server's one error hierarchy; each class carries its gRPC status code.

Core components (repository, cache, batcher, engine) raise these; the servicer
maps them to a status in one place (``KernelGenError.code``). Anything that is
not a ``KernelGenError`` is a bug and reaches the caller as INTERNAL with a
generic message, its details going to the log only.
"""

from __future__ import annotations

import grpc

from kernelgen_wire.metadata import Reason

__all__ = [
    "Cancelled",
    "ConditioningNotSupported",
    "DeadlineExceeded",
    "GroupNotModel",
    "InvalidRequest",
    "KernelGenError",
    "KernelTooLarge",
    "MemoryFull",
    "MessageTooLarge",
    "ModelNotFound",
    "ModelNotGroup",
    "ModelNotReady",
    "NotSupported",
    "Overloaded",
    "QueueFull",
    "RegionExists",
    "RegionNotFound",
    "ServerDraining",
    "SharedMemoryUnavailable",
    "SlowReader",
    "shorten",
]


def shorten(text: str, limit: int = 64) -> str:
    """``repr(text)``, cut to about ``limit`` characters: client-given strings go into messages and logs."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


class KernelGenError(Exception):
    """A failure the caller should see, with its status code and a readable message."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    #: Machine-readable tag sent in the ``kernelgen-reason`` trailer.
    reason: Reason = Reason.INTERNAL
    #: gRPC retry pushback: None sends none, a negative value forbids a retry,
    #: a positive value asks the client to retry after that many milliseconds.
    retry_pushback_ms: int | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(KernelGenError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = Reason.INVALID_ARGUMENT


class GroupNotModel(InvalidRequest):
    """A group's name where a model's is expected; the caller can ask for the group's kernels together."""

    reason = Reason.GROUP_NOT_MODEL


class ModelNotGroup(InvalidRequest):
    """A model's name where a group's is expected."""

    reason = Reason.MODEL_NOT_GROUP


class ModelNotFound(KernelGenError):
    code = grpc.StatusCode.NOT_FOUND
    reason = Reason.MODEL_NOT_FOUND


class ModelNotReady(KernelGenError):
    """The model exists in the repository but failed to load."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = Reason.MODEL_NOT_READY


class ConditioningNotSupported(KernelGenError):
    """Conditioning was sent to a model without a FiLM generator."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = Reason.NO_FILM


class Overloaded(KernelGenError):
    """Back-pressure: the server has no room for the request now; retryable after the pushback."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class QueueFull(Overloaded):
    """The batcher's queue is at its bound; retryable after a short pause."""

    reason = Reason.QUEUE_FULL
    retry_pushback_ms = 50


class MemoryFull(Overloaded):
    """The responses in flight hold the server's byte budget; retryable."""

    reason = Reason.MEMORY_FULL
    retry_pushback_ms = 100


class KernelTooLarge(KernelGenError):
    """The request is over a configured size limit; retrying cannot help."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = Reason.TOO_LARGE
    retry_pushback_ms = -1


class MessageTooLarge(KernelTooLarge):
    """A response over the one-message limit: the same kernel can be streamed in chunks."""

    reason = Reason.MESSAGE_TOO_LARGE


class DeadlineExceeded(KernelGenError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = Reason.DEADLINE_EXCEEDED


class SlowReader(DeadlineExceeded):
    """A stream's client took nothing for too long; the stream is given up."""

    reason = Reason.SLOW_READER


class Cancelled(KernelGenError):
    code = grpc.StatusCode.CANCELLED
    reason = Reason.CANCELLED


class ServerDraining(KernelGenError):
    """The server is shutting down and takes no new work."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = Reason.DRAINING


class SharedMemoryUnavailable(KernelGenError):
    """A shared-memory call on a server started without ``--shared-memory``."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = Reason.SHARED_MEMORY_OFF


class RegionNotFound(KernelGenError):
    """No shared-memory region of the name a request gave is registered."""

    code = grpc.StatusCode.NOT_FOUND
    reason = Reason.REGION_NOT_FOUND


class RegionExists(KernelGenError):
    """A shared-memory region of that name is registered already."""

    code = grpc.StatusCode.ALREADY_EXISTS
    reason = Reason.REGION_EXISTS


class NotSupported(KernelGenError):
    """A protocol feature this server does not offer (CUDA shared memory, unloading models)."""

    code = grpc.StatusCode.UNIMPLEMENTED
    reason = Reason.NOT_SUPPORTED
