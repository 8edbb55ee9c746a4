"""``inference.GRPCInferenceService``, the Open Inference Protocol, over a ``KernelService``.

The second protocol of the same port and process as ``kernelgen.v1``:
requests go through the same service (validation, limits, cache, batcher,
engine) and leave with the same status codes (``status.rpc_scope``). Tensors
are mapped by ``oip_codec``; shared memory is ``shared_memory``'s registry,
shared with kernelgen.v1. Readiness answers from the health service's states
(``readiness``), statistics from the metrics' observations (``statistics``).

``ModelStreamInfer`` runs the requests of one stream concurrently (so the
batcher can batch them), at most ``STREAM_INFLIGHT`` at a time, and answers
each in the order they finish, with its request's id; a request that fails
gets a response carrying ``error_message`` ("CODE: message") and the stream
goes on.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from grpc import aio

from kernelgen_server.core.service import KernelService
from kernelgen_server.core.statistics import Duration, ModelStatistics
from kernelgen_server.errors import (
    InvalidRequest,
    KernelGenError,
    MessageTooLarge,
    ModelNotFound,
    NotSupported,
    RegionNotFound,
    shorten,
)
from kernelgen_server.repository.store import LoadedModel
from kernelgen_server.settings import flag
from kernelgen_server.transport.native_codec import decode_conditioning
from kernelgen_server.transport.oip_codec import (
    VERSION,
    InferCall,
    decode_infer,
    encode_infer,
    encode_stream_error,
    encode_stream_response,
    infer_encoder,
    model_config,
    model_metadata,
)
from kernelgen_server.transport.readiness import HealthStates
from kernelgen_server.transport.shared_memory import SharedMemoryRegistry, check_off
from kernelgen_server.transport.status import deadline_of, decoded, rpc_scope
from kernelgen_wire.metadata import REPORT_TRAILER
from kernelgen_wire.oip import grpc_service_pb2 as oip
from kernelgen_wire.v1 import kernelgen_pb2 as pb

__all__ = ["OIP_SERVICE_NAME", "STREAM_INFLIGHT", "InferenceServicer"]

log = logging.getLogger("kernelgen.oip")

#: ``inference.GRPCInferenceService``.
OIP_SERVICE_NAME: str = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
#: Requests of one ModelStreamInfer stream in progress at once; reading waits beyond it.
STREAM_INFLIGHT = 256


def _version() -> str:
    try:
        return importlib.metadata.version("kernelgen")
    except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown"


class InferenceServicer:
    """Implements ``inference.GRPCInferenceService`` over a ``KernelService``."""

    def __init__(
        self, service: KernelService, health: HealthStates, registry: SharedMemoryRegistry | None
    ) -> None:
        self.service = service
        self.metrics = service.metrics
        self.health = health
        self.registry = registry
        self.max_message_bytes = int(service.settings.max_message_bytes)
        self.metrics.statistics.track(service.repository.names())
        self._version = _version()

    def _label(self, model: str) -> str:
        """The ``model`` label of a call's metrics: a served model's name, never a stranger's."""
        return model if model in self.service.repository else ""

    # --- health and metadata ------------------------------------------------------------------
    async def ServerLive(self, request: oip.ServerLiveRequest, context: Any) -> oip.ServerLiveResponse:
        return oip.ServerLiveResponse(live=True)

    async def ServerReady(self, request: oip.ServerReadyRequest, context: Any) -> oip.ServerReadyResponse:
        return oip.ServerReadyResponse(ready=self.health.serving(""))

    async def ModelReady(self, request: oip.ModelReadyRequest, context: Any) -> oip.ModelReadyResponse:
        ready = request.version in ("", VERSION) and self.health.serving(request.name)
        return oip.ModelReadyResponse(ready=bool(request.name) and ready)

    async def ServerMetadata(
        self, request: oip.ServerMetadataRequest, context: Any
    ) -> oip.ServerMetadataResponse:
        extensions = ["model_configuration", "statistics", "parameters"]
        if self.registry is not None:
            extensions.append("system_shared_memory")
        return oip.ServerMetadataResponse(name="kernelgen", version=self._version, extensions=extensions)

    async def ModelMetadata(
        self, request: oip.ModelMetadataRequest, context: aio.ServicerContext[Any, Any]
    ) -> oip.ModelMetadataResponse:
        async with rpc_scope(self.metrics, "ModelMetadata", context, self._label, model=request.name):
            return model_metadata(self._model(request.name, request.version))
        raise AssertionError("unreachable: errors leave through context.abort")

    async def ModelConfig(
        self, request: oip.ModelConfigRequest, context: aio.ServicerContext[Any, Any]
    ) -> oip.ModelConfigResponse:
        async with rpc_scope(self.metrics, "ModelConfig", context, self._label, model=request.name):
            model = self._model(request.name, request.version)
            config = model_config(model, self.service.settings, str(self.service.device))
            return oip.ModelConfigResponse(config=config)
        raise AssertionError("unreachable: errors leave through context.abort")

    async def RepositoryIndex(
        self, request: oip.RepositoryIndexRequest, context: aio.ServicerContext[Any, Any]
    ) -> oip.RepositoryIndexResponse:
        async with rpc_scope(self.metrics, "RepositoryIndex", context, self._label):
            if request.repository_name:
                raise InvalidRequest("this server has one repository: leave repository_name empty")
            response = oip.RepositoryIndexResponse()
            for entry in self.service.repository.entries():
                ready = self.health.serving(entry.name)
                if request.ready and not ready:
                    continue
                reason = ""
                if not isinstance(entry, LoadedModel):
                    reason = entry.reason
                elif not ready:
                    reason = "the server is starting or draining"
                response.models.add(
                    name=entry.name, version=VERSION, state="READY" if ready else "UNAVAILABLE", reason=reason
                )
            return response
        raise AssertionError("unreachable: errors leave through context.abort")

    async def RepositoryModelLoad(
        self, request: oip.RepositoryModelLoadRequest, context: aio.ServicerContext[Any, Any]
    ) -> oip.RepositoryModelLoadResponse:
        async with rpc_scope(
            self.metrics, "RepositoryModelLoad", context, self._label, model=request.model_name
        ):
            self._model(request.model_name, "")  # unknown or failed: NOT_FOUND or FAILED_PRECONDITION
            return oip.RepositoryModelLoadResponse()  # loaded at start-up: nothing to do
        raise AssertionError("unreachable: errors leave through context.abort")

    async def RepositoryModelUnload(
        self, request: oip.RepositoryModelUnloadRequest, context: aio.ServicerContext[Any, Any]
    ) -> oip.RepositoryModelUnloadResponse:
        async with rpc_scope(
            self.metrics, "RepositoryModelUnload", context, self._label, model=request.model_name
        ):
            raise NotSupported(
                "kernelgen loads its models at start-up and does not unload them; change the repository "
                "and restart (rolling) instead"
            )
        raise AssertionError("unreachable: errors leave through context.abort")

    # --- statistics ---------------------------------------------------------------------------
    async def ModelStatistics(
        self, request: oip.ModelStatisticsRequest, context: aio.ServicerContext[Any, Any]
    ) -> oip.ModelStatisticsResponse:
        async with rpc_scope(self.metrics, "ModelStatistics", context, self._label, model=request.name):
            statistics = self.metrics.statistics
            if request.name:
                if request.name not in self.service.repository or request.version not in ("", VERSION):
                    raise ModelNotFound(f"no model {request.name!r} (version {request.version or VERSION})")
                names = [request.name]
            else:
                names = statistics.names()
            response = oip.ModelStatisticsResponse()
            for name in names:
                stats = statistics.get(name)
                if stats is not None:
                    response.model_stats.append(_statistics_message(name, stats))
            return response
        raise AssertionError("unreachable: errors leave through context.abort")

    # --- inference ----------------------------------------------------------------------------
    async def ModelInfer(
        self, request: oip.ModelInferRequest, context: aio.ServicerContext[Any, Any]
    ) -> bytes:
        async with rpc_scope(self.metrics, "ModelInfer", context, self._label, model=request.model_name):
            body, report, release = await self._infer(request, deadline_of(context))
            # The response's bytes stay reserved until gRPC is done sending them.
            context.add_done_callback(lambda _context: release())
            context.set_trailing_metadata(((REPORT_TRAILER, report.SerializeToString()),))
            return body
        raise AssertionError("unreachable: errors leave through context.abort")

    async def ModelStreamInfer(
        self, requests: AsyncIterator[oip.ModelInferRequest], context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        deadline = deadline_of(context)
        answers: asyncio.Queue[bytes | None] = asyncio.Queue()
        slots = asyncio.Semaphore(STREAM_INFLIGHT)
        running: set[asyncio.Task[None]] = set()
        failure: list[BaseException] = []

        async def answer(request: oip.ModelInferRequest) -> None:
            try:
                answers.put_nowait(await self._stream_one(request, deadline))
            finally:
                slots.release()

        async def read() -> None:
            try:
                async for request in requests:
                    await slots.acquire()
                    task = asyncio.create_task(answer(request))
                    running.add(task)
                    task.add_done_callback(running.discard)
                while running:
                    await asyncio.wait(set(running))
            except Exception as exc:  # the request stream broke; the call ends with its error
                failure.append(exc)
            finally:
                answers.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (message := await answers.get()) is not None:
                yield message
        finally:
            reader.cancel()
            for task in list(running):
                task.cancel()
        if failure:
            raise failure[0]

    async def _stream_one(self, request: oip.ModelInferRequest, deadline: float | None) -> bytes:
        """One request of a stream: its response, or an error response; counted as a call."""
        start = time.perf_counter()
        self.metrics.inflight.inc()
        code = grpc.StatusCode.OK
        model = request.model_name
        try:
            body, _report, release = await self._infer(request, deadline)
            try:
                return encode_stream_response(body)
            finally:
                release()
        except KernelGenError as exc:
            code = exc.code
            log.warning("%s model=%s (stream): %s", exc.code.name, shorten(model), exc.message)
            return encode_stream_error(f"{exc.code.name}: {exc.message}")
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            code = grpc.StatusCode.INTERNAL
            log.exception("unexpected error in ModelStreamInfer (model=%s)", shorten(model))
            return encode_stream_error("INTERNAL: internal server error")
        finally:
            elapsed = time.perf_counter() - start
            self.metrics.inflight.dec()
            label = self._label(model)
            self.metrics.requests.labels(label, "ModelStreamInfer", code.name).inc()
            self.metrics.latency.labels(label, "ModelStreamInfer").observe(elapsed)
            self.metrics.statistics.on_call(label, "ModelStreamInfer", code == grpc.StatusCode.OK, elapsed)

    async def _infer(
        self, request: oip.ModelInferRequest, deadline: float | None
    ) -> tuple[bytes, pb.ServerReport, Callable[[], None]]:
        """One inference: checks and limits first, then the service, then the output's place.

        Returns the serialized response, the server's report, and what returns the
        response's bytes to the in-flight budget once it is sent.
        """
        model = self._model(request.model_name, request.model_version)
        call = decode_infer(request, model)
        self.service.planner.seq_lens(model, call.seq_lens)  # before anything is read from shared memory
        conditioning = await self._conditioning(call, model)
        representation = pb.REPRESENTATION_FACTORED if call.factored else pb.REPRESENTATION_DENSE
        plan = self.service.plan(model.name, call.seq_lens, conditioning, call.dtype, False, representation)
        region = None
        out = call.output_shm
        if out is not None:
            registry = check_off(self.registry)
            what = f"output {call.output_name}"
            region = registry.check(out.region, out.offset, out.byte_size, plan.kernel_bytes, what)
        elif plan.kernel_bytes > self.max_message_bytes:
            raise MessageTooLarge(
                f"output {call.output_name} would be {plan.kernel_bytes} bytes, over the server's limit of "
                f"{self.max_message_bytes} bytes for one message (set by {flag('max_message_bytes')}); "
                "have it written into a shared-memory region (same host), or stream it with kernelgen.v1"
            )
        # Computed kernels are written as this protocol's response where the batch encodes them.
        result = await self.service.compute(
            plan, deadline, None if region is not None else infer_encoder(call)
        )
        if region is not None and out is not None and self.registry is not None:
            await self.registry.write(region, out.offset, result.kernel.payload.data)
            return encode_infer(call, result, in_shared_memory=True), result.report, result.releaser
        return encode_infer(call, result, in_shared_memory=False), result.report, result.releaser

    async def _conditioning(self, call: InferCall, model: LoadedModel) -> Any:
        """The request's conditioning as a checked float32 array (None when absent).

        Its shape is checked against the model and the row limit before anything
        is read from shared memory.
        """
        if call.conditioning_shape is None:
            return None
        rows, width = call.conditioning_shape
        self.service.planner.conditioning_shape(model, rows, width)
        data = call.conditioning
        ref = call.conditioning_shm
        if ref is not None:
            registry = check_off(self.registry)
            nbytes = rows * width * 4
            region = registry.check(ref.region, ref.offset, ref.byte_size, nbytes, "input conditioning")
            data = await registry.read(region, ref.offset, nbytes)
        tensor = pb.Tensor(shape=[rows, width], dtype=pb.DTYPE_FLOAT32, data=data or b"")
        return decode_conditioning(tensor)

    def _model(self, name: str, version: str) -> LoadedModel:
        model = self.service.model(name)  # empty, unknown or failed: the native errors
        if version not in ("", VERSION):
            raise ModelNotFound(f"model {name!r} has no version {version!r}; its one version is {VERSION}")
        return model

    # --- system shared memory -----------------------------------------------------------------
    async def SystemSharedMemoryRegister(
        self, request: oip.SystemSharedMemoryRegisterRequest, context: aio.ServicerContext[Any, Any]
    ) -> oip.SystemSharedMemoryRegisterResponse:
        async with rpc_scope(self.metrics, "SystemSharedMemoryRegister", context, self._label):
            registry = check_off(self.registry)
            registry.register(request.name, request.key, request.offset, request.byte_size)
            return oip.SystemSharedMemoryRegisterResponse()
        raise AssertionError("unreachable: errors leave through context.abort")

    async def SystemSharedMemoryStatus(
        self, request: oip.SystemSharedMemoryStatusRequest, context: aio.ServicerContext[Any, Any]
    ) -> oip.SystemSharedMemoryStatusResponse:
        async with rpc_scope(self.metrics, "SystemSharedMemoryStatus", context, self._label):
            response = oip.SystemSharedMemoryStatusResponse()
            if self.registry is None:
                if request.name:
                    raise RegionNotFound(f"no shared-memory region named {request.name!r} is registered")
                return response  # shared memory is off: no regions
            for region in self.registry.status(request.name):
                response.regions[region.name].CopyFrom(
                    oip.SystemSharedMemoryStatusResponse.RegionStatus(
                        name=region.name, key=region.key, offset=region.offset, byte_size=region.byte_size
                    )
                )
            return response
        raise AssertionError("unreachable: errors leave through context.abort")

    async def SystemSharedMemoryUnregister(
        self, request: oip.SystemSharedMemoryUnregisterRequest, context: aio.ServicerContext[Any, Any]
    ) -> oip.SystemSharedMemoryUnregisterResponse:
        async with rpc_scope(self.metrics, "SystemSharedMemoryUnregister", context, self._label):
            if self.registry is not None:
                await self.registry.unregister(request.name)
            elif request.name:
                raise RegionNotFound(f"no shared-memory region named {request.name!r} is registered")
            return oip.SystemSharedMemoryUnregisterResponse()
        raise AssertionError("unreachable: errors leave through context.abort")

    # --- CUDA shared memory: not offered --------------------------------------------------------
    async def CudaSharedMemoryRegister(
        self, request: oip.CudaSharedMemoryRegisterRequest, context: aio.ServicerContext[Any, Any]
    ) -> oip.CudaSharedMemoryRegisterResponse:
        async with rpc_scope(self.metrics, "CudaSharedMemoryRegister", context, self._label):
            raise NotSupported(
                f"CUDA shared memory is not supported by this server (it computes on "
                f"{self.service.device}); use system shared memory"
                + ("" if self.registry is not None else " (enabled with --shared-memory)")
            )
        raise AssertionError("unreachable: errors leave through context.abort")

    async def CudaSharedMemoryStatus(
        self, request: oip.CudaSharedMemoryStatusRequest, context: aio.ServicerContext[Any, Any]
    ) -> oip.CudaSharedMemoryStatusResponse:
        async with rpc_scope(self.metrics, "CudaSharedMemoryStatus", context, self._label):
            if request.name:
                raise RegionNotFound(f"no CUDA shared-memory region named {request.name!r} is registered")
            return oip.CudaSharedMemoryStatusResponse()
        raise AssertionError("unreachable: errors leave through context.abort")

    async def CudaSharedMemoryUnregister(
        self, request: oip.CudaSharedMemoryUnregisterRequest, context: aio.ServicerContext[Any, Any]
    ) -> oip.CudaSharedMemoryUnregisterResponse:
        async with rpc_scope(self.metrics, "CudaSharedMemoryUnregister", context, self._label):
            if request.name:
                raise RegionNotFound(f"no CUDA shared-memory region named {request.name!r} is registered")
            return oip.CudaSharedMemoryUnregisterResponse()  # every region of none
        raise AssertionError("unreachable: errors leave through context.abort")

    # --- registration -------------------------------------------------------------------------
    def handler(self) -> grpc.GenericRpcHandler:
        """Method handlers; inference responses are already serialized bytes."""

        def raw(data: bytes) -> bytes:
            return data

        def unary(name: str, response_serializer: Any = None) -> grpc.RpcMethodHandler:
            # Requests arrive as bytes, decoded in the call's scope: bytes that are not the
            # method's message are INVALID_ARGUMENT, after authentication, as on kernelgen.v1.
            method = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name[name]
            request_class = getattr(oip, method.input_type.name)
            response_class = getattr(oip, method.output_type.name)
            return grpc.unary_unary_rpc_method_handler(
                decoded(request_class, getattr(self, name), self.metrics, name, self._label),
                request_deserializer=raw,
                response_serializer=response_serializer or response_class.SerializeToString,
            )

        names = [m.name for m in oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods]
        handlers = {name: unary(name) for name in names if name not in ("ModelInfer", "ModelStreamInfer")}
        handlers["ModelInfer"] = unary("ModelInfer", raw)
        handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
            self.ModelStreamInfer,
            request_deserializer=oip.ModelInferRequest.FromString,
            response_serializer=raw,
        )
        return grpc.method_handlers_generic_handler(OIP_SERVICE_NAME, handlers)


def _duration(value: Duration) -> oip.StatisticDuration:
    return oip.StatisticDuration(count=value.count, ns=value.ns)


def _statistics_message(name: str, stats: ModelStatistics) -> oip.ModelStatistics:
    message = oip.ModelStatistics(
        name=name,
        version=VERSION,
        last_inference=stats.last_inference_ms,
        inference_count=stats.inference_count,
        execution_count=stats.execution_count,
        inference_stats=oip.InferStatistics(
            success=_duration(stats.success),
            fail=_duration(stats.fail),
            queue=_duration(stats.queue),
            compute_infer=_duration(stats.compute_infer),
            cache_hit=_duration(stats.cache_hit),
            cache_miss=_duration(stats.cache_miss),
        ),
    )
    for size in sorted(stats.batches):
        message.batch_stats.add(batch_size=size, compute_infer=_duration(stats.batches[size]))
    return message


def reflection_pool(*files: Any) -> Any:
    """A descriptor pool holding ``files`` and their imports, for the reflection service.

    The Open Inference Protocol's messages live in a pool of their own
    (``kernelgen_wire.oip.pool``), so reflection, which answers from one pool,
    gets one that holds both protocols' files.
    """
    from google.protobuf import descriptor_pool

    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file: Any) -> None:
        if file.name in added:
            return
        for dependency in file.dependencies:
            add(dependency)
        pool.AddSerializedFile(file.serialized_pb)
        added.add(file.name)

    for file in files:
        add(file)
    return pool
