"""``kernelgen.v1.KernelGenerator`` over a ``KernelService``: decode, call the core, encode.

Kernel responses are written by ``native_codec`` (around bytes the core's
encoder wrote straight from tensor memory), so the kernel methods return
``bytes`` and are registered with a pass-through response serializer. Errors
become statuses in ``status.rpc_scope`` only.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
from grpc import aio

from kernelgen_server.core.plan import check_name
from kernelgen_server.core.service import KernelService
from kernelgen_server.errors import KernelTooLarge, SlowReader
from kernelgen_server.settings import flag
from kernelgen_server.transport.model_info import model_info
from kernelgen_server.transport.native_codec import (
    decode_conditioning,
    group_messages,
    head_message,
    response_bytes,
    stream_messages,
)
from kernelgen_server.transport.status import deadline_of, decode, rpc_scope
from kernelgen_wire.metadata import REPORT_TRAILER
from kernelgen_wire.rpc import SERVICE_NAME
from kernelgen_wire.v1 import kernelgen_pb2 as pb

__all__ = ["KernelGeneratorServicer"]

log = logging.getLogger("kernelgen.rpc")


class KernelGeneratorServicer:
    """Implements ``kernelgen.v1.KernelGenerator`` over a ``KernelService``.

    Requests arrive as bytes and are decoded inside ``rpc_scope``: bytes that are
    not the method's message are an INVALID_ARGUMENT like any other bad request,
    counted and logged once, and only after the call was authenticated.
    """

    def __init__(self, service: KernelService) -> None:
        self.service = service
        self.metrics = service.metrics
        settings = service.settings
        self.max_message_bytes = int(settings.max_message_bytes)
        self.chunk_bytes = int(settings.stream_chunk_bytes)
        self.send_timeout_s = float(settings.stream_send_timeout_s)

    # --- methods ------------------------------------------------------------------------------
    async def GenerateKernel(self, data: bytes, context: aio.ServicerContext[Any, Any]) -> bytes:
        async with rpc_scope(self.metrics, "GenerateKernel", context, self._label) as call:
            request = decode(pb.GenerateKernelRequest, data)
            call.model = request.model
            return await self._unary_kernel(request, context)
        raise AssertionError("unreachable: errors leave through context.abort")

    async def _unary_kernel(
        self, request: pb.GenerateKernelRequest, context: aio.ServicerContext[Any, Any]
    ) -> bytes:
        """One decoded ``GenerateKernel`` request's response bytes (inside its call's scope)."""
        result = await self.service.generate(
            *self._kernel_args(request),
            representation=request.representation,
            deadline=deadline_of(context),
            max_bytes=self.max_message_bytes,
        )
        # The response's bytes stay reserved until gRPC is done sending them.
        release = result.releaser
        context.add_done_callback(lambda _context: release())
        context.set_trailing_metadata(((REPORT_TRAILER, result.report.SerializeToString()),))
        return response_bytes(result)

    async def StreamKernel(self, data: bytes, context: aio.ServicerContext[Any, Any]) -> None:
        async with rpc_scope(self.metrics, "StreamKernel", context, self._label) as call:
            request = decode(pb.GenerateKernelRequest, data)
            call.model = request.model
            self._check_stream(request)
            stream = await self.service.open_stream(
                *self._kernel_args(request),
                representation=request.representation,
                deadline=deadline_of(context),
            )
            try:
                async for message in stream_messages(stream, self.chunk_bytes):
                    await self._write(context, message)
            finally:
                stream.close()

    async def FlopCount(self, data: bytes, context: aio.ServicerContext[Any, Any]) -> pb.FlopCountResponse:
        async with rpc_scope(self.metrics, "FlopCount", context, self._label) as call:
            request = decode(pb.FlopCountRequest, data)
            call.model = request.model
            summary = self.service.flop_count(request.model, list(request.seq_lens), request.inference)
            return pb.FlopCountResponse(
                flops=summary.flops,
                grid_points=summary.grid_points,
                kernel_bytes=summary.kernel_bytes,
                cacheable=summary.cacheable,
            )
        raise AssertionError("unreachable: errors leave through context.abort")

    async def ListModels(self, data: bytes, context: aio.ServicerContext[Any, Any]) -> pb.ListModelsResponse:
        async with rpc_scope(self.metrics, "ListModels", context, self._label):
            decode(pb.ListModelsRequest, data)
            return pb.ListModelsResponse(models=model_info(self.service.repository))
        raise AssertionError("unreachable: errors leave through context.abort")

    async def GetModel(self, data: bytes, context: aio.ServicerContext[Any, Any]) -> pb.ModelInfo:
        async with rpc_scope(self.metrics, "GetModel", context, self._label) as call:
            request = decode(pb.GetModelRequest, data)
            call.model = request.model
            check_name(request.model)
            for info in model_info(self.service.repository):
                if info.name == request.model:
                    return info  # a model that failed to load is listed too, not ready
            self.service.model(request.model)  # raises: unknown model
        raise AssertionError("unreachable: errors leave through context.abort")

    async def GetOutputHead(self, data: bytes, context: aio.ServicerContext[Any, Any]) -> pb.OutputHead:
        async with rpc_scope(self.metrics, "GetOutputHead", context, self._label) as call:
            request = decode(pb.GetOutputHeadRequest, data)
            call.model = request.model
            output_head = self.service.output_head(request.model)
            if output_head.nbytes > self.max_message_bytes:
                raise KernelTooLarge(
                    f"the output head of {request.model!r} is {output_head.nbytes} bytes, over the "
                    f"server's limit of {self.max_message_bytes} bytes for one message (set by "
                    f"{flag('max_message_bytes')}); ask for the dense representation"
                )
            return head_message(output_head)
        raise AssertionError("unreachable: errors leave through context.abort")

    async def GenerateGroup(self, data: bytes, context: aio.ServicerContext[Any, Any]) -> None:
        async with rpc_scope(self.metrics, "GenerateGroup", context, self._label) as call:
            request = decode(pb.GenerateGroupRequest, data)
            call.model = request.group
            conditioning = (
                decode_conditioning(request.conditioning) if request.HasField("conditioning") else None
            )
            result = await self.service.generate_group(
                request.group,
                list(request.seq_lens),
                conditioning,
                request.dtype,
                representation=request.representation,
                deadline=deadline_of(context),
            )
            try:
                for message in group_messages(result, self.chunk_bytes):
                    await self._write(context, message)
            finally:
                result.release()

    # --- plumbing -----------------------------------------------------------------------------
    def _check_stream(self, request: pb.GenerateKernelRequest) -> None:
        """Refuse what a stream cannot answer (nothing here; a subclass may)."""

    def _kernel_args(self, request: pb.GenerateKernelRequest) -> tuple[Any, ...]:
        conditioning = decode_conditioning(request.conditioning) if request.HasField("conditioning") else None
        return (
            request.model,
            list(request.seq_lens),
            conditioning,
            request.dtype,
            request.return_grid,
        )

    def _label(self, model: str) -> str:
        """The ``model`` label of a call's metrics: a served model's (or group's) name, never a stranger's."""
        repository = self.service.repository
        return model if model in repository or model in repository.groups else ""

    async def _write(self, context: aio.ServicerContext[Any, Any], message: bytes) -> None:
        """Send one stream message; a client that takes none for ``send_timeout_s`` is given up."""
        try:
            await asyncio.wait_for(context.write(message), self.send_timeout_s)
        except TimeoutError:
            raise SlowReader(
                f"the client took no message for {self.send_timeout_s:g} s; the stream is stopped "
                f"(set by {flag('stream_send_timeout_s')})"
            ) from None
        except Exception as exc:
            # A write fails only once the call is over: the client cancelled, its deadline
            # passed or its connection went. An ordinary end, not a server error.
            log.debug("a stream write failed, the call is over: %s", type(exc).__name__)
            raise asyncio.CancelledError() from None

    def handler(self) -> grpc.GenericRpcHandler:
        """Method handlers: requests come as bytes (decoded in the scope), kernels go as bytes."""

        def raw(data: bytes) -> bytes:
            return data

        def unary(method: Any, response_serializer: Any = raw) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(
                method, request_deserializer=raw, response_serializer=response_serializer
            )

        handlers = {
            "GenerateKernel": unary(self.GenerateKernel),
            "StreamKernel": grpc.unary_stream_rpc_method_handler(
                self.StreamKernel, request_deserializer=raw, response_serializer=raw
            ),
            "FlopCount": unary(self.FlopCount, pb.FlopCountResponse.SerializeToString),
            "ListModels": unary(self.ListModels, pb.ListModelsResponse.SerializeToString),
            "GetModel": unary(self.GetModel, pb.ModelInfo.SerializeToString),
            "GetOutputHead": unary(self.GetOutputHead, pb.OutputHead.SerializeToString),
            "GenerateGroup": grpc.unary_stream_rpc_method_handler(
                self.GenerateGroup, request_deserializer=raw, response_serializer=raw
            ),
        }
        return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)
