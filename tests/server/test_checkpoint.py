"""Weights files: round trips, strict checks naming file and key, training-checkpoint extraction."""

from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor

from kernelgen_server.model.config import ModelConfig
from kernelgen_server.repository.checkpoint import (
    CheckpointError,
    extract_kernel_state,
    find_weights,
    load_module,
    read_checkpoint,
    read_weights,
    save_safetensors,
)

CONFIG = ModelConfig.from_dict(
    {
        "out_dim": 4,
        "data_dim": 2,
        "mlp_hidden_dim": 8,
        "num_layers": 3,
        "embedding_dim": 8,
        "omega_0": 10.0,
        "L_cache": 5,
        "use_bias": True,
        "film": {"cond_dim": 3, "film_hidden_dim": 6},
        "film_after_pos_embed": True,
    }
)
CONDITIONING = torch.linspace(-1.0, 1.0, 6).reshape(2, 3)


def fresh_state(seed: int = 0) -> dict[str, Tensor]:
    return dict(CONFIG.build(seed=seed).state_dict())


def kernels(module: torch.nn.Module) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        return module((3, 4))[0], module((3, 4), CONDITIONING)[0]


def load(path: Path) -> torch.nn.Module:
    return load_module(CONFIG, read_weights(path), path)


def save_pt(obj: object, path: Path) -> Path:
    torch.save(obj, path)
    return path


# -- round trips --------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_round_trip_gives_the_same_kernel_bitwise(tmp_path: Path, suffix: str) -> None:
    original = CONFIG.build(seed=3)
    path = tmp_path / f"model{suffix}"
    if suffix == ".safetensors":
        save_safetensors(original.state_dict(), path)
    else:
        save_pt(original.state_dict(), path)
    loaded = load(path)
    for before, after in zip(kernels(original), kernels(loaded), strict=True):
        assert torch.equal(before, after)


def test_loaded_module_is_float32_eval_without_gradients(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_safetensors({k: v.to(torch.float64) for k, v in fresh_state().items()}, path)
    module = load(path)
    assert not module.training
    params = list(module.parameters())
    assert params
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in params)
    assert all(p.device.type == "cpu" for p in params)


def test_half_precision_weights_are_accepted_and_widened(tmp_path: Path) -> None:
    state = {k: v.to(torch.bfloat16) for k, v in fresh_state().items()}
    path = save_pt(state, tmp_path / "model.pt")
    module = load(path)
    assert torch.equal(module.out_linear.weight, state["out_linear.weight"].to(torch.float32))


def test_safetensors_is_preferred_over_pt(tmp_path: Path) -> None:
    save_pt(fresh_state(), tmp_path / "model.pt")
    assert find_weights(tmp_path) == tmp_path / "model.pt"
    save_safetensors(fresh_state(), tmp_path / "model.safetensors")
    assert find_weights(tmp_path) == tmp_path / "model.safetensors"


def test_saved_file_is_world_readable(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_safetensors(fresh_state(), path)
    assert path.stat().st_mode & 0o044 == 0o044
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temporary left behind


# -- malformed weights: one test per case, each naming the file and the key ----------


def refused(path: Path) -> CheckpointError:
    with pytest.raises(CheckpointError) as info:
        load(path)
    assert str(path) in str(info.value)
    return info.value


def test_missing_tensor(tmp_path: Path) -> None:
    state = fresh_state()
    del state["hidden_linears.1.bias"]
    error = refused(save_pt(state, tmp_path / "model.pt"))
    assert "missing tensor(s) 'hidden_linears.1.bias'" in str(error)
    assert error.key == "hidden_linears.1.bias"


def test_unexpected_tensor(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_safetensors({**fresh_state(), "out_linear.scale": torch.ones(4)}, path)
    error = refused(path)
    assert "unexpected tensor(s) 'out_linear.scale'" in str(error)


def test_misshaped_tensor(tmp_path: Path) -> None:
    state = fresh_state()
    state["hidden_linears.0.weight"] = torch.zeros(8, 9)
    error = refused(save_pt(state, tmp_path / "model.pt"))
    assert "'hidden_linears.0.weight' has shape [8, 9], the config needs [8, 8]" in str(error)


def test_nan_value(tmp_path: Path) -> None:
    state = fresh_state()
    state["out_linear.weight"][2, 5] = float("nan")
    path = tmp_path / "model.safetensors"
    save_safetensors(state, path)
    error = refused(path)
    assert "'out_linear.weight' has 1 non-finite value(s)" in str(error)
    assert "[2, 5]" in str(error)


def test_infinite_value(tmp_path: Path) -> None:
    state = fresh_state()
    state["film_generator.mlp.2.bias"][0] = float("-inf")
    error = refused(save_pt(state, tmp_path / "model.pt"))
    assert "'film_generator.mlp.2.bias' has 1 non-finite value(s)" in str(error)


def test_value_beyond_float32_range(tmp_path: Path) -> None:
    state = {k: v.to(torch.float64) for k, v in fresh_state().items()}
    state["positional_embedding.linear.bias"][1] = 1e300
    error = refused(save_pt(state, tmp_path / "model.pt"))
    assert "'positional_embedding.linear.bias'" in str(error)
    assert "non-finite value(s) in float32" in str(error)


def test_integer_dtype(tmp_path: Path) -> None:
    state = fresh_state()
    state["out_linear.bias"] = torch.zeros(4, dtype=torch.int64)
    error = refused(save_pt(state, tmp_path / "model.pt"))
    assert "'out_linear.bias' has dtype int64" in str(error)


def test_unsupported_floating_dtype(tmp_path: Path) -> None:
    state = fresh_state()
    state["out_linear.weight"] = state["out_linear.weight"].to(torch.float8_e4m3fn)
    path = tmp_path / "model.safetensors"
    save_safetensors(state, path)
    assert "'out_linear.weight' has dtype float8_e4m3fn" in str(refused(path))


def test_corrupt_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_safetensors(fresh_state(), path)
    path.write_bytes(path.read_bytes()[:100])
    assert "cannot read weights" in str(refused(path))


def test_corrupt_pt(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(b"\x00not a checkpoint" * 10)
    assert "cannot read weights" in str(refused(path))


def test_empty_pt(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    path.touch()
    assert "cannot read weights" in str(refused(path))


class _Tripwire:
    """Unpickling this would create a file: a full unpickle runs code from the checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path.touch, (str(self.marker),))  # type: ignore[return-value]


def test_pt_that_needs_full_pickle_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    path = save_pt({"out_linear.weight": _Tripwire(marker)}, tmp_path / "model.pt")
    assert "cannot read weights" in str(refused(path))
    assert not marker.exists()


def test_pt_holding_a_non_tensor_value(tmp_path: Path) -> None:
    path = save_pt({**fresh_state(), "step": 3}, tmp_path / "model.pt")
    error = refused(path)
    assert "key 'step' holds a int, not a tensor" in str(error)


def test_pt_holding_a_wrapped_training_checkpoint(tmp_path: Path) -> None:
    path = save_pt({"state_dict": fresh_state()}, tmp_path / "model.pt")
    error = refused(path)
    assert "key 'state_dict' holds a dict" in str(error)
    assert "kernelgen import" in str(error)


def test_pt_that_is_not_a_mapping(tmp_path: Path) -> None:
    path = save_pt(list(fresh_state().values()), tmp_path / "model.pt")
    assert "found a list" in str(refused(path))


def test_folder_without_weights(tmp_path: Path) -> None:
    with pytest.raises(
        CheckpointError, match=r"no weights file: expected model.safetensors or model.pt"
    ) as info:
        find_weights(tmp_path)
    assert str(tmp_path) in str(info.value)


# -- training checkpoints ---------------------------------------------------------


def test_extract_from_a_wrapped_prefixed_checkpoint(tmp_path: Path) -> None:
    state = fresh_state(seed=4)
    other = fresh_state(seed=5)
    training = OrderedDict(
        [("model.embed.weight", torch.zeros(2, 2))]
        + [(f"model.blocks.0.filter.kernel.{k}", v) for k, v in state.items()]
        + [(f"model.blocks.1.filter.kernel.{k}", v) for k, v in other.items()]
    )
    path = save_pt({"state_dict": training, "epoch": 7, "optimizer": {"lr": 0.1}}, tmp_path / "ckpt.pt")
    for prefix in ("model.blocks.0.filter.kernel", "model.blocks.0.filter.kernel."):
        extracted = extract_kernel_state(read_checkpoint(path), prefix, path)
        assert extracted.keys() == state.keys()
        assert all(torch.equal(extracted[k], state[k]) for k in state)
    module = load_module(CONFIG, extracted, path)
    for before, after in zip(kernels(CONFIG.build(seed=4)), kernels(module), strict=True):
        assert torch.equal(before, after)


def test_extract_maps_legacy_kernel_network_names(tmp_path: Path) -> None:
    state = fresh_state(seed=6)
    legacy = {
        re.sub(r"^hidden_linears\.(\d+)", lambda m: f"kernel_network.{2 * int(m[1])}", k): v
        for k, v in state.items()
    }
    assert "kernel_network.2.weight" in legacy
    path = tmp_path / "ckpt.safetensors"
    save_file({f"net.{k}": v.contiguous() for k, v in legacy.items()}, path)
    extracted = extract_kernel_state(read_checkpoint(path), "net", path)
    assert extracted.keys() == state.keys()
    assert torch.equal(extracted["hidden_linears.1.weight"], state["hidden_linears.1.weight"])


def test_extract_refuses_parameters_on_an_activation_index(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    with pytest.raises(CheckpointError, match=r"'k.kernel_network.1.weight': odd kernel_network") as info:
        extract_kernel_state({"k.kernel_network.1.weight": torch.zeros(2)}, "k", path)
    assert str(path) in str(info.value)


def test_extract_refuses_a_key_given_twice(tmp_path: Path) -> None:
    raw = {"k.kernel_network.0.weight": torch.zeros(2), "k.hidden_linears.0.weight": torch.zeros(2)}
    with pytest.raises(CheckpointError, match=r"'hidden_linears.0.weight' a second time"):
        extract_kernel_state(raw, "k", tmp_path / "ckpt.pt")


def test_extract_with_unknown_prefix_suggests_the_right_ones(tmp_path: Path) -> None:
    raw = {f"{p}.{k}": v for p in ("a.kernel", "b.kernel") for k, v in fresh_state().items()}
    with pytest.raises(
        CheckpointError, match=r"no tensor under prefix 'c'; kernels found under 'a.kernel', 'b.kernel'"
    ):
        extract_kernel_state(raw, "c", tmp_path / "ckpt.pt")
