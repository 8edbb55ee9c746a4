"""The service core: ``KernelService`` routes a planned request to the cache or the batcher.

``KernelService`` answers in Python values and raises ``KernelGenError``s; a
servicer only decodes, calls it, encodes and maps errors to statuses.

A request goes one way down and back:

    plan (``Planner``: every check, every size)
      -> reserve its bytes (``InflightBudget``)
      -> unconditioned: the cache (a miss: a cut of a larger cached kernel on the
         host thread, or the engine on the device thread)
         conditioned: the batcher -> the batch stage (``BatchRunner.run``:
         the engine on the device thread, the rows' encoding)
      -> its ``GeneratedKernel``, built once.

Invariants:
- all tensor work for the device runs on one device thread (``ServiceThreads``),
  in submission order, so a GPU sees one ordered stream and the event loop never
  computes;
- unconditioned kernels go through the byte-bounded cache, conditioned ones
  through the batcher (the ``submit`` seam); nothing else computes kernels;
- the core writes messages only through an ``Encoder``: the service's own
  (kernelgen.v1's by default: what the cache keeps), or one a call brings;
- a kernel is served dense or factored (``representation``): factored ones
  share the dense ones' batch buckets (same model, grid and dtype) and have
  cache entries of their own; a miss whose kernel is the centre of a cached
  larger one (same model and dtype) is cut from it on the host thread instead
  of computed;
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
from typing import Any, Protocol

import numpy as np
import torch

from kernelgen_server.core.batch_policy import BatchOutcome, BatchPolicy
from kernelgen_server.core.batcher import DynamicBatcher
from kernelgen_server.core.batches import BatchRunner, BucketKey, ConditionedItem, PendingKernel
from kernelgen_server.core.cache import ByteLRUCache
from kernelgen_server.core.inflight import InflightBudget, Reservation
from kernelgen_server.core.metrics import Metrics
from kernelgen_server.core.payloads import to_payload
from kernelgen_server.core.plan import KernelPlan, Planner, check_name
from kernelgen_server.core.results import Encoder, FlopSummary, GeneratedGroup, GeneratedKernel
from kernelgen_server.core.slicing import centre, covers
from kernelgen_server.core.streaming import KernelStream, TiledStream, WholeStream
from kernelgen_server.core.threads import ServiceThreads
from kernelgen_server.engine.kernel_engine import KernelEngine
from kernelgen_server.errors import DeadlineExceeded, KernelGenError, ServerDraining
from kernelgen_server.model.output_head import OutputHead
from kernelgen_server.repository.store import LoadedModel, ModelGroup, ModelRepository
from kernelgen_server.settings import ServerSettings
from kernelgen_wire.kernel_messages import EncodedKernel, encode_kernel
from kernelgen_wire.sizes import kernel_spatial, tensor_bytes
from kernelgen_wire.v1 import kernelgen_pb2 as pb

__all__ = ["KernelService", "Submitter", "resolve_device"]

log = logging.getLogger("kernelgen.core")
_REPRESENTATION_NAMES = {False: "dense", True: "factored"}

#: (model content hash, seq_lens, wire dtype, factored)
CacheKey = tuple[str, tuple[int, ...], int, bool]


class Submitter(Protocol):
    """The seam conditioned requests go through: one request in, its pending message out."""

    async def submit(
        self, key: BucketKey, item: ConditionedItem, *, deadline: float | None = None
    ) -> BatchOutcome[PendingKernel]: ...

    async def close(self, drain: bool = True) -> None: ...


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name} was asked for but CUDA is not available")
    return device


class KernelService:
    """Serves the ready models of a repository on one device.

    ``encoder`` writes the messages the cache keeps and computed kernels are
    sent as, unless a call brings its own (kernelgen.v1's ``encode_kernel`` by
    default).
    """

    def __init__(
        self,
        repository: ModelRepository,
        settings: ServerSettings,
        *,
        metrics: Metrics | None = None,
        device: torch.device | None = None,
        clock: Callable[[], float] = time.monotonic,
        worker: int = 0,
        encoder: Encoder = encode_kernel,
    ) -> None:
        self.repository = repository
        #: This process's index among the server's worker processes; every report carries it.
        self.worker = worker
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.device = device or resolve_device(settings.device)
        self.planner = Planner(repository, settings)
        self._clock = clock
        self._encoder = encoder
        cuda = self.device.type == "cuda"
        self._threads = ServiceThreads(self.device, cpu_threads=settings.torch_threads())
        # Per-row GEMMs keep every row bitwise independent of its batch; on a GPU one launch
        # per row and layer would waste the device, so batched GEMMs are the default there.
        batched = cuda if settings.batched_gemm is None else settings.batched_gemm
        ready = repository.ready.values()
        self._engines = {m.name: KernelEngine(m.module, self.device, batched=batched) for m in ready}
        self._cache: ByteLRUCache[CacheKey, EncodedKernel] = ByteLRUCache(
            int(settings.cache_bytes), observer=self.metrics
        )
        self._batches = BatchRunner(
            self._engines,
            {m.name: m.output_head.head_hash for m in ready},
            self._threads,
            pipelined=cuda if settings.pipeline_batches is None else settings.pipeline_batches,
        )
        policy = BatchPolicy(
            max_batch_size=settings.max_batch_size,
            max_queue_delay_s=settings.max_queue_delay_ms / 1000.0,
            max_queue_size=settings.max_queue_size,
            max_batch_bytes=int(settings.max_batch_bytes),
        )
        self.submitter: Submitter = DynamicBatcher(
            self._batches.run, policy, clock=clock, observer=self.metrics
        )
        self.budget = InflightBudget(settings.inflight_budget(), observe=self.metrics.inflight_bytes.set)
        self.draining = False

    # --- lookups ------------------------------------------------------------------------------
    def model(self, name: str) -> LoadedModel:
        """The ready model ``name``; refuses a name that could name no model, an unknown or failed one."""
        return self.planner.model(name)

    def output_head(self, name: str) -> OutputHead:
        """The output head of a ready model, for materialising its factored kernels."""
        return self.model(name).output_head

    def flop_count(self, name: str, seq_lens: Sequence[int], inference: bool) -> FlopSummary:
        model = self.model(name)
        lens = self.planner.seq_lens(model, seq_lens)
        module = model.module
        spatial = kernel_spatial(lens, module.causal)
        return FlopSummary(
            flops=module.flop_count(lens, inference=inference),
            grid_points=math.prod(spatial),
            kernel_bytes=tensor_bytes((1, *spatial, module.out_dim), pb.DTYPE_FLOAT32),
            cacheable=module.film_generator is None,
        )

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
        """Validate a kernel request and size it (``Planner.plan``); refused while draining."""
        self._check_open()
        return self.planner.plan(name, seq_lens, conditioning, dtype, return_grid, representation)

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

        ``max_bytes`` bounds the whole response (one message). ``dtype`` is the
        dtype of what travels: the kernel, or its factors. ``encoder`` writes a
        conditioned kernel's message where the batch encodes it (another
        protocol's response, one copy in all); a cached kernel is always the
        service's own encoder's message.
        """
        plan = self.plan(name, seq_lens, conditioning, dtype, return_grid, representation)
        if max_bytes is not None:
            self.planner.check_response(plan, max_bytes)
        return await self.compute(plan, deadline, encoder)

    async def compute(
        self, plan: KernelPlan, deadline: float | None = None, encoder: Encoder | None = None
    ) -> GeneratedKernel:
        """The kernel of a plan, whole; its bytes are reserved in the in-flight budget first."""
        self._check_deadline(deadline)
        reservation = self.budget.reserve(plan.total_bytes)
        try:
            generated = await self._generate(plan, deadline, encoder, reservation)
        except BaseException:
            reservation.release()
            raise
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
        """A streamed kernel: computed whole and sent in parts, or, when large, tile by tile."""
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

        return TiledStream(
            plan,
            engine=self._engines[model.name],
            threads=self._threads,
            tile_bytes=int(settings.stream_tile_bytes),
            report=self._report(plan, batch_size=plan.rows, batch_requests=1),
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

    async def _generate(
        self,
        plan: KernelPlan,
        deadline: float | None,
        encoder: Encoder | None,
        reservation: Reservation | None,
    ) -> GeneratedKernel:
        """One planned kernel from the cache or the batcher, with its grid and report."""
        started = self._clock()
        model = plan.model
        if plan.conditioning is None:
            kernel, report = await self._unconditioned(plan)
        else:
            item = ConditionedItem(
                torch.from_numpy(plan.conditioning.copy()),
                plan.kernel_bytes,
                plan.factored,
                encoder or self._encoder,
            )
            outcome = await self.submitter.submit(
                (model.name, plan.lens, plan.wire_dtype), item, deadline=deadline
            )
            kernel = await outcome.result
            report = self._report(
                plan,
                batch_size=outcome.batch_rows,
                batch_requests=outcome.batch_requests,
                queue_ms=outcome.queue_s * 1000.0,
                compute_ms=outcome.compute_s * 1000.0,
            )
        self._count(plan, report, kernel.payload.nbytes, self._clock() - started)
        grid = None
        if plan.grid_bytes:
            engine = self._engines[model.name]
            grid = await self._threads.on_device(lambda: to_payload(engine.grid(plan.lens).contiguous()))
        return GeneratedKernel(kernel, grid, report, reservation)

    def _report(self, plan: KernelPlan, **fields: Any) -> pb.ServerReport:
        """A kernel's ``ServerReport``: how it was made, and by which model and worker."""
        return pb.ServerReport(
            content_hash=plan.model.content_hash,
            worker=self.worker,
            representation=pb.REPRESENTATION_FACTORED if plan.factored else pb.REPRESENTATION_DENSE,
            **fields,
        )

    def _count(self, plan: KernelPlan, report: pb.ServerReport, nbytes: int, seconds: float) -> None:
        name = plan.model.name
        self.metrics.statistics.on_kernel(
            name,
            rows=plan.rows,
            conditioned=plan.conditioning is not None,
            cache_hit=report.cache_hit,
            queue_s=report.queue_ms / 1000.0,
            compute_s=report.compute_ms / 1000.0,
            seconds=seconds,
        )
        label = _REPRESENTATION_NAMES[plan.factored]
        self.metrics.kernels_served.labels(name, label).inc()
        self.metrics.payload_bytes.labels(name, label).inc(nbytes)

    async def _unconditioned(self, plan: KernelPlan) -> tuple[EncodedKernel, pb.ServerReport]:
        model, lens, wire_dtype, factored = plan.model, plan.lens, plan.wire_dtype, plan.factored
        engine = self._engines[model.name]
        head_hash = plan.head_hash
        encode = self._encoder
        timing: dict[str, float] = {}

        def compute() -> EncodedKernel:
            start = time.perf_counter()
            tensor = engine.unconditioned(lens, plan.out_dtype, factored=factored)
            timing["compute_s"] = time.perf_counter() - start
            return encode(to_payload(tensor), head_hash)

        def cut(larger: EncodedKernel) -> EncodedKernel:
            # Grid points are independent, so a factored kernel's centre is the centre's factors.
            start = time.perf_counter()
            kernel = encode(centre(larger.payload, plan.spatial, causal=model.module.causal), head_hash)
            timing["compute_s"] = time.perf_counter() - start
            return kernel

        def larger_of_same(key: CacheKey) -> bool:
            digest, other, dtype, other_factored = key
            same = (digest, dtype, other_factored) == (model.content_hash, wire_dtype, factored)
            return same and covers(other, lens)

        accepted = self._clock()

        async def miss() -> EncodedKernel:
            # No deadline check in here: callers that join this computation have their own.
            timing["queue_s"] = self._clock() - accepted
            larger = self._cache.smallest_stored(larger_of_same) if self.settings.cache_slicing else None
            if larger is not None:
                self.metrics.cache_slices.inc()
                return await self._threads.on_host(functools.partial(cut, larger))
            return await self._threads.on_device(compute)

        key: CacheKey = (model.content_hash, lens, wire_dtype, factored)
        kernel, hit = await self._cache.get_or_compute(key, miss)
        # A caller that waited on another's miss did no compute of its own: report it as a hit.
        computed_here = not hit and "compute_s" in timing
        if computed_here:
            self.metrics.compute_time.labels(model.name).observe(timing["compute_s"])
        return kernel, self._report(
            plan,
            cache_hit=not computed_here,
            batch_size=1 if computed_here else 0,
            batch_requests=1 if computed_here else 0,
            queue_ms=timing.get("queue_s", 0.0) * 1000.0,
            compute_ms=timing.get("compute_s", 0.0) * 1000.0,
        )

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
        self._check_open()
        group = self.repository.group(check_name(name, "group"))
        plans = []
        for member in group.members:
            try:
                plans.append(self.planner.plan(member, seq_lens, conditioning, dtype, False, representation))
            except KernelGenError as exc:
                raise _of_member(exc, group, member) from None
        total = self.planner.check_group(name, plans)
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
                return await self._generate(plan, deadline, None, None)  # the group's reservation holds it
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

    def _check_open(self) -> None:
        if self.draining:
            raise ServerDraining("the server is shutting down; retry on another replica")

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
        """Finish (or fail) queued batches and their encodings, then stop both threads."""
        self.draining = True
        await self.submitter.close(drain=drain)
        await self._batches.close()
        self._threads.close()


def _of_member(error: KernelGenError, group: ModelGroup, member: str) -> KernelGenError:
    """The same error (class, status, reason), its message naming the group member at fault."""
    named = type(error)(f"group {group.name!r}, member {member!r}: {error.message}")
    named.__cause__ = error.__cause__
    return named
