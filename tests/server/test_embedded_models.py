"""The models shipped in the package: they load, have the documented configs, and respond to FiLM."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch

from kernelgen_server.repository.store import ModelRepository, embedded_repository

ROOT = Path(__file__).resolve().parents[2]

EXPECTED: dict[str, dict[str, Any]] = {
    "hyena-2d": {
        "out_dim": 384,
        "data_dim": 2,
        "mlp_hidden_dim": 32,
        "num_layers": 3,
        "embedding_dim": 32,
        "omega_0": 10.0,
        "L_cache": 15,
        "use_bias": True,
        "hidden_omega_0": 1.0,
        "film_after_pos_embed": False,
        "film": {"cond_dim": 384, "film_hidden_dim": 64},
    },
    "long-1d": {
        "out_dim": 256,
        "data_dim": 1,
        "mlp_hidden_dim": 32,
        "num_layers": 4,
        "embedding_dim": 32,
        "omega_0": 30.0,
        "L_cache": 4096,
        "use_bias": True,
        "hidden_omega_0": 1.0,
        "film_after_pos_embed": False,
        "film": None,
    },
    "volume-3d": {
        "out_dim": 32,
        "data_dim": 3,
        "mlp_hidden_dim": 32,
        "num_layers": 3,
        "embedding_dim": 32,
        "omega_0": 10.0,
        "L_cache": [4, 8, 8],
        "use_bias": False,
        "hidden_omega_0": 1.0,
        "film_after_pos_embed": True,
        "film": {"cond_dim": 16, "film_hidden_dim": 32},
    },
}


def test_embedded_repository_lives_in_the_package() -> None:
    import kernelgen_server

    assert embedded_repository() == Path(kernelgen_server.__file__).resolve().parent / "models"


def test_exactly_the_three_models_load(embedded_models: ModelRepository) -> None:
    assert dict(embedded_models.failed) == {}
    assert sorted(embedded_models.ready) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_is_as_documented(embedded_models: ModelRepository, name: str) -> None:
    model = embedded_models.get(name)
    assert model.config.to_json_dict() == EXPECTED[name]
    assert model.weights_format == "safetensors"


@pytest.mark.parametrize("name", ["hyena-2d", "volume-3d"])
def test_conditioning_visibly_changes_the_kernel(embedded_models: ModelRepository, name: str) -> None:
    model = embedded_models.get(name)
    assert model.config.cond_dim is not None
    conditioning = torch.randn(2, model.config.cond_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain, _ = model.module(3)
        modulated, _ = model.module(3, conditioning)
    scale = plain.abs().max()
    assert modulated.shape[0] == 2
    # Each conditioning moves the kernel away from the plain one, and the two apart.
    assert (modulated[0] - plain[0]).abs().max() > 0.05 * scale
    assert (modulated[1] - plain[0]).abs().max() > 0.05 * scale
    assert (modulated[0] - modulated[1]).abs().max() > 0.05 * scale


def test_long_1d_serves_its_full_cache_length(embedded_models: ModelRepository) -> None:
    with torch.no_grad():
        kernel, grid = embedded_models.get("long-1d").module(4096)
    assert kernel.shape == (1, 2 * 4096 - 1, 256)
    assert grid[0, 0, 0] == -1.0
    assert grid[0, -1, 0] == 1.0
    assert torch.isfinite(kernel).all()


def test_the_script_regenerates_the_committed_models(
    embedded_models: ModelRepository, tmp_path: Path
) -> None:
    spec = importlib.util.spec_from_file_location(
        "make_embedded_models", ROOT / "scripts/make_embedded_models.py"
    )
    assert spec is not None
    assert spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--out", str(tmp_path)]) == 0
    regenerated = ModelRepository.load(tmp_path)
    assert sorted(regenerated.ready) == sorted(EXPECTED)
    for name, model in embedded_models.ready.items():
        assert regenerated.get(name).content_hash == model.content_hash, name
        assert (tmp_path / name / "config.json").read_bytes() == (model.path / "config.json").read_bytes()
