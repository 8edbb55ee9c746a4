"""``kernelgen import --all``: every generator of a training checkpoint, in every format, as one group.

The checkpoints come from ``networks.mixed_network``: 1-D, 2-D anisotropic and 3-D generators,
with and without FiLM and biases, one legacy-named, inside blocks beside other layers, weights
moved off their initialisation.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

import kernelgen_server
from kernelgen_client.cli import main
from kernelgen_server.model.config import ModelConfig
from kernelgen_server.repository import store as repository_module
from kernelgen_server.repository.layers import layer_tensor
from kernelgen_server.repository.store import ModelRepository
from kernelgen_server.transport.model_info import model_info
from kernelgen_wire.layers import layer_hash

from networks import (
    FORMATS,
    LEGACY,
    MIXED,
    MIXED_BASE,
    assert_close,
    mixed_network,
    reference_kernel,
    save,
)
from support import kernel_service

#: A grid per generator of ``MIXED``: inside L_cache on some axes, beyond it on others.
SEQ_LENS = [(5,), (4, 11), (3, 2, 4), (20,)]
CONDITIONING = torch.linspace(-1.5, 1.5, 10).reshape(2, 5)


def write_base(folder: Path, base: dict[str, Any], root: str = "") -> Path:
    """``base`` with its override prefixes under ``root``, as a file."""
    head = f"{root}." if root else ""
    document = {**base, "overrides": {f"{head}{p}": v for p, v in base.get("overrides", {}).items()}}
    path = folder / "base.json"
    path.write_text(json.dumps(document))
    return path


def run_import(checkpoint: Path, repo: Path, *extra: str, base: Path | None = None, name: str = "net") -> int:
    args = ["import", str(checkpoint), "--all", "--name", name, "--repo", str(repo), *extra]
    return main([*args, *(["--config", str(base)] if base is not None else [])])


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("kernelgen import: error: ")
    return lines[0]


def assert_nothing_written(repo: Path) -> None:
    """No group, no model, and no staging folder left behind."""
    assert not repo.exists() or list(repo.iterdir()) == []


# -- every format -------------------------------------------------------------------------------


@pytest.mark.parametrize("form", FORMATS)
def test_every_generator_is_found_configured_and_gives_the_networks_kernels(
    tmp_path: Path, form: str, capsys: pytest.CaptureFixture[str]
) -> None:
    network = mixed_network(seed=3)
    root = "model" if form == "ckpt" else ""  # Lightning keys the state by the module's attribute
    checkpoint = save(network, form, tmp_path / "run", root=root)
    repo = tmp_path / "repo"
    assert run_import(checkpoint, repo, base=write_base(tmp_path, MIXED_BASE, root)) == 0
    out = capsys.readouterr().out
    assert f"imported group 'net' in {repo / 'net'}: 4 models" in out

    loaded = ModelRepository.load(repo)
    assert not loaded.failed
    head = f"{root}." if root else ""
    group = loaded.groups["net"]
    assert group.members == ("net/0", "net/1", "net/2", "net/3")
    assert group.sources == tuple(f"{head}{prefix}" for prefix, _ in MIXED)
    assert group.checkpoint == checkpoint.name
    assert sorted(loaded.ready) == list(group.members)
    for index, (member, (_, config), generator) in enumerate(
        zip(group.members, MIXED, network.generators(), strict=True)
    ):
        model = loaded.get(member)
        assert model.config.to_json_dict() == config, member
        seq_lens = SEQ_LENS[index]
        assert_close(model.module(seq_lens)[0], reference_kernel(generator, seq_lens, None))
        if config["film"] is not None:
            got = model.module(seq_lens, CONDITIONING)[0]
            assert got.shape[0] == 2
            assert_close(got, reference_kernel(generator, seq_lens, CONDITIONING))
    stored = json.loads((repo / "net" / "group.json").read_text())
    assert [m["name"] for m in stored["members"]] == ["0", "1", "2", "3"]
    # Each member records its layer's hash, which the live network's layer gives too, whatever
    # the checkpoint's format and prefix.
    for block, hashes in zip(network.blocks, group.layer_hashes, strict=True):
        layer = block.filter  # type: ignore[union-attr]
        live = layer_hash([layer_tensor(key, value) for key, value in layer.state_dict().items()])
        assert hashes == (live,)
    listed = {info.name: tuple(info.layer_hashes) for info in model_info(loaded)}
    assert [listed[member] for member in group.members] == list(group.layer_hashes)


def test_a_changed_layer_has_another_hash() -> None:
    network = mixed_network(seed=3)
    layer = network.blocks[0].filter  # type: ignore[union-attr]
    before = layer_hash([layer_tensor(key, value) for key, value in layer.state_dict().items()])
    with torch.no_grad():
        layer.kernel.out_linear.bias[0] += 1e-6
    after = layer_hash([layer_tensor(key, value) for key, value in layer.state_dict().items()])
    assert after != before


async def test_served_kernels_of_an_imported_network_equal_its_forward(tmp_path: Path) -> None:
    network = mixed_network(seed=5)
    checkpoint = save(network, "safetensors", tmp_path / "run")
    repo = tmp_path / "repo"
    assert run_import(checkpoint, repo, base=write_base(tmp_path, MIXED_BASE)) == 0
    service = kernel_service(ModelRepository.load(repo))
    try:
        for index, generator in enumerate(network.generators()):
            film = MIXED[index][1]["film"] is not None
            conditioning = CONDITIONING.numpy() if film else None
            result = await service.generate(f"net/{index}", SEQ_LENS[index], conditioning, 0, False)
            payload = result.kernel.payload
            got = torch.frombuffer(bytearray(payload.data), dtype=torch.float32).reshape(payload.shape)
            want = reference_kernel(generator, SEQ_LENS[index], CONDITIONING if film else None)
            assert_close(got, want)
    finally:
        await service.close()


def test_the_legacy_generator_is_marked_and_renamed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = save(mixed_network(), "pt", tmp_path / "run")
    assert run_import(checkpoint, tmp_path / "repo", "--dry-run", base=write_base(tmp_path, MIXED_BASE)) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("net/")]
    assert len(rows) == 4
    assert rows[LEGACY].endswith("legacy names")
    assert not any(row.endswith("legacy names") for row in rows[:LEGACY])
    assert_nothing_written(tmp_path / "repo")


def test_dry_run_shows_what_it_found_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = save(mixed_network(), "ckpt", tmp_path / "run", root="model")
    repo = tmp_path / "repo"
    assert run_import(checkpoint, repo, "--dry-run", base=write_base(tmp_path, MIXED_BASE, "model")) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{checkpoint}: 4 kernel generator(s)\nMODEL")
    for index, (prefix, config) in enumerate(MIXED):
        row = next(line for line in out.splitlines() if line.startswith(f"net/{index} "))
        assert f"model.{prefix}" in row
        lengths = config["L_cache"]
        assert (str(lengths) if isinstance(lengths, int) else "x".join(map(str, lengths))) in row
    assert "net/2  model.blocks.2.filter.kernel  3     8      8       2       3    yes" in out
    assert "cond 5, hidden 4, +embedding" in out
    assert f"would write group 'net' in {repo / 'net'} (4 models)" in out
    assert_nothing_written(repo)


def test_dry_run_without_a_base_shows_the_shapes_and_what_is_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = save(mixed_network(), "pt", tmp_path / "run")
    assert run_import(checkpoint, tmp_path / "repo", "--dry-run") == 2
    captured = capsys.readouterr()
    assert "net/1  blocks.1.filter.kernel  2     10     8       4       4    no    -" in captured.out
    assert "would write nothing: 4 generator(s) cannot be imported" in captured.out
    errors = captured.err.splitlines()
    assert len(errors) == 4
    assert "generator 'blocks.0.filter.kernel' needs omega_0 and L_cache" in errors[0]
    assert_nothing_written(tmp_path / "repo")


def test_prefix_keeps_the_generators_under_it(tmp_path: Path) -> None:
    checkpoint = save(mixed_network(), "pt", tmp_path / "run")
    repo = tmp_path / "repo"
    # The base's override of blocks.2, left out of this import, is no typo: it is kept quiet.
    assert run_import(checkpoint, repo, "--prefix", "blocks.1", base=write_base(tmp_path, MIXED_BASE)) == 0
    group = ModelRepository.load(repo).groups["net"]
    assert group.members == ("net/0",)
    assert group.sources == ("blocks.1.filter.kernel",)


def test_generators_are_numbered_in_layer_order(tmp_path: Path) -> None:
    from networks import stack

    network = stack(depth=12)
    checkpoint = save(network, "safetensors", tmp_path / "run")
    base = write_base(tmp_path, {"omega_0": 10.0, "L_cache": 7})
    assert run_import(checkpoint, tmp_path / "repo", base=base) == 0
    loaded = ModelRepository.load(tmp_path / "repo")
    group = loaded.groups["net"]
    assert group.sources == tuple(f"blocks.{i}.filter.kernel" for i in range(12))
    assert loaded.names() == [f"net/{i}" for i in range(12)]
    for member, generator in zip(group.members, network.generators(), strict=True):
        assert_close(loaded.get(member).module((3, 4))[0], reference_kernel(generator, (3, 4), None))


# -- re-import ----------------------------------------------------------------------------------


def test_reimporting_the_same_weights_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    network = mixed_network()
    base = write_base(tmp_path, MIXED_BASE)
    repo = tmp_path / "repo"
    assert run_import(save(network, "pt", tmp_path / "a"), repo, base=base) == 0
    before = {p: os.stat(p).st_ino for p in sorted((repo / "net").rglob("*"))}
    hashes = {m.name: m.content_hash for m in ModelRepository.load(repo).ready.values()}
    capsys.readouterr()
    # The same weights from another format: still the same models.
    assert run_import(save(network, "sharded", tmp_path / "b"), repo, base=base) == 0
    out = capsys.readouterr().out
    assert "already holds these 4 generators (same content hashes): nothing written" in out
    assert {p: os.stat(p).st_ino for p in sorted((repo / "net").rglob("*"))} == before
    assert {m.name: m.content_hash for m in ModelRepository.load(repo).ready.values()} == hashes
    assert run_import(save(network, "pt", tmp_path / "a"), repo, "--dry-run", base=base) == 0
    assert "would write nothing" in capsys.readouterr().out


def test_other_weights_replace_a_group_only_with_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = write_base(tmp_path, MIXED_BASE)
    repo = tmp_path / "repo"
    assert run_import(save(mixed_network(seed=1), "pt", tmp_path / "a"), repo, base=base) == 0
    old = {m.name: m.content_hash for m in ModelRepository.load(repo).ready.values()}
    capsys.readouterr()
    newer = save(mixed_network(seed=2), "pt", tmp_path / "b")
    assert run_import(newer, repo, base=base) == 2
    assert "already holds a group; pass --force to replace it" in one_error_line(capsys)
    assert {m.name: m.content_hash for m in ModelRepository.load(repo).ready.values()} == old
    assert run_import(newer, repo, "--force", base=base) == 0
    new = {m.name: m.content_hash for m in ModelRepository.load(repo).ready.values()}
    assert new.keys() == old.keys()
    assert all(new[name] != old[name] for name in old)
    assert sorted(p.name for p in repo.iterdir()) == ["net"]  # nothing set aside is left


# -- refusals: clear, naming the key, and nothing half-written -----------------------------------


def refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], checkpoint: Path, base: dict[str, Any] | None
) -> str:
    repo = tmp_path / "repo"
    base_file = write_base(tmp_path, base) if base is not None else None
    assert run_import(checkpoint, repo, base=base_file) == 2
    assert_nothing_written(repo)
    return one_error_line(capsys)


@pytest.mark.parametrize(
    ("base", "expected"),
    [
        (
            {**MIXED_BASE, "out_dim": 6},
            "generator 'blocks.1.filter.kernel': {base} sets out_dim 6, but tensor "
            "'blocks.1.filter.kernel.out_linear.weight' has shape [4, 8] (out_dim 4)",
        ),
        (
            {**MIXED_BASE, "overrides": {"blocks.3.filter.kernel": {"num_layers": 4}}},
            "generator 'blocks.3.filter.kernel': {base} overrides['blocks.3.filter.kernel'] sets "
            "num_layers 4, but its last hidden layer is 'blocks.3.filter.kernel.kernel_network.2.weight' "
            "(num_layers 3)",
        ),
        (
            {**MIXED_BASE, "overrides": {"blocks.0.filter.kernel": {"film": None}}},
            "sets film null, but tensor 'blocks.0.filter.kernel.film_generator.mlp.0.weight' has shape "
            '[7, 5] (film {"cond_dim": 5, "film_hidden_dim": 7})',
        ),
        (
            {**MIXED_BASE, "film": {"cond_dim": 5}},
            "generator 'blocks.1.filter.kernel': {base} sets film {\"cond_dim\": 5}, but it has no "
            "'blocks.1.filter.kernel.film_generator.mlp.0.weight' (film null)",
        ),
        (
            {**MIXED_BASE, "use_bias": True},
            "generator 'blocks.1.filter.kernel': {base} sets use_bias true, but it has no "
            "'blocks.1.filter.kernel.positional_embedding.linear.bias' (use_bias false)",
        ),
        (
            {**MIXED_BASE, "overrides": {"blocks.1.filter.kernel": {"L_cache": [6, 9, 4]}}},
            "sets L_cache [6, 9, 4] (3 axes), but tensor "
            "'blocks.1.filter.kernel.positional_embedding.linear.weight' has shape [10, 2] (data_dim 2)",
        ),
    ],
    ids=["out_dim", "num_layers", "film-null", "film-absent", "use_bias", "L_cache-axes"],
)
def test_a_base_the_shapes_contradict_is_refused_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], base: dict[str, Any], expected: str
) -> None:
    checkpoint = save(mixed_network(), "pt", tmp_path / "run")
    line = refused(tmp_path, capsys, checkpoint, base)
    assert expected.replace("{base}", str(tmp_path / "base.json")) in line
    assert str(checkpoint) in line


@pytest.mark.parametrize(
    ("base", "expected"),
    [
        (None, "generator 'blocks.0.filter.kernel' needs omega_0 and L_cache, which the weights cannot tell"),
        ({"omega_0": 30.0}, "generator 'blocks.0.filter.kernel' needs L_cache, which the weights"),
        (
            {"L_cache": 16, "overrides": {"blocks.1.filter.kernel": {"L_cache": [6, 9], "omega_0": 30.0}}},
            "generator 'blocks.0.filter.kernel' needs omega_0",
        ),
        ({**MIXED_BASE, "L_cache": 1}, "L_cache must be >= 2, got 1"),
        ({**MIXED_BASE, "omega_0": "30"}, "omega_0: Input should be a valid number, got '30'"),
        ({**MIXED_BASE, "omega": 30.0}, "unknown key 'omega'"),
        (
            {**MIXED_BASE, "overrides": {"blocks.9.filter.kernel": {"L_cache": 8}}},
            "overrides name 'blocks.9.filter.kernel', which is no generator found",
        ),
    ],
    ids=["no-base", "no-L_cache", "no-omega_0", "bad-L_cache", "bad-type", "unknown-key", "unknown-prefix"],
)
def test_a_base_missing_or_invalid_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], base: dict[str, Any] | None, expected: str
) -> None:
    checkpoint = save(mixed_network(), "pt", tmp_path / "run")
    assert expected in refused(tmp_path, capsys, checkpoint, base)


def test_contradicting_shapes_inside_the_checkpoint_name_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = mixed_network().state_dict()
    state["blocks.0.filter.kernel.hidden_linears.1.weight"] = torch.zeros(16, 15)
    checkpoint = tmp_path / "run.pt"
    torch.save(state, checkpoint)
    line = refused(tmp_path, capsys, checkpoint, MIXED_BASE)
    assert "tensor 'blocks.0.filter.kernel.hidden_linears.1.weight' has shape [16, 15]" in line
    assert "make it [16, 16]" in line


def test_a_non_finite_weight_is_refused_naming_the_generator(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = mixed_network().state_dict()
    state["blocks.2.filter.kernel.out_linear.bias"][1] = float("nan")
    checkpoint = tmp_path / "run.pt"
    torch.save(state, checkpoint)
    line = refused(tmp_path, capsys, checkpoint, MIXED_BASE)
    assert "generator 'blocks.2.filter.kernel': tensor 'out_linear.bias' has 1 non-finite value(s)" in line


@pytest.mark.parametrize("form", ["pt", "ckpt", "safetensors", "sharded"])
def test_a_truncated_checkpoint_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], form: str
) -> None:
    checkpoint = save(mixed_network(), form, tmp_path / "run")
    damaged = tmp_path / "run" / "model-00002-of-00002.safetensors" if form == "sharded" else checkpoint
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    line = refused(tmp_path, capsys, checkpoint, MIXED_BASE)
    assert f"{damaged}: cannot read weights" in line


def test_a_shard_the_index_names_but_is_missing_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = save(mixed_network(), "sharded", tmp_path / "run")
    (tmp_path / "run" / "model-00001-of-00002.safetensors").unlink()
    line = refused(tmp_path, capsys, checkpoint.parent, MIXED_BASE)  # the folder holding the index
    assert "00001-of-00002.safetensors: shard named by model.safetensors.index.json does not exist" in line


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ({"note": "hello", "epoch": 3}, "the checkpoint holds no tensors (only int, str value(s))"),
        ([torch.zeros(2)], "expected a mapping of names to tensors, found a list"),
        (
            {"state_dict": {"k.positional_embedding.linear.weight": [[1.0, 2.0]]}},
            "key 'k.positional_embedding.linear.weight' holds a list, not a tensor",
        ),
        ({"state_dict": {"encoder.weight": torch.zeros(2, 2)}}, "no kernel generator found"),
    ],
    ids=["no-tensors", "a-list", "list-in-a-generator", "no-generator"],
)
def test_a_checkpoint_without_generator_tensors_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: object, expected: str
) -> None:
    checkpoint = tmp_path / "odd.ckpt"
    torch.save(content, checkpoint)
    assert expected in refused(tmp_path, capsys, checkpoint, MIXED_BASE)


class _Tripwire:
    """Unpickling this would create a file: a full unpickle runs code from the checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path.touch, (str(self.marker),))  # type: ignore[return-value]


def test_a_checkpoint_that_needs_a_full_unpickle_is_refused_without_running_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "code-ran"
    state: dict[str, object] = dict(mixed_network().state_dict())
    checkpoint = tmp_path / "run.ckpt"
    torch.save({"state_dict": state, "callbacks": {"hook": _Tripwire(marker)}}, checkpoint)
    assert "cannot read weights" in refused(tmp_path, capsys, checkpoint, MIXED_BASE)
    assert not marker.exists()


def test_a_failure_while_writing_leaves_nothing_behind(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint = save(mixed_network(), "pt", tmp_path / "run")
    base = write_base(tmp_path, MIXED_BASE)
    repo = tmp_path / "repo"
    real = repository_module.write_model
    written: list[str] = []

    def failing(root: Path, name: str, *args: Any, **kwargs: Any) -> Path:
        if len(written) == 2:
            raise OSError(28, "No space left on device")
        written.append(name)
        return real(root, name, *args, **kwargs)

    monkeypatch.setattr(repository_module, "write_model", failing)
    assert run_import(checkpoint, repo, base=base) == 2
    assert "No space left on device" in one_error_line(capsys)
    assert written == ["0", "1"]
    assert list(repo.iterdir()) == []  # the staging folder is gone too

    monkeypatch.setattr(repository_module, "write_model", real)
    assert run_import(checkpoint, repo, base=base) == 0
    hashes = {m.name: m.content_hash for m in ModelRepository.load(repo).ready.values()}
    written.clear()
    monkeypatch.setattr(repository_module, "write_model", failing)
    other = save(mixed_network(seed=9), "pt", tmp_path / "other")
    assert run_import(other, repo, "--force", base=base) == 2
    assert {m.name: m.content_hash for m in ModelRepository.load(repo).ready.values()} == hashes
    assert sorted(p.name for p in repo.iterdir()) == ["net"]


def test_a_group_name_must_be_a_model_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = save(mixed_network(), "pt", tmp_path / "run")
    base = write_base(tmp_path, MIXED_BASE)
    assert run_import(checkpoint, tmp_path / "repo", base=base, name="my/net") == 2
    assert "invalid model name 'my/net'" in one_error_line(capsys)


def test_one_generator_import_still_needs_prefix_and_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = save(mixed_network(), "pt", tmp_path / "run")
    assert main(["import", str(checkpoint), "--name", "m", "--repo", str(tmp_path / "repo")]) == 2
    assert "--prefix and --config are required to import one generator" in one_error_line(capsys)
    args = ["import", str(checkpoint), "--prefix", "blocks.0.filter.kernel", "--dry-run"]
    assert main([*args, "--config", str(checkpoint), "--name", "m", "--repo", str(tmp_path)]) == 2
    assert "--dry-run goes with --all" in one_error_line(capsys)


# -- inspect ----------------------------------------------------------------------------------------


def test_inspect_lists_the_group_with_its_members(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = save(mixed_network(), "ckpt", tmp_path / "run", root="model")
    repo = tmp_path / "repo"
    assert run_import(checkpoint, repo, base=write_base(tmp_path, MIXED_BASE, "model")) == 0
    capsys.readouterr()
    assert main(["inspect", str(repo), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    (group,) = report["groups"]
    assert group == {
        "name": "net",
        "status": "ready",
        "path": str(repo / "net"),
        "checkpoint": "network.ckpt",
        "members": ["net/0", "net/1", "net/2", "net/3"],
        "sources": [f"model.{prefix}" for prefix, _ in MIXED],
    }
    assert [(m["name"], m["group"], m["group_index"], m["source"]) for m in report["models"]] == [
        (f"net/{i}", "net", i, f"model.{prefix}") for i, (prefix, _) in enumerate(MIXED)
    ]
    assert main(["inspect", str(repo)]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[0] == f"repository {repo}: 4 ready, 0 failed, 1 group(s)"
    assert text[1] == "group net: 4 models, imported from network.ckpt"
    assert text[2] == "net/0: ready"
    assert text[3] == "  source        model.blocks.0.filter.kernel"

    (repo / "net" / "2" / "model.safetensors").unlink()
    assert main(["inspect", str(repo), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["groups"][0]["status"] == "failed"
    failed = report["models"][2]
    assert (failed["name"], failed["status"], failed["group"]) == ("net/2", "failed", "net")
    assert main(["inspect", str(repo)]) == 1
    out = capsys.readouterr().out
    assert "group net: 4 models, imported from network.ckpt (a member failed to load)" in out


# -- a network of the reference package's layers: masks, variants, causal crops -------------------

import reference_network as R  # noqa: E402

#: What a user writes for the reference network: every layer's settings the weights cannot tell
#: (prefixes relative to the network; the classes the tensors show are left to them).
REFERENCE_OVERRIDES: dict[str, dict[str, Any]] = {
    R.conv_path(0): {
        "omega_0": 12.0, "L_cache": 16, "causal": True, "mask": {"type": "GaussianModulationND"},
    },
    R.conv_path(1): {
        "omega_0": 8.0, "omega_0_scale_min": 0.5, "omega_0_scale_max": 1.5, "L_cache": 16, "causal": True,
        "mask": {"type": "ExponentialModulationND"},
    },
    # A circular layer: its generator's L_cache is the layer's halved, (15 + 1) // 2.
    R.conv_path(2): {"omega_0": 2.0, "nonlinearity": "gelu", "L_cache": 8, "causal": False},
    R.conv_path(3): {
        "kernel": "MultiOmegaSIRENKernelND", "omega_0_per_row": [1, 2, 3, 4, 5, 6, 7, 8], "L_cache": [6, 8],
        "mask": {"type": "GaussianModulationND", "parametrization": "log"},
    },
    R.conv_path(4): {
        "kernel": "BlockDiagonalMultiOmegaSIRENKernelND", "num_blocks": 4, "L_cache": 6,
        "mask": {"type": "BlockAlignedGaussianModulationND"},
    },
    R.conv_path(5): {
        "kernel": "BlockDiagonalLearnableOmegaSIRENKernelND", "num_blocks": 2, "omega_0_min": 2.0,
        "omega_0_max": 12.0, "schedule": "log", "omega_0_scale_min": 0.01, "omega_0_scale_max": 2.0,
        "L_cache": [4, 8],
        "mask": {"type": "BlockAlignedGaussianModulationND", "parametrization": "softplus"},
    },
    R.conv_path(6): {
        "omega_0": 6.0, "hidden_omega_0": 3.0, "L_cache": 4,
        "mask": {"type": "GaussianModulationND", "parametrization": "softplus"},
    },
    R.conv_path(7): {
        "omega_0": 5.0, "omega_0_scale_min": 0.01, "omega_0_scale_max": 2.0, "L_cache": [3, 4, 5],
        "mask": {"type": "GaussianModulationND", "init_extent": [2, 1, 0.5]},
    },
}  # fmt: skip
HEADS = {"lightning": "network.", "compiled": "network._orig_mod."}


#: A value in ``reference_base``'s changes that removes the key.
DROP = object()


def reference_base(head: str, changes: dict[int, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The base of the reference network's checkpoint (keys under ``head``), each layer's override
    updated by ``changes`` (a key set to ``DROP`` is removed)."""
    overrides = {}
    for index, (layer, values) in enumerate(REFERENCE_OVERRIDES.items()):
        values = {**values, **(changes or {}).get(index, {})}
        overrides[f"{head}{layer}.kernel"] = {k: v for k, v in values.items() if v is not DROP}
    return {"overrides": overrides}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The reference network's Lightning checkpoints, as trained, and as a compiled network saves them."""
    network, _ = R.shared_trained_network()
    folder = tmp_path_factory.mktemp("reference")
    return {
        form: R.save_lightning(network, folder / f"{form}.ckpt", compiled=form == "compiled")
        for form in HEADS
    }


@pytest.mark.parametrize("form", HEADS)
def test_a_reference_network_imports_as_the_kernels_its_layers_convolve_with(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], reference: dict[str, Path], form: str
) -> None:
    network, conditioning = R.shared_trained_network()
    repo = tmp_path / "repo"
    base = tmp_path / "base.json"
    base.write_text(json.dumps(reference_base(HEADS[form])))
    assert run_import(reference[form], repo, base=base) == 0
    captured = capsys.readouterr()
    assert captured.err == ""  # every layer said all the weights cannot tell
    assert f"imported group 'net' in {repo / 'net'}: 8 models" in captured.out
    manifest = json.loads((repo / "net" / "group.json").read_text())
    assert [m["source"] for m in manifest["members"]] == [
        f"{HEADS[form]}{R.conv_path(i)}.kernel" for i in range(len(R.LAYERS))
    ]
    exported = kernelgen_server.export(network, tmp_path / "exported", "net")
    for index, (layer, conv) in enumerate(zip(R.LAYERS, network.convs(), strict=True)):
        member = repo / "net" / str(index)
        R.assert_serves_layer(R.load_member(member), conv, conditioning if layer.film else None, layer.name)
        # Both ways in give the same member: the same config.json, the same weights.
        assert json.loads((member / "config.json").read_text()) == json.loads(
            (exported / str(index) / "config.json").read_text()
        ), layer.name
        assert (member / "model.safetensors").read_bytes() == (
            exported / str(index) / "model.safetensors"
        ).read_bytes()
    # And the same layer hashes (saved, and clamped where a forward's clamps change the tensors).
    exported_manifest = json.loads((exported / "group.json").read_text())
    assert [m["layer_hashes"] for m in manifest["members"]] == [
        m["layer_hashes"] for m in exported_manifest["members"]
    ]


def test_the_dry_run_shows_each_layer_s_kernel_mask_and_crop(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], reference: dict[str, Path]
) -> None:
    base = tmp_path / "base.json"
    base.write_text(json.dumps(reference_base("network.")))
    assert run_import(reference["lightning"], tmp_path / "repo", "--dry-run", base=base) == 0
    rows = [line.split("  ") for line in capsys.readouterr().out.splitlines() if line.startswith("net/")]
    cells = [[cell.strip() for cell in row if cell.strip()] for row in rows]
    assert [row[-3:-1] for row in cells][:2] == [["Gaussian direct", "yes"], ["Exponential", "yes"]]
    kinds = [next(c for c in row if c.endswith(("SIREN", "Fourier"))) for row in cells]
    assert kinds == [
        "SIREN", "LearnableOmegaSIREN", "RandomFourier", "MultiOmegaSIREN", "BlockDiagonalMultiOmegaSIREN",
        "BlockDiagonalLearnableOmegaSIREN", "SIREN", "LearnableOmegaSIREN",
    ]  # fmt: skip
    assert_nothing_written(tmp_path / "repo")


def _refused_reference(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], checkpoint: Path, base: dict[str, Any]
) -> str:
    repo = tmp_path / "repo"
    (tmp_path / "base.json").write_text(json.dumps(base))
    assert run_import(checkpoint, repo, base=tmp_path / "base.json") == 2
    assert_nothing_written(repo)
    return one_error_line(capsys)


LAYER_0 = "network.blocks.0.mixer.global_conv"
LAYER_1 = "network.blocks.1.mixer.global_conv"
LAYER_2 = "network.blocks.2.mixer.global_conv"

BASE_REFUSALS: dict[str, tuple[dict[int, dict[str, Any]], str]] = {
    "mask-settings-missing": (
        {0: {"mask": DROP}},
        f"generator '{LAYER_0}.kernel': its layer '{LAYER_0}' has a mask ('{LAYER_0}.mask.std_param' "
        "[1, 8], as GaussianModulationND and BlockAlignedGaussianModulationND hold) whose class and "
        'settings the weights cannot tell, and {base} describes no mask: add "mask": {"type": '
        '"GaussianModulationND"',
    ),
    "mask-set-to-null": (
        {1: {"mask": None}},
        f"('{LAYER_1}.mask.weight' [1, 8], as ExponentialModulationND hold) whose class and settings the "
        f"weights cannot tell, and {{base}} overrides['{LAYER_1}.kernel'] sets mask null: add \"mask\": "
        '{"type": "ExponentialModulationND"}',
    ),
    "mask-of-the-other-kind": (
        {1: {"mask": {"type": "GaussianModulationND"}}},
        f"sets a GaussianModulationND mask, but its layer's mask holds '{LAYER_1}.mask.weight' [1, 8], as "
        "ExponentialModulationND hold",
    ),
    "mask-channels": (
        {0: {"mask": {"type": "GaussianModulationND", "num_channels": 4}}},
        f"sets mask.num_channels 4, but tensor '{LAYER_0}.mask.std_param' has shape [1, 8] "
        "(mask.num_channels 8)",
    ),
    "unknown-mask-type": (
        {0: {"mask": {"type": "HannModulationND"}}},
        "mask.type: unknown type 'HannModulationND'",
    ),
    "mask-clamps-out-of-order": (
        {0: {"mask": {"type": "GaussianModulationND", "min_std": 0.5, "max_std": 0.1}}},
        "max_std (0.1) is below min_std (0.5): the clamps are out of order",
    ),
    "unknown-kernel": (
        {0: {"kernel": "HyenaKernelND"}},
        f"generator '{LAYER_0}.kernel': kernel: unknown generator 'HyenaKernelND'",
    ),
    "kernel-the-tensors-contradict": (
        {1: {"kernel": "SIRENKernelND"}},
        f"sets kernel SIRENKernelND, but it has '{LAYER_1}.kernel.positional_embedding.omega_0_scale', a "
        "learnable omega scale (LearnableOmegaSIRENKernelND, BlockDiagonalLearnableOmegaSIRENKernelND)",
    ),
    "scale-clamps-out-of-order": (
        {1: {"omega_0_scale_min": 2.0, "omega_0_scale_max": 1.0}},
        "omega_0_scale_max (1.0) must be >= omega_0_scale_min (2.0)",
    ),
    "fourier-activation-missing": (
        {2: {"nonlinearity": DROP}},
        f"generator '{LAYER_2}.kernel' needs nonlinearity, which the weights cannot tell "
        "(RandomFourierKernelND)",
    ),
    "an-argument-the-class-does-not-take": ({4: {"omega_0": 3.0}}, "key 'omega_0' is no argument of"),
    "causal-2d": ({3: {"causal": True}}, "causal is for 1-D kernels"),
}


@pytest.mark.parametrize(("changes", "expected"), BASE_REFUSALS.values(), ids=BASE_REFUSALS.keys())
def test_a_base_that_does_not_determine_a_reference_layer_is_refused_naming_it(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    reference: dict[str, Path],
    changes: dict[int, dict[str, Any]],
    expected: str,
) -> None:
    line = _refused_reference(tmp_path, capsys, reference["lightning"], reference_base("network.", changes))
    assert expected.replace("{base}", str(tmp_path / "base.json")) in line


def _edited(tmp_path: Path, checkpoint: Path, edit: Any) -> Path:
    saved = torch.load(checkpoint, weights_only=True)
    edit(saved["state_dict"])
    path = tmp_path / "edited.ckpt"
    torch.save(saved, path)
    return path


def _rename(state: dict[str, Any], old: str, new: str) -> None:
    state[new] = state.pop(old)


CHECKPOINT_REFUSALS: dict[str, tuple[Any, str]] = {
    "unknown-mask": (
        lambda s: _rename(s, f"{LAYER_0}.mask.std_param", f"{LAYER_0}.mask.sigma"),
        f"generator '{LAYER_0}.kernel': its layer '{LAYER_0}' has a mask holding sigma "
        f"('{LAYER_0}.mask.sigma'), which is no mask kernelgen serves",
    ),
    "a-mask-of-two-tensors": (
        lambda s: s.__setitem__(f"{LAYER_1}.mask.bias", torch.zeros(8)),
        f"its layer '{LAYER_1}' has a mask holding bias, weight",
    ),
    "unknown-generator-parameter": (
        lambda s: s.__setitem__(f"{LAYER_0}.kernel.positional_embedding.phase", torch.zeros(8)),
        f"key '{LAYER_0}.kernel.positional_embedding.phase' is under generator '{LAYER_0}.kernel' but is no "
        "generator parameter kernelgen knows",
    ),
    "fourier-with-a-learnable-scale": (
        lambda s: s.__setitem__(f"{LAYER_2}.kernel.positional_embedding.omega_0_scale", torch.ones(4)),
        f"has random Fourier features ('{LAYER_2}.kernel.kernel_network.0.weight' takes the cosines and "
        "sines of 4 phases) and a learnable omega scale",
    ),
}


@pytest.mark.parametrize(("edit", "expected"), CHECKPOINT_REFUSALS.values(), ids=CHECKPOINT_REFUSALS.keys())
def test_a_reference_layer_kernelgen_cannot_serve_exactly_is_refused_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], reference: dict[str, Path], edit: Any, expected: str
) -> None:
    checkpoint = _edited(tmp_path, reference["lightning"], edit)
    assert expected in _refused_reference(tmp_path, capsys, checkpoint, reference_base("network."))


def test_what_the_base_leaves_unsaid_or_says_in_vain_is_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], reference: dict[str, Path]
) -> None:
    """A 1-D layer's causal crop is not in the weights: unsaid, it is imported as not causal, with a
    warning. film_after_pos_embed without FiLM modulates nothing in the layer: written false, warned.
    A learnable omega's clamps (and a block schedule) change the kernel: unsaid, the package's
    defaults, warned."""
    unmodulated = (0, 4, 7)  # layers without FiLM, where the package ignores film_after_pos_embed
    changes: dict[int, dict[str, Any]] = {i: {"film_after_pos_embed": True} for i in unmodulated}
    changes[0]["causal"] = DROP
    changes[2] = {"causal": DROP}
    changes[7] |= {"omega_0_scale_min": DROP, "omega_0_scale_max": DROP}
    base = reference_base("network.", changes)
    (tmp_path / "base.json").write_text(json.dumps(base))
    repo = tmp_path / "repo"
    assert run_import(reference["lightning"], repo, base=tmp_path / "base.json") == 0
    warned = capsys.readouterr().err.splitlines()
    assert all(line.startswith("kernelgen import: warning: ") for line in warned)
    causal = [line for line in warned if "whether its layer is causal" in line]
    assert [line.split("'")[1] for line in causal] == [f"network.{R.conv_path(i)}.kernel" for i in (0, 2)]
    film = [line for line in warned if "film_after_pos_embed true" in line]
    assert [line.split("'")[1] for line in film] == [f"network.{R.conv_path(i)}.kernel" for i in unmodulated]
    defaults = [line for line in warned if "imported with the package's defaults" in line]
    assert [line.split("'")[1] for line in defaults] == [f"network.{R.conv_path(7)}.kernel"]
    assert "omega_0_scale_min 0.01, omega_0_scale_max 2.0" in defaults[0]
    assert len(warned) == len(causal) + len(film) + len(defaults)
    configs = [ModelConfig.from_file(repo / "net" / str(i) / "config.json") for i in range(len(R.LAYERS))]
    assert [c.causal for c in configs][:3] == [False, True, False]
    assert [c.film_after_pos_embed for c in configs] == [
        layer.film and i in (3,) for i, layer in enumerate(R.LAYERS)
    ]
