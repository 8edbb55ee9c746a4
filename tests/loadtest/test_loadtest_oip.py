"""``kernelgen loadtest --protocol oip`` and ``--shared-memory``: the same workload, statistics and gates
over the Open Inference Protocol and through shared memory, checked against the reference model."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from kernelgen_client.cli import main

from support import run_server

QUICK = ("--warmup", "0.3", "--quiet")


@pytest.fixture
async def shm_server() -> AsyncIterator[Any]:
    async with run_server(shared_memory=True) as server:
        yield server


async def loadtest(server: Any, *argv: str) -> int:
    return await asyncio.to_thread(main, ["loadtest", *argv, "--target", f"127.0.0.1:{server.port}"])


@pytest.mark.parametrize(
    "extra",
    [("--protocol", "oip"), ("--protocol", "oip", "--shared-memory"), ("--shared-memory",)],
    ids=["oip", "oip-shared-memory", "native-shared-memory"],
)
async def test_the_workload_runs_and_checks_out(
    shm_server: Any, tmp_path: Path, extra: tuple[str, ...]
) -> None:
    out = tmp_path / "run.json"
    argv = ["hyena-2d", "--seq-lens", "9,9", "--rows", "1-2", "--unconditioned", "0.25", "--requests", "40"]
    argv += ["--representation", "dense:1,factored:1"]
    argv += ["--concurrency", "4", "--check-correctness", "6", "--json", str(out), *extra, *QUICK]
    assert await loadtest(shm_server, *argv) == 0
    document = json.loads(out.read_text())
    settings = document["settings"]
    assert settings["protocol"] == ("oip" if "oip" in extra else "native")
    assert settings["shared_memory"] == ("--shared-memory" in extra)
    step = document["steps"][0]
    assert step["ok"] == 40 and step["errors"] == {}
    assert set(step["server"]["responses_by_representation"]) == {"dense", "factored"}
    computed = step["ok"] - step["server"]["cache_hits"]
    assert sum(step["server"]["batch_histogram"].values()) == computed  # the reports came back
    assert step["correctness"]["checked"] == 6 and step["correctness"]["mismatches"] == 0
    assert shm_server.shared_memory.status() == []  # every region released at the end


async def test_oip_errors_are_counted_by_status(tmp_path: Path) -> None:
    out = tmp_path / "errors.json"
    async with run_server(max_grid_points=9 * 9) as server:
        argv = [
            "hyena-2d",
            "--seq-lens",
            "15,15",
            "--seq-lens",
            "5,5",
            "--requests",
            "30",
            "--concurrency",
            "2",
        ]
        argv += ["--protocol", "oip", "--max-error-rate", "1", "--json", str(out), *QUICK]
        assert await loadtest(server, *argv) == 0
    step = json.loads(out.read_text())["steps"][0]
    assert step["ok"] > 0 and set(step["errors"]) == {"RESOURCE_EXHAUSTED"}
    assert step["ok"] + step["errors"]["RESOURCE_EXHAUSTED"] == 30


async def test_shared_memory_refusals(capsys: pytest.CaptureFixture[str]) -> None:
    async with run_server() as server:
        argv = ["hyena-2d", "--requests", "2", "--shared-memory", "--connections", "2", *QUICK]
        assert await loadtest(server, *argv) == 2
        assert "--shared-memory needs --connections 1" in capsys.readouterr().err
        out = await loadtest(
            server, "hyena-2d", "--requests", "3", "--shared-memory", "--protocol", "oip", *QUICK
        )
        assert out == 1  # every call refused: the server runs without --shared-memory
