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
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc import aio

from kernelgen_server.errors import KernelGenError
from kernelgen_server.metrics import Metrics
from kernelgen_wire.metadata import REASON_TRAILER, RETRY_PUSHBACK_TRAILER, Reason

__all__ = ["deadline_of", "rpc_scope"]

log = logging.getLogger("kernelgen.rpc")


def deadline_of(context: aio.ServicerContext[Any, Any]) -> float | None:
    """The call's deadline on ``time.monotonic``'s clock, or None."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


@contextlib.asynccontextmanager
async def rpc_scope(
    metrics: Metrics, method: str, model: str, context: aio.ServicerContext[Any, Any]
) -> AsyncIterator[None]:
    """Metrics, logging and the status of one call; every exception leaves as a status."""
    start = time.perf_counter()
    metrics.inflight.inc()
    code = grpc.StatusCode.OK
    try:
        yield
    except KernelGenError as exc:
        code = exc.code
        await _abort(context, exc, model)
    except (asyncio.CancelledError, GeneratorExit):  # the caller went away, mid-stream too
        code = grpc.StatusCode.CANCELLED
        raise
    except Exception:
        code = grpc.StatusCode.INTERNAL
        await _internal(context, method, model)
    finally:
        elapsed = time.perf_counter() - start
        metrics.inflight.dec()
        metrics.requests.labels(model, method, code.name).inc()
        metrics.latency.labels(model, method).observe(elapsed)
        metrics.statistics.on_call(model, method, code == grpc.StatusCode.OK, elapsed)
        log.debug("%s model=%r code=%s %.2f ms", method, model, code.name, elapsed * 1000.0)


async def _abort(context: aio.ServicerContext[Any, Any], exc: KernelGenError, model: str) -> None:
    trailers: list[tuple[str, str]] = [(REASON_TRAILER, exc.reason)]
    if exc.retry_pushback_ms is not None:
        trailers.append((RETRY_PUSHBACK_TRAILER, str(exc.retry_pushback_ms)))
    context.set_trailing_metadata(tuple(trailers))
    log.warning("%s model=%r: %s", exc.code.name, model, exc.message)
    await context.abort(exc.code, exc.message)


async def _internal(context: aio.ServicerContext[Any, Any], method: str, model: str) -> None:
    # The caller gets no details: they may reveal paths or internals. The log has them.
    log.exception("unexpected error in %s (model=%r)", method, model)
    context.set_trailing_metadata(((REASON_TRAILER, Reason.INTERNAL),))
    await context.abort(grpc.StatusCode.INTERNAL, "internal server error")
