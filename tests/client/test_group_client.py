"""``generate_group``, ``get_group`` and ``list_groups`` in both clients; groups in ``kernelgen models``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kernelgen_client import (
    AsyncKernelClient,
    FactoredKernel,
    GroupInfo,
    InvalidRequest,
    KernelClient,
    KernelResult,
    KernelTooLarge,
    ModelNotFound,
    ModelNotReady,
)
from kernelgen_client.cli import main

from networks import MIXED_BASE, assert_close, import_group, mixed_network, reference_kernel, stack
from support import run_server, threaded_server

ROWS = np.random.default_rng(3).standard_normal((2, 5)).astype(np.float32)


@pytest.fixture(scope="module")
def networks() -> dict[str, Any]:
    return {"stack": stack(depth=3, seed=21), "wide": stack(depth=2, seed=22, out_dim=24)}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, networks: dict[str, Any]) -> Path:
    root = tmp_path_factory.mktemp("repo")
    work = tmp_path_factory.mktemp("checkpoints")
    for name, network in networks.items():
        import_group(network, root, name, {"omega_0": 10.0, "L_cache": 7}, work)
    import_group(mixed_network(seed=23), root, "mixed", MIXED_BASE, work)
    (root / "broken").mkdir()
    (root / "broken" / "group.json").write_text("{}")
    return root


@pytest.fixture(scope="module")
def target(repo: Path) -> Iterator[str]:
    with threaded_server(model_repo=str(repo)) as server:
        yield f"127.0.0.1:{server.port}"


def check(kernels: dict[str, Any], network: Any, seq_lens: tuple[int, ...], rows: np.ndarray | None) -> None:
    conditioning = None if rows is None else torch.from_numpy(rows)
    for kernel, generator in zip(kernels.values(), network.generators(), strict=True):
        want = reference_kernel(generator, seq_lens, conditioning)
        assert_close(torch.as_tensor(np.asarray(kernel, dtype=np.float32)), want)


def test_sync_client_fetches_every_kernel_of_a_group(target: str, networks: dict[str, Any]) -> None:
    with KernelClient(target, timeout=60) as client:
        kernels = client.generate_group("stack", [4, 6], ROWS)
        assert list(kernels) == ["stack/0", "stack/1", "stack/2"]
        assert all(isinstance(k, np.ndarray) and k.shape == (2, 7, 11, 6) for k in kernels.values())
        check(kernels, networks["stack"], (4, 6), ROWS)
        plain = client.generate_group("stack", (3, 3))
        check(plain, networks["stack"], (3, 3), None)
        results = client.generate_group("stack", (3, 3), with_report=True)
        for name, result in results.items():
            assert isinstance(result, KernelResult)
            assert result.report.cache_hit and result.streamed
            assert result.report.content_hash == client.get_model(name).content_hash
        tensors = client.generate_group("stack", (3, 3), ROWS[:1], as_torch=True, dtype="bfloat16")
        assert all(t.dtype == torch.bfloat16 and t.shape == (1, 5, 5, 6) for t in tensors.values())


async def test_async_client_fetches_groups_concurrently(target: str, networks: dict[str, Any]) -> None:
    async with AsyncKernelClient(target, timeout=60) as client:
        rows = [np.random.default_rng(i).standard_normal((1, 5)).astype(np.float32) for i in range(6)]
        results = await asyncio.gather(*(client.generate_group("stack", (5, 5), r) for r in rows))
        for row, kernels in zip(rows, results, strict=True):
            check(kernels, networks["stack"], (5, 5), row)


@pytest.mark.parametrize("flavour", ["sync", "async"])
async def test_factored_groups_and_auto(target: str, networks: dict[str, Any], flavour: str) -> None:
    async def call(method: str, *args: Any, **kwargs: Any) -> Any:
        if flavour == "sync":
            return await asyncio.to_thread(getattr(sync, method), *args, **kwargs)
        return await getattr(aio, method)(*args, **kwargs)

    with KernelClient(target, timeout=60) as sync:
        async with AsyncKernelClient(target, timeout=60) as aio:
            factored = await call("generate_group", "stack", (4, 4), ROWS, representation="factored")
            assert all(isinstance(k, FactoredKernel) for k in factored.values())
            assert all(k.shape == (2, 7, 7, 6) and k.factors.shape == (2, 7, 7, 8) for k in factored.values())
            check({n: k.dense() for n, k in factored.items()}, networks["stack"], (4, 4), ROWS)
            # hidden 8 > out_dim 6: factors are more bytes than the kernel, so auto stays dense
            dense = await call("generate_group", "stack", (4, 4), ROWS, representation="auto")
            assert all(isinstance(k, np.ndarray) for k in dense.values())
            # out_dim 24 > hidden 8: auto sends factors, heads included
            wide = await call("generate_group", "wide", (5, 5), ROWS, representation="auto", with_report=True)
            assert [r.representation for r in wide.values()] == ["factored", "factored"]
            check({n: r.kernel.dense() for n, r in wide.items()}, networks["wide"], (5, 5), ROWS)


def test_heads_are_fetched_once_per_member(repo: Path) -> None:
    with threaded_server(model_repo=str(repo)) as server:
        with KernelClient(f"127.0.0.1:{server.port}", timeout=60) as client:
            for _ in range(3):
                client.generate_group("wide", (3, 3), ROWS, representation="factored")
        registry = server.service.metrics.registry
        for member in ("wide/0", "wide/1"):
            labels = {"model": member, "method": "GetOutputHead", "code": "OK"}
            assert registry.get_sample_value("kernelgen_requests_total", labels) == 1
        labels = {"model": "wide", "method": "GenerateGroup", "code": "OK"}
        assert registry.get_sample_value("kernelgen_requests_total", labels) == 3


def test_groups_are_listed_with_their_members(target: str) -> None:
    with KernelClient(target, timeout=60) as client:
        groups = client.list_groups()
        assert [g.name for g in groups] == ["mixed", "stack", "wide"]
        stack_group = client.get_group("stack")
        assert isinstance(stack_group, GroupInfo) and stack_group.ready
        assert stack_group.names == ("stack/0", "stack/1", "stack/2")
        assert [m.source for m in stack_group.members] == [f"blocks.{i}.filter.kernel" for i in range(3)]
        assert [m.group_index for m in stack_group.members] == [0, 1, 2]
        info = client.get_model("mixed/3")
        assert (info.group, info.group_index, info.source) == ("mixed", 3, "blocks.3.filter.kernel")
        assert client.get_model("mixed/3").config is not None
        with pytest.raises(ModelNotFound, match="unknown group 'nope'"):
            client.get_group("nope")
        with pytest.raises(ModelNotReady, match=r"'broken' is not ready: .*group\.json"):
            client.get_group("broken")


def test_errors_name_the_member(target: str) -> None:
    with KernelClient(target, timeout=60) as client:
        with pytest.raises(InvalidRequest) as caught:
            client.generate_group("mixed", [5])
        assert caught.value.message == (
            "group 'mixed', member 'mixed/1': model 'mixed/1' is 2-D: seq_lens needs 2 entries, got 1"
        )
        with pytest.raises(ModelNotFound, match="unknown group 'nope'"):
            client.generate_group("nope", [5])
        with pytest.raises(InvalidRequest, match="'stack/0' is a model, not a group"):
            client.generate_group("stack/0", [3, 3])
        with pytest.raises(ModelNotReady, match="'broken' is not ready"):
            client.generate_group("broken", [3])
        with pytest.raises(InvalidRequest, match="group must be a non-empty name"):
            client.generate_group("", [3])
        with pytest.raises(InvalidRequest, match="representation must be one of"):
            client.generate_group("stack", [3, 3], representation="sparse")  # type: ignore[call-overload]


async def test_a_group_over_the_kernel_limit_is_never_retried(repo: Path) -> None:
    limits = {"max_kernel_bytes": 8192, "max_message_bytes": 8192, "stream_chunk_bytes": 1024}
    async with run_server(model_repo=str(repo), **limits) as server:
        async with AsyncKernelClient(f"127.0.0.1:{server.port}", timeout=30) as client:
            message = (
                "the 3 kernels of group 'stack' together would be 8424 bytes, over the server's limit of 8192"
            )
            with pytest.raises(KernelTooLarge, match=message) as caught:
                await client.generate_group("stack", (5, 7), ROWS[:1])
            assert caught.value.retry_pushback_ms == -1
        registry = server.service.metrics.registry
        labels = {"model": "stack", "method": "GenerateGroup", "code": "RESOURCE_EXHAUSTED"}
        assert registry.get_sample_value("kernelgen_requests_total", labels) == 1


def test_kernelgen_models_lists_the_groups(target: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--target", target]) == 0
    out = capsys.readouterr().out
    models, groups = out.split("\n\n")
    names = [line.split()[0] for line in models.splitlines()[1:]]
    members = [*(f"mixed/{i}" for i in range(4)), *(f"stack/{i}" for i in range(3)), "wide/0", "wide/1"]
    assert names == ["broken", *members]
    assert [" ".join(line.split()) for line in groups.splitlines()] == [
        "GROUP MODELS READY MEMBERS FROM",
        "mixed 4 yes mixed/0 .. mixed/3 blocks.0.filter.kernel .. blocks.3.filter.kernel",
        "stack 3 yes stack/0 .. stack/2 blocks.0.filter.kernel .. blocks.2.filter.kernel",
        "wide 2 yes wide/0 .. wide/1 blocks.0.filter.kernel .. blocks.1.filter.kernel",
    ]
    assert main(["models", "--target", target, "--json"]) == 0
    listed = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    assert (listed["stack/2"]["group"], listed["stack/2"]["group_index"]) == ("stack", 2)
    assert listed["stack/2"]["source"] == "blocks.2.filter.kernel"


def test_a_name_of_the_other_kind_points_to_the_client_method_that_fits(target: str) -> None:
    with KernelClient(target, timeout=60) as client:
        with pytest.raises(InvalidRequest) as caught:
            client.generate("stack", [3, 3])
        assert caught.value.reason == "group-not-model"
        assert caught.value.message.startswith(
            "'stack' is a group of 3 models (stack/0 .. stack/2), not a model"
        )
        assert caught.value.message.endswith(
            "; generate_group('stack', seq_lens, conditioning) fetches all of its kernels in one call; "
            "get_group('stack') lists its members"
        )
        with pytest.raises(InvalidRequest) as caught:
            client.generate_group("stack/0", [3, 3])
        assert caught.value.reason == "model-not-group"
        assert caught.value.message.endswith(
            "; generate('stack/0', seq_lens, conditioning) fetches its kernel"
        )
        with pytest.raises(InvalidRequest) as caught:
            client.generate_group("stack/0", [3, 3], representation="auto")  # looked up by the client
        assert caught.value.message == (
            "'stack/0' is a model, not a group; "
            "generate('stack/0', seq_lens, conditioning) fetches its kernel"
        )
        with pytest.raises(InvalidRequest) as caught:
            client.get_group("wide/1")
        assert caught.value.message.endswith("; get_model('wide/1') describes it")
        with pytest.raises(InvalidRequest) as caught:
            client.get_model("wide")
        assert caught.value.message.endswith("; get_group('wide') describes it and its members")
        # A model that failed to load says why, as ListModels does.
        with pytest.raises(ModelNotReady, match=r"'broken' is not ready: it failed to load: .*group\.json"):
            client.generate("broken", [3])


def test_kernelgen_generate_group(target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "stack.safetensors"
    argv = ["generate-group", "stack", "--seq-lens", "3,3", "--random-conditioning", "2", "--seed", "4"]
    assert main([*argv, "--out", str(out), "--target", target]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("stack: 3 kernels, 3.60 kB (streamed), total ")  # 3 x 2 x 5 x 5 x 6 x 4 B
    assert lines[0].endswith(f"-> {out}")
    for i, line in enumerate(lines[1:]):
        assert line.startswith(
            f"  stack/{i}: kernel [2, 5, 5, 6] float32, 1.20 kB, cache hit no, batch 2 rows"
        )
    from safetensors.numpy import load_file

    saved = load_file(out)
    rows = np.random.default_rng(4).standard_normal((2, 5), dtype=np.float32)
    with KernelClient(target, timeout=60) as client:
        want = client.generate_group("stack", [3, 3], rows)
    assert list(saved) == list(want) == ["stack/0", "stack/1", "stack/2"]
    for name, kernel in want.items():
        np.testing.assert_array_equal(saved[name], kernel)
    assert main([*argv, "--representation", "factored", "--json", "--target", target]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [m["model"] for m in summary["members"]] == ["stack/0", "stack/1", "stack/2"]
    assert summary["members"][0]["shape"] == [2, 5, 5, 6]
    assert summary["members"][0]["factors_shape"] == [2, 5, 5, 8]


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (
            ["generate", "stack", "--seq-lens", "3,3"],
            2,
            "kernelgen generate: 'stack' is a group of 3 models (stack/0 .. stack/2), not a model: name one "
            "of its members, or ask for the whole group's kernels at once; kernelgen generate-group stack "
            "--seq-lens ... fetches them all, kernelgen models lists its members",
        ),
        (
            ["flops", "stack", "--seq-lens", "3,3"],
            2,
            "kernelgen flops: 'stack' is a group of 3 models (stack/0 .. stack/2), not a model: name one of "
            "its members, or ask for the whole group's kernels at once; kernelgen models lists its members",
        ),
        (
            ["generate-group", "stack/1", "--seq-lens", "3,3"],
            2,
            "kernelgen generate-group: 'stack/1' is a model, not a group: ask for its kernel alone; "
            "kernelgen generate stack/1 --seq-lens ... fetches its kernel",
        ),
        (
            ["generate-group", "stack/1", "--seq-lens", "3,3", "--representation", "auto"],
            2,
            "kernelgen generate-group: 'stack/1' is a model, not a group; "
            "kernelgen generate stack/1 --seq-lens ... fetches its kernel",
        ),
        (
            ["generate-group", "nothing", "--seq-lens", "3"],
            4,
            "kernelgen generate-group: unknown group 'nothing'",
        ),
        (
            ["generate-group", "stack", "--seq-lens", "3,3", "--out", "k.npy"],
            2,
            "kernelgen generate-group: --out must end in .safetensors, got 'k.npy' (one tensor per member)",
        ),
    ],
    ids=["generate-a-group", "flops-a-group", "group-a-model", "group-a-model-auto", "unknown-group", "npy"],
)
def test_kernelgen_names_the_command_that_fits(
    target: str, argv: list[str], code: int, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*argv, "--target", target]) == code
    err = capsys.readouterr().err
    assert err.splitlines()[0].startswith(message)
    assert "generate(" not in err and "generate_group(" not in err  # the client's methods are not the CLI's


def test_kernelgen_generate_says_why_a_model_failed_to_load(
    target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["generate", "broken", "--seq-lens", "3", "--target", target]) == 1
    err = capsys.readouterr().err
    assert err.startswith("kernelgen generate: model 'broken' is not ready: it failed to load: ")
    assert "group.json" in err
