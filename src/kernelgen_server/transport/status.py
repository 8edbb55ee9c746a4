"""The one place a call's outcome becomes a gRPC status, with its metrics and log line.

``rpc_scope`` wraps every servicer method: a ``KernelGenError`` leaves as its
own status code and message with the ``kernelgen-reason`` trailer (and gRPC's
retry pushback where the error sets one); anything else is a bug and leaves as
INTERNAL with a generic message, its details going to the log only; a caller
that went away is counted as CANCELLED. Every call is counted and timed once,
whatever its outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from grpc import aio

from kernelgen_server.core.metrics import Metrics
from kernelgen_server.errors import InvalidRequest, KernelGenError, shorten
from kernelgen_wire.metadata import REASON_TRAILER, RETRY_PUSHBACK_TRAILER, Reason

__all__ = ["Call", "deadline_of", "decode", "decoded", "rpc_scope"]

T = TypeVar("T", bound=Any)
R = TypeVar("R")

log = logging.getLogger("kernelgen.rpc")


def deadline_of(context: aio.ServicerContext[Any, Any]) -> float | None:
    """The call's deadline on ``time.monotonic``'s clock, or None."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


@dataclass
class Call:
    """What a call's scope knows of it; the method sets ``model`` once it has decoded the request."""

    model: str = ""


@contextlib.asynccontextmanager
async def rpc_scope(
    metrics: Metrics,
    method: str,
    context: aio.ServicerContext[Any, Any],
    label: Callable[[str], str] = lambda model: model,
    *,
    model: str = "",
) -> AsyncIterator[Call]:
    """Metrics, logging and the status of one call; every exception leaves as a status.

    ``label`` maps the requested model name to the metrics label: the name of a
    served model, never an arbitrary client string (the label set stays bounded).
    ``model`` is the name when the request is already decoded; else the method
    sets ``call.model`` once it has decoded it.
    """
    start = time.perf_counter()
    metrics.inflight.inc()
    call = Call(model)
    code = grpc.StatusCode.OK
    try:
        yield call
    except KernelGenError as exc:
        code = exc.code
        await _abort(context, exc, call.model)
    except (asyncio.CancelledError, GeneratorExit):  # the caller went away, mid-stream too
        code = grpc.StatusCode.CANCELLED
        log.debug("%s model=%s cancelled by the client", method, shorten(call.model))
        raise
    except Exception:
        code = grpc.StatusCode.INTERNAL
        await _internal(context, method, call.model)
    finally:
        elapsed = time.perf_counter() - start
        model = label(call.model)
        metrics.inflight.dec()
        metrics.requests.labels(model, method, code.name).inc()
        metrics.latency.labels(model, method).observe(elapsed)
        metrics.statistics.on_call(model, method, code == grpc.StatusCode.OK, elapsed)
        log.debug("%s model=%s code=%s %.2f ms", method, shorten(call.model), code.name, elapsed * 1000.0)


async def _abort(context: aio.ServicerContext[Any, Any], exc: KernelGenError, model: str) -> None:
    trailers: list[tuple[str, str]] = [(REASON_TRAILER, exc.reason)]
    if exc.retry_pushback_ms is not None:
        trailers.append((RETRY_PUSHBACK_TRAILER, str(exc.retry_pushback_ms)))
    context.set_trailing_metadata(tuple(trailers))
    log.warning("%s model=%s: %s", exc.code.name, shorten(model), exc.message)
    await context.abort(exc.code, exc.message)


async def _internal(context: aio.ServicerContext[Any, Any], method: str, model: str) -> None:
    # The caller gets no details: they may reveal paths or internals. The log has them.
    log.exception("unexpected error in %s (model=%s)", method, shorten(model))
    context.set_trailing_metadata(((REASON_TRAILER, Reason.INTERNAL),))
    await context.abort(grpc.StatusCode.INTERNAL, "internal server error")


def decode(message: type[T], data: bytes) -> T:
    """``data`` as a ``message``; anything else is an ``InvalidRequest`` with a short message."""
    try:
        decoded: T = message.FromString(data)
    except Exception:  # protobuf's DecodeError, whose module varies by backend
        name = message.DESCRIPTOR.full_name
        raise InvalidRequest(f"the request ({len(data)} bytes) is not a valid {name}") from None
    return decoded


def decoded(
    message: type[T],
    method: Callable[[T, aio.ServicerContext[Any, Any]], Awaitable[R]],
    metrics: Metrics,
    name: str,
    label: Callable[[str], str],
) -> Callable[[bytes, aio.ServicerContext[Any, Any]], Awaitable[R]]:
    """A unary handler taking the request's bytes: ``method`` gets it decoded, bytes that are not a
    ``message`` get INVALID_ARGUMENT through ``rpc_scope`` (counted, logged once, after authentication).
    """

    async def handle(data: bytes, context: aio.ServicerContext[Any, Any]) -> R:
        try:
            request = message.FromString(data)
        except Exception:
            async with rpc_scope(metrics, name, context, label):
                decode(message, data)
            raise AssertionError("unreachable: errors leave through context.abort") from None
        return await method(request, context)

    return handle
