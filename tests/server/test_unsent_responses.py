"""A client that cancels just before its response is sent: counted in a metric, no traceback."""

from __future__ import annotations

import logging

from grpc._cython.cygrpc import ExecuteBatchError
from prometheus_client import CollectorRegistry, Counter

from kernelgen_server.transport.unsent import GRPC_LOGGER, UnsentResponses

GENERATE = "/kernelgen.v1.KernelGenerator/GenerateKernel"


def record(
    message: str, args: tuple[object, ...], error: BaseException | None, name: str = GRPC_LOGGER
) -> logging.LogRecord:
    exc_info = (type(error), error, None) if error is not None else None
    return logging.LogRecord(name, logging.ERROR, "server.pyx.pxi", 710, message, args, exc_info)


def test_the_filter_drops_and_counts_exactly_grpcs_failed_send_record() -> None:
    counter = Counter("unsent", "", ["method"], registry=CollectorRegistry())
    unsent = UnsentResponses(counter)
    failed_send = "ExecuteBatchError raised in core by servicer method [%s]"
    # gRPC's own record: the method already in the message, no arguments (as a live server logs it).
    logged = f"ExecuteBatchError raised in core by servicer method [{GENERATE}]"
    assert unsent.filter(record(logged, (), ExecuteBatchError("Failed execute_batch"))) is False
    assert unsent.filter(record(failed_send, (GENERATE,), ExecuteBatchError("Failed execute_batch"))) is False
    assert unsent.filter(record(failed_send, ("/x.Y/Z",), ExecuteBatchError("x"))) is False
    assert counter.labels("GenerateKernel")._value.get() == 2
    assert counter.labels("other")._value.get() == 1
    # Everything else passes: another message, another exception, another logger.
    assert unsent.filter(
        record("Unexpected [%s] raised by servicer method [%s]", ("E", GENERATE), ValueError())
    )
    assert unsent.filter(record(failed_send, (GENERATE,), RuntimeError("not a batch error")))
    assert unsent.filter(record(failed_send, (GENERATE,), None))
    assert unsent.filter(record(failed_send, (GENERATE,), ExecuteBatchError("x"), name="kernelgen.rpc"))
