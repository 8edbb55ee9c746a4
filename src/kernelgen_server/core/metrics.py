"""Prometheus metrics of one server, on a registry of its own (no globals).

Under ``kernelgen serve --workers N`` each worker process records into
prometheus_client's multiprocess files and the supervisor serves their sum;
each gauge's ``multiprocess_mode`` says how the workers' values combine
(outside that mode it is ignored).

The cache and the batcher report through small observer protocols; the
adapters here bind those to counters and histograms, so neither component
knows about Prometheus.
"""

from __future__ import annotations

from collections.abc import Hashable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from kernelgen_server.core.statistics import InferenceStatistics

__all__ = ["Metrics"]

# Latencies from a cache hit (~1 ms) to a large streamed kernel (seconds).
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def _bucket_label(key: Hashable) -> str:
    """A short label for a batch bucket key ``(model, seq_lens, dtype)``."""
    if isinstance(key, tuple) and len(key) == 3:
        model, seq_lens, dtype = key
        lens = "x".join(str(n) for n in seq_lens) if isinstance(seq_lens, tuple) else str(seq_lens)
        return f"{model}/{lens}/{dtype}"
    return str(key)


def _model_of(key: Hashable) -> str:
    return str(key[0]) if isinstance(key, tuple) and key else "unknown"


class Metrics:
    """All of the server's metrics. ``serve(port)`` exposes them on ``/metrics``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "kernelgen_requests",
            "Finished calls by model, method and status code.",
            ["model", "method", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "kernelgen_request_latency_seconds",
            "Call latency, accepted to last byte handed to gRPC.",
            ["model", "method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inflight = Gauge(
            "kernelgen_inflight_requests", "Calls in progress.", registry=r, multiprocess_mode="livesum"
        )
        self.inflight_bytes = Gauge(
            "kernelgen_inflight_bytes",
            "Response bytes reserved by calls in progress (the --max-inflight-bytes budget).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.queue_time = Histogram(
            "kernelgen_queue_time_seconds",
            "Time a conditioned request waited for its batch.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.compute_time = Histogram(
            "kernelgen_compute_time_seconds",
            "Device time of one batch or one cache miss.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "kernelgen_batch_size_rows",
            "Conditioning rows per batch run.",
            ["model"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.batches = Counter("kernelgen_batches", "Batches run.", ["model"], registry=r)
        self.kernels_served = Counter(
            "kernelgen_kernels_served",
            "Kernel responses answered, by model and representation (dense or factored).",
            ["model", "representation"],
            registry=r,
        )
        self.payload_bytes = Counter(
            "kernelgen_payload_bytes",
            "Bytes of kernels (dense) or factors (factored) answered, by model and representation.",
            ["model", "representation"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "kernelgen_queue_depth",
            "Requests waiting, by batch bucket (model/seq_lens/dtype).",
            ["bucket"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.oom_splits = Counter(
            "kernelgen_oom_splits",
            "Batches split and retried after running out of memory.",
            ["model"],
            registry=r,
        )
        self.dropped = Counter(
            "kernelgen_dropped_requests",
            "Queued requests dropped before computing (expired, cancelled).",
            ["model", "reason"],
            registry=r,
        )
        self.unsent_responses = Counter(
            "kernelgen_unsent_responses",
            "Responses a handler returned that were never sent: the call had ended first (the client "
            "cancelled, its deadline passed or its connection closed).",
            ["method"],
            registry=r,
        )
        self.cache_hits = Counter("kernelgen_cache_hits", "Unconditioned-kernel cache hits.", registry=r)
        self.cache_misses = Counter(
            "kernelgen_cache_misses", "Unconditioned-kernel cache misses.", registry=r
        )
        self.cache_evictions = Counter("kernelgen_cache_evictions", "Cache entries evicted.", registry=r)
        self.cache_slices = Counter(
            "kernelgen_cache_slices",
            "Cache misses served as the centre of a cached larger kernel.",
            registry=r,
        )
        self.cache_bytes = Gauge(
            "kernelgen_cache_bytes", "Bytes held by the cache.", registry=r, multiprocess_mode="livesum"
        )
        self.cache_entries = Gauge(
            "kernelgen_cache_entries", "Entries held by the cache.", registry=r, multiprocess_mode="livesum"
        )
        self.models_ready = Gauge(
            "kernelgen_model_ready",
            "1 when the model is loaded and serving (in every live worker).",
            ["model"],
            registry=r,
            multiprocess_mode="livemin",
        )
        #: The same observations per model, for the Open Inference Protocol's ModelStatistics.
        self.statistics = InferenceStatistics()

    # --- cache observer -------------------------------------------------------------------------
    def on_hit(self) -> None:
        self.cache_hits.inc()

    def on_miss(self) -> None:
        self.cache_misses.inc()

    def on_eviction(self, nbytes: int) -> None:
        self.cache_evictions.inc()

    def on_bytes(self, total_bytes: int, entries: int) -> None:
        self.cache_bytes.set(total_bytes)
        self.cache_entries.set(entries)

    # --- batcher observer -----------------------------------------------------------------------
    def on_batch(self, key: Hashable, rows: int, requests: int, compute_s: float) -> None:
        model = _model_of(key)
        self.batches.labels(model).inc()
        self.batch_size.labels(model).observe(rows)
        self.compute_time.labels(model).observe(compute_s)
        self.statistics.on_batch(model, rows, compute_s)

    def on_queue_time(self, key: Hashable, seconds: float) -> None:
        self.queue_time.labels(_model_of(key)).observe(seconds)

    def on_queue_depth(self, key: Hashable, depth: int) -> None:
        self.queue_depth.labels(_bucket_label(key)).set(depth)

    def on_oom_split(self, key: Hashable, rows: int) -> None:
        self.oom_splits.labels(_model_of(key)).inc()

    def on_dropped(self, key: Hashable, reason: str) -> None:
        self.dropped.labels(_model_of(key), reason).inc()
