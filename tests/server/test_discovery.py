"""Finding generators by their structure, inferring configs from shapes, reading training checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor

from kernelgen_server.model.config import ConfigError, ModelConfig
from kernelgen_server.repository.checkpoint import CheckpointError, read_training_checkpoint, training_state
from kernelgen_server.repository.discovery import find_generators, generator_prefixes, natural_key
from kernelgen_server.repository.import_plan import ImportBase, configure, plan_network

PATH = Path("run.ckpt")
CONFIG: dict[str, Any] = {
    "out_dim": 3, "data_dim": 2, "mlp_hidden_dim": 8, "num_layers": 4, "embedding_dim": 6,
    "omega_0": 10.0, "L_cache": 5, "use_bias": True, "hidden_omega_0": 1.0,
    "film_after_pos_embed": False, "film": {"cond_dim": 4, "film_hidden_dim": 5},
}  # fmt: skip


def generator_state(prefix: str = "", seed: int = 0, **changes: Any) -> dict[str, Tensor]:
    config = ModelConfig.from_dict({**CONFIG, **changes})
    head = f"{prefix}." if prefix else ""
    return {f"{head}{k}": v for k, v in config.build(seed=seed).state_dict().items()}


def refusal(state: dict[str, Any]) -> str:
    with pytest.raises(CheckpointError) as info:
        find_generators(state, PATH)
    assert str(PATH) in str(info.value)
    return str(info.value)


# -- what the shapes tell -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"use_bias": False},
        {"film": None},
        {"film_after_pos_embed": True, "embedding_dim": 8},
        {"data_dim": 3, "L_cache": [5, 6, 7], "num_layers": 2},
        {"film": {"cond_dim": 1, "film_hidden_dim": 64}, "out_dim": 1},
    ],
    ids=["film", "no-bias", "no-film", "film-after-embedding", "3d-two-layers", "widths-of-one"],
)
def test_the_shapes_give_every_value_they_determine(changes: dict[str, Any]) -> None:
    (generator,) = find_generators(generator_state("k", **changes), PATH)
    expected = {**CONFIG, **changes}
    assert generator.prefix == "k"
    assert dict(generator.shape_values) == {
        name: expected[name]
        for name in ("data_dim", "embedding_dim", "mlp_hidden_dim", "num_layers", "out_dim", "use_bias")
    } | {"film": expected["film"], "film_after_pos_embed": expected["film_after_pos_embed"]}
    base = ImportBase("base.json", {"omega_0": 10.0, "L_cache": expected["L_cache"]}, {})
    config = configure(generator, base, PATH)
    assert config == ModelConfig.from_dict(expected)


def test_a_generator_at_the_root_and_generators_in_order() -> None:
    (root,) = find_generators(generator_state(), PATH)
    assert root.prefix == ""
    state = {**generator_state("blocks.10.k"), **generator_state("blocks.2.k"), **generator_state("a.k")}
    assert [g.prefix for g in find_generators(state, PATH)] == ["a.k", "blocks.2.k", "blocks.10.k"]
    assert sorted(["b.10", "b.9", "a", "b.x"], key=natural_key) == ["a", "b.9", "b.10", "b.x"]
    assert [g.prefix for g in find_generators(state, PATH, under="blocks")] == ["blocks.2.k", "blocks.10.k"]
    assert [g.prefix for g in find_generators(state, PATH, under="blocks.10.k.")] == ["blocks.10.k"]
    with pytest.raises(CheckpointError, match=r"no kernel generator under prefix 'block'; generators found"):
        find_generators(state, PATH, under="block")


def test_a_generator_inside_another_keeps_its_own_keys() -> None:
    state = {**generator_state("outer"), **generator_state("outer.inner", seed=1)}
    outer, inner = find_generators(state, PATH)
    assert (outer.prefix, inner.prefix) == ("outer", "outer.inner")
    assert outer.tensors.keys() == inner.tensors.keys()
    assert not torch.equal(outer.tensors["out_linear.weight"], inner.tensors["out_linear.weight"])


def test_legacy_names_become_hidden_linears() -> None:
    modern = generator_state("k")
    legacy = {
        k.replace(f"hidden_linears.{i}.", f"kernel_network.{2 * i}."): v
        for k, v in modern.items()
        for i in [int(k.split("hidden_linears.")[1].split(".")[0]) if "hidden_linears." in k else 0]
    }
    assert "k.kernel_network.4.weight" in legacy
    (generator,) = find_generators(legacy, PATH)
    assert generator.legacy
    assert generator.keys["hidden_linears.2.weight"] == "k.kernel_network.4.weight"
    assert all(torch.equal(generator.tensors[k.removeprefix("k.")], v) for k, v in modern.items())
    assert generator.shape_values["num_layers"] == 4


# -- structures that are not a SIRENKernelND ------------------------------------------------------


def test_a_foreign_key_under_a_generator_is_refused() -> None:
    state = {**generator_state("k"), "k.grid_scale": torch.ones(1)}
    assert (
        "key 'k.grid_scale' is under generator 'k' but is no generator parameter kernelgen knows"
        in refusal(state)
    )


def test_a_bias_on_some_layers_only_is_refused() -> None:
    state = generator_state("k")
    del state["k.hidden_linears.1.bias"]
    assert (
        "generator 'k' has no 'k.hidden_linears.1.bias' but has 'k.positional_embedding.linear.bias': "
        "a generator has a bias on every linear layer or on none"
    ) in refusal(state)
    state = generator_state("k", use_bias=False)
    state["k.out_linear.bias"] = torch.zeros(3)
    assert "has 'k.out_linear.bias' but has no 'k.positional_embedding.linear.bias'" in refusal(state)


def test_missing_layers_are_refused() -> None:
    state = generator_state("k")
    del state["k.hidden_linears.1.weight"], state["k.hidden_linears.1.bias"]
    assert "generator 'k' has no 'k.hidden_linears.1.weight'" in refusal(state)
    state = {k: v for k, v in generator_state("k", film=None).items() if "hidden_linears" not in k}
    assert "generator 'k' has no hidden layer ('k.hidden_linears.0.weight')" in refusal(state)
    state = generator_state("k")
    del state["k.out_linear.weight"]
    assert "generator 'k' has no 'k.out_linear.weight'" in refusal(state)
    state = generator_state("k")
    del state["k.film_generator.mlp.2.bias"]
    assert "generator 'k' has no 'k.film_generator.mlp.2.bias'" in refusal(state)


def test_a_film_output_of_the_wrong_width_is_refused() -> None:
    state = generator_state("k")
    state["k.film_generator.mlp.2.weight"] = torch.zeros(40, 5)
    assert (
        "tensor 'k.film_generator.mlp.2.weight' has 40 output rows, but FiLM of 3 hidden layer(s) of width 8 "
        "has 48 (or 64 when it also modulates the positional embedding)"
    ) in refusal(state)
    state = generator_state("k")  # embedding 6 != hidden 8: the embedding cannot be modulated
    state["k.film_generator.mlp.2.weight"] = torch.zeros(64, 5)
    assert "needs embedding_dim == mlp_hidden_dim, but they are 6 and 8" in refusal(state)


def test_odd_legacy_entries_duplicates_and_wrong_ranks_are_refused() -> None:
    state = {**generator_state("k"), "k.kernel_network.1.weight": torch.zeros(8, 8)}
    assert "'k.kernel_network.1.weight': odd kernel_network entries are activations" in refusal(state)
    state = {**generator_state("k"), "k.kernel_network.0.weight": torch.zeros(8, 6)}
    assert "gives 'hidden_linears.0.weight' a second time" in refusal(state)
    state = generator_state("k")
    state["k.out_linear.weight"] = torch.zeros(3, 8, 1)
    assert "tensor 'k.out_linear.weight' has shape [3, 8, 1], expected 2 dimension(s)" in refusal(state)


def test_plan_reports_each_generators_fault_and_an_unknown_override_at_once() -> None:
    state = {**generator_state("a"), **generator_state("b", data_dim=1, L_cache=9)}
    generators = find_generators(state, PATH)
    base = ImportBase("base.json", {"omega_0": 1.0, "L_cache": [5, 5]}, {})
    good, bad = plan_network(generators, base, PATH)
    assert (good.member, good.error, bad.member, bad.config) == ("0", None, "1", None)
    assert good.config is not None and good.config.L_cache == (5, 5)
    assert isinstance(bad.error, CheckpointError)
    assert bad.error.key == "b.positional_embedding.linear.weight"
    assert bad.value("data_dim") == 1 and bad.value("L_cache") is None
    with pytest.raises(ConfigError, match=r"overrides name 'c', which is no generator found"):
        plan_network(generators, ImportBase("base.json", {}, {"c": {"L_cache": 4}}), PATH)
    # An override of a generator the checkpoint holds but this import leaves out is no typo.
    (only_a,) = find_generators(state, PATH, under="a")
    base = ImportBase("base.json", {"omega_0": 1.0, "L_cache": 5}, {"b": {"L_cache": 9}})
    (plan,) = plan_network([only_a], base, PATH, generator_prefixes(state))
    assert plan.error is None
    with pytest.raises(ConfigError, match=r"overrides name 'b'"):
        plan_network([only_a], base, PATH)


def test_a_base_file_is_strict(tmp_path: Path) -> None:
    path = tmp_path / "base.json"
    path.write_text(json.dumps({"omega_0": 10.0, "L_cache": [4, 5], "overrides": {"k.": {"L_cache": 9}}}))
    base = ImportBase.from_file(path)
    assert base.values == {"omega_0": 10.0, "L_cache": (4, 5)}
    assert base.overrides == {"k": {"L_cache": 9}}
    for document, message in [
        ([1, 2], "a base config is a JSON object"),
        ({"film": {"cond_dim": 3, "width": 2}}, "unknown key 'film.width'"),
        ({"use_bias": 1}, "use_bias: Input should be a valid boolean"),
        ({"overrides": {"k": {"L_cache": "9"}}}, "overrides.k.L_cache"),
    ]:
        path.write_text(json.dumps(document))
        with pytest.raises(ConfigError, match=message):
            ImportBase.from_file(path)
    path.write_text("{")
    with pytest.raises(ConfigError, match="invalid JSON"):
        ImportBase.from_file(path)


# -- reading training checkpoints -------------------------------------------------------------------


def test_training_state_unwraps_and_flattens() -> None:
    weights = generator_state()
    raw = {"model": {"k": weights}, "optimizer": {"state": {0: {"exp_avg": torch.zeros(1)}}}, "epoch": 2}
    state = training_state(raw, PATH)
    assert state["epoch"] == 2
    assert "optimizer.state" not in state and not any(k.startswith("optimizer.state.") for k in state)
    assert [g.prefix for g in find_generators(state, PATH)] == ["model.k"]
    assert training_state({"state_dict": {"a": {"b": 1}}, "epoch": 3}, PATH) == {"a.b": 1}
    with pytest.raises(CheckpointError, match=r"two entries are named 'a.b' once nesting is flattened"):
        training_state({"a.b": torch.zeros(1), "a": {"b": torch.zeros(1)}}, PATH)


def write_shards(folder: Path, state: dict[str, Tensor], weight_map: dict[str, str] | None = None) -> Path:
    keys = sorted(state)
    shards = {"one.safetensors": keys[::2], "two.safetensors": keys[1::2]}
    mapping: dict[str, str] = {}
    for shard, names in shards.items():
        save_file({k: state[k].contiguous() for k in names}, folder / shard)
        mapping.update(dict.fromkeys(names, shard))
    index = folder / "net.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map if weight_map is not None else mapping}))
    return index


def test_sharded_safetensors_read_as_one_state(tmp_path: Path) -> None:
    state = generator_state("k")
    index = write_shards(tmp_path, state)
    for path in (index, tmp_path):  # the index, or the folder holding it
        read = read_training_checkpoint(path)
        assert read.keys() == state.keys()
        assert all(torch.equal(read[k], state[k]) for k in state)  # type: ignore[arg-type]


def test_a_shard_index_that_does_not_match_its_shards_is_refused(tmp_path: Path) -> None:
    state = generator_state("k")
    key = sorted(state)[0]
    index = write_shards(tmp_path, state)
    mapping = json.loads(index.read_text())["weight_map"]
    for weight_map, message in [
        ({**mapping, "k.ghost": "two.safetensors"}, "the index maps 'k.ghost' to this shard, which does not"),
        ({k: v for k, v in mapping.items() if k != key}, f"holds {key!r}, which the index"),
        ({**mapping, key: "../elsewhere.safetensors"}, "not the name of a .safetensors file beside the"),
        ({}, "the shard index has no 'weight_map'"),
    ]:
        index.write_text(json.dumps({"weight_map": weight_map}))
        with pytest.raises(CheckpointError, match=message):
            read_training_checkpoint(index)
    index.write_text("not json")
    with pytest.raises(CheckpointError, match="cannot read the shard index"):
        read_training_checkpoint(index)


def test_a_folder_or_a_missing_file_as_the_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"expected one .* in the folder; found neither"):
        read_training_checkpoint(tmp_path)
    save_file(generator_state(), tmp_path / "only.safetensors")
    assert "out_linear.weight" in read_training_checkpoint(tmp_path)
    save_file(generator_state(), tmp_path / "second.safetensors")
    with pytest.raises(CheckpointError, match=r"found 'only\.safetensors', 'second\.safetensors'"):
        read_training_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        read_training_checkpoint(tmp_path / "absent.ckpt")


# -- families and masks ----------------------------------------------------------------------------


def _state_of(config: dict[str, Any], prefix: str, seed: int = 0) -> dict[str, Tensor]:
    model = ModelConfig.from_dict(config).build(seed=seed)
    head = f"{prefix}." if prefix else ""
    return {f"{head}{k}": v for k, v in model.state_dict().items()}


FOURIER = {**{k: v for k, v in CONFIG.items() if k not in ("hidden_omega_0", "film_after_pos_embed", "film")},
           "kernel": "RandomFourierKernelND", "embedding_dim": 16, "nonlinearity": "silu"}  # fmt: skip


def test_the_tensors_tell_the_family_and_random_fourier_features_their_width() -> None:
    state = {
        **_state_of(FOURIER, "a.kernel"),
        **_state_of({**CONFIG, "kernel": "LearnableOmegaSIRENKernelND"}, "b.kernel"),
        **generator_state("c.kernel"),
    }
    fourier, learnable, siren = find_generators(state, PATH)
    assert (fourier.family, learnable.family, siren.family) == ("fourier", "learnable", "siren")
    # Fourier features: 8 phases, their cosines and sines; not a legacy SIREN's 8-wide embedding.
    assert fourier.tensors["positional_embedding.linear.weight"].shape[0] == 8
    assert fourier.shape_values["embedding_dim"] == 16 and not fourier.legacy
    base = ImportBase("base.json", {"omega_0": 10.0, "L_cache": 5, "nonlinearity": "silu"}, {})
    assert configure(fourier, base, PATH) == ModelConfig.from_dict(FOURIER)
    assert configure(learnable, base, PATH).kernel == "LearnableOmegaSIRENKernelND"
    assert configure(siren, base, PATH) == ModelConfig.from_dict(CONFIG)  # nonlinearity is not its argument


def test_a_lone_layer_s_mask_sits_beside_its_kernel() -> None:
    """A checkpoint of one CKConvND: ``kernel.*`` and ``mask.*`` at the root."""
    masked = {**CONFIG, "mask": {"type": "ExponentialModulationND", "data_dim": 2, "num_channels": 3}}
    model = ModelConfig.from_dict(masked).build(seed=0)
    state = {(k if k.startswith("mask.") else f"kernel.{k}"): v for k, v in model.state_dict().items()}
    state["shortcut"] = torch.zeros(3)  # the layer's own, not the kernel's
    (generator,) = find_generators(state, PATH)
    assert generator.mask is not None and generator.mask.key == "mask.weight"
    base = ImportBase(
        "base.json", {"omega_0": 10.0, "L_cache": 5, "mask": {"type": "ExponentialModulationND"}}, {}
    )
    assert configure(generator, base, PATH) == ModelConfig.from_dict(masked)


def test_two_generators_beside_one_mask_are_refused() -> None:
    state = {**generator_state("layer.kernel"), **generator_state("layer.other", seed=1)}
    state["layer.mask.weight"] = torch.ones(2, 3)
    assert "layer 'layer' holds the generators 'layer.kernel' and 'layer.other' beside one mask" in refusal(
        state
    )
