"""The model repository: bad models beside good ones, typed failures, content hashes, writing models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from kernelgen_server.errors import ModelNotFound, ModelNotReady
from kernelgen_server.model.config import ModelConfig
from kernelgen_server.repository.checkpoint import read_weights, save_safetensors
from kernelgen_server.repository.store import (
    FailedModel,
    LoadedModel,
    ModelRepository,
    content_hash,
    load_model,
    write_model,
)

CONFIG_DICT: dict[str, Any] = {
    "out_dim": 4,
    "data_dim": 1,
    "mlp_hidden_dim": 8,
    "num_layers": 3,
    "embedding_dim": 8,
    "omega_0": 10.0,
    "L_cache": 9,
    "use_bias": True,
}
CONFIG = ModelConfig.from_dict(CONFIG_DICT)


def add_model(root: Path, name: str, seed: int = 0, config: ModelConfig = CONFIG) -> Path:
    return write_model(root, name, config, config.build(seed=seed).state_dict())


def test_bad_model_beside_a_good_one(tmp_path: Path) -> None:
    add_model(tmp_path, "good")
    bad = add_model(tmp_path, "bad")
    state = read_weights(bad / "model.safetensors")
    del state["out_linear.bias"]
    save_safetensors(state, bad / "model.safetensors")

    repo = ModelRepository.load(tmp_path)
    assert list(repo.ready) == ["good"]
    assert list(repo.failed) == ["bad"]
    assert repo.names() == ["bad", "good"]
    assert [type(e) for e in repo.entries()] == [FailedModel, LoadedModel]
    failure = repo.failed["bad"]
    assert failure.path == bad
    assert str(bad / "model.safetensors") in failure.reason
    assert "'out_linear.bias'" in failure.reason
    with torch.no_grad():
        kernel, _ = repo.get("good").module(5)
    assert kernel.shape == (1, 9, 4)


def test_unknown_and_failed_models_raise_the_service_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    repo = ModelRepository.load(tmp_path)
    with pytest.raises(ModelNotReady, match=r"'empty'"):
        repo.get("empty")
    with pytest.raises(ModelNotFound, match=r"'nope'"):
        repo.get("nope")
    assert "empty" in repo
    assert "nope" not in repo
    assert len(repo) == 1


def test_missing_config_is_reported(tmp_path: Path) -> None:
    model_dir = add_model(tmp_path, "m")
    (model_dir / "config.json").unlink()
    reason = ModelRepository.load(tmp_path).failed["m"].reason
    assert str(model_dir / "config.json") in reason
    assert "cannot read config" in reason


def test_invalid_config_is_reported(tmp_path: Path) -> None:
    model_dir = add_model(tmp_path, "m")
    (model_dir / "config.json").write_text(json.dumps({**CONFIG_DICT, "num_layers": True}))
    reason = ModelRepository.load(tmp_path).failed["m"].reason
    assert str(model_dir / "config.json") in reason
    assert "num_layers" in reason


def test_absent_weights_file_is_reported(tmp_path: Path) -> None:
    model_dir = add_model(tmp_path, "m")
    (model_dir / "model.safetensors").unlink()
    reason = ModelRepository.load(tmp_path).failed["m"].reason
    assert str(model_dir) in reason
    assert "expected model.safetensors or model.pt" in reason


def test_weights_that_do_not_fit_the_config_are_reported(tmp_path: Path) -> None:
    model_dir = add_model(tmp_path, "m")
    (model_dir / "config.json").write_text(json.dumps({**CONFIG_DICT, "mlp_hidden_dim": 16}))
    reason = ModelRepository.load(tmp_path).failed["m"].reason
    assert str(model_dir / "model.safetensors") in reason
    assert "'hidden_linears.0.bias' has shape [8], the config needs [16]" in reason


def test_folder_with_an_invalid_model_name_is_reported(tmp_path: Path) -> None:
    (tmp_path / "two words").mkdir()
    assert "invalid model name" in ModelRepository.load(tmp_path).failed["two words"].reason


def test_hidden_folders_and_loose_files_are_not_models(tmp_path: Path) -> None:
    add_model(tmp_path, "m")
    (tmp_path / ".git").mkdir()
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "README.md").write_text("models")
    repo = ModelRepository.load(tmp_path)
    assert repo.names() == ["m"]


def test_loaded_model_facts(tmp_path: Path) -> None:
    model_dir = add_model(tmp_path, "m", seed=2)
    model = ModelRepository.load(tmp_path).get("m")
    assert model.name == "m"
    assert model.path == model_dir
    assert model.config == CONFIG
    assert model.weights_format == "safetensors"
    assert model.weights_path == model_dir / "model.safetensors"
    assert model.parameter_count == 8 * 1 + 8 + 2 * (8 * 8 + 8) + 4 * 8 + 4
    assert not model.module.training
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in model.module.parameters())
    assert torch.equal(model.module.out_linear.weight, CONFIG.build(seed=2).out_linear.weight)


def test_pt_weights_are_served_too(tmp_path: Path) -> None:
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(CONFIG_DICT))
    torch.save(CONFIG.build(seed=0).state_dict(), model_dir / "model.pt")
    model = ModelRepository.load(tmp_path).get("m")
    assert model.weights_format == "pt"
    # The hash is over content, not file bytes: the same model in safetensors hashes the same.
    assert model.content_hash == load_model(add_model(tmp_path / "other", "m")).content_hash


def test_missing_repository_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"model repository .*nowhere does not exist"):
        ModelRepository.load(tmp_path / "nowhere")


def test_repository_that_is_a_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "repo"
    path.write_text("")
    with pytest.raises(NotADirectoryError, match=r"is not a directory"):
        ModelRepository.load(path)


# -- content hash ---------------------------------------------------------------


def test_content_hash_is_stable_across_loads(tmp_path: Path) -> None:
    add_model(tmp_path, "m", seed=1)
    first = ModelRepository.load(tmp_path).get("m").content_hash
    second = ModelRepository.load(tmp_path).get("m").content_hash
    assert first == second
    assert len(first) == 64
    int(first, 16)


def test_content_hash_changes_when_one_weight_changes(tmp_path: Path) -> None:
    model_dir = add_model(tmp_path, "m", seed=1)
    before = ModelRepository.load(tmp_path).get("m").content_hash
    state = read_weights(model_dir / "model.safetensors")
    weight = state["hidden_linears.1.weight"]
    weight[3, 4] = torch.nextafter(weight[3, 4], torch.tensor(float("inf")))  # one ulp
    save_safetensors(state, model_dir / "model.safetensors")
    assert ModelRepository.load(tmp_path).get("m").content_hash != before


def test_content_hash_covers_config_and_dtype() -> None:
    state = CONFIG.build(seed=0).state_dict()
    base = content_hash(CONFIG, state)
    other_config = ModelConfig.from_dict({**CONFIG_DICT, "hidden_omega_0": 2.0})
    assert content_hash(other_config, state) != base
    assert content_hash(CONFIG, {k: v.double() for k, v in state.items()}) != base
    assert content_hash(CONFIG, dict(reversed(list(state.items())))) == base


# -- writing --------------------------------------------------------------------


def test_write_refuses_to_replace_without_force(tmp_path: Path) -> None:
    add_model(tmp_path, "m", seed=0)
    with pytest.raises(FileExistsError, match=r"--force"):
        add_model(tmp_path, "m", seed=1)
    model_dir = write_model(tmp_path, "m", CONFIG, CONFIG.build(seed=1).state_dict(), force=True)
    assert torch.equal(load_model(model_dir).module.out_linear.weight, CONFIG.build(seed=1).out_linear.weight)


def test_forced_write_removes_a_stale_pt(tmp_path: Path) -> None:
    model_dir = add_model(tmp_path, "m")
    torch.save(CONFIG.build(seed=9).state_dict(), model_dir / "model.pt")
    write_model(tmp_path, "m", CONFIG, CONFIG.build(seed=0).state_dict(), force=True)
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.json", "model.safetensors"]


@pytest.mark.parametrize("name", ["", "../escape", "a/b", ".hidden", "-dash", "x" * 129])
def test_write_refuses_an_invalid_name(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match=r"invalid model name"):
        add_model(tmp_path, name)
    assert list(tmp_path.iterdir()) == []
