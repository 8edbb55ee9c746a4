"""``kernelgen loadtest --protocol oip``: the same workload sent as Open Inference Protocol ModelInfer calls.

``OipClient`` has the ``generate`` of ``AsyncKernelClient`` that the step
runner calls, so every workload option, statistic and gate works unchanged:
each request becomes a ``ModelInferRequest`` (``seq_lens`` and
``conditioning`` as raw contents, the ``dtype`` parameter, the ``kernel`` or
``factors`` output), and the server's report comes back in the call's
``kernelgen-report-bin`` trailer. With ``shared_memory`` the output is written into a
region of the client's pool (``kernelgen_client.shared_memory``), registered
with ``SystemSharedMemoryRegister``.

The protocol's generated modules are imported only when an ``OipClient`` is
made: the client package never loads them.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Sequence
from typing import Any

import grpc
import numpy as np
from grpc import aio

from kernelgen_client.errors import (
    InvalidRequest,
    KernelServiceError,
    MalformedResponse,
    RegionNotFound,
    from_rpc_error,
)
from kernelgen_client.factored import FactoredKernel, OutputHead
from kernelgen_client.results import KernelResult, ServerReport
from kernelgen_client.shared_memory import MappedRegion, RegionPool, SharedMemoryPolicy
from kernelgen_client.tensors import decode_numpy
from kernelgen_wire.dtypes import DTYPE_BY_NAME
from kernelgen_wire.kernel_messages import ResponseView, TensorView, report_from_trailers
from kernelgen_wire.sizes import kernel_spatial, tensor_bytes
from kernelgen_wire.v1 import kernelgen_pb2 as pb

__all__ = ["OipClient"]

_SERVICE = "/inference.GRPCInferenceService/"
_DATATYPES = {"float32": "FP32", "float16": "FP16", "bfloat16": "BF16"}
_WIRE = {"FP32": 1, "FP16": 2, "BF16": 3}  # kernelgen.v1 DType values, for decoding
_ITEMSIZE = {"FP32": 4, "FP16": 2, "BF16": 2}


class OipClient:
    """An asyncio Open Inference Protocol client with ``AsyncKernelClient.generate``'s signature."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = None,
        tls: Any = None,
        token: str | None = None,
        connections: int = 1,
        shared_memory: bool = False,
        retries: Any = None,
    ) -> None:
        from kernelgen_wire.oip import grpc_service_pb2

        if shared_memory and connections != 1:
            raise ValueError("shared memory needs one connection: a region is known to one server process")
        self._oip: Any = grpc_service_pb2
        self.target = target
        self._timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", -1),
            ("grpc.max_send_message_length", -1),
        ]
        if tls:
            from kernelgen_client import TLSConfig

            config = tls if isinstance(tls, TLSConfig) else TLSConfig()
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_pem(config.root_certificates),
                private_key=_pem(config.private_key),
                certificate_chain=_pem(config.certificate_chain),
            )
            if config.server_name_override:
                options.append(("grpc.ssl_target_name_override", config.server_name_override))
            self._channels = [
                aio.secure_channel(target, credentials, options=options) for _ in range(connections)
            ]
        else:
            self._channels = [aio.insecure_channel(target, options=options) for _ in range(connections)]
        oip = self._oip
        self._infer = itertools.cycle(
            [
                channel.unary_unary(
                    _SERVICE + "ModelInfer",
                    request_serializer=oip.ModelInferRequest.SerializeToString,
                    response_deserializer=oip.ModelInferResponse.FromString,
                )
                for channel in self._channels
            ]
        )
        self._pool = RegionPool(SharedMemoryPolicy()) if shared_memory else None
        self._widths: dict[tuple[str, bool], int] = {}
        self._output_heads: dict[str, OutputHead] = {}
        self._native: Any = None
        self._native_options = {"timeout": timeout, "tls": tls, "token": token}

    async def close(self) -> None:
        if self._native is not None:
            await self._native.close()
        if self._pool is not None:
            for region in self._pool.close():
                await self._unregister(region)
        for channel in self._channels:
            await channel.close()

    async def _unary(self, method: str, request: Any, response_class: Any) -> Any:
        call = self._channels[0].unary_unary(
            _SERVICE + method,
            request_serializer=type(request).SerializeToString,
            response_deserializer=response_class.FromString,
        )
        try:
            return await call(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, self.target) from exc

    async def _register(self, region: MappedRegion) -> None:
        oip = self._oip
        request = oip.SystemSharedMemoryRegisterRequest(
            name=region.name, key=region.key, byte_size=region.byte_size
        )
        try:
            await self._unary("SystemSharedMemoryRegister", request, oip.SystemSharedMemoryRegisterResponse)
        except BaseException:
            assert self._pool is not None
            self._pool.forget(region)
            raise
        region.registered = True

    async def _unregister(self, region: MappedRegion) -> None:
        assert self._pool is not None
        if region.registered:
            oip = self._oip
            request = oip.SystemSharedMemoryUnregisterRequest(name=region.name)
            with contextlib.suppress(KernelServiceError):  # the server is gone, and its regions
                await self._unary(
                    "SystemSharedMemoryUnregister", request, oip.SystemSharedMemoryUnregisterResponse
                )
        self._pool.drop(region)

    def _request(
        self, model: str, seq_lens: Sequence[int], conditioning: Any, dtype: str, factored: bool
    ) -> Any:
        oip = self._oip
        if dtype not in _DATATYPES:
            raise InvalidRequest(f"dtype must be one of {', '.join(_DATATYPES)}, got {dtype!r}")
        request = oip.ModelInferRequest(model_name=model)
        request.parameters["dtype"].string_param = _DATATYPES[dtype]
        lens = np.asarray(list(seq_lens), dtype="<i8")
        request.inputs.add(name="seq_lens", datatype="INT64", shape=[len(lens)])
        request.raw_input_contents.append(lens.tobytes())
        if conditioning is not None:
            rows = np.ascontiguousarray(conditioning, dtype="<f4")
            if rows.ndim == 1:
                rows = rows[None, :]
            request.inputs.add(name="conditioning", datatype="FP32", shape=list(rows.shape))
            request.raw_input_contents.append(rows.tobytes())
        request.outputs.add(name="factors" if factored else "kernel")
        return request

    async def generate(
        self,
        model: str,
        seq_lens: int | Sequence[int],
        conditioning: Any = None,
        *,
        dtype: str = "float32",
        with_report: bool = True,
        stream: bool | None = None,
        representation: str = "dense",
    ) -> KernelResult[Any]:
        """One ModelInfer call; the result as ``AsyncKernelClient.generate(with_report=True)`` gives it.

        ``representation="auto"`` asks for the kernel; ``stream`` has no meaning here.
        """
        started = time.perf_counter()
        lens = [seq_lens] if isinstance(seq_lens, int) else list(seq_lens)
        factored = representation == "factored"
        request = self._request(model, lens, conditioning, dtype, factored)
        region: MappedRegion | None = None
        if self._pool is not None:
            region = await self._output_region(request, model, lens, conditioning, dtype, factored)
        try:
            response, trailers = await self._call(request, region)
            output = response.outputs[0]
            datatype, shape = output.datatype, tuple(int(n) for n in output.shape)
            wire = _WIRE.get(datatype, 1)
            nbytes = math.prod(shape) * _ITEMSIZE.get(datatype, 4)
            if region is not None and self._pool is not None:
                # A view of the region, which returns to the pool when the kernel is gone.
                written = ResponseView(
                    TensorView(shape, wire, memoryview(b"")), None, pb.ServerReport(), "", nbytes
                )
                raw = self._pool.view(region, written, nbytes).kernel.data.toreadonly()
            else:
                raw = memoryview(response.raw_output_contents[0]).toreadonly()
        except BaseException:
            if region is not None and self._pool is not None:
                self._pool.release(region)
            raise
        kernel: Any = decode_numpy(raw, shape, wire)
        if factored:
            output_head = await self._output_head(model)
            if output.parameters["head_hash"].string_param != output_head.head_hash:
                raise MalformedResponse(
                    f"the factors of {model!r} name another output head than the server's"
                )
            kernel = FactoredKernel(kernel, output_head, nbytes)
        return KernelResult(
            kernel=kernel,
            grid=None,
            report=_report(trailers, factored),
            wire_dtype=dtype,
            raw=raw,
            streamed=False,
            elapsed_ms=(time.perf_counter() - started) * 1000.0,
            representation="factored" if factored else "dense",
        )

    async def _output_region(
        self, request: Any, model: str, lens: list[int], conditioning: Any, dtype: str, factored: bool
    ) -> MappedRegion | None:
        """A region of the pool for the output, named in the request; None: the socket."""
        assert self._pool is not None
        rows = 1 if conditioning is None or np.ndim(conditioning) == 1 else len(conditioning)
        width = await self._width(model, factored)
        # The size of a symmetric kernel: a causal model's (s points on its axis, not 2s - 1) fits too.
        size = tensor_bytes((rows, *kernel_spatial(lens), width), DTYPE_BY_NAME[dtype])
        lease = self._pool.acquire(size)
        if lease is None:
            return None
        region, evicted = lease
        for old in evicted:
            await self._unregister(old)
        if not region.registered:
            try:
                await self._register(region)
            except BaseException:
                self._pool.release(region)
                raise
        output = request.outputs[0]
        output.parameters["shared_memory_region"].string_param = region.name
        output.parameters["shared_memory_byte_size"].int64_param = size
        return region

    async def _call(self, request: Any, region: MappedRegion | None) -> tuple[Any, Any]:
        """The response and its trailers (the server's report); a lost region is registered again, once."""
        try:
            return await self._attempt(request)
        except grpc.RpcError as exc:
            error = from_rpc_error(exc, self.target)
        if isinstance(error, RegionNotFound) and region is not None:
            region.registered = False
            await self._register(region)
            try:
                return await self._attempt(request)
            except grpc.RpcError as exc:
                raise from_rpc_error(exc, self.target) from exc
        raise error

    async def _attempt(self, request: Any) -> tuple[Any, Any]:
        call = next(self._infer)(request, timeout=self._timeout, metadata=self._metadata)
        response = await call
        return response, await call.trailing_metadata()

    async def _output_head(self, model: str) -> OutputHead:
        """The model's output head, from kernelgen.v1's GetOutputHead on the same server, once per model."""
        if model not in self._output_heads:
            if self._native is None:
                from kernelgen_client import AsyncKernelClient

                self._native = AsyncKernelClient(self.target, retries=None, **self._native_options)
            self._output_heads[model] = await self._native.output_head(model)
        return self._output_heads[model]

    async def _width(self, model: str, factored: bool) -> int:
        """The last dimension of the model's kernel (or factors), from its metadata, once per model."""
        cache = self._widths
        key = (model, factored)
        if key not in cache:
            oip = self._oip
            metadata = await self._unary(
                "ModelMetadata", oip.ModelMetadataRequest(name=model), oip.ModelMetadataResponse
            )
            for tensor in metadata.outputs:
                cache[(model, tensor.name == "factors")] = int(tensor.shape[-1])
        return cache[key]


def _report(trailers: Any, factored: bool) -> ServerReport:
    """The server's report from the call's ``kernelgen-report-bin`` trailer, as kernelgen.v1 sends it."""
    message = report_from_trailers(trailers) or pb.ServerReport()
    report = ServerReport.from_pb(message)
    if factored != (report.representation == "factored"):
        raise MalformedResponse("the server's report names another representation than the one asked")
    return report


def _pem(value: Any) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    text = str(value)
    if text.lstrip().startswith("-----BEGIN"):
        return text.encode()
    with open(text, "rb") as handle:
        return handle.read()
