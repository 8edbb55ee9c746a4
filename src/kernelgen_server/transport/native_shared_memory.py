"""kernelgen.v1's shared-memory path: kernels written into a registered region instead of the response.

``SharedMemoryGeneratorServicer`` is the native servicer with three additions:
``RegisterSharedMemory`` and ``UnregisterSharedMemory`` (the same registry as
the Open Inference Protocol's system shared memory), and ``GenerateKernel``
requests that name an ``output_region``: the kernel's size is checked against
the region before any work, the service computes it as for any call, and the
kernel's bytes are written into the region; the response carries the shape,
dtype, report and ``shared_memory_bytes``, no kernel bytes. Other requests go
to the native servicer unchanged.
"""

from __future__ import annotations

from typing import Any, cast

import grpc
from grpc import aio

from kernelgen_server.core.service import KernelService
from kernelgen_server.errors import InvalidRequest
from kernelgen_server.transport.native_codec import decode_conditioning
from kernelgen_server.transport.native_servicer import KernelGeneratorServicer
from kernelgen_server.transport.shared_memory import SharedMemoryRegistry, check_off
from kernelgen_server.transport.status import deadline_of, decoded, rpc_scope
from kernelgen_wire.metadata import REPORT_TRAILER
from kernelgen_wire.rpc import SERVICE_NAME
from kernelgen_wire.v1 import kernelgen_pb2 as pb

__all__ = ["SharedMemoryGeneratorServicer"]


class SharedMemoryGeneratorServicer(KernelGeneratorServicer):
    """``kernelgen.v1.KernelGenerator`` with kernels written into shared memory on request."""

    def __init__(self, service: KernelService, registry: SharedMemoryRegistry | None) -> None:
        super().__init__(service)
        self.registry = registry

    async def _unary_kernel(
        self, request: pb.GenerateKernelRequest, context: aio.ServicerContext[Any, Any]
    ) -> bytes:
        if not request.HasField("output_region"):
            return await super()._unary_kernel(request, context)
        response = await self._into_region(request, context)
        return cast(bytes, response.SerializeToString())

    def _check_stream(self, request: pb.GenerateKernelRequest) -> None:
        if request.HasField("output_region"):
            raise InvalidRequest("a kernel written into shared memory goes with GenerateKernel")

    async def _into_region(
        self, request: pb.GenerateKernelRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.GenerateKernelResponse:
        registry = check_off(self.registry)
        target = request.output_region
        conditioning = decode_conditioning(request.conditioning) if request.HasField("conditioning") else None
        plan = self.service.plan(
            request.model,
            list(request.seq_lens),
            conditioning,
            request.dtype,
            request.return_grid,
            request.representation,
        )
        region = registry.check(
            target.region, target.offset, target.byte_size, plan.kernel_bytes, "the kernel"
        )
        # Only the grid, when asked, travels in the message.
        self.service.planner.check_response(plan, self.max_message_bytes, kernel_elsewhere=True)
        result = await self.service.compute(plan, deadline_of(context))
        payload = result.kernel.payload
        await registry.write(region, target.offset, payload.data)
        context.set_trailing_metadata(((REPORT_TRAILER, result.report.SerializeToString()),))
        tensor = pb.Tensor(shape=payload.shape, dtype=payload.dtype)  # type: ignore[arg-type]
        response = pb.GenerateKernelResponse(shared_memory_bytes=payload.nbytes)
        if result.kernel.head_hash:
            response.factors.CopyFrom(tensor)
            response.head_hash = result.kernel.head_hash
        else:
            response.kernel.CopyFrom(tensor)
        if result.grid is not None:
            grid = result.grid
            response.grid.CopyFrom(pb.Tensor(shape=grid.shape, dtype=grid.dtype, data=bytes(grid.data)))  # type: ignore[arg-type]
        return response

    async def RegisterSharedMemory(
        self, request: pb.RegisterSharedMemoryRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.RegisterSharedMemoryResponse:
        async with rpc_scope(self.metrics, "RegisterSharedMemory", context):
            check_off(self.registry).register(request.name, request.key, request.offset, request.byte_size)
            return pb.RegisterSharedMemoryResponse()
        raise AssertionError("unreachable: errors leave through context.abort")

    async def UnregisterSharedMemory(
        self, request: pb.UnregisterSharedMemoryRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.UnregisterSharedMemoryResponse:
        async with rpc_scope(self.metrics, "UnregisterSharedMemory", context):
            await check_off(self.registry).unregister(request.name)
            return pb.UnregisterSharedMemoryResponse()
        raise AssertionError("unreachable: errors leave through context.abort")

    def shared_memory_handler(self) -> grpc.GenericRpcHandler:
        """Handlers of the two registration methods (``handler()`` serves the others)."""

        def raw(data: bytes) -> bytes:
            return data

        def unary(name: str, request: Any, response: Any, method: Any) -> grpc.RpcMethodHandler:
            handle = decoded(request, method, self.metrics, name, self._label)
            return grpc.unary_unary_rpc_method_handler(
                handle, request_deserializer=raw, response_serializer=response.SerializeToString
            )

        handlers = {
            "RegisterSharedMemory": unary(
                "RegisterSharedMemory",
                pb.RegisterSharedMemoryRequest,
                pb.RegisterSharedMemoryResponse,
                self.RegisterSharedMemory,
            ),
            "UnregisterSharedMemory": unary(
                "UnregisterSharedMemory",
                pb.UnregisterSharedMemoryRequest,
                pb.UnregisterSharedMemoryResponse,
                self.UnregisterSharedMemory,
            ),
        }
        return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)
