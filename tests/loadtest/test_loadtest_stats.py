"""Load-test statistics: percentiles, histograms, merging, per-step results and gates."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest

from kernelgen_loadtest.stats import Gates, Samples, batch_buckets, percentile, summarise


def samples(
    ok: int = 100, errors: dict[str, int] | None = None, window: float = 2.0, **extra: object
) -> Samples:
    s = Samples(window_s=window, cpu_util=[0.3])
    s.latencies_s = [(i + 1) / 1000 for i in range(ok)]  # 1..ok ms
    for code, n in (errors or {}).items():
        for _ in range(n):
            s.error(code, f"{code.lower()} happened")
    s.sent = s.scheduled = ok + sum((errors or {}).values())
    s.kernels, s.bytes = 2 * ok, 1_000_000 * ok
    for key, value in extra.items():
        setattr(s, key, value)
    return s


def test_nearest_rank_percentile_is_an_observed_value() -> None:
    values = [float(v) for v in range(1, 101)]
    assert [percentile(values, q) for q in (50, 90, 99, 100)] == [50, 90, 99, 100]
    assert percentile([7.0], 99) == 7.0
    assert percentile([1.0, 2.0], 50) == 1.0 and percentile([1.0, 2.0], 51) == 2.0
    assert math.isnan(percentile([], 50))


def test_batch_buckets_by_powers_of_two() -> None:
    assert batch_buckets([1, 2, 3, 4, 5, 8, 9, 64, 65]) == {
        "1": 1, "2": 1, "3-4": 2, "5-8": 2, "9-16": 1, "33-64": 1, "65-128": 1,
    }  # fmt: skip
    assert batch_buckets([]) == {}


def test_summary_rates_latency_and_server_figures() -> None:
    s = samples(ok=100, errors={"UNAVAILABLE": 3, "DEADLINE_EXCEEDED": 1}, unconditioned=20, cache_hits=15)
    # One batch of 4 rows from 4 requests, and 2 single-row batches: 3 batches, 6 rows.
    s.batch_rows, s.batch_requests = [4, 4, 4, 4, 1, 1], [4, 4, 4, 4, 1, 1]
    s.queue_ms, s.compute_ms = [1.0] * 6, [2.0, 2.0, 2.0, 2.0, 5.0, 5.0]
    s.server_workers = Counter({1: 40, 0: 60})
    result = summarise(s, "closed", 8)
    assert (result.sent, result.ok, result.error_count, result.scheduled) == (104, 100, 4, 104)
    assert result.errors == {"DEADLINE_EXCEEDED": 1, "UNAVAILABLE": 3}
    assert result.error_examples["UNAVAILABLE"] == "unavailable happened"
    assert result.requests_per_s == 50.0 and result.kernels_per_s == 100.0 and result.mb_per_s == 50.0
    assert result.send_rate == 52.0
    assert result.error_rate == pytest.approx(4 / 104)
    lat = result.latency_ms
    assert (lat.p50, lat.p90, lat.p95, lat.p99, lat.max) == pytest.approx((50, 90, 95, 99, 100))
    assert lat.mean == pytest.approx(50.5)
    server = result.server
    assert server.mean_batch_rows == pytest.approx(2.0)
    assert server.batch_histogram == {"1": 2, "3-4": 4}
    assert server.mean_compute_ms == pytest.approx(3.0) and server.mean_queue_ms == 1.0
    assert server.cache_hit_rate == 0.75
    assert list(server.responses_by_worker.items()) == [("0", 60), ("1", 40)]
    assert result.label == "concurrency 8"
    document = result.to_dict()
    json.dumps(document, allow_nan=False)
    assert document["passed"] and document["error_count"] == 4


def test_empty_step_is_json_safe() -> None:
    result = summarise(Samples(window_s=1.0, cpu_util=[0.0]), "open", 20)
    assert math.isnan(result.latency_ms.p99) and math.isnan(result.server.cache_hit_rate)
    document = result.to_dict()
    assert document["latency_ms"]["p99"] is None
    json.dumps(document, allow_nan=False)


def test_counts_must_add_up() -> None:
    s = samples(ok=3)
    s.sent += 1  # a request with no outcome
    with pytest.raises(AssertionError, match="do not add up"):
        summarise(s, "closed", 1)


def test_merge_is_the_union_of_processes() -> None:
    a = samples(ok=50, errors={"UNAVAILABLE": 1}, window=2.0, late=1, lag_s=0.01, max_lag_s=0.005)
    b = samples(
        ok=50, errors={"UNAVAILABLE": 2, "INTERNAL": 1}, window=2.1, late=2, lag_s=0.02, max_lag_s=0.009
    )
    b.latencies_s = [v + 0.05 for v in b.latencies_s]  # 51..100 ms
    b.cpu_util = [0.6]
    a.server_workers, b.server_workers = Counter({0: 30, 1: 20}), Counter({1: 50})
    a.merge(b)
    assert a.sent == a.scheduled == 104 and a.ok == 100
    assert a.server_workers == Counter({0: 30, 1: 70})
    assert a.errors == Counter({"UNAVAILABLE": 3, "INTERNAL": 1})
    assert (a.late, a.max_lag_s, a.window_s, a.cpu_util) == (3, 0.009, 2.1, [0.3, 0.6])
    assert a.lag_s == pytest.approx(0.03)
    result = summarise(a, "open", 50)
    assert result.latency_ms.p50 == pytest.approx(50) and result.latency_ms.max == pytest.approx(100)
    assert result.client.processes == 2 and result.client.max_cpu_util == 0.6


def test_client_bottleneck_is_named() -> None:
    assert summarise(samples(), "closed", 4).client.bottleneck == ""
    busy = samples(cpu_util=[0.2, 0.93])
    assert "0.93 of a core" in summarise(busy, "closed", 4).client.bottleneck
    # Open loop at 100/s reaching 50/s: the sends fell behind.
    behind = summarise(samples(ok=100, window=2.0), "open", 100)
    assert "fell behind schedule (50.0 of 100 req/s" in behind.client.bottleneck
    on_time = summarise(samples(ok=100, window=2.0, late=3, lag_s=0.05), "open", 50)
    assert on_time.client.bottleneck == "" and on_time.client.late == 3
    late = summarise(samples(ok=100, window=2.0, late=90, lag_s=3.0), "open", 50)
    assert "30.0 ms behind on average" in late.client.bottleneck


def test_gates() -> None:
    clean = summarise(samples(), "closed", 1)
    assert Gates().failures(clean) == ()
    assert Gates(slo_p99_ms=99.0).failures(clean) == ()
    assert Gates(slo_p99_ms=50.0).failures(clean) == ("p99 99.0 ms > SLO 50 ms",)
    failing = summarise(samples(ok=90, errors={"UNAVAILABLE": 10}), "closed", 1)
    assert Gates().failures(failing) == ("error rate 10.00% > 0.00% (UNAVAILABLE 10)",)
    assert Gates(max_error_rate=0.1).failures(failing) == ()
    dropped = samples(ok=90, dropped=10)
    dropped.scheduled = 100
    assert "10 dropped" in Gates(max_error_rate=0.05).failures(summarise(dropped, "open", 50))[0]
    nothing = summarise(Samples(window_s=1.0), "closed", 1)
    assert Gates(slo_p99_ms=10).failures(nothing) == (
        "no request was sent",
        "p99 SLO 10 ms: no successful request to measure",
    )
    assert Gates().failures(clean, {"checked": 4, "mismatches": 1}) == ("1 of 4 checked kernels mismatch",)
