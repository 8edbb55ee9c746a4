"""Raw samples of a step and what they sum up to: throughput, latency, errors, server reports.

Counting invariants, checked by ``Samples.check`` and relied on by the reports:

- ``scheduled = sent + dropped`` (open loop drops a send when ``--max-inflight``
  calls are already out; closed loop never drops);
- ``sent = ok + sum(errors.values())``: every sent request is awaited to an
  outcome, a status code (``OK`` or the gRPC code's name, or ``CLIENT_<Error>``
  for a failure inside the client);
- only requests *sent* inside the measurement window are counted; warm-up
  requests are neither counted nor timed.

Percentiles are nearest-rank: always a latency that was observed.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = [
    "LATE_AFTER_S",
    "ClientStats",
    "Gates",
    "LatencyStats",
    "Samples",
    "ServerStats",
    "StepResult",
    "batch_buckets",
    "percentile",
    "summarise",
]

Mode = Literal["closed", "open"]

#: A send later than this behind its scheduled time counts as late (open loop).
LATE_AFTER_S = 0.002
#: A client process busier than this share of one core is called the bottleneck.
CLIENT_CPU_BOUND = 0.85
#: An open loop whose sends reach less than this share of the target rate fell behind.
RATE_SHORTFALL = 0.95
PERCENTILES = (50, 90, 95, 99)


@dataclass
class Samples:
    """What one process measured in one step; ``merge`` folds in another process's."""

    scheduled: int = 0
    sent: int = 0
    dropped: int = 0
    late: int = 0
    #: Sum and maximum of how far sends were behind their schedule (open loop).
    lag_s: float = 0.0
    max_lag_s: float = 0.0
    #: Latency in seconds of each successful request.
    latencies_s: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    #: One message per error code, to say what went wrong.
    error_examples: dict[str, str] = field(default_factory=dict)
    bytes: int = 0
    kernels: int = 0
    unconditioned: int = 0
    cache_hits: int = 0
    # Per successful computed (not cache-hit) response, from its ServerReport.
    batch_rows: list[int] = field(default_factory=list)
    batch_requests: list[int] = field(default_factory=list)
    queue_ms: list[float] = field(default_factory=list)
    compute_ms: list[float] = field(default_factory=list)
    #: Successful responses by the server worker process that answered (``ServerReport.worker``).
    server_workers: Counter[int] = field(default_factory=Counter)
    #: Successful responses by the representation the server sent ("dense", "factored").
    representations: Counter[str] = field(default_factory=Counter)
    #: Length of the measurement window (the longest of the processes').
    window_s: float = 0.0
    #: CPU seconds / wall seconds of each process over its window (cores).
    cpu_util: list[float] = field(default_factory=list)
    #: Responses kept for the correctness check (``correctness.Kept``).
    kept: list[Any] = field(default_factory=list)

    @property
    def ok(self) -> int:
        return len(self.latencies_s)

    def error(self, code: str, message: str) -> None:
        self.errors[code] += 1
        self.error_examples.setdefault(code, message)

    def merge(self, other: Samples) -> None:
        for name in (
            "scheduled",
            "sent",
            "dropped",
            "late",
            "lag_s",
            "bytes",
            "kernels",
            "unconditioned",
            "cache_hits",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.max_lag_s = max(self.max_lag_s, other.max_lag_s)
        self.window_s = max(self.window_s, other.window_s)
        for name in (
            "latencies_s",
            "batch_rows",
            "batch_requests",
            "queue_ms",
            "compute_ms",
            "cpu_util",
            "kept",
        ):
            getattr(self, name).extend(getattr(other, name))
        self.errors.update(other.errors)
        self.server_workers.update(other.server_workers)
        self.representations.update(other.representations)
        for code, message in other.error_examples.items():
            self.error_examples.setdefault(code, message)

    def check(self) -> None:
        """Raise ``AssertionError`` when a counting invariant does not hold (a bug here)."""
        errors = sum(self.errors.values())
        if self.scheduled != self.sent + self.dropped or self.sent != self.ok + errors:
            raise AssertionError(
                f"counts do not add up: scheduled {self.scheduled}, sent {self.sent}, dropped {self.dropped},"
                f" ok {self.ok}, errors {errors}"
            )


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of ascending ``ordered``; NaN when empty."""
    if not ordered:
        return math.nan
    rank = math.ceil(q / 100.0 * len(ordered))
    return ordered[min(len(ordered), max(rank, 1)) - 1]


def batch_buckets(rows: Iterable[int]) -> dict[str, int]:
    """Requests by the size of the batch they ran in, in power-of-two buckets ("1", "2", "3-4", ...)."""
    counts: Counter[int] = Counter()
    for n in rows:
        counts[(max(n, 1) - 1).bit_length()] += 1  # bucket b holds 2**(b-1) < n <= 2**b
    out = {}
    for b in sorted(counts):
        high, low = 1 << b, (1 << (b - 1)) + 1 if b else 1
        out[str(high) if low == high else f"{low}-{high}"] = counts[b]
    return out


# --- per-step results ------------------------------------------------------------------------------
@dataclass(frozen=True)
class LatencyStats:
    """Latency of the successful requests, in milliseconds (NaN without any)."""

    p50: float
    p90: float
    p95: float
    p99: float
    max: float
    mean: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> LatencyStats:
        ordered = sorted(seconds)
        p50, p90, p95, p99 = (percentile(ordered, q) * 1e3 for q in PERCENTILES)
        mean = sum(ordered) / len(ordered) * 1e3 if ordered else math.nan
        return cls(p50, p90, p95, p99, ordered[-1] * 1e3 if ordered else math.nan, mean)


@dataclass(frozen=True)
class ServerStats:
    """The server's side, from the per-response reports of the successful requests."""

    #: Requests by the rows of the batch they ran in (cache hits excluded).
    batch_histogram: dict[str, int]
    #: Rows per batch, averaged over batches (a batch of n requests reports n times).
    mean_batch_rows: float
    #: Per request: time queued before its batch, and its batch's compute time.
    mean_queue_ms: float
    mean_compute_ms: float
    unconditioned: int
    cache_hits: int
    #: Hits among the unconditioned (cacheable) requests; NaN without any.
    cache_hit_rate: float
    #: Responses by the index of the server worker process that answered, in index order
    #: (one entry, "0", for a server of one process).
    responses_by_worker: dict[str, int]
    #: Responses by the representation sent: "dense", "factored".
    responses_by_representation: dict[str, int]


@dataclass(frozen=True)
class ClientStats:
    """The load tester's own side: was it keeping up?"""

    processes: int
    #: The busiest process's CPU use over the window, in cores.
    max_cpu_util: float
    #: Open loop: sends more than ``LATE_AFTER_S`` behind schedule, and by how much.
    late: int
    mean_lag_ms: float
    max_lag_ms: float
    #: Why the client, not the server, may have limited this step; empty when it did not.
    bottleneck: str


@dataclass(frozen=True)
class StepResult:
    """Everything measured at one concurrency or rate."""

    mode: Mode
    #: Concurrency (closed loop) or target requests/s (open loop).
    level: float
    window_s: float
    scheduled: int
    sent: int
    ok: int
    errors: dict[str, int]
    error_examples: dict[str, str]
    dropped: int
    #: Sends per second actually achieved (the offered load).
    send_rate: float
    requests_per_s: float
    kernels_per_s: float
    mb_per_s: float
    latency_ms: LatencyStats
    server: ServerStats
    client: ClientStats
    correctness: dict[str, Any] | None = None
    #: Why this step failed its gates; empty when it passed.
    failures: tuple[str, ...] = ()

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def error_rate(self) -> float:
        """Failed share of the scheduled requests: errors plus open-loop drops."""
        return (self.error_count + self.dropped) / self.scheduled if self.scheduled else 0.0

    @property
    def label(self) -> str:
        return f"concurrency {self.level:g}" if self.mode == "closed" else f"rate {self.level:g}/s"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["error_count"] = self.error_count
        out["error_rate"] = self.error_rate
        out["passed"] = not self.failures
        finite: dict[str, Any] = _finite(out)
        return finite


def _finite(value: Any) -> Any:
    """NaN and infinities become ``None`` (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _server(samples: Samples) -> ServerStats:
    per_batch = [1.0 / max(n, 1) for n in samples.batch_requests]
    batches = sum(per_batch)
    rows = sum(r * w for r, w in zip(samples.batch_rows, per_batch, strict=True))
    return ServerStats(
        batch_histogram=batch_buckets(samples.batch_rows),
        mean_batch_rows=rows / batches if batches else math.nan,
        mean_queue_ms=_mean(samples.queue_ms),
        mean_compute_ms=_mean(samples.compute_ms),
        unconditioned=samples.unconditioned,
        cache_hits=samples.cache_hits,
        cache_hit_rate=samples.cache_hits / samples.unconditioned if samples.unconditioned else math.nan,
        responses_by_worker={str(w): n for w, n in sorted(samples.server_workers.items())},
        responses_by_representation=dict(sorted(samples.representations.items())),
    )


def _client(samples: Samples, mode: Mode, level: float, send_rate: float) -> ClientStats:
    cpu = max(samples.cpu_util, default=0.0)
    reasons = []
    if cpu >= CLIENT_CPU_BOUND:
        reasons.append(f"a client process used {cpu:.2f} of a core; add --workers")
    mean_lag = samples.lag_s / samples.sent if samples.sent else 0.0
    # Behind schedule: short of the rate, or late by more than a mean interval on average.
    if mode == "open" and samples.sent and (send_rate < RATE_SHORTFALL * level or mean_lag > 1.0 / level):
        reasons.append(
            f"sends fell behind schedule ({send_rate:.1f} of {level:g} req/s,"
            f" {samples.late / samples.sent:.0%} late, {mean_lag * 1e3:.1f} ms behind on average)"
        )
    return ClientStats(
        processes=len(samples.cpu_util),
        max_cpu_util=cpu,
        late=samples.late,
        mean_lag_ms=mean_lag * 1e3,
        max_lag_ms=samples.max_lag_s * 1e3,
        bottleneck="; ".join(reasons),
    )


def summarise(samples: Samples, mode: Mode, level: float) -> StepResult:
    """The step's result; ``window_s`` is the measurement window every rate divides by."""
    samples.check()
    window = samples.window_s if samples.window_s > 0 else math.nan
    send_rate = samples.sent / window
    return StepResult(
        mode=mode,
        level=level,
        window_s=samples.window_s,
        scheduled=samples.scheduled,
        sent=samples.sent,
        ok=samples.ok,
        errors=dict(sorted(samples.errors.items())),
        error_examples=dict(sorted(samples.error_examples.items())),
        dropped=samples.dropped,
        send_rate=send_rate,
        requests_per_s=samples.ok / window,
        kernels_per_s=samples.kernels / window,
        mb_per_s=samples.bytes / window / 1e6,
        latency_ms=LatencyStats.of(samples.latencies_s),
        server=_server(samples),
        client=_client(samples, mode, level, send_rate),
    )


# --- gates -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Gates:
    """Pass/fail criteria of every step, for CI and deployment checks."""

    #: Largest acceptable ``error_rate`` (errors and drops over scheduled requests).
    max_error_rate: float = 0.0
    #: p99 latency objective in milliseconds; ``None``: none.
    slo_p99_ms: float | None = None

    def failures(self, step: StepResult, correctness: Mapping[str, Any] | None = None) -> tuple[str, ...]:
        out = []
        if step.sent == 0:
            out.append("no request was sent")
        elif step.error_rate > self.max_error_rate:
            codes = ", ".join(f"{code} {n}" for code, n in step.errors.items())
            drops = f", {step.dropped} dropped" if step.dropped else ""
            out.append(
                f"error rate {step.error_rate:.2%} > {self.max_error_rate:.2%}"
                f" ({codes or 'no errors'}{drops})"
            )
        if self.slo_p99_ms is not None:
            p99 = step.latency_ms.p99
            if not math.isfinite(p99):
                out.append(f"p99 SLO {self.slo_p99_ms:g} ms: no successful request to measure")
            elif p99 > self.slo_p99_ms:
                out.append(f"p99 {p99:.1f} ms > SLO {self.slo_p99_ms:g} ms")
        if correctness and correctness.get("mismatches"):
            out.append(f"{correctness['mismatches']} of {correctness['checked']} checked kernels mismatch")
        return tuple(out)
