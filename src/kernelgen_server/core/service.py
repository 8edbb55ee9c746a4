"""The service core: validation, cache, batching and compute, without gRPC.

``KernelService`` answers in Python values and raises ``KernelGenError``s;
the servicer only decodes, calls it, encodes and maps errors to statuses.

Invariants:
- all tensor work for the device runs on one device thread (``ServiceThreads``),
  in submission order, so a GPU sees one ordered stream and the event loop never
  computes;
- unconditioned kernels go through the byte-bounded cache, conditioned ones
  through the batcher (the ``submit`` seam); nothing else computes kernels;
- a kernel is served dense or factored (``representation``): factored ones
  share the dense ones' batch buckets (same model, grid and dtype) and have
  cache entries of their own;
  a miss whose kernel is the centre of a cached larger one (same model and
  dtype) is cut from it on the host thread instead of computed;
- every limit is checked before any work is queued, so a refused request
  costs the others nothing;
- a group's kernels (``generate_group``) are its members' requests, each
  planned first and then computed as one request is, all at once: they batch
  with every other request of their member's bucket.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np
import torch

from kernelgen_server.core.batcher import BatchOutcome, BatchPolicy, DynamicBatcher
from kernelgen_server.core.cache import ByteLRUCache
from kernelgen_server.core.inflight import InflightBudget, Reservation
from kernelgen_server.core.metrics import Metrics
from kernelgen_server.core.streaming import KernelStream, TiledStream, WholeStream
from kernelgen_server.core.tensors import (
    centre,
    decode_output_dtype,
    decode_representation,
    itemsize,
    to_payload,
)
from kernelgen_server.core.threads import ServiceThreads
from kernelgen_server.engine.kernel_engine import KernelEngine, is_oom
from kernelgen_server.errors import (
    ConditioningNotSupported,
    DeadlineExceeded,
    InvalidRequest,
    KernelGenError,
    KernelTooLarge,
    ServerDraining,
    shorten,
)
from kernelgen_server.model.output_head import OutputHead
from kernelgen_server.repository.store import LoadedModel, ModelGroup, ModelRepository, is_served_name
from kernelgen_server.settings import ServerSettings
from kernelgen_wire.kernel_messages import EncodedKernel, Payload, encode_kernel
from kernelgen_wire.v1 import kernelgen_pb2 as pb

__all__ = [
    "Encoder",
    "FlopSummary",
    "GeneratedGroup",
    "GeneratedKernel",
    "KernelPlan",
    "KernelService",
    "Submitter",
    "check_name",
    "resolve_device",
]

log = logging.getLogger("kernelgen.core")
_REPRESENTATION_NAMES = {False: "dense", True: "factored"}

BucketKey = tuple[str, tuple[int, ...], int]  # (model name, seq_lens, wire dtype)
CacheKey = tuple[str, tuple[int, ...], int, bool]  # (model content hash, seq_lens, wire dtype, factored)


#: Writes one computed kernel (or its factors) as the message its caller sends, from the payload and
#: the output head's hash (empty: dense); ``encode_kernel`` (kernelgen.v1's response) by default.
Encoder = Callable[[Payload, str], EncodedKernel]


class CondItem(NamedTuple):
    """One conditioned request in a batch bucket: its ``[B, C]`` rows, output size and representation."""

    conditioning: torch.Tensor
    nbytes: int
    factored: bool = False
    encoder: Encoder | None = None


class Submitter(Protocol):
    """The seam conditioned requests go through: one request in, its rows out."""

    async def submit(
        self, key: BucketKey, item: CondItem, *, deadline: float | None = None
    ) -> BatchOutcome[asyncio.Future[EncodedKernel]]: ...

    async def close(self, drain: bool = True) -> None: ...


@dataclass(frozen=True)
class GeneratedKernel:
    """One kernel as the service made it: its encoded message, the grid if asked, the report.

    ``reservation`` holds the response's bytes in the server's in-flight budget until
    ``release()`` (the servicer calls it when the call ends; dropping the result does too).
    """

    kernel: EncodedKernel
    grid: Payload | None
    report: pb.ServerReport
    reservation: Reservation | None = None

    @property
    def nbytes(self) -> int:
        return self.kernel.nbytes + (0 if self.grid is None else self.grid.nbytes)

    def release(self) -> None:
        if self.reservation is not None:
            self.reservation.release()

    @property
    def releaser(self) -> Callable[[], None]:
        """``release`` without the kernel: what a call's done callback may hold.

        A gRPC call's context, and the done callbacks it holds, can outlive the call
        until the garbage collector frees it; a callback holding this result would keep
        the response's bytes alive as long, and the process's memory would swing by
        hundreds of MB between collections.
        """
        return self.reservation.release if self.reservation is not None else _nothing


def _nothing() -> None:
    pass


@dataclass(frozen=True)
class GeneratedGroup:
    """A group's kernels as the service made them, in the group's member order.

    ``reservation`` holds all their bytes in the in-flight budget until ``release()``.
    """

    group: ModelGroup
    kernels: tuple[GeneratedKernel, ...]
    reservation: Reservation | None = None

    @property
    def nbytes(self) -> int:
        return sum(kernel.nbytes for kernel in self.kernels)

    def release(self) -> None:
        if self.reservation is not None:
            self.reservation.release()


@dataclass(frozen=True)
class KernelPlan:
    """A validated kernel request: what to compute and how many bytes it will take."""

    model: LoadedModel
    lens: tuple[int, ...]
    out_dtype: torch.dtype
    wire_dtype: int
    factored: bool
    #: ``[rows, C]`` float32, or None for the plain kernel.
    conditioning: np.ndarray | None
    rows: int
    points: int
    width: int
    kernel_bytes: int
    grid_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.kernel_bytes + self.grid_bytes

    @property
    def head_hash(self) -> str:
        """The output head's hash for a factored kernel, else empty."""
        return self.model.output_head.head_hash if self.factored else ""

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        return (self.rows, *(2 * n - 1 for n in self.lens), self.width)


@dataclass(frozen=True)
class FlopSummary:
    """What ``FlopCount`` answers: the reference count, the grid's size and the kernel's."""

    flops: int
    grid_points: int
    kernel_bytes: int
    cacheable: bool


def check_name(name: str, what: str = "model") -> str:
    """``name`` if it could name a model (or a group's member, ``GROUP/MEMBER``); else
    ``InvalidRequest``, the name cut short in the message."""
    if not name:
        raise InvalidRequest(f"{what} name is empty")
    if not is_served_name(name):
        raise InvalidRequest(
            f"{shorten(name)} is not a {what} name: letters, digits, '.', '_' or '-', at most 128 "
            "characters (a group's member: GROUP/MEMBER)"
        )
    return name


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name} was asked for but CUDA is not available")
    return device


class KernelService:
    """Serves the ready models of a repository on one device."""

    def __init__(
        self,
        repository: ModelRepository,
        settings: ServerSettings,
        *,
        metrics: Metrics | None = None,
        device: torch.device | None = None,
        clock: Callable[[], float] = time.monotonic,
        worker: int = 0,
    ) -> None:
        self.repository = repository
        #: This process's index among the server's worker processes; every report carries it.
        self.worker = worker
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.device = device or resolve_device(settings.device)
        self._clock = clock
        cuda = self.device.type == "cuda"
        self._threads = ServiceThreads(
            self.device,
            cpu_threads=settings.torch_threads(),
            pipelined=cuda if settings.pipeline_batches is None else settings.pipeline_batches,
        )
        # Per-row GEMMs keep every row bitwise independent of its batch; on a GPU one launch
        # per row and layer would waste the device, so batched GEMMs are the default there.
        batched = cuda if settings.batched_gemm is None else settings.batched_gemm
        self._engines = {
            m.name: KernelEngine(m.module, self.device, batched=batched) for m in repository.ready.values()
        }
        self._cache: ByteLRUCache[CacheKey, EncodedKernel] = ByteLRUCache(
            int(settings.cache_bytes), observer=self.metrics
        )
        policy = BatchPolicy(
            max_batch_size=settings.max_batch_size,
            max_queue_delay_s=settings.max_queue_delay_ms / 1000.0,
            max_queue_size=settings.max_queue_size,
            max_batch_bytes=int(settings.max_batch_bytes),
        )
        self.submitter: Submitter = DynamicBatcher(
            self._run_batch,
            policy,
            rows_of=lambda item: int(item.conditioning.shape[0]),
            bytes_of=lambda item: item.nbytes,
            is_oom=is_oom,
            clock=clock,
            observer=self.metrics,
        )
        self.budget = InflightBudget(settings.inflight_budget(), observe=self.metrics.inflight_bytes.set)
        self.draining = False

    # --- lookups ------------------------------------------------------------------------------
    def model(self, name: str) -> LoadedModel:
        """The ready model ``name``; refuses a name that could name no model, an unknown or failed one."""
        return self.repository.get(check_name(name))

    def seq_lens(self, model: LoadedModel, values: Sequence[int]) -> tuple[int, ...]:
        data_dim = model.module.data_dim
        if len(values) != data_dim:
            raise InvalidRequest(
                f"model {model.name!r} is {data_dim}-D: seq_lens needs {data_dim} entries, got {len(values)}"
            )
        if any(v < 1 for v in values):
            raise InvalidRequest(f"seq_lens must all be >= 1, got {list(values)}")
        lens = tuple(int(v) for v in values)
        points = math.prod(2 * n - 1 for n in lens)
        if points > self.settings.max_grid_points:
            raise KernelTooLarge(
                f"a grid of {points} points (seq_lens {list(lens)}) is over the limit of "
                f"{self.settings.max_grid_points} points"
            )
        return lens

    # --- FlopCount / models -------------------------------------------------------------------
    def flop_count(self, name: str, seq_lens: Sequence[int], inference: bool) -> FlopSummary:
        model = self.model(name)
        lens = self.seq_lens(model, seq_lens)
        points = math.prod(2 * n - 1 for n in lens)
        module = model.module
        return FlopSummary(
            flops=module.flop_count(lens, inference=inference),
            grid_points=points,
            kernel_bytes=points * module.out_dim * 4,
            cacheable=module.film_generator is None,
        )

    def output_head(self, name: str) -> OutputHead:
        """The output head of a ready model, for materialising its factored kernels."""
        return self.model(name).output_head

    # --- GenerateKernel -----------------------------------------------------------------------
    def plan(
        self,
        name: str,
        seq_lens: Sequence[int],
        conditioning: np.ndarray | None,
        dtype: int,
        return_grid: bool,
        representation: int = pb.REPRESENTATION_DENSE,
    ) -> KernelPlan:
        """Validate a kernel request and size it; every refusal happens here, before any work."""
        if self.draining:
            raise ServerDraining("the server is shutting down; retry on another replica")
        model = self.model(name)
        lens = self.seq_lens(model, seq_lens)
        out_dtype = decode_output_dtype(dtype)
        wire_dtype = int(dtype) or pb.DTYPE_FLOAT32
        factored = decode_representation(representation)
        module = model.module
        rows = 1
        if conditioning is not None:
            if module.film_generator is None:
                raise ConditioningNotSupported(
                    f"model {name!r} has no FiLM generator and takes no conditioning; omit it"
                )
            if conditioning.shape[1] != module.film_generator.cond_dim:
                raise InvalidRequest(
                    f"model {name!r} takes conditioning of width {module.film_generator.cond_dim}, "
                    f"got {conditioning.shape[1]}"
                )
            rows = int(conditioning.shape[0])
            if rows > self.settings.max_conditioning_rows:
                raise KernelTooLarge(
                    f"{rows} conditioning rows is over the limit of {self.settings.max_conditioning_rows}"
                )
        points = math.prod(2 * n - 1 for n in lens)
        width = module.mlp_hidden_dim if factored else module.out_dim
        kernel_bytes = rows * points * width * itemsize(out_dtype)
        grid_bytes = points * module.data_dim * 4 if return_grid else 0
        if kernel_bytes > self.settings.max_kernel_bytes:
            raise KernelTooLarge(
                f"the {'factors' if factored else 'kernel'} would be {kernel_bytes} bytes, over the limit "
                f"of {int(self.settings.max_kernel_bytes)} bytes"
            )
        return KernelPlan(
            model, lens, out_dtype, wire_dtype, factored, conditioning, rows, points, width, kernel_bytes,
            grid_bytes,
        )  # fmt: skip

    async def generate(
        self,
        name: str,
        seq_lens: Sequence[int],
        conditioning: np.ndarray | None,
        dtype: int,
        return_grid: bool,
        *,
        representation: int = pb.REPRESENTATION_DENSE,
        deadline: float | None = None,
        max_bytes: int | None = None,
        encoder: Encoder | None = None,
    ) -> GeneratedKernel:
        """Compute (or fetch) one kernel, dense or factored, holding its bytes in the in-flight budget.

        ``max_bytes`` bounds the whole response (unary calls). ``dtype`` is the
        dtype of what travels: the kernel, or its factors. ``encoder`` writes a
        conditioned kernel's message where the batch encodes it (another
        protocol's response, one copy in all); a cached kernel is always
        kernelgen.v1's message.
        """
        plan = self.plan(name, seq_lens, conditioning, dtype, return_grid, representation)
        if max_bytes is not None and plan.total_bytes > max_bytes:
            raise KernelTooLarge(
                f"the response would be {plan.total_bytes} bytes, over the unary limit of "
                f"{max_bytes} bytes; use StreamKernel for large kernels"
            )
        return await self.compute(plan, deadline, encoder)

    async def compute(
        self, plan: KernelPlan, deadline: float | None = None, encoder: Encoder | None = None
    ) -> GeneratedKernel:
        """The kernel of a plan, whole; its bytes are reserved in the in-flight budget first."""
        self._check_deadline(deadline)
        reservation = self.budget.reserve(plan.total_bytes)
        try:
            result = await self._compute(plan, deadline, encoder)
        except BaseException:
            reservation.release()
            raise
        generated = GeneratedKernel(result.kernel, result.grid, result.report, reservation)
        # A caller that drops the result without releasing it (in-process use) returns the bytes then.
        weakref.finalize(generated, reservation.release)
        return generated

    async def open_stream(
        self,
        name: str,
        seq_lens: Sequence[int],
        conditioning: np.ndarray | None,
        dtype: int,
        return_grid: bool,
        *,
        representation: int = pb.REPRESENTATION_DENSE,
        deadline: float | None = None,
    ) -> KernelStream:
        """A ``StreamKernel`` response: the kernel whole in chunks, or, when large, tile by tile."""
        plan = self.plan(name, seq_lens, conditioning, dtype, return_grid, representation)
        if not self.tiled(plan):
            return WholeStream(await self.compute(plan, deadline))
        self._check_deadline(deadline)
        settings = self.settings
        held = 2 * int(settings.stream_tile_bytes) + 2 * int(settings.stream_chunk_bytes)
        reservation = self.budget.reserve(held, "the stream")
        model = plan.model
        label = _REPRESENTATION_NAMES[plan.factored]

        def done(nbytes: int) -> None:
            self.metrics.kernels_served.labels(model.name, label).inc()
            self.metrics.payload_bytes.labels(model.name, label).inc(nbytes)

        report = pb.ServerReport(
            batch_size=plan.rows,
            batch_requests=1,
            content_hash=model.content_hash,
            worker=self.worker,
            representation=pb.REPRESENTATION_FACTORED if plan.factored else pb.REPRESENTATION_DENSE,
        )
        spatial = plan.kernel_shape[1:-1]
        return TiledStream(
            engine=self._engines[model.name],
            threads=self._threads,
            lens=plan.lens,
            conditioning=None if plan.conditioning is None else torch.from_numpy(plan.conditioning.copy()),
            dtype=plan.out_dtype,
            wire_dtype=plan.wire_dtype,
            factored=plan.factored,
            head_hash=plan.head_hash,
            kernel_shape=plan.kernel_shape,
            grid_shape=(1, *spatial, model.module.data_dim) if plan.grid_bytes else None,
            cache_lens=tuple(model.module.L_cache),
            tile_bytes=int(settings.stream_tile_bytes),
            report=report,
            reservation=reservation,
            on_done=done,
        )

    def tiled(self, plan: KernelPlan) -> bool:
        """Whether a streamed kernel is computed in tiles as it is sent, never whole.

        Above ``stream_tile_bytes``; an unconditioned one only when it is also too large
        for the cache to keep well (a quarter of it), since cached kernels are sent from
        the cache's bytes to every later caller.
        """
        if plan.kernel_bytes <= self.settings.stream_tile_bytes:
            return False
        return plan.conditioning is not None or plan.kernel_bytes > int(self.settings.cache_bytes) // 4

    async def _compute(
        self, plan: KernelPlan, deadline: float | None, encoder: Encoder | None = None
    ) -> GeneratedKernel:
        started = self._clock()
        model, lens, out_dtype, wire_dtype = plan.model, plan.lens, plan.out_dtype, plan.wire_dtype
        factored, conditioning, kernel_bytes = plan.factored, plan.conditioning, plan.kernel_bytes
        if conditioning is None:
            kernel, report = await self._unconditioned(model, lens, out_dtype, wire_dtype, factored)
        else:
            cond = torch.from_numpy(conditioning.copy())
            key: BucketKey = (model.name, lens, wire_dtype)
            item = CondItem(cond, kernel_bytes, factored, encoder)
            outcome = await self.submitter.submit(key, item, deadline=deadline)
            kernel = await outcome.result
            report = pb.ServerReport(
                cache_hit=False,
                batch_size=outcome.batch_rows,
                batch_requests=outcome.batch_requests,
                queue_ms=outcome.queue_s * 1000.0,
                compute_ms=outcome.compute_s * 1000.0,
            )
        report.content_hash = model.content_hash
        report.worker = self.worker
        report.representation = kernel.representation
        self.metrics.statistics.on_kernel(
            model.name,
            rows=plan.rows,
            conditioned=conditioning is not None,
            cache_hit=report.cache_hit,
            queue_s=report.queue_ms / 1000.0,
            compute_s=report.compute_ms / 1000.0,
            seconds=self._clock() - started,
        )
        self.metrics.kernels_served.labels(model.name, _REPRESENTATION_NAMES[factored]).inc()
        self.metrics.payload_bytes.labels(model.name, _REPRESENTATION_NAMES[factored]).inc(
            kernel.payload.nbytes
        )
        grid = None
        if plan.grid_bytes:
            engine = self._engines[model.name]
            grid = await self._threads.on_device(lambda: to_payload(engine.grid(lens).contiguous()))
        return GeneratedKernel(kernel, grid, report)

    async def _unconditioned(
        self,
        model: LoadedModel,
        lens: tuple[int, ...],
        out_dtype: torch.dtype,
        wire_dtype: int,
        factored: bool,
    ) -> tuple[EncodedKernel, pb.ServerReport]:
        engine = self._engines[model.name]
        head_hash = model.output_head.head_hash if factored else ""
        timing: dict[str, float] = {}

        def compute() -> EncodedKernel:
            start = time.perf_counter()
            tensor = engine.unconditioned(lens, out_dtype, factored=factored)
            timing["compute_s"] = time.perf_counter() - start
            return encode_kernel(to_payload(tensor), head_hash)

        def cut(larger: EncodedKernel) -> EncodedKernel:
            # Grid points are independent, so a factored kernel's centre is the centre's factors.
            start = time.perf_counter()
            kernel = encode_kernel(centre(larger.payload, engine.spatial_shape(lens)), head_hash)
            timing["compute_s"] = time.perf_counter() - start
            return kernel

        def covers(key: CacheKey) -> bool:
            digest, other, dtype, other_factored = key
            return (
                digest == model.content_hash
                and dtype == wire_dtype
                and other_factored == factored
                and other != lens
                and all(m >= n for m, n in zip(other, lens, strict=True))
            )

        accepted = self._clock()

        async def miss() -> EncodedKernel:
            # No deadline check in here: callers that join this computation have their own.
            timing["queue_s"] = self._clock() - accepted
            larger = self._cache.smallest_stored(covers) if self.settings.cache_slicing else None
            if larger is not None:
                self.metrics.cache_slices.inc()
                return await self._threads.on_host(functools.partial(cut, larger))
            return await self._threads.on_device(compute)

        key: CacheKey = (model.content_hash, lens, wire_dtype, factored)
        payload, hit = await self._cache.get_or_compute(key, miss)
        if not hit and "compute_s" in timing:
            self.metrics.compute_time.labels(model.name).observe(timing["compute_s"])
        # A caller that waited on another's miss did no compute of its own: report it as a hit.
        computed_here = not hit and "compute_s" in timing
        return payload, pb.ServerReport(
            cache_hit=not computed_here,
            batch_size=1 if computed_here else 0,
            batch_requests=1 if computed_here else 0,
            queue_ms=timing.get("queue_s", 0.0) * 1000.0,
            compute_ms=timing.get("compute_s", 0.0) * 1000.0,
        )

    async def _run_batch(self, key: BucketKey, items: list[CondItem]) -> list[asyncio.Future[EncodedKernel]]:
        """Compute one batch; returns once the device is free, with a future per request."""
        name, lens, wire_dtype = key
        requests = [(item.conditioning, item.factored, item.encoder) for item in items]
        engine, dtype = self._engines[name], decode_output_dtype(wire_dtype)
        head_hash = self.repository.ready[name].output_head.head_hash
        return await self._threads.run_batch(engine, lens, requests, dtype, head_hash)

    # --- GenerateGroup ------------------------------------------------------------------------
    async def generate_group(
        self,
        name: str,
        seq_lens: Sequence[int],
        conditioning: np.ndarray | None,
        dtype: int,
        *,
        representation: int = pb.REPRESENTATION_DENSE,
        deadline: float | None = None,
    ) -> GeneratedGroup:
        """Every member's kernel of group ``name`` for one grid and conditioning, in member order.

        Every member is planned (every check of one request) and the group's
        kernels together must fit ``max_kernel_bytes`` and the in-flight budget,
        all before any work is queued; then the members are computed
        concurrently, each as one request is (its own batch bucket or cache
        entry). The first failure cancels the others and is raised as its own
        error class, its message naming the member.
        """
        if self.draining:
            raise ServerDraining("the server is shutting down; retry on another replica")
        group = self.repository.group(check_name(name, "group"))
        plans = []
        for member in group.members:
            try:
                plans.append(self.plan(member, seq_lens, conditioning, dtype, False, representation))
            except KernelGenError as exc:
                raise _of_member(exc, group, member) from None
        total = sum(plan.total_bytes for plan in plans)
        if total > self.settings.max_kernel_bytes:
            raise KernelTooLarge(
                f"the {len(plans)} kernels of group {name!r} would be {total} bytes together, over the "
                f"limit of {int(self.settings.max_kernel_bytes)} bytes"
            )
        self._check_deadline(deadline)
        reservation = self.budget.reserve(total, f"the {len(plans)} kernels of group {name!r}")
        try:
            kernels = await self._members(group, plans, deadline)
        except BaseException:
            reservation.release()
            raise
        generated = GeneratedGroup(group, kernels, reservation)
        weakref.finalize(generated, reservation.release)
        return generated

    async def _members(
        self, group: ModelGroup, plans: list[KernelPlan], deadline: float | None
    ) -> tuple[GeneratedKernel, ...]:
        """Compute the members' plans at once; the first failure cancels the rest."""

        async def run(plan: KernelPlan) -> GeneratedKernel:
            try:
                return await self._compute(plan, deadline)
            except KernelGenError as exc:
                raise _of_member(exc, group, plan.model.name) from None

        tasks = [asyncio.ensure_future(run(plan)) for plan in plans]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            failed = [task for task in tasks if task in done and task.exception() is not None]
            if failed:
                raise failed[0].exception()  # type: ignore[misc]
            return tuple(task.result() for task in tasks)
        finally:
            for task in tasks:
                task.cancel()  # a failed member, or a cancelled caller: the others' work is dropped
            await asyncio.gather(*tasks, return_exceptions=True)  # and gone before the call ends

    def _check_deadline(self, deadline: float | None) -> None:
        if deadline is not None and self._clock() >= deadline:
            raise DeadlineExceeded("the deadline passed before the kernel was computed")

    # --- lifecycle ----------------------------------------------------------------------------
    async def warmup(self) -> None:
        """Run every model once on a small grid so the first real call pays no start-up cost."""
        for model in self.repository.ready.values():
            engine = self._engines[model.name]
            lens = tuple(min(2, n) for n in model.module.L_cache)
            await self._threads.on_device(functools.partial(engine.unconditioned, lens, torch.float32))
            cond_dim = model.module.cond_dim
            if cond_dim is not None:
                conds = [torch.zeros(1, cond_dim)]
                warm = functools.partial(engine.conditioned, lens, conds, torch.float32)
                await self._threads.on_device(warm)

    async def close(self, drain: bool = True) -> None:
        """Finish (or fail) queued batches, then stop the device thread and the host thread."""
        self.draining = True
        await self.submitter.close(drain=drain)
        await self._threads.close()


def _of_member(error: KernelGenError, group: ModelGroup, member: str) -> KernelGenError:
    """The same error (class, status, reason), its message naming the group member at fault."""
    named = type(error)(f"group {group.name!r}, member {member!r}: {error.message}")
    named.__cause__ = error.__cause__
    return named
