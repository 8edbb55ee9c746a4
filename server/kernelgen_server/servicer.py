"""The gRPC face of ``KernelService``: decode, call the core, encode, map errors.

Kernel responses are serialized by ``wire`` straight from tensor memory, so
the kernel methods return ``bytes`` and are registered with a pass-through
response serializer. Every error becomes a status here and only here.
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

from kernelgen_client._proto.kernelgen.v1 import kernelgen_pb2 as pb
from kernelgen_server.codec import decode_conditioning
from kernelgen_server.core import KernelResult, KernelService
from kernelgen_server.errors import KernelGenError
from kernelgen_server.model_info import model_info
from kernelgen_server.wire import encode_chunks, encode_response

__all__ = ["REPORT_KEY", "SERVICE_NAME", "KernelServicer"]

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["KernelGenerator"].full_name
#: Trailing metadata of a GenerateKernel call: its serialized ServerReport.
REPORT_KEY = "kernelgen-report-bin"
log = logging.getLogger("kernelgen.rpc")


def _deadline(context: aio.ServicerContext[Any, Any]) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class KernelServicer:
    """Implements ``kernelgen.v1.KernelGenerator`` over a ``KernelService``."""

    def __init__(self, service: KernelService) -> None:
        self.service = service
        self.metrics = service.metrics
        self.max_message_bytes = int(service.settings.max_message_bytes)
        self.chunk_bytes = int(service.settings.stream_chunk_bytes)

    # --- methods ------------------------------------------------------------------------------
    async def GenerateKernel(
        self, request: pb.GenerateKernelRequest, context: aio.ServicerContext[Any, Any]
    ) -> bytes:
        async with self._rpc("GenerateKernel", request.model, context):
            result = await self._generate(request, context, max_bytes=self.max_message_bytes)
            context.set_trailing_metadata(((REPORT_KEY, result.report.SerializeToString()),))
            return encode_response(result.kernel, result.grid)
        raise AssertionError("unreachable: errors leave through context.abort")

    async def StreamKernel(
        self, request: pb.GenerateKernelRequest, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        async with self._rpc("StreamKernel", request.model, context):
            result = await self._generate(request, context, max_bytes=None)
            for message in encode_chunks(result.kernel.payload, result.grid, result.report, self.chunk_bytes):
                yield message

    async def FlopCount(
        self, request: pb.FlopCountRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.FlopCountResponse:
        async with self._rpc("FlopCount", request.model, context):
            report = self.service.flop_count(request.model, list(request.seq_lens), request.inference)
            return pb.FlopCountResponse(
                flops=report.flops,
                grid_points=report.grid_points,
                kernel_bytes=report.kernel_bytes,
                cacheable=report.cacheable,
            )
        raise AssertionError("unreachable: errors leave through context.abort")

    async def ListModels(
        self, request: pb.ListModelsRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.ListModelsResponse:
        async with self._rpc("ListModels", "", context):
            return pb.ListModelsResponse(models=model_info(self.service.repository))
        raise AssertionError("unreachable: errors leave through context.abort")

    async def GetModel(
        self, request: pb.GetModelRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.ModelInfo:
        async with self._rpc("GetModel", request.model, context):
            for info in model_info(self.service.repository):
                if info.name == request.model:
                    return info  # a model that failed to load is listed too, not ready
            self.service.model(request.model)  # raises: empty name or unknown model
        raise AssertionError("unreachable: errors leave through context.abort")

    # --- plumbing -----------------------------------------------------------------------------
    async def _generate(
        self,
        request: pb.GenerateKernelRequest,
        context: aio.ServicerContext[Any, Any],
        max_bytes: int | None,
    ) -> KernelResult:
        conditioning = decode_conditioning(request.conditioning) if request.HasField("conditioning") else None
        return await self.service.generate(
            request.model,
            list(request.seq_lens),
            conditioning,
            request.dtype,
            request.return_grid,
            deadline=_deadline(context),
            max_bytes=max_bytes,
        )

    @contextlib.asynccontextmanager
    async def _rpc(
        self, method: str, model: str, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[None]:
        """Metrics, logging and the status of one call; every exception leaves as a status."""
        start = time.perf_counter()
        self.metrics.inflight.inc()
        code = grpc.StatusCode.OK
        try:
            yield
        except KernelGenError as exc:
            code = exc.code
            await self._abort(context, exc, model)
        except (asyncio.CancelledError, GeneratorExit):  # the caller went away, mid-stream too
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            code = grpc.StatusCode.INTERNAL
            await self._internal(context, method, model)
        finally:
            self._done(method, model, code, start)

    async def _abort(self, context: aio.ServicerContext[Any, Any], exc: KernelGenError, model: str) -> None:
        """The one place a ``KernelGenError`` becomes a status, with machine-readable trailers."""
        trailers: list[tuple[str, str]] = [("kernelgen-reason", exc.reason)]
        if exc.retry_pushback_ms is not None:
            trailers.append(("grpc-retry-pushback-ms", str(exc.retry_pushback_ms)))
        context.set_trailing_metadata(tuple(trailers))
        log.warning("%s model=%r: %s", exc.code.name, model, exc.message)
        await context.abort(exc.code, exc.message)

    async def _internal(self, context: aio.ServicerContext[Any, Any], method: str, model: str) -> None:
        # The caller gets no details: they may reveal paths or internals. The log has them.
        log.exception("unexpected error in %s (model=%r)", method, model)
        context.set_trailing_metadata((("kernelgen-reason", "internal"),))
        await context.abort(grpc.StatusCode.INTERNAL, "internal server error")

    def _done(self, method: str, model: str, code: grpc.StatusCode, start: float) -> None:
        elapsed = time.perf_counter() - start
        self.metrics.inflight.dec()
        self.metrics.requests.labels(model, method, code.name).inc()
        self.metrics.latency.labels(model, method).observe(elapsed)
        log.debug("%s model=%r code=%s %.2f ms", method, model, code.name, elapsed * 1000.0)

    def handler(self) -> grpc.GenericRpcHandler:
        """Method handlers; kernel responses are already serialized bytes."""

        def raw(data: bytes) -> bytes:
            return data

        handlers = {
            "GenerateKernel": grpc.unary_unary_rpc_method_handler(
                self.GenerateKernel,
                request_deserializer=pb.GenerateKernelRequest.FromString,
                response_serializer=raw,
            ),
            "StreamKernel": grpc.unary_stream_rpc_method_handler(
                self.StreamKernel,
                request_deserializer=pb.GenerateKernelRequest.FromString,
                response_serializer=raw,
            ),
            "FlopCount": grpc.unary_unary_rpc_method_handler(
                self.FlopCount,
                request_deserializer=pb.FlopCountRequest.FromString,
                response_serializer=pb.FlopCountResponse.SerializeToString,
            ),
            "ListModels": grpc.unary_unary_rpc_method_handler(
                self.ListModels,
                request_deserializer=pb.ListModelsRequest.FromString,
                response_serializer=pb.ListModelsResponse.SerializeToString,
            ),
            "GetModel": grpc.unary_unary_rpc_method_handler(
                self.GetModel,
                request_deserializer=pb.GetModelRequest.FromString,
                response_serializer=pb.ModelInfo.SerializeToString,
            ),
        }
        return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)
