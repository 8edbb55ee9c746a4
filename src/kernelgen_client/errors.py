"""The client's one exception hierarchy, and the one place gRPC errors map onto it.

Every failure of a client call is a ``KernelServiceError``; its ``code`` is the
``grpc.StatusCode`` and ``reason`` the server's machine-readable
``kernelgen-reason`` trailer (``None`` when the status did not come from a
kernelgen server, e.g. a refused connection). Subclasses narrow by status, and
within a status by reason::

    KernelServiceError
    ├── InvalidRequest            INVALID_ARGUMENT (also raised before sending)
    ├── ModelNotFound             NOT_FOUND
    ├── RegionNotFound            NOT_FOUND, reason region-not-found (a shared-memory region)
    ├── FailedPrecondition        FAILED_PRECONDITION
    │   ├── ConditioningNotSupported   reason no-film
    │   ├── ModelNotReady              reason model-not-ready
    │   └── SharedMemoryUnavailable    reason shared-memory-off
    ├── ResourceExhausted         RESOURCE_EXHAUSTED
    │   ├── Overloaded                 reason queue-full or memory-full (retryable)
    │   └── KernelTooLarge             reason too-large (never retried), message-too-large (streamed instead)
    ├── DeadlineExceeded          DEADLINE_EXCEEDED (also a TimeoutError)
    ├── Cancelled                 CANCELLED
    ├── Unavailable               UNAVAILABLE
    │   ├── ConnectionFailed           no server reachable at the target
    │   └── ServerDraining             reason draining
    ├── Unauthenticated           UNAUTHENTICATED
    ├── PermissionDenied          PERMISSION_DENIED
    ├── InternalServerError       INTERNAL
    └── MalformedResponse         DATA_LOSS (a response the client cannot decode)

Example::

    try:
        client.generate("hyena-2d", [29, 29])
    except ModelNotFound as exc:
        print(exc.code.name, exc.message)   # NOT_FOUND model 'hyena-2d' is not ...
    except Overloaded:
        ...                                  # back off and try again later
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc

from kernelgen_wire.metadata import REASON_TRAILER, RETRY_PUSHBACK_TRAILER, Reason

__all__ = [
    "Cancelled",
    "ConditioningNotSupported",
    "ConnectionFailed",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InternalServerError",
    "InvalidRequest",
    "KernelServiceError",
    "KernelTooLarge",
    "MalformedResponse",
    "ModelNotFound",
    "ModelNotReady",
    "Overloaded",
    "PermissionDenied",
    "RegionNotFound",
    "ResourceExhausted",
    "ServerDraining",
    "SharedMemoryUnavailable",
    "Unauthenticated",
    "Unavailable",
    "from_rpc_error",
]


class KernelServiceError(Exception):
    """A failed kernelgen call: a gRPC status code, a readable message, the server's reason.

    Attributes:
        code: the ``grpc.StatusCode`` of the failure.
        message: the server's (or the client's) explanation.
        reason: the ``kernelgen-reason`` trailer (``"queue-full"``, ``"too-large"``, ...)
            or ``None`` when the status did not come from a kernelgen server.
        retry_pushback_ms: the server's retry advice: positive means "retry after
            that many milliseconds", negative "do not retry", ``None`` none given.

    Example::

        try:
            kernel = client.generate("hyena-2d", [29, 29], rows)
        except KernelServiceError as exc:
            print(exc.code.name, exc.reason, exc.message)  # e.g. INVALID_ARGUMENT invalid-argument ...
    """

    #: Status code of the class; an instance may carry a more specific one.
    default_code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        reason: str | None = None,
        retry_pushback_ms: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code: grpc.StatusCode = code if code is not None else self.default_code
        self.reason = reason
        self.retry_pushback_ms = retry_pushback_ms

    @property
    def interrupted(self) -> bool:
        """The call was cut by the transport (a connection lost mid-response, a proxy's reset of the
        stream), not answered by a kernelgen server: UNAVAILABLE, INTERNAL or CANCELLED without a
        ``kernelgen-reason`` (a kernelgen server sends one with every status it decides), after a
        server was reached, and not cancelled by this process. Every kernelgen call is idempotent,
        so such a call may be sent again."""
        return (
            self.code in _INTERRUPTIONS
            and self.reason is None
            and not isinstance(self, ConnectionFailed)
            and _LOCAL_CANCEL not in self.message
        )

    def __str__(self) -> str:
        return f"{self.message} [{self.code.name}]"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, code={self.code.name}, reason={self.reason!r})"


#: Statuses a proxy's reset or a lost connection reaches the client as (Envoy resets a stream whose
#: upstream died mid-response with RST_STREAM INTERNAL_ERROR or CANCEL).
_INTERRUPTIONS = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.CANCELLED)
#: gRPC's details of a call this process cancelled itself.
_LOCAL_CANCEL = "Locally cancelled"


class InvalidRequest(KernelServiceError, ValueError):
    """The request is malformed (seq_lens, conditioning shape or values, dtype)."""

    default_code = grpc.StatusCode.INVALID_ARGUMENT


class ModelNotFound(KernelServiceError, LookupError):
    """The server has no model of that name."""

    default_code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(KernelServiceError):
    """The request is well-formed but the model cannot serve it."""

    default_code = grpc.StatusCode.FAILED_PRECONDITION


class ConditioningNotSupported(FailedPrecondition):
    """Conditioning was sent to a model without a FiLM generator."""


class ModelNotReady(FailedPrecondition):
    """The model exists but failed to load on the server."""


class ResourceExhausted(KernelServiceError):
    """A server or transport limit was hit."""

    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Overloaded(ResourceExhausted):
    """The server's queue is full; retrying after a pause can succeed."""


class KernelTooLarge(ResourceExhausted):
    """The kernel (or the request) is over a configured server limit; retrying cannot help."""


class DeadlineExceeded(KernelServiceError, TimeoutError):
    """The call's deadline passed before the kernel arrived."""

    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(KernelServiceError):
    """The call was cancelled."""

    default_code = grpc.StatusCode.CANCELLED


class Unavailable(KernelServiceError):
    """The service cannot take the call right now (transient)."""

    default_code = grpc.StatusCode.UNAVAILABLE


class ConnectionFailed(Unavailable, ConnectionError):
    """No server could be reached at the target (refused, unresolvable, unreachable)."""


class ServerDraining(Unavailable):
    """The server is shutting down and takes no new work; another replica may."""


class Unauthenticated(KernelServiceError):
    """The server wants a valid bearer token (``token=``) or client certificate."""

    default_code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(KernelServiceError):
    """The credentials are valid but not allowed to make this call."""

    default_code = grpc.StatusCode.PERMISSION_DENIED


class InternalServerError(KernelServiceError):
    """The server failed unexpectedly; its log has the details."""

    default_code = grpc.StatusCode.INTERNAL


class MalformedResponse(KernelServiceError):
    """The server's response does not decode to a consistent kernel."""

    default_code = grpc.StatusCode.DATA_LOSS


class RegionNotFound(KernelServiceError, LookupError):
    """The server has no shared-memory region of the name a request gave (a restarted server?)."""

    default_code = grpc.StatusCode.NOT_FOUND


class SharedMemoryUnavailable(FailedPrecondition):
    """Shared memory was asked of a server that runs without ``--shared-memory``."""


_BY_CODE: dict[grpc.StatusCode, type[KernelServiceError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.OUT_OF_RANGE: InvalidRequest,
    grpc.StatusCode.NOT_FOUND: ModelNotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.INTERNAL: InternalServerError,
    grpc.StatusCode.DATA_LOSS: MalformedResponse,
}

# A reason refines the class within its status code.
_BY_REASON: dict[str, type[KernelServiceError]] = {
    Reason.NO_FILM: ConditioningNotSupported,
    Reason.MODEL_NOT_READY: ModelNotReady,
    Reason.QUEUE_FULL: Overloaded,
    Reason.MEMORY_FULL: Overloaded,
    Reason.TOO_LARGE: KernelTooLarge,
    Reason.MESSAGE_TOO_LARGE: KernelTooLarge,
    Reason.DRAINING: ServerDraining,
    Reason.SHARED_MEMORY_OFF: SharedMemoryUnavailable,
    Reason.REGION_NOT_FOUND: RegionNotFound,
}

# What gRPC core says when no connection could be made (no server ever answered).
_CONNECT_FAILURES = (
    "failed to connect",
    "connections to all backends failing",
    "connection refused",
    "errors resolving",
    "dns resolution failed",
    "name resolution",
    "no route to host",
    "network is unreachable",
)


def _trailers(error: Any) -> dict[str, str]:
    try:
        pairs: Iterable[Any] = error.trailing_metadata() or ()
    except Exception:  # a locally generated error may have none to give
        return {}
    out: dict[str, str] = {}
    for pair in pairs:
        key, value = pair[0], pair[1]
        out[str(key).lower()] = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    return out


def _pushback(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None


def from_rpc_error(error: grpc.RpcError, target: str | None = None) -> KernelServiceError:
    """The ``KernelServiceError`` for a failed gRPC call (sync ``RpcError`` or ``AioRpcError``).

    ``target``, when given, names the server in a connection failure's message.
    """
    code_fn = getattr(error, "code", None)
    code: grpc.StatusCode = code_fn() if callable(code_fn) else grpc.StatusCode.UNKNOWN
    details_fn = getattr(error, "details", None)
    details = (details_fn() if callable(details_fn) else None) or code.name.lower().replace("_", " ")
    trailers = _trailers(error)
    reason = trailers.get(REASON_TRAILER)
    pushback = _pushback(trailers.get(RETRY_PUSHBACK_TRAILER))

    cls = _BY_CODE.get(code, KernelServiceError)
    refined = _BY_REASON.get(reason or "")
    if refined is not None and (issubclass(refined, cls) or refined.default_code == code):
        cls = refined
    elif (
        code == grpc.StatusCode.UNAVAILABLE
        and reason is None
        and any(marker in details.lower() for marker in _CONNECT_FAILURES)
    ):
        cls = ConnectionFailed
        if target:
            details = f"cannot connect to {target}: {details}"
    return cls(details, code=code, reason=reason, retry_pushback_ms=pushback)
