"""``AsyncKernelClient``: the asyncio client (grpc.aio).

This module is the one definition of both clients' methods, signatures and
docstrings: ``client.py`` (``KernelClient``, blocking) is generated from it by
``scripts/gen_sync_client.py``, which drops ``async``/``await`` and swaps the
names of the asyncio transport for the blocking one (``_transport``). Edit
this file, then run the script; ``make test`` fails when they differ.
"""

# ``timeout`` is each call's gRPC deadline, the same parameter as on the sync client.
# ruff: noqa: ASYNC109

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, overload

import grpc
import numpy.typing as npt

from kernelgen_client._base import ClientConfig, ModelCache
from kernelgen_client._channel import MetadataLike, RetryPolicy, TargetLike, TLSConfig, merge_metadata
from kernelgen_client._generate import (
    Deadline,
    GenerateCall,
    SeqLens,
    check_seq_lens,
    pointing,
    prepare,
    prepare_group,
)
from kernelgen_client._health import decode_response, encode_request
from kernelgen_client._responses import Assembled, Assembler, GroupReassembler, Reassembler, read_unary
from kernelgen_client._transport import AsyncChannels, AsyncOnce
from kernelgen_client.errors import (
    ConnectionFailed,
    InvalidRequest,
    KernelServiceError,
    MalformedResponse,
    ModelNotFound,
    ModelNotReady,
    RegionNotFound,
    from_rpc_error,
)
from kernelgen_client.factored import FactoredKernel, OutputHead
from kernelgen_client.results import FlopReport, GroupInfo, HealthStatus, KernelResult, ModelInfo
from kernelgen_client.shared_memory import MappedRegion, RegionPool, SharedMemoryPolicy, coerce_policy
from kernelgen_client.tensors import ConditioningLike, DTypeLike
from kernelgen_wire.kernel_messages import ResponseView
from kernelgen_wire.metadata import Reason
from kernelgen_wire.v1 import kernelgen_pb2 as pb

if TYPE_CHECKING:
    import torch

__all__ = ["AsyncKernelClient"]

NDArray = npt.NDArray[Any]
Representation = Literal["dense", "factored", "auto"]


class AsyncKernelClient:
    """An asyncio client of a kernelgen server, for one event loop.

    Args:
        target: ``"host:port"``, several of them (a list or ``"h1:p1,h2:p2"``,
            balanced round robin), or a gRPC URI such as ``"dns:///name:50051"``.
            Default: ``$KERNELGEN_TARGET``, else ``127.0.0.1:50051``.
        timeout: default deadline of every call, in seconds (``None``: none).
        tls: ``True`` for TLS with the system's roots, or a ``TLSConfig``.
        token: a bearer token, sent as ``authorization: Bearer <token>``.
        metadata: metadata sent with every call.
        retries: a ``RetryPolicy``, a number of attempts, or ``None`` for none.
        load_balancing: ``"round_robin"`` (default) or ``"pick_first"``.
        options: extra gRPC channel arguments (they win over the client's own).
        connections: channels the client's calls take in turn, each a connection of its
            own to every server address (1). Raise it to reach every worker process of a
            ``kernelgen serve --workers N`` server, which Linux balances by connection.
        shared_memory: ``True`` or a ``SharedMemoryPolicy``: kernels are written by the server
            into shared-memory regions this client owns, and results are views of them (a
            server on this host started with ``--shared-memory``; one target, one connection).
            See ``kernelgen_client.shared_memory``.

    Example::

        from kernelgen_client import AsyncKernelClient

        async with AsyncKernelClient("127.0.0.1:50051", timeout=30) as client:
            kernel = await client.generate("hyena-2d", [29, 29])  # numpy [1, 57, 57, 384]
            report = await client.flop_count("hyena-2d", [29, 29])

    Calls run concurrently on the client's event loop, and the server batches them::

        kernels = await asyncio.gather(
            *(client.generate("hyena-2d", [29, 29], row) for row in np.eye(8, 384))
        )
    """

    def __init__(
        self,
        target: TargetLike | None = None,
        *,
        timeout: float | None = None,
        tls: TLSConfig | bool | None = None,
        token: str | None = None,
        metadata: MetadataLike | None = None,
        retries: RetryPolicy | int | None = RetryPolicy(),  # noqa: B008 - frozen, shared safely
        load_balancing: str = "round_robin",
        options: Sequence[tuple[str, Any]] = (),
        connections: int = 1,
        shared_memory: SharedMemoryPolicy | bool = False,
    ) -> None:
        policy = coerce_policy(shared_memory)
        if policy is not None and connections != 1:
            raise ValueError("shared_memory needs one connection: a region is known to one server process")
        self._config = ClientConfig.build(
            target,
            timeout=timeout,
            tls=tls,
            token=token,
            metadata=metadata,
            retries=retries,
            load_balancing=load_balancing,
            options=options,
        )
        self._channels = AsyncChannels(self._config, connections)
        self._models = ModelCache()
        self._output_heads: AsyncOnce[OutputHead] = AsyncOnce()
        self._shared_memory = RegionPool(policy) if policy is not None else None

    @property
    def target(self) -> str:
        """The gRPC target the channel connects to."""
        return self._config.target

    # --- life cycle ---------------------------------------------------------------------------
    async def close(self) -> None:
        """Close the channels; calls in progress are cancelled. Shared-memory regions are
        unregistered and removed (arrays still viewing one keep its memory)."""
        if self._shared_memory is not None:
            for region in self._shared_memory.close():
                await self._unregister_region(region)
        await self._channels.close()

    async def __aenter__(self) -> AsyncKernelClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"AsyncKernelClient({self.target!r})"

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until every channel is connected; ``ConnectionFailed`` after ``timeout`` seconds."""
        if not await self._channels.ready(timeout):
            raise ConnectionFailed(f"no server became reachable at {self.target} within {timeout} s")

    # --- plumbing -----------------------------------------------------------------------------
    async def _call(self, name: str, request: Any, deadline: Deadline, metadata: MetadataLike | None) -> Any:
        try:
            return await self._channels.unary(name)(
                request,
                timeout=deadline.remaining(),
                metadata=self._config.call_metadata(metadata),
                wait_for_ready=self._config.retries.wait_for_ready,
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, self.target) from exc

    async def _unary_kernel(
        self, request: pb.GenerateKernelRequest, deadline: Deadline, metadata: MetadataLike | None
    ) -> ResponseView:
        try:
            raw, trailers = await self._channels.unary_with_trailers(
                "GenerateKernel",
                request,
                timeout=deadline.remaining(),
                metadata=self._config.call_metadata(metadata),
                wait_for_ready=self._config.retries.wait_for_ready,
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, self.target) from exc
        return read_unary(raw, trailers)

    async def _streamed(
        self, request: pb.GenerateKernelRequest, deadline: Deadline, metadata: MetadataLike | None
    ) -> ResponseView:
        return await self._read_stream("StreamKernel", request, Reassembler(), deadline, metadata)

    async def _group_stream(
        self, request: pb.GenerateGroupRequest, deadline: Deadline, metadata: MetadataLike | None
    ) -> tuple[str, list[str], list[ResponseView]]:
        return await self._read_stream("GenerateGroup", request, GroupReassembler(), deadline, metadata)

    async def _read_stream(
        self,
        method: str,
        request: pb.GenerateKernelRequest | pb.GenerateGroupRequest,
        assembler: Assembler[Assembled],
        deadline: Deadline,
        metadata: MetadataLike | None,
    ) -> Assembled:
        """Every message of one server stream into ``assembler``; the call is cancelled if we stop early."""
        call = self._channels.stream(method)(
            request,
            timeout=deadline.remaining(),
            metadata=self._config.call_metadata(metadata),
            wait_for_ready=self._config.retries.wait_for_ready,
        )
        try:
            async for message in call:
                assembler.add(message)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, self.target) from exc
        except BaseException:
            call.cancel()
            raise
        return assembler.finish()

    async def _model_infos(self, deadline: Deadline, metadata: MetadataLike | None) -> list[ModelInfo]:
        reply = await self._call("ListModels", pb.ListModelsRequest(), deadline, metadata)
        infos = [ModelInfo.from_pb(m) for m in reply.models]
        for info in infos:
            self._models.put(info)
        return infos

    async def _group(self, name: str, deadline: Deadline, metadata: MetadataLike | None) -> GroupInfo:
        infos = await self._model_infos(deadline, metadata)
        for group in GroupInfo.collect(infos):
            if group.name == name:
                return group
        model = next((info for info in infos if info.name == name), None)
        if model is not None and not model.ready:
            raise ModelNotReady(f"{name!r} is not ready: {model.reason}")
        if model is not None:
            raise InvalidRequest(f"{name!r} is a model, not a group", reason=Reason.MODEL_NOT_GROUP)
        raise ModelNotFound(f"unknown group {name!r}")

    async def _info(self, model: str, deadline: Deadline, metadata: MetadataLike | None) -> ModelInfo:
        info = self._models.get(model)
        if info is None:
            info = ModelInfo.from_pb(
                await self._call("GetModel", pb.GetModelRequest(model=model), deadline, metadata)
            )
            self._models.put(info)
        return info

    # --- metadata calls -----------------------------------------------------------------------
    async def list_models(
        self, *, timeout: float | None = None, metadata: MetadataLike | None = None
    ) -> list[ModelInfo]:
        """Every model of the server's repository, ready or not, by name (a group's members in order)."""
        return await self._model_infos(Deadline(self._config.call_timeout(timeout)), metadata)

    async def list_groups(
        self, *, timeout: float | None = None, metadata: MetadataLike | None = None
    ) -> list[GroupInfo]:
        """Every group of the server's repository (the kernel generators of one network), by name."""
        deadline = Deadline(self._config.call_timeout(timeout))
        return GroupInfo.collect(await self._model_infos(deadline, metadata))

    async def get_group(
        self, name: str, *, timeout: float | None = None, metadata: MetadataLike | None = None
    ) -> GroupInfo:
        """One group and its members in order; ``ModelNotFound`` when the server has none of that name."""
        with pointing("get_group", name):
            return await self._group(name, Deadline(self._config.call_timeout(timeout)), metadata)

    async def get_model(
        self, name: str, *, timeout: float | None = None, metadata: MetadataLike | None = None
    ) -> ModelInfo:
        """One model; ``ModelNotFound`` when the server has none of that name."""
        with pointing("get_model", name):
            reply = await self._call(
                "GetModel",
                pb.GetModelRequest(model=name),
                Deadline(self._config.call_timeout(timeout)),
                metadata,
            )
        info = ModelInfo.from_pb(reply)
        self._models.put(info)
        return info

    async def flop_count(
        self,
        model: str,
        seq_lens: SeqLens,
        inference: bool = False,
        *,
        timeout: float | None = None,
        metadata: MetadataLike | None = None,
    ) -> FlopReport:
        """The reference model's FLOP count for a grid, and the kernel's size."""
        request = pb.FlopCountRequest(model=model, seq_lens=check_seq_lens(seq_lens), inference=inference)
        reply = await self._call("FlopCount", request, Deadline(self._config.call_timeout(timeout)), metadata)
        return FlopReport.from_pb(reply)

    async def output_head(
        self, model: str, *, timeout: float | None = None, metadata: MetadataLike | None = None
    ) -> OutputHead:
        """The model's output head (``kernel = factors @ weight_t + bias``), as factored kernels use it."""
        deadline = Deadline(self._config.call_timeout(timeout))
        info = await self._info(model, deadline, metadata)
        return await self._output_head(model, info.head_hash, deadline, metadata)

    async def health(
        self, model: str | None = None, *, timeout: float | None = None, metadata: MetadataLike | None = None
    ) -> HealthStatus:
        """The server's serving status, or one model's; ``SERVICE_UNKNOWN`` for an unknown model."""
        try:
            reply = await self._call(
                "Check", encode_request(model or ""), Deadline(self._config.call_timeout(timeout)), metadata
            )
        except ModelNotFound:
            return HealthStatus.SERVICE_UNKNOWN
        return decode_response(reply)

    # --- generate -----------------------------------------------------------------------------
    @overload
    async def generate(
        self,
        model: str,
        seq_lens: SeqLens,
        conditioning: ConditioningLike | None = None,
        *,
        dtype: DTypeLike = "float32",
        return_grid: Literal[False] = False,
        as_torch: Literal[False] = False,
        with_report: Literal[False] = False,
        copy: bool = False,
        stream: bool | None = None,
        representation: Literal["dense"] = "dense",
        timeout: float | None = None,
        metadata: MetadataLike | None = None,
    ) -> NDArray: ...
    @overload
    async def generate(
        self,
        model: str,
        seq_lens: SeqLens,
        conditioning: ConditioningLike | None = None,
        *,
        dtype: DTypeLike = "float32",
        return_grid: Literal[True],
        as_torch: Literal[False] = False,
        with_report: Literal[False] = False,
        copy: bool = False,
        stream: bool | None = None,
        representation: Literal["dense"] = "dense",
        timeout: float | None = None,
        metadata: MetadataLike | None = None,
    ) -> tuple[NDArray, NDArray]: ...
    @overload
    async def generate(
        self,
        model: str,
        seq_lens: SeqLens,
        conditioning: ConditioningLike | None = None,
        *,
        dtype: DTypeLike = "float32",
        return_grid: Literal[False] = False,
        as_torch: Literal[True],
        with_report: Literal[False] = False,
        copy: bool = False,
        stream: bool | None = None,
        representation: Literal["dense"] = "dense",
        timeout: float | None = None,
        metadata: MetadataLike | None = None,
    ) -> torch.Tensor: ...
    @overload
    async def generate(
        self,
        model: str,
        seq_lens: SeqLens,
        conditioning: ConditioningLike | None = None,
        *,
        dtype: DTypeLike = "float32",
        return_grid: Literal[True],
        as_torch: Literal[True],
        with_report: Literal[False] = False,
        copy: bool = False,
        stream: bool | None = None,
        representation: Literal["dense"] = "dense",
        timeout: float | None = None,
        metadata: MetadataLike | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...
    @overload
    async def generate(
        self,
        model: str,
        seq_lens: SeqLens,
        conditioning: ConditioningLike | None = None,
        *,
        dtype: DTypeLike = "float32",
        return_grid: bool = False,
        as_torch: Literal[False] = False,
        with_report: Literal[True],
        copy: bool = False,
        stream: bool | None = None,
        representation: Literal["dense"] = "dense",
        timeout: float | None = None,
        metadata: MetadataLike | None = None,
    ) -> KernelResult[NDArray]: ...
    @overload
    async def generate(
        self,
        model: str,
        seq_lens: SeqLens,
        conditioning: ConditioningLike | None = None,
        *,
        dtype: DTypeLike = "float32",
        return_grid: bool = False,
        as_torch: Literal[True],
        with_report: Literal[True],
        copy: bool = False,
        stream: bool | None = None,
        representation: Literal["dense"] = "dense",
        timeout: float | None = None,
        metadata: MetadataLike | None = None,
    ) -> KernelResult[torch.Tensor]: ...
    @overload
    async def generate(
        self,
        model: str,
        seq_lens: SeqLens,
        conditioning: ConditioningLike | None = None,
        *,
        dtype: DTypeLike = "float32",
        return_grid: Literal[False] = False,
        as_torch: Literal[False] = False,
        with_report: Literal[False] = False,
        copy: bool = False,
        stream: bool | None = None,
        representation: Literal["factored"],
        timeout: float | None = None,
        metadata: MetadataLike | None = None,
    ) -> FactoredKernel[NDArray]: ...
    @overload
    async def generate(
        self,
        model: str,
        seq_lens: SeqLens,
        conditioning: ConditioningLike | None = None,
        *,
        dtype: DTypeLike = "float32",
        return_grid: Literal[False] = False,
        as_torch: Literal[True],
        with_report: Literal[False] = False,
        copy: bool = False,
        stream: bool | None = None,
        representation: Literal["factored"],
        timeout: float | None = None,
        metadata: MetadataLike | None = None,
    ) -> FactoredKernel[torch.Tensor]: ...
    @overload
    async def generate(
        self,
        model: str,
        seq_lens: SeqLens,
        conditioning: ConditioningLike | None = None,
        *,
        dtype: DTypeLike = "float32",
        return_grid: bool = False,
        as_torch: bool = False,
        with_report: bool = False,
        copy: bool = False,
        stream: bool | None = None,
        representation: Representation = "dense",
        timeout: float | None = None,
        metadata: MetadataLike | None = None,
    ) -> Any: ...

    async def generate(
        self,
        model: str,
        seq_lens: SeqLens,
        conditioning: ConditioningLike | None = None,
        *,
        dtype: DTypeLike = "float32",
        return_grid: bool = False,
        as_torch: bool = False,
        with_report: bool = False,
        copy: bool = False,
        stream: bool | None = None,
        representation: Representation = "dense",
        timeout: float | None = None,
        metadata: MetadataLike | None = None,
    ) -> Any:
        """Generate one kernel: ``[1 | B, 2*s_0-1, ..., out_dim]``.

        Args:
            model: the model's name on the server.
            seq_lens: one length per spatial axis (an int for 1-D models).
            conditioning: ``[B, cond_dim]`` (or ``[cond_dim]``) FiLM conditioning:
                a numpy array, nested lists, or a torch tensor. ``None``: the
                unconditioned kernel, which the server caches.
            dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"`` on the wire.
                numpy has no bfloat16, so numpy results of bfloat16 are float32;
                ``as_torch=True`` keeps ``torch.bfloat16``, and
                ``with_report=True`` gives the raw bytes as ``result.raw``.
            return_grid: also return the ``[1, *spatial, data_dim]`` coordinate grid.
            as_torch: return torch tensors (needs torch installed).
            with_report: return a ``KernelResult`` (kernel, grid, server report, timings).
            copy: return arrays that own their memory. By default numpy results
                are zero-copy views of the received bytes, read-only for kernels
                that came in one message (under ~3.5 MiB), writable for streamed ones.
            stream: force (``True``) or forbid (``False``) streaming; by default
                kernels predicted above ~3.5 MiB are streamed.
            representation: ``"dense"`` (the kernel itself), ``"factored"`` (its
                factors and the model's output head, fetched once per model: a
                ``FactoredKernel``, materialised with ``.dense()`` or ``np.asarray``)
                or ``"auto"`` (factored when that moves fewer bytes). ``dtype`` is
                then the factors' dtype; their dense kernel is float32.
            timeout: deadline for the whole call in seconds (default: the client's).
            metadata: extra metadata for this call.

        Returns:
            The kernel (a ``FactoredKernel`` when factored); ``(kernel, grid)`` with
            ``return_grid``; a ``KernelResult`` with ``with_report``.

        Example::

            kernel = await client.generate("hyena-2d", [29, 29], np.zeros((4, 384)), dtype="bfloat16")
            kernel.shape, kernel.dtype   # ((4, 57, 57, 384), dtype('float32'))
        """
        call = prepare(
            model,
            seq_lens,
            conditioning,
            dtype=dtype,
            return_grid=return_grid,
            as_torch=as_torch,
            copy=copy,
            with_report=with_report,
            stream=stream,
            representation=representation,
        )
        deadline = Deadline(self._config.call_timeout(timeout))
        with pointing("generate", model):
            info = await self._info(call.model, deadline, metadata) if call.needs_info else None
            head_held = info is not None and info.head_hash in self._output_heads
            call.choose_representation(info, head_held=head_held)
            routed = merge_metadata(metadata, call.affinity(info))
            replays = self._config.retries.replays
            while True:
                try:
                    return await self._generate(call, info, deadline, routed)
                except KernelServiceError as exc:
                    if not (replays and exc.interrupted):
                        raise
                    replays -= 1  # cut mid-response, past gRPC's retry: sent again from the start

    async def _generate(
        self, call: GenerateCall, info: ModelInfo | None, deadline: Deadline, metadata: MetadataLike | None
    ) -> Any:
        if self._shared_memory is not None and call.stream is not True:
            if info is None:
                info = await self._info(call.model, deadline, metadata)
            size = call.payload_bytes(info)
            if size and size >= self._shared_memory.policy.min_kernel_bytes:
                lease = self._shared_memory.acquire(size)
                if lease is not None:
                    return await self._in_shared_memory(call, lease, size, deadline, metadata)
        streamed = call.use_stream(info)
        if streamed:
            response = await self._streamed(call.request, deadline, metadata)
        else:
            try:
                response = await self._unary_kernel(call.request, deadline, metadata)
            except KernelServiceError as exc:
                if call.stream is False or not call.wants_stream(exc):
                    raise
                response, streamed = await self._streamed(call.request, deadline, metadata), True
        output_head = None
        if response.factored:
            output_head = await self._output_head(call.model, response.head_hash, deadline, metadata)
        return call.finish(response, streamed=streamed, output_head=output_head)

    async def _in_shared_memory(
        self,
        call: GenerateCall,
        lease: tuple[MappedRegion, list[MappedRegion]],
        size: int,
        deadline: Deadline,
        metadata: MetadataLike | None,
    ) -> Any:
        """One ``generate`` whose kernel the server writes into a region of the client's pool."""
        pool = self._shared_memory
        assert pool is not None
        region, evicted = lease
        for old in evicted:
            await self._unregister_region(old)
        try:
            call.request.output_region.region = region.name
            call.request.output_region.byte_size = size
            try:
                if not region.registered:
                    await self._register_region(region, deadline, metadata)
                try:
                    response = await self._unary_kernel(call.request, deadline, metadata)
                except RegionNotFound:  # the server restarted and lost it: register again, once
                    region.registered = False
                    await self._register_region(region, deadline, metadata)
                    response = await self._unary_kernel(call.request, deadline, metadata)
            finally:
                call.request.ClearField("output_region")
            response = pool.view(region, response, size)
        except BaseException:
            pool.release(region)
            raise
        output_head = None
        if response.factored:
            output_head = await self._output_head(call.model, response.head_hash, deadline, metadata)
        return call.finish(response, streamed=False, output_head=output_head)

    async def _register_region(
        self, region: MappedRegion, deadline: Deadline, metadata: MetadataLike | None
    ) -> None:
        request = pb.RegisterSharedMemoryRequest(name=region.name, key=region.key, byte_size=region.byte_size)
        try:
            await self._call("RegisterSharedMemory", request, deadline, metadata)
        except BaseException:
            assert self._shared_memory is not None
            self._shared_memory.forget(region)
            raise
        region.registered = True

    async def _unregister_region(self, region: MappedRegion) -> None:
        """Unregister a region taken out of the pool (the server then never touches it), then remove it."""
        assert self._shared_memory is not None
        if region.registered:
            try:
                request = pb.UnregisterSharedMemoryRequest(name=region.name)
                await self._call("UnregisterSharedMemory", request, Deadline(10.0), None)
            except KernelServiceError:
                pass  # the server is gone, and its registrations with it
        self._shared_memory.drop(region)

    async def _output_head(
        self, model: str, head_hash: str, deadline: Deadline, metadata: MetadataLike | None
    ) -> OutputHead:
        """The output head ``head_hash`` names, fetched once per client however many calls ask."""

        async def fetch() -> OutputHead:
            request = pb.GetOutputHeadRequest(model=model)
            reply = await self._call("GetOutputHead", request, deadline, metadata)
            output_head = OutputHead.from_pb(reply)
            if output_head.head_hash != head_hash:
                raise MalformedResponse(
                    f"the factors of {model!r} name output head {head_hash[:12]} but the server's is "
                    f"{output_head.head_hash[:12]} (replicas serving different weights?)"
                )
            return output_head

        return await self._output_heads.get(head_hash, fetch)

    # --- generate_group -----------------------------------------------------------------------
    @overload
    async def generate_group(
        self,
        group: str,
        seq_lens: SeqLens,
        conditioning: ConditioningLike | None = None,
        *,
        dtype: DTypeLike = "float32",
        as_torch: Literal[False] = False,
        with_report: Literal[False] = False,
        copy: bool = False,
        representation: Literal["dense"] = "dense",
        timeout: float | None = None,
        metadata: MetadataLike | None = None,
    ) -> dict[str, NDArray]: ...
    @overload
    async def generate_group(
        self,
        group: str,
        seq_lens: SeqLens,
        conditioning: ConditioningLike | None = None,
        *,
        dtype: DTypeLike = "float32",
        as_torch: Literal[True],
        with_report: Literal[False] = False,
        copy: bool = False,
        representation: Literal["dense"] = "dense",
        timeout: float | None = None,
        metadata: MetadataLike | None = None,
    ) -> dict[str, torch.Tensor]: ...
    @overload
    async def generate_group(
        self,
        group: str,
        seq_lens: SeqLens,
        conditioning: ConditioningLike | None = None,
        *,
        dtype: DTypeLike = "float32",
        as_torch: Literal[False] = False,
        with_report: Literal[True],
        copy: bool = False,
        representation: Literal["dense"] = "dense",
        timeout: float | None = None,
        metadata: MetadataLike | None = None,
    ) -> dict[str, KernelResult[NDArray]]: ...
    @overload
    async def generate_group(
        self,
        group: str,
        seq_lens: SeqLens,
        conditioning: ConditioningLike | None = None,
        *,
        dtype: DTypeLike = "float32",
        as_torch: Literal[True],
        with_report: Literal[True],
        copy: bool = False,
        representation: Literal["dense"] = "dense",
        timeout: float | None = None,
        metadata: MetadataLike | None = None,
    ) -> dict[str, KernelResult[torch.Tensor]]: ...
    @overload
    async def generate_group(
        self,
        group: str,
        seq_lens: SeqLens,
        conditioning: ConditioningLike | None = None,
        *,
        dtype: DTypeLike = "float32",
        as_torch: Literal[False] = False,
        with_report: Literal[False] = False,
        copy: bool = False,
        representation: Literal["factored"],
        timeout: float | None = None,
        metadata: MetadataLike | None = None,
    ) -> dict[str, FactoredKernel[NDArray]]: ...
    @overload
    async def generate_group(
        self,
        group: str,
        seq_lens: SeqLens,
        conditioning: ConditioningLike | None = None,
        *,
        dtype: DTypeLike = "float32",
        as_torch: Literal[True],
        with_report: Literal[False] = False,
        copy: bool = False,
        representation: Literal["factored"],
        timeout: float | None = None,
        metadata: MetadataLike | None = None,
    ) -> dict[str, FactoredKernel[torch.Tensor]]: ...
    @overload
    async def generate_group(
        self,
        group: str,
        seq_lens: SeqLens,
        conditioning: ConditioningLike | None = None,
        *,
        dtype: DTypeLike = "float32",
        as_torch: bool = False,
        with_report: bool = False,
        copy: bool = False,
        representation: Representation = "dense",
        timeout: float | None = None,
        metadata: MetadataLike | None = None,
    ) -> dict[str, Any]: ...

    async def generate_group(
        self,
        group: str,
        seq_lens: SeqLens,
        conditioning: ConditioningLike | None = None,
        *,
        dtype: DTypeLike = "float32",
        as_torch: bool = False,
        with_report: bool = False,
        copy: bool = False,
        representation: Representation = "dense",
        timeout: float | None = None,
        metadata: MetadataLike | None = None,
    ) -> dict[str, Any]:
        """Every kernel of a group (one network's generators) for one grid and conditioning, in one call.

        The server computes the members concurrently, batching each with the
        other requests for that member, and streams the kernels once all are
        ready. A member that fails fails the call: the error is the one that
        member's ``generate`` would raise, its message naming the member.

        Args:
            group: the group's name on the server (``ModelInfo.group`` of its members).
            seq_lens: one length per spatial axis, the same for every member.
            conditioning: ``[B, cond_dim]`` FiLM conditioning for every member, or ``None``
                for their unconditioned (cached) kernels.
            dtype, as_torch, copy, representation: as for ``generate``, for every member;
                ``"auto"`` picks factored when the members' factors (with the output
                heads not yet held) are fewer bytes than their dense kernels.
            with_report: each value a ``KernelResult`` with that member's server report.
            timeout: deadline for the whole call in seconds (default: the client's).
            metadata: extra metadata for this call.

        Returns:
            ``{member model name: kernel}`` in the group's order (``"net/0"``, ``"net/1"``, ...).

        Example::

            kernels = await client.generate_group("vision-net", [29, 29], np.zeros((4, 384)))
            layer_3 = kernels["vision-net/3"]      # or list(kernels.values())[3]
        """
        call = prepare_group(
            group,
            seq_lens,
            conditioning,
            dtype=dtype,
            as_torch=as_torch,
            copy=copy,
            with_report=with_report,
            representation=representation,
        )
        deadline = Deadline(self._config.call_timeout(timeout))
        with pointing("generate_group", group):
            if call.representation == "auto":
                found = await self._group(group, deadline, metadata)
                call.choose_representation(found.members, lambda head_hash: head_hash in self._output_heads)
            metadata = merge_metadata(metadata, call.affinity())
            replays = self._config.retries.replays
            while True:
                try:
                    name, members, views = await self._group_stream(call.request, deadline, metadata)
                    break
                except KernelServiceError as exc:
                    if not (replays and exc.interrupted):
                        raise
                    replays -= 1  # cut mid-stream, past gRPC's retry: sent again from the start
        output_heads: dict[str, OutputHead] = {}
        for member, view in zip(members, views, strict=True):
            if view.factored:
                output_heads[member] = await self._output_head(member, view.head_hash, deadline, metadata)
        return call.finish(name, members, views, output_heads)
