"""The server's one error hierarchy; each class carries its gRPC status code.

Core components (repository, cache, batcher, engine) raise these; the servicer
maps them to a status in one place (``KernelGenError.code``). Anything that is
not a ``KernelGenError`` is a bug and reaches the caller as INTERNAL with a
generic message, its details going to the log only.
"""

from __future__ import annotations

import grpc

__all__ = [
    "Cancelled",
    "ConditioningNotSupported",
    "DeadlineExpired",
    "Draining",
    "InvalidRequest",
    "KernelGenError",
    "ModelNotFound",
    "ModelNotReady",
    "QueueFull",
    "TooLarge",
]


class KernelGenError(Exception):
    """A failure the caller should see, with its status code and a readable message."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    #: Machine-readable tag sent as ``kernelgen-reason`` trailing metadata.
    reason: str = "internal"
    #: gRPC retry pushback: None sends none, a negative value forbids a retry,
    #: a positive value asks the client to retry after that many milliseconds.
    retry_pushback_ms: int | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(KernelGenError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "invalid-argument"


class ModelNotFound(KernelGenError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "model-not-found"


class ModelNotReady(KernelGenError):
    """The model exists in the repository but failed to load."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "model-not-ready"


class ConditioningNotSupported(KernelGenError):
    """Conditioning was sent to a model without a FiLM generator."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "no-film"


class QueueFull(KernelGenError):
    """Back-pressure: retryable after a short pause."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "queue-full"
    retry_pushback_ms = 50


class TooLarge(KernelGenError):
    """The request is over a configured size limit; retrying cannot help."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "too-large"
    retry_pushback_ms = -1


class DeadlineExpired(KernelGenError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "deadline-exceeded"


class Cancelled(KernelGenError):
    code = grpc.StatusCode.CANCELLED
    reason = "cancelled"


class Draining(KernelGenError):
    """The server is shutting down and takes no new work."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "draining"
