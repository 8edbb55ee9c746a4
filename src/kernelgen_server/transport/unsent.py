"""Responses that were never sent because their call had ended: counted, not logged as errors.

A unary handler returns its response, and gRPC sends it afterwards. When the client cancels (or
its deadline passes, or its connection closes) after the handler returned and before gRPC has
learnt of it, the send fails inside gRPC's own code, which logs ``ExecuteBatchError raised in core
by servicer method [...]`` at ERROR with a traceback (measured: 7-62 tracebacks in storms of 1,000
cancels). Nothing is wrong: the client no longer wants the response. ``UnsentResponses`` is a
filter on exactly that record of gRPC's logger: it drops it and counts the call in
``kernelgen_unsent_responses{method}``; every other record passes.
"""

from __future__ import annotations

import logging

from prometheus_client import Counter

__all__ = ["GRPC_LOGGER", "UnsentResponses"]

#: The logger of gRPC's Cython layer, where the record comes from.
GRPC_LOGGER = "grpc._cython.cygrpc"
_MESSAGE = "ExecuteBatchError raised in core by servicer method"
_EXCEPTION = "ExecuteBatchError"
#: Services whose method names may label the counter (any other path counts as "other").
_SERVICES = ("/kernelgen.v1.", "/inference.", "/grpc.health.v1.", "/grpc.reflection.")


class UnsentResponses(logging.Filter):
    """Drops gRPC's ``ExecuteBatchError`` record of a call that ended first; counts it instead."""

    def __init__(self, counter: Counter) -> None:
        super().__init__()
        self._counter = counter

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.matches(record):
            return True
        # gRPC formats the method into the message itself: "... servicer method [/pkg.Svc/Method]".
        path = record.getMessage().removeprefix(_MESSAGE).strip().removeprefix("[").removesuffix("]")
        method = path.rsplit("/", 1)[-1] if path.startswith(_SERVICES) else "other"
        self._counter.labels(method).inc()
        return False

    @staticmethod
    def matches(record: logging.LogRecord) -> bool:
        """gRPC's record of a failed send after the call ended, and nothing else."""
        exception = record.exc_info[1] if record.exc_info else None
        return (
            record.name == GRPC_LOGGER
            and isinstance(record.msg, str)
            and record.msg.startswith(_MESSAGE)
            and type(exception).__name__ == _EXCEPTION
        )

    def install(self) -> None:
        logging.getLogger(GRPC_LOGGER).addFilter(self)

    def remove(self) -> None:
        logging.getLogger(GRPC_LOGGER).removeFilter(self)
