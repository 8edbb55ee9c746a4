"""One load step on one ``AsyncKernelClient``: closed loop or open loop, warm-up excluded.

Closed loop (``--concurrency N``): N users, each sending its next request as
soon as its last one is answered; N requests are always in flight.

Open loop (``--rate R``): sends at absolute times ``t0 + offset_k`` from a
Poisson or constant schedule, whatever the server does. A send more than
``LATE_AFTER_S`` behind its time is counted late (the client fell behind); a
send due while ``max_inflight`` calls are out is dropped and counted, so a slow
server cannot make the tester hold unbounded calls.

Both run one continuous load: warm-up requests are sent the same way, and only
requests *sent* inside the measurement window are counted; every one of those
is awaited to an outcome (each call has the client's deadline, so a step always
ends). The window is ``duration_s`` long, or ends when the ``requests``-th
measured request completes.
"""

from __future__ import annotations

import asyncio
import functools
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal

from kernelgen_client.errors import KernelServiceError
from kernelgen_loadtest.correctness import Kept, Reservoir
from kernelgen_loadtest.stats import LATE_AFTER_S, Mode, Samples
from kernelgen_loadtest.workload import Request, RequestSource, ResolvedWorkload

__all__ = ["Progress", "StepPlan", "StepRunner", "schedule"]

Distribution = Literal["poisson", "constant"]


@dataclass(frozen=True)
class StepPlan:
    """One step of a sweep: a mode, its level, how long, and how to warm up."""

    mode: Mode
    #: Concurrency (closed loop, an integer) or requests/s (open loop).
    level: float
    duration_s: float | None = 10.0
    requests: int | None = None
    warmup_s: float = 2.0
    distribution: Distribution = "poisson"
    max_inflight: int = 1024
    #: Responses to keep for the correctness check.
    keep: int = 0
    #: Position in the sweep; with the client process's index it seeds requests and schedule.
    index: int = 0

    def __post_init__(self) -> None:
        if (self.duration_s is None) == (self.requests is None):
            raise ValueError("a step has a duration or a number of requests, not both")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError(f"duration must be positive, got {self.duration_s}")
        if self.requests is not None and self.requests < 1:
            raise ValueError(f"requests must be >= 1, got {self.requests}")
        if self.warmup_s < 0:
            raise ValueError(f"warm-up must be >= 0, got {self.warmup_s}")
        if not (self.level > 0 and math.isfinite(self.level)):
            raise ValueError(f"{'concurrency' if self.mode == 'closed' else 'rate'} must be positive")
        if self.mode == "closed" and self.level != int(self.level):
            raise ValueError(f"concurrency must be an integer, got {self.level}")
        if self.max_inflight < 1:
            raise ValueError("max_inflight must be >= 1")

    def share(self, process: int, processes: int) -> StepPlan | None:
        """This client process's part of the step (users, rate, requests, kept responses split evenly);
        ``None`` when it has no user or no request to send.
        """

        def split(total: int) -> int:
            return total // processes + (1 if process < total % processes else 0)

        level = float(split(int(self.level))) if self.mode == "closed" else self.level / processes
        requests = None if self.requests is None else split(self.requests)
        if level == 0 or requests == 0:
            return None
        return replace(
            self,
            level=level,
            requests=requests,
            keep=split(self.keep),
            max_inflight=max(1, self.max_inflight // processes),
        )


class Progress:
    """Live counters of the running step, for the display: measured requests, plus calls out."""

    __slots__ = ("dropped", "errors", "inflight", "ok", "sent")

    def __init__(self) -> None:
        self.sent = self.ok = self.errors = self.dropped = self.inflight = 0

    def snapshot(self) -> tuple[int, int, int, int, int]:
        return self.sent, self.ok, self.errors, self.dropped, self.inflight


def schedule(rate: float, distribution: Distribution, rng: random.Random) -> Iterator[float]:
    """Send offsets in seconds from the start: ``k / rate``, or a Poisson process of that rate."""
    if distribution == "constant":
        k = 0
        while True:
            yield k / rate
            k += 1
    offset = 0.0
    while True:
        yield offset
        offset += rng.expovariate(rate)


class StepRunner:
    """Runs steps with one client; ``client`` is an ``AsyncKernelClient`` or anything with its
    ``generate(model, seq_lens, conditioning, *, dtype, with_report, stream, representation)``
    (and, for a workload with a group, ``generate_group(group, seq_lens, conditioning, *, dtype,
    with_report, representation)``).
    """

    def __init__(
        self,
        client: Any,
        resolved: ResolvedWorkload,
        *,
        process: int = 0,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._client = client
        self._resolved = resolved
        self._stream = resolved.workload.stream
        self._process = process
        self._clock = clock

    async def run(self, plan: StepPlan, progress: Progress | None = None) -> Samples:
        step = _Step(self, plan, progress or Progress())
        return await step.run()

    async def call(self, request: Request) -> Any:
        if request.group:
            return await self._client.generate_group(
                request.model,
                request.seq_lens,
                request.conditioning,
                dtype=request.dtype,
                with_report=True,
                representation=request.representation,
            )
        return await self._client.generate(
            request.model,
            request.seq_lens,
            request.conditioning,
            dtype=request.dtype,
            with_report=True,
            stream=self._stream,
            representation=request.representation,
        )


class _Step:
    """The state of one running step (one per ``StepRunner.run``)."""

    def __init__(self, runner: StepRunner, plan: StepPlan, progress: Progress) -> None:
        self.runner = runner
        self.plan = plan
        self.progress = progress
        self.clock = runner._clock
        self.samples = Samples()
        seed = (runner._resolved.workload.seed, runner._process, plan.index)
        self.source = RequestSource(runner._resolved, stream_id=seed)
        self.rng = random.Random(hash(seed))
        self.kept: Reservoir[Kept] = Reservoir(plan.keep, seed=hash(seed))
        self.start = self.clock()
        self.window_start = self.start + plan.warmup_s
        duration = plan.duration_s
        self.window_end = math.inf if duration is None else self.window_start + duration
        self.last_send = self.last_done = self.window_start
        self.inflight: set[asyncio.Task[None]] = set()

    async def run(self) -> Samples:
        marks = asyncio.create_task(self._mark_window())
        try:
            if self.plan.mode == "closed":
                await self._closed()
            else:
                await self._open()
            # Measured sends happen only after the window opened, so this is done or due now.
            wall0, cpu0 = await marks
        finally:  # only an error or a cancellation leaves anything here to cancel
            for task in self.inflight:
                task.cancel()
            marks.cancel()
        wall = self.clock() - wall0
        samples = self.samples
        samples.cpu_util = [(time.process_time() - cpu0) / wall if wall > 0 else 0.0]
        if self.plan.duration_s is not None:
            samples.window_s = max(self.plan.duration_s, self.last_send - self.window_start)
        else:
            samples.window_s = self.last_done - self.window_start
        samples.kept = list(self.kept.items)
        return samples

    async def _mark_window(self) -> tuple[float, float]:
        """Wall and CPU clocks when the measurement window opens (the client's CPU use is read over it)."""
        delay = self.window_start - self.clock()
        if delay > 0:
            await asyncio.sleep(delay)
        return self.clock(), time.process_time()

    def _count_send(self) -> None:
        self.samples.sent += 1
        self.progress.sent += 1
        self.last_send = self.clock()

    # --- closed loop -------------------------------------------------------------------------------
    async def _closed(self) -> None:
        remaining = self.plan.requests  # measured sends still to make; None: by time

        async def user() -> None:
            nonlocal remaining
            while True:
                measured = self.clock() >= self.window_start
                if measured:
                    if self.clock() >= self.window_end:
                        return
                    if remaining is not None:
                        if remaining <= 0:
                            return
                        remaining -= 1
                    self.samples.scheduled += 1
                    self._count_send()
                await self._call(self.source.next(), measured)

        await asyncio.gather(*(user() for _ in range(int(self.plan.level))))

    # --- open loop ---------------------------------------------------------------------------------
    async def _open(self) -> None:
        samples, plan = self.samples, self.plan
        for offset in schedule(plan.level, plan.distribution, self.rng):
            due = self.start + offset
            measured = due >= self.window_start
            if measured and (
                due >= self.window_end or (plan.requests is not None and samples.scheduled >= plan.requests)
            ):
                break
            delay = due - self.clock()
            # Yield even when behind schedule, so that replies are read between sends.
            await asyncio.sleep(delay if delay > 0 else 0)
            if measured:
                samples.scheduled += 1
            if len(self.inflight) >= plan.max_inflight:
                if measured:
                    samples.dropped += 1
                    self.progress.dropped += 1
                continue
            if measured:
                lag = self.clock() - due
                samples.lag_s += lag
                samples.max_lag_s = max(samples.max_lag_s, lag)
                samples.late += lag > LATE_AFTER_S
                self._count_send()
            task = asyncio.create_task(self._call(self.source.next(), measured))
            self.inflight.add(task)
            task.add_done_callback(self.inflight.discard)
        while self.inflight:
            await asyncio.gather(*self.inflight)

    # --- one call ----------------------------------------------------------------------------------
    async def _call(self, request: Request, measured: bool) -> None:
        progress = self.progress
        progress.inflight += 1
        started = self.clock()
        try:
            result = await self.runner.call(request)
        except KernelServiceError as exc:
            code, message, result = exc.code.name, exc.message, None
        except Exception as exc:  # a failure inside the client is counted, never raised out of a step
            code, message, result = f"CLIENT_{type(exc).__name__}", str(exc) or repr(exc), None
        else:
            code, message = "OK", ""
        finally:
            progress.inflight -= 1
        done = self.clock()
        if not measured:
            return
        self.last_done = max(self.last_done, done)
        if result is None:
            self.samples.error(code, message)
            progress.errors += 1
            return
        self._record(request, result, done - started)
        progress.ok += 1

    def _record(self, request: Request, result: Any, latency: float) -> None:
        """One successful call; a group's counts as one call of many kernels, each with its report."""
        samples = self.samples
        samples.latencies_s.append(latency)
        members = list(result.items()) if request.group else [(request.model, result)]
        for model, one in members:
            samples.bytes += one.nbytes
            samples.kernels += one.shape[0] if one.shape else 1
            report = one.report
            samples.server_workers[report.worker] += 1
            samples.representations[report.representation] += 1
            if request.conditioning is None:
                samples.unconditioned += 1
                samples.cache_hits += report.cache_hit
            if not report.cache_hit:
                samples.batch_rows.append(report.batch_size)
                samples.batch_requests.append(report.batch_requests)
                samples.queue_ms.append(report.queue_ms)
                samples.compute_ms.append(report.compute_ms)
            self.kept.offer(functools.partial(_keep, request, model, one))


def _keep(request: Request, model: str, result: Any) -> Kept:
    import numpy as np

    kernel = result.kernel
    bound = None
    factors = getattr(kernel, "factors", None)  # a factored kernel (numpy factors)
    if factors is not None and request.dtype != "float32":
        # Reduced factors are rounded once each: element j of the kernel is off by at most
        # a unit roundoff of sum_i |factors_i * W^T[i, j]| (README, "Dense or factored kernels").
        flat = np.abs(np.asarray(factors, dtype=np.float32).reshape(-1, kernel.output_head.hidden))
        bound = (flat @ np.abs(kernel.output_head.weight_t)).reshape(kernel.shape)
    return Kept(
        model=model,
        seq_lens=request.seq_lens,
        conditioning=request.conditioning,
        dtype=request.dtype,
        kernel=np.array(kernel, dtype=np.float32),  # a copy: the response buffer is not ours
        content_hash=result.report.content_hash,
        rounding_bound=bound,
    )
