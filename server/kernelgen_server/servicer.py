"""The gRPC face of ``KernelService``: decode, call the core, encode, map errors.

Kernel responses are serialized by ``wire`` straight from tensor memory, so
the kernel methods return ``bytes`` and are registered with a pass-through
response serializer. Every error becomes a status here and only here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

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
R = TypeVar("R")


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
        async def call() -> bytes:
            result = await self._generate(request, context, max_bytes=self.max_message_bytes)
            context.set_trailing_metadata(((REPORT_KEY, result.report.SerializeToString()),))
            return encode_response(result.kernel, result.grid)

        return await self._observe("GenerateKernel", request.model, context, call)

    async def StreamKernel(
        self, request: pb.GenerateKernelRequest, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        start = time.perf_counter()
        self.metrics.inflight.inc()
        code = grpc.StatusCode.OK
        try:
            result = await self._generate(request, context, max_bytes=None)
            chunks = encode_chunks(result.kernel.payload, result.grid, result.report, self.chunk_bytes)
            for message in chunks:
                yield message
        except KernelGenError as exc:
            code = exc.code
            await self._abort(context, exc, request.model)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            code = grpc.StatusCode.INTERNAL
            await self._internal(context, "StreamKernel", request.model)
        finally:
            self._done("StreamKernel", request.model, code, start)

    async def FlopCount(
        self, request: pb.FlopCountRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.FlopCountResponse:
        async def call() -> pb.FlopCountResponse:
            report = self.service.flop_count(request.model, list(request.seq_lens), request.inference)
            return pb.FlopCountResponse(
                flops=report.flops,
                grid_points=report.grid_points,
                kernel_bytes=report.kernel_bytes,
                cacheable=report.cacheable,
            )

        return await self._observe("FlopCount", request.model, context, call)

    async def ListModels(
        self, request: pb.ListModelsRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.ListModelsResponse:
        async def call() -> pb.ListModelsResponse:
            return pb.ListModelsResponse(models=model_info(self.service.repository))

        return await self._observe("ListModels", "", context, call)

    async def GetModel(
        self, request: pb.GetModelRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.ModelInfo:
        async def call() -> pb.ModelInfo:
            for info in model_info(self.service.repository):
                if info.name == request.model:
                    return info
            self.service.model(request.model)  # raises the right error
            raise AssertionError("unreachable")

        return await self._observe("GetModel", request.model, context, call)

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

    async def _observe(
        self,
        method: str,
        model: str,
        context: aio.ServicerContext[Any, Any],
        call: Callable[[], Awaitable[R]],
    ) -> R:
        start = time.perf_counter()
        self.metrics.inflight.inc()
        code = grpc.StatusCode.OK
        try:
            return await call()
        except KernelGenError as exc:
            code = exc.code
            await self._abort(context, exc, model)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            code = grpc.StatusCode.INTERNAL
            await self._internal(context, method, model)
        finally:
            self._done(method, model, code, start)
        raise AssertionError("unreachable: context.abort raises")

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
