"""``kernelgen loadtest`` against real servers, a few seconds each.

The in-process server runs on the test's event loop while the load tester runs
``main`` on a worker thread with a loop of its own. The only timing assertion
is the documented one: the open-loop rate at 20/s within 10 %.
"""

from __future__ import annotations

import asyncio
import csv
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from kernelgen_client.cli import main

from support import run_server, serve_process

QUICK = ("--warmup", "0.3", "--quiet")


async def loadtest(server: Any, *argv: str) -> int:
    return await asyncio.to_thread(main, ["loadtest", *argv, "--target", f"127.0.0.1:{server.port}"])


def counts_add_up(step: dict[str, Any]) -> None:
    assert step["sent"] == step["ok"] + sum(step["errors"].values()) == step["ok"] + step["error_count"]
    assert step["scheduled"] == step["sent"] + step["dropped"]


async def test_closed_sweep_writes_json_csv_and_png(
    server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = {suffix: tmp_path / f"sweep.{suffix}" for suffix in ("json", "csv", "png")}
    argv = ["hyena-2d", "--seq-lens", "15,15", "--rows", "1-2", "--unconditioned", "0.25", "--seed", "3"]
    argv += ["--concurrency", "1,3", "--duration", "1", "--warmup", "0.3", "--check-correctness", "3"]
    argv += ["--json", str(out["json"]), "--csv", str(out["csv"]), "--plot", str(out["png"])]
    assert await loadtest(server, *argv) == 0
    table = capsys.readouterr().out
    assert "Load and latency (ms)" in table and "c=3" in table

    document = json.loads(out["json"].read_text())
    assert document["passed"] and document["mode"] == "closed" and not document["interrupted"]
    assert document["workload"]["resolved"] == [
        {"name": "hyena-2d", "share": 1.0, "seq_lens": [[15, 15]], "cond_dim": 384}
    ]
    assert document["workload"]["models"][0]["seq_lens"] == document["workload"]["seq_lens"] == [[15, 15]]
    steps = document["steps"]
    assert [s["level"] for s in steps] == [1, 3]
    for s in steps:
        counts_add_up(s)
        assert s["ok"] > 0 and s["errors"] == {} and s["passed"]
        assert s["kernels_per_s"] >= s["requests_per_s"] > 0
        server_side = s["server"]
        assert server_side["unconditioned"] > 0 and server_side["cache_hit_rate"] > 0.5
        computed = s["ok"] - server_side["cache_hits"]
        assert sum(server_side["batch_histogram"].values()) == computed
        assert server_side["mean_compute_ms"] > 0
        latency = s["latency_ms"]
        assert 0 < latency["p50"] <= latency["p90"] <= latency["p95"] <= latency["p99"] <= latency["max"]
        assert s["correctness"]["checked"] == 3 and s["correctness"]["mismatches"] == 0

    with out["csv"].open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["sent"]), int(r["ok"])) for r in rows] == [(s["sent"], s["ok"]) for s in steps]

    from matplotlib.image import imread

    assert out["png"].read_bytes()[:4] == b"\x89PNG"
    assert imread(out["png"]).shape[0] > 300


async def test_open_loop_reaches_a_low_rate_within_ten_percent(server: Any, tmp_path: Path) -> None:
    path = tmp_path / "rate.json"
    argv = ["hyena-2d", "--seq-lens", "15,15", "--rate", "20", "--distribution", "constant"]
    assert await loadtest(server, *argv, "--duration", "3", *QUICK, "--json", str(path)) == 0
    (step,) = json.loads(path.read_text())["steps"]
    counts_add_up(step)
    assert step["mode"] == "open" and step["dropped"] == 0
    assert step["send_rate"] == pytest.approx(20, rel=0.1)
    assert step["requests_per_s"] == pytest.approx(20, rel=0.1)


async def test_error_budget_and_slo_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Grids over 29x29 points are refused: 40,40 fails as RESOURCE_EXHAUSTED, 15,15 succeeds.
    async with run_server(max_grid_points=29 * 29) as server:
        path = tmp_path / "mixed.json"
        mixed = ["hyena-2d", "--seq-lens", "15,15", "--seq-lens", "40,40", "--requests", "40", *QUICK]
        assert await loadtest(server, *mixed, "--json", str(path)) == 1
        assert "FAILED concurrency 1: error rate" in capsys.readouterr().err
        (step,) = json.loads(path.read_text())["steps"]
        counts_add_up(step)
        assert step["sent"] == 40 and 0 < step["errors"]["RESOURCE_EXHAUSTED"] < 40
        assert "over the server's limit" in step["error_examples"]["RESOURCE_EXHAUSTED"]
        assert await loadtest(server, *mixed, "--max-error-rate", "0.95") == 0

        clean = ["hyena-2d", "--seq-lens", "15,15", "--requests", "20", *QUICK]
        assert await loadtest(server, *clean, "--slo-p99-ms", "60000") == 0
        assert await loadtest(server, *clean, "--slo-p99-ms", "0.001") == 1
        assert "SLO 0.001 ms" in capsys.readouterr().err


def test_a_server_killed_mid_run_gives_counted_unavailable_errors(tmp_path: Path) -> None:
    path = tmp_path / "killed.json"
    with serve_process("--log-level", "WARNING") as proc:
        argv = ["loadtest", "hyena-2d", "--seq-lens", "15,15", "--concurrency", "4", "--duration", "4"]
        argv += ["--warmup", "0", "--timeout", "5", "--quiet", "--json", str(path), "--target", proc.target]
        result: list[int] = []
        thread = threading.Thread(target=lambda: result.append(main(argv)), daemon=True)
        thread.start()
        time.sleep(1.5)  # under way: the server has answered some calls
        proc.proc.kill()
        thread.join(timeout=60)
        assert not thread.is_alive(), "the load test hung after the server died"
    assert result == [1]
    (step,) = json.loads(path.read_text())["steps"]
    counts_add_up(step)
    assert step["ok"] > 0 and step["errors"]["UNAVAILABLE"] > 0
    assert set(step["errors"]) <= {"UNAVAILABLE", "CANCELLED", "INTERNAL"}


async def test_workers_and_a_mixed_workload_file(server: Any, tmp_path: Path) -> None:
    workload = tmp_path / "mix.yaml"
    workload.write_text(
        "models:\n"
        "  - {name: hyena-2d, weight: 2}\n"
        "  - name: volume-3d\n"
        "    seq_lens: [[3, 4, 2]]\n"
        "  - long-1d\n"
        'seq_lens: ["15,15", [64]]\n'
        "rows: 1-3\n"
        "dtype: bfloat16\n"
    )
    path = tmp_path / "workers.json"
    argv = ["--workload", str(workload), "--concurrency", "3", "--requests", "30", "--workers", "2"]
    assert await loadtest(server, *argv, "--check-correctness", "4", *QUICK, "--json", str(path)) == 0
    document = json.loads(path.read_text())
    (step,) = document["steps"]
    counts_add_up(step)
    assert step["sent"] == step["ok"] == 30 and step["client"]["processes"] == 2
    assert step["correctness"]["checked"] == 4 and step["correctness"]["mismatches"] == 0
    resolved = {m["name"]: m for m in document["workload"]["resolved"]}
    assert resolved["hyena-2d"]["share"] == 0.5 and resolved["long-1d"]["cond_dim"] is None
    assert resolved["volume-3d"]["seq_lens"] == [[3, 4, 2]] and resolved["long-1d"]["seq_lens"] == [[64]]
    assert document["workload"]["dtype"] == "bfloat16" and document["settings"]["workers"] == 2


async def test_refusals_before_any_load(server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert await loadtest(server, "no-such-model", *QUICK) == 4
    assert "the server has: hyena-2d, long-1d, volume-3d" in capsys.readouterr().err
    assert await loadtest(server, "volume-3d", "--seq-lens", "15,15", *QUICK) == 2
    assert "'volume-3d' has 3 axes" in capsys.readouterr().err
    assert await loadtest(server, *QUICK) == 2
    assert "name one or more models" in capsys.readouterr().err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    argv = ["loadtest", "hyena-2d", *QUICK, "--target", f"127.0.0.1:{closed_port}"]
    assert await asyncio.to_thread(main, argv) == 3
    assert "cannot reach a kernelgen server" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["loadtest", "hyena-2d", "--rate", "10", "--concurrency", "2"])
    assert exit_info.value.code == 2


async def test_a_representation_mix_is_sent_counted_and_checked(server: Any, tmp_path: Path) -> None:
    out = tmp_path / "mix.json"
    argv = ["hyena-2d", "--seq-lens", "9,9", "--representation", "dense:1,factored:1", "--requests", "60"]
    argv += ["--concurrency", "4", "--check-correctness", "8", "--json", str(out), *QUICK]
    assert await loadtest(server, *argv) == 0
    step = json.loads(out.read_text())["steps"][0]
    mix = step["server"]["responses_by_representation"]
    assert set(mix) == {"dense", "factored"} and sum(mix.values()) == step["ok"] == 60
    assert step["correctness"]["checked"] == 8 and step["correctness"]["mismatches"] == 0


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
async def test_reduced_factors_are_checked_against_their_rounding_bound(
    server: Any, tmp_path: Path, dtype: str
) -> None:
    """Factors rounded to 16 bits are off by a unit roundoff of ``|factors| @ |W^T|`` per
    element, not of ``|kernel|``: the check allows that bound, and only that bound."""
    out = tmp_path / "reduced.json"
    argv = ["hyena-2d", "--seq-lens", "9,9", "--representation", "factored", "--dtype", dtype]
    argv += ["--requests", "16", "--concurrency", "2", "--check-correctness", "6", "--json", str(out), *QUICK]
    assert await loadtest(server, *argv) == 0
    correctness = json.loads(out.read_text())["steps"][0]["correctness"]
    assert correctness["checked"] == 6 and correctness["mismatches"] == 0
    # The bound is tight enough to mean something: the worst element uses a real part of it.
    assert 0.0 < correctness["worst_error_over_tolerance"] <= 1.0
