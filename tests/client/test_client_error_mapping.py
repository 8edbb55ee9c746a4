"""Mapping gRPC errors onto the client's exception hierarchy."""

from __future__ import annotations

import grpc
import pytest

from kernelgen_client import errors
from kernelgen_client.errors import from_rpc_error

Code = grpc.StatusCode


class FakeRpcError(grpc.RpcError):
    """What grpc raises: a code, details and trailing metadata."""

    def __init__(self, code: grpc.StatusCode, details: str = "", trailers: tuple[tuple[str, str], ...] = ()):
        super().__init__()
        self._code, self._details, self._trailers = code, details, trailers

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._trailers


def reason(value: str, pushback: str | None = None) -> tuple[tuple[str, str], ...]:
    out = [("kernelgen-reason", value)]
    if pushback is not None:
        out.append(("grpc-retry-pushback-ms", pushback))
    return tuple(out)


@pytest.mark.parametrize(
    ("code", "trailers", "cls"),
    [
        (Code.INVALID_ARGUMENT, reason("invalid-argument"), errors.InvalidRequest),
        (Code.NOT_FOUND, reason("model-not-found"), errors.ModelNotFound),
        (Code.FAILED_PRECONDITION, reason("no-film"), errors.ConditioningNotSupported),
        (Code.FAILED_PRECONDITION, reason("model-not-ready"), errors.ModelNotReady),
        (Code.FAILED_PRECONDITION, (), errors.FailedPrecondition),
        (Code.RESOURCE_EXHAUSTED, reason("queue-full", "50"), errors.Overloaded),
        (Code.RESOURCE_EXHAUSTED, reason("too-large", "-1"), errors.KernelTooLarge),
        (Code.RESOURCE_EXHAUSTED, (), errors.ResourceExhausted),
        (Code.DEADLINE_EXCEEDED, (), errors.DeadlineExceeded),
        (Code.CANCELLED, reason("cancelled"), errors.Cancelled),
        (Code.UNAVAILABLE, reason("draining"), errors.ServerDraining),
        (Code.UNAVAILABLE, (), errors.Unavailable),
        (Code.UNAUTHENTICATED, (), errors.Unauthenticated),
        (Code.PERMISSION_DENIED, (), errors.PermissionDenied),
        (Code.INTERNAL, reason("internal"), errors.InternalServerError),
        (Code.UNIMPLEMENTED, (), errors.KernelServiceError),
        # A reason that does not belong to the code does not change the class.
        (Code.NOT_FOUND, reason("queue-full"), errors.ModelNotFound),
    ],
)
def test_each_status_maps_to_its_class(
    code: grpc.StatusCode, trailers: tuple[tuple[str, str], ...], cls: type[errors.KernelServiceError]
) -> None:
    error = from_rpc_error(FakeRpcError(code, "what happened", trailers))
    assert type(error) is cls
    assert error.code is code
    assert error.message == "what happened"
    assert str(error) == f"what happened [{code.name}]"
    assert isinstance(error, errors.KernelServiceError)


def test_reason_and_pushback_are_kept() -> None:
    error = from_rpc_error(FakeRpcError(Code.RESOURCE_EXHAUSTED, "full", reason("queue-full", "50")))
    assert error.reason == "queue-full"
    assert error.retry_pushback_ms == 50
    error = from_rpc_error(FakeRpcError(Code.RESOURCE_EXHAUSTED, "big", reason("too-large", "-1")))
    assert error.retry_pushback_ms == -1
    error = from_rpc_error(FakeRpcError(Code.RESOURCE_EXHAUSTED, "x", reason("queue-full", "soon")))
    assert error.retry_pushback_ms is None
    assert "reason='queue-full'" in repr(error)


@pytest.mark.parametrize(
    "details",
    [
        "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Connection refused",
        "connections to all backends failing; last error: UNKNOWN: ipv4:127.0.0.1:1: "
        "Failed to connect to remote host: Connection refused",
        "DNS resolution failed for nowhere.invalid:50051",
        "errors resolving nowhere.invalid:50051: Domain name not found",
    ],
)
def test_connection_failures_are_recognised(details: str) -> None:
    error = from_rpc_error(FakeRpcError(Code.UNAVAILABLE, details), target="h:1")
    assert type(error) is errors.ConnectionFailed
    assert isinstance(error, errors.Unavailable)
    assert isinstance(error, ConnectionError)
    assert error.message.startswith("cannot connect to h:1: ")


def test_builtin_bases_for_idiomatic_handling() -> None:
    assert issubclass(errors.InvalidRequest, ValueError)
    assert issubclass(errors.DeadlineExceeded, TimeoutError)
    assert issubclass(errors.ModelNotFound, LookupError)
    assert issubclass(errors.Overloaded, errors.ResourceExhausted)
    assert issubclass(errors.KernelTooLarge, errors.ResourceExhausted)
    assert not issubclass(errors.KernelTooLarge, errors.Overloaded)


def test_missing_details_and_bytes_trailers() -> None:
    error = from_rpc_error(FakeRpcError(Code.UNAVAILABLE, "", (("kernelgen-reason", b"draining"),)))  # type: ignore[arg-type]
    assert type(error) is errors.ServerDraining
    assert error.message == "unavailable"


def test_client_side_errors_carry_their_class_code() -> None:
    assert errors.InvalidRequest("bad").code is Code.INVALID_ARGUMENT
    assert errors.MalformedResponse("bad").code is Code.DATA_LOSS
    assert errors.ConnectionFailed("down").code is Code.UNAVAILABLE
