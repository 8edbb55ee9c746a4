"""Three replicas behind one round-robin target; one is killed and restarted mid-run.

The full 30 s run with its report is ``python benchmarks/scale_out.py``; this is
the same scenario, shorter, with its invariants asserted.
"""

from __future__ import annotations

from scale_out import scale_out


def test_a_replica_killed_and_restarted_loses_no_accepted_request() -> None:
    result = scale_out(duration=12.0, concurrency=8, check=24)
    assert result["sent"] > 0
    assert result["counts_add_up"], result
    # The only failures are the killed replica's calls in flight, counted as UNAVAILABLE.
    assert result["only_unavailable_errors"], result["errors_by_code"]
    assert result["ok"] > 0.9 * result["sent"]
    assert result["correctness"]["checked"] > 0
    assert result["correctness"]["mismatches"] == 0
    # Every replica served calls, the restarted one included after its restart.
    assert all(count > 0 for count in result["served_by_replica_since_last_start"].values()), result
    assert set(result["replica_exit_codes_on_sigterm"].values()) == {0}
