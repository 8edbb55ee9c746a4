"""The load tester driving groups: resolution, requests, counting per member, and a served run."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kernelgen_client.cli import main
from kernelgen_client.results import FiLMConfig, KernelResult, ModelConfig, ModelInfo, ServerReport
from kernelgen_loadtest.runner import StepPlan, StepRunner
from kernelgen_loadtest.workload import (
    ModelMix,
    RequestSource,
    RowRange,
    Workload,
    WorkloadError,
    resolve,
)

from networks import import_group, stack
from support import run_server


def member(
    group: str, index: int, data_dim: int = 2, cond_dim: int | None = 5, ready: bool = True
) -> ModelInfo:
    config = ModelConfig(
        out_dim=6, data_dim=data_dim, mlp_hidden_dim=8, num_layers=3, embedding_dim=8, omega_0=10.0,
        L_cache=(7,) * data_dim, use_bias=True, hidden_omega_0=1.0, film_after_pos_embed=False,
        film=None if cond_dim is None else FiLMConfig(cond_dim, 6),
    )  # fmt: skip
    name = f"{group}/{index}"
    return ModelInfo(name, ready, "" if ready else "broken", config, "h", 10, "", group, index, f"b.{index}")


def infos(*models: ModelInfo) -> dict[str, ModelInfo]:
    return {m.name: m for m in models}


def test_a_group_resolves_to_one_target_of_its_members() -> None:
    found = infos(member("net", 1), member("net", 0), member("net", 2))
    resolved = resolve(Workload(models=(ModelMix("net"),)), found)
    (target,) = resolved.targets
    assert (target.name, target.members, target.cond_dim, target.seq_lens) == (
        "net", ("net/0", "net/1", "net/2"), 5, ((7, 7),)
    )  # fmt: skip
    assert resolved.to_dict()["resolved"][0]["members"] == ["net/0", "net/1", "net/2"]
    # A member is also a model of its own, and the two mix.
    both = resolve(Workload(models=(ModelMix("net"), ModelMix("net/1")), seq_lens=((3, 3),)), found)
    assert [(t.name, len(t.members)) for t in both.targets] == [("net", 3), ("net/1", 0)]


def test_a_group_is_conditioned_only_when_every_member_takes_one_width() -> None:
    mixed = infos(member("net", 0), member("net", 1, cond_dim=None))
    assert resolve(Workload(models=(ModelMix("net"),)), mixed).targets[0].cond_dim is None
    widths = infos(member("net", 0), member("net", 1, cond_dim=4))
    assert resolve(Workload(models=(ModelMix("net"),)), widths).targets[0].cond_dim is None


def test_a_group_that_cannot_run_is_refused() -> None:
    axes = infos(member("net", 0, data_dim=1), member("net", 1, data_dim=2))
    with pytest.raises(WorkloadError, match="group 'net' has members of 1 and 2 axes"):
        resolve(Workload(models=(ModelMix("net"),)), axes)
    broken = infos(member("net", 0), member("net", 1, ready=False))
    with pytest.raises(WorkloadError, match="group 'net' is not ready on the server: member 'net/1': broken"):
        resolve(Workload(models=(ModelMix("net"),)), broken)


def test_group_requests_are_drawn_as_group_calls() -> None:
    found = infos(member("net", 0), member("net", 1), member("solo", 0))
    workload = Workload(models=(ModelMix("net"), ModelMix("solo/0")), rows=RowRange(1, 3), unconditioned=0.2)
    source = RequestSource(resolve(workload, found), stream_id=(0,))
    requests = [source.next() for _ in range(200)]
    assert {(r.model, r.group) for r in requests} == {("net", True), ("solo/0", False)}
    assert all(r.conditioning is None or r.conditioning.shape[1] == 5 for r in requests)


class GroupClient:
    """Answers every group call with one kernel per member, each with its own report."""

    def __init__(self, members: int) -> None:
        self.members = members
        self.calls = 0

    async def generate_group(
        self, group: str, seq_lens: Any, conditioning: Any = None, *, dtype: str, with_report: bool,
        representation: str,
    ) -> dict[str, KernelResult[Any]]:  # fmt: skip
        assert with_report and group == "net"
        self.calls += 1
        await asyncio.sleep(0.001)
        rows = 1 if conditioning is None else len(conditioning)
        out = {}
        for index in range(self.members):
            kernel = np.full((rows, 3, 3, 2), float(index), np.float32)
            hit = conditioning is None
            report = ServerReport(hit, rows * 2, 2, 0.5, 1.5, f"hash-{index}", worker=index % 2)
            raw = memoryview(kernel.tobytes())
            out[f"net/{index}"] = KernelResult(kernel, None, report, "float32", raw, True, 1.0)
        return out


async def test_a_group_call_is_one_request_of_many_kernels() -> None:
    found = infos(member("net", 0), member("net", 1), member("net", 2))
    resolved = resolve(Workload(models=(ModelMix("net"),), seq_lens=((2, 2),), unconditioned=0.5), found)
    client = GroupClient(3)
    plan = StepPlan(mode="closed", level=2, duration_s=None, requests=20, warmup_s=0.0, keep=6)
    samples = await StepRunner(client, resolved).run(plan)
    assert samples.sent == samples.ok == 20 and len(samples.latencies_s) == 20
    assert samples.bytes == samples.kernels * 3 * 3 * 2 * 4 and samples.kernels >= 3 * 20
    assert sum(samples.server_workers.values()) == 60 and samples.server_workers[1] == 20
    assert samples.representations == {"dense": 60}
    assert samples.unconditioned % 3 == 0 and samples.cache_hits == samples.unconditioned > 0
    assert len(samples.batch_rows) == 60 - samples.cache_hits
    assert {kept.model for kept in samples.kept} <= {"net/0", "net/1", "net/2"}
    for kept in samples.kept:
        index = int(kept.model.split("/")[1])
        assert kept.content_hash == f"hash-{index}" and (kept.kernel == index).all()


async def test_a_served_group_is_driven_and_checked(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    import_group(stack(depth=3, seed=31), repo, "net", {"omega_0": 10.0, "L_cache": 7}, tmp_path)
    out = tmp_path / "run.json"
    async with run_server(model_repo=str(repo)) as server:
        argv = ["loadtest", "net", "net/1:0.5", "--seq-lens", "4,4", "--rows", "1-2"]
        argv += ["--unconditioned", "0.3"]
        argv += ["--concurrency", "3", "--requests", "30", "--warmup", "0.2", "--quiet"]
        argv += ["--check-correctness", "12", "--model-repo", str(repo), "--json", str(out)]
        argv += ["--target", f"127.0.0.1:{server.port}"]
        assert await asyncio.to_thread(main, argv) == 0
        registry = server.service.metrics.registry
        group_calls = registry.get_sample_value(
            "kernelgen_requests_total", {"model": "net", "method": "GenerateGroup", "code": "OK"}
        )
    document = json.loads(out.read_text())
    assert document["passed"]
    resolved = {t["name"]: t for t in document["workload"]["resolved"]}
    assert resolved["net"]["members"] == ["net/0", "net/1", "net/2"]
    assert "members" not in resolved["net/1"]
    (step,) = document["steps"]
    assert step["ok"] == 30 and step["errors"] == {}
    assert group_calls is not None and group_calls >= 1
    correctness = step["correctness"]
    assert correctness["checked"] > 0 and correctness["mismatches"] == 0 and correctness["skipped"] == 0


async def test_an_unknown_name_is_still_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo = tmp_path / "repo"
    import_group(stack(depth=2, seed=32), repo, "net", {"omega_0": 10.0, "L_cache": 7}, tmp_path)
    async with run_server(model_repo=str(repo)) as server:
        argv = ["loadtest", "nett", "--requests", "3", "--quiet", "--target", f"127.0.0.1:{server.port}"]
        assert await asyncio.to_thread(main, argv) == 4
    assert "model 'nett' is not on the server" in capsys.readouterr().err
