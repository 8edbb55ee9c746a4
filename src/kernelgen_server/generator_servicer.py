"""``kernelgen.v1.KernelGenerator`` over a ``KernelService``: decode, call the core, encode.

Kernel responses are serialized by ``kernelgen_wire.kernel_messages`` straight
from tensor memory, so the kernel methods return ``bytes`` and are registered
with a pass-through response serializer. Errors become statuses in
``status.rpc_scope`` only.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import torch
from grpc import aio

from kernelgen_server.errors import TooLarge
from kernelgen_server.model_info import model_info
from kernelgen_server.output_head import OutputHead
from kernelgen_server.service import GeneratedKernel, KernelService
from kernelgen_server.status import deadline_of, rpc_scope
from kernelgen_server.tensors import decode_conditioning
from kernelgen_wire.group_messages import MemberKernel, encode_group
from kernelgen_wire.kernel_messages import encode_chunks, encode_response
from kernelgen_wire.metadata import REPORT_TRAILER
from kernelgen_wire.rpc import SERVICE_NAME
from kernelgen_wire.v1 import kernelgen_pb2 as pb

__all__ = ["KernelGeneratorServicer"]


class KernelGeneratorServicer:
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
        async with rpc_scope(self.metrics, "GenerateKernel", request.model, context):
            result = await self._generate(request, context, max_bytes=self.max_message_bytes)
            context.set_trailing_metadata(((REPORT_TRAILER, result.report.SerializeToString()),))
            return encode_response(result.kernel, result.grid)
        raise AssertionError("unreachable: errors leave through context.abort")

    async def StreamKernel(
        self, request: pb.GenerateKernelRequest, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        async with rpc_scope(self.metrics, "StreamKernel", request.model, context):
            result = await self._generate(request, context, max_bytes=None)
            kernel = result.kernel
            chunks = encode_chunks(
                kernel.payload, result.grid, result.report, self.chunk_bytes, head_hash=kernel.head_hash
            )
            for message in chunks:
                yield message

    async def FlopCount(
        self, request: pb.FlopCountRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.FlopCountResponse:
        async with rpc_scope(self.metrics, "FlopCount", request.model, context):
            summary = self.service.flop_count(request.model, list(request.seq_lens), request.inference)
            return pb.FlopCountResponse(
                flops=summary.flops,
                grid_points=summary.grid_points,
                kernel_bytes=summary.kernel_bytes,
                cacheable=summary.cacheable,
            )
        raise AssertionError("unreachable: errors leave through context.abort")

    async def ListModels(
        self, request: pb.ListModelsRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.ListModelsResponse:
        async with rpc_scope(self.metrics, "ListModels", "", context):
            return pb.ListModelsResponse(models=model_info(self.service.repository))
        raise AssertionError("unreachable: errors leave through context.abort")

    async def GetModel(
        self, request: pb.GetModelRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.ModelInfo:
        async with rpc_scope(self.metrics, "GetModel", request.model, context):
            for info in model_info(self.service.repository):
                if info.name == request.model:
                    return info  # a model that failed to load is listed too, not ready
            self.service.model(request.model)  # raises: empty name or unknown model
        raise AssertionError("unreachable: errors leave through context.abort")

    async def GetOutputHead(
        self, request: pb.GetOutputHeadRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.OutputHead:
        async with rpc_scope(self.metrics, "GetOutputHead", request.model, context):
            head = self.service.output_head(request.model)
            if head.nbytes > self.max_message_bytes:
                raise TooLarge(
                    f"the output head of {request.model!r} is {head.nbytes} bytes, over the unary limit of "
                    f"{self.max_message_bytes} bytes (--max-message-bytes); use the dense representation"
                )
            return _head_message(head)
        raise AssertionError("unreachable: errors leave through context.abort")

    async def GenerateGroup(
        self, request: pb.GenerateGroupRequest, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        async with rpc_scope(self.metrics, "GenerateGroup", request.group, context):
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
            kernels = [
                MemberKernel(k.kernel.payload, k.report, k.kernel.head_hash) for k in result.kernels
            ]
            for message in encode_group(result.group.name, result.group.members, kernels, self.chunk_bytes):
                yield message

    # --- plumbing -----------------------------------------------------------------------------
    async def _generate(
        self,
        request: pb.GenerateKernelRequest,
        context: aio.ServicerContext[Any, Any],
        max_bytes: int | None,
    ) -> GeneratedKernel:
        conditioning = decode_conditioning(request.conditioning) if request.HasField("conditioning") else None
        return await self.service.generate(
            request.model,
            list(request.seq_lens),
            conditioning,
            request.dtype,
            request.return_grid,
            representation=request.representation,
            deadline=deadline_of(context),
            max_bytes=max_bytes,
        )

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
            "GetOutputHead": grpc.unary_unary_rpc_method_handler(
                self.GetOutputHead,
                request_deserializer=pb.GetOutputHeadRequest.FromString,
                response_serializer=pb.OutputHead.SerializeToString,
            ),
            "GenerateGroup": grpc.unary_stream_rpc_method_handler(
                self.GenerateGroup,
                request_deserializer=pb.GenerateGroupRequest.FromString,
                response_serializer=raw,
            ),
        }
        return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


def _head_message(head: OutputHead) -> pb.OutputHead:
    def tensor(t: torch.Tensor) -> pb.Tensor:
        return pb.Tensor(shape=t.shape, dtype=pb.DTYPE_FLOAT32, data=t.numpy().tobytes())

    message = pb.OutputHead(head_hash=head.head_hash, weight_t=tensor(head.weight_t))
    if head.bias is not None:
        message.bias.CopyFrom(tensor(head.bias))
    return message
