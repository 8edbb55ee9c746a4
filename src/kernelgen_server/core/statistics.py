"""Per-model inference statistics, as the Open Inference Protocol's ModelStatistics reports them.

Fed from the same observations as the Prometheus metrics, at the same points:
every finished kernel call (``status.rpc_scope`` and the streaming inference
loop: success or failure and its duration, as ``kernelgen_requests`` and the
latency histogram), every kernel the service produced (its report's queue and
compute times, cache hit or miss), and every batch the batcher ran (its rows
and compute time, as ``kernelgen_batch_size_rows`` and the compute-time
histogram). Counts are of this server process.

Only the repository's models are tracked (``track``), so unknown names sent by
clients cannot grow it; batch statistics have one entry per batch size seen,
at most ``--max-conditioning-rows`` of them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

__all__ = ["KERNEL_METHODS", "Duration", "InferenceStatistics", "ModelStatistics"]

#: The methods whose calls count as inference requests, of either protocol.
KERNEL_METHODS = frozenset({"GenerateKernel", "StreamKernel", "ModelInfer", "ModelStreamInfer"})


@dataclass
class Duration:
    """How many, and their total time in nanoseconds."""

    count: int = 0
    ns: int = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.ns += max(0, round(seconds * 1e9))


@dataclass
class ModelStatistics:
    """One model's counts; see the ``inference.ModelStatistics`` message for each field."""

    last_inference_ms: int = 0
    inference_count: int = 0
    execution_count: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    cache_hit: Duration = field(default_factory=Duration)
    cache_miss: Duration = field(default_factory=Duration)
    #: Compute time of the executions of each batch size (conditioning rows).
    batches: dict[int, Duration] = field(default_factory=dict)


class InferenceStatistics:
    """The statistics of the tracked models; updated on the event loop only."""

    def __init__(self, wall_clock: Callable[[], float] = time.time) -> None:
        self._clock = wall_clock
        self._models: dict[str, ModelStatistics] = {}

    def track(self, names: Iterable[str]) -> None:
        for name in names:
            self._models.setdefault(name, ModelStatistics())

    def names(self) -> list[str]:
        return sorted(self._models)

    def get(self, name: str) -> ModelStatistics | None:
        return self._models.get(name)

    def on_call(self, model: str, method: str, ok: bool, seconds: float) -> None:
        """A call finished: a success or a failure, and how long it took."""
        stats = self._models.get(model)
        if stats is None or method not in KERNEL_METHODS:
            return
        (stats.success if ok else stats.fail).add(seconds)
        stats.last_inference_ms = int(self._clock() * 1000)

    def on_kernel(
        self,
        model: str,
        *,
        rows: int,
        conditioned: bool,
        cache_hit: bool,
        queue_s: float,
        compute_s: float,
        seconds: float,
    ) -> None:
        """The service produced one kernel (its report's numbers); ``seconds`` is its time in the service."""
        stats = self._models.get(model)
        if stats is None:
            return
        if cache_hit:
            stats.cache_hit.add(seconds)
            return
        stats.inference_count += rows
        stats.queue.add(queue_s)
        stats.compute_infer.add(compute_s)
        if not conditioned:
            # A cache miss computed alone: one execution of batch size 1 (batches report their own).
            stats.cache_miss.add(seconds)
            self._execution(stats, 1, compute_s)

    def on_batch(self, model: str, rows: int, compute_s: float) -> None:
        """The batcher ran one batch of ``rows`` conditioning rows."""
        stats = self._models.get(model)
        if stats is not None:
            self._execution(stats, rows, compute_s)

    @staticmethod
    def _execution(stats: ModelStatistics, rows: int, compute_s: float) -> None:
        stats.execution_count += 1
        stats.batches.setdefault(rows, Duration()).add(compute_s)
