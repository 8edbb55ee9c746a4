"""config.json: the strict schema, the architecture rules it borrows from the model, file errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from kernelgen_server.model.config import ConfigError, ModelConfig

BASE: dict[str, Any] = {
    "out_dim": 4,
    "data_dim": 2,
    "mlp_hidden_dim": 8,
    "num_layers": 3,
    "embedding_dim": 8,
    "omega_0": 10.0,
    "L_cache": 5,
    "use_bias": True,
}


def write_config(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    return path


def test_defaults_and_derived_facts() -> None:
    config = ModelConfig.from_dict(BASE)
    assert config.hidden_omega_0 == 1.0
    assert config.film_after_pos_embed is False
    assert config.film is None
    assert config.cond_dim is None
    assert config.cache_lens == (5, 5)


def test_film_section_and_per_axis_cache() -> None:
    config = ModelConfig.from_dict({**BASE, "data_dim": 3, "L_cache": [4, 8, 6], "film": {"cond_dim": 7}})
    assert config.film is not None
    assert config.film.film_hidden_dim == 64
    assert config.cond_dim == 7
    assert config.cache_lens == (4, 8, 6)
    assert config.L_cache == (4, 8, 6)  # stored immutable: the config is hashable
    assert hash(config) == hash(ModelConfig.from_dict(config.to_json_dict()))


def test_integer_json_number_is_accepted_for_a_float() -> None:
    config = ModelConfig.from_dict({**BASE, "omega_0": 30})
    assert isinstance(config.omega_0, float)
    assert config.omega_0 == 30.0


def test_json_dict_round_trip_holds_every_field(tmp_path: Path) -> None:
    config = ModelConfig.from_dict({**BASE, "film": {"cond_dim": 3, "film_hidden_dim": 6}})
    data = config.to_json_dict()
    assert set(data) == {
        "out_dim",
        "data_dim",
        "mlp_hidden_dim",
        "num_layers",
        "embedding_dim",
        "omega_0",
        "L_cache",
        "use_bias",
        "hidden_omega_0",
        "film_after_pos_embed",
        "film",
    }
    assert data["film"] == {"cond_dim": 3, "film_hidden_dim": 6}
    assert ModelConfig.from_file(write_config(tmp_path, data)) == config
    # The canonical text is independent of the order keys were written in.
    shuffled = ModelConfig.from_dict(dict(reversed(list(data.items()))))
    assert shuffled.canonical_json() == config.canonical_json()


def test_build_makes_the_described_module() -> None:
    config = ModelConfig.from_dict(
        {**BASE, "film": {"cond_dim": 3, "film_hidden_dim": 6}, "film_after_pos_embed": True}
    )
    module = config.build(seed=0)
    assert module.out_linear.out_features == 4
    assert len(module.hidden_linears) == 2
    assert module.cond_dim == 3
    assert module.film_after_pos_embed is True
    assert module.L_cache == config.cache_lens


def test_build_seed_is_reproducible_and_leaves_global_rng_alone() -> None:
    config = ModelConfig.from_dict(BASE)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a, b, c = config.build(seed=5), config.build(seed=5), config.build(seed=6)
    assert torch.equal(torch.rand(3), expected_next)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key])
    assert not torch.equal(a.out_linear.weight, c.out_linear.weight)


# Each invalid config is refused with a message that names the file and the key at fault.
INVALID: dict[str, tuple[dict[str, Any], str]] = {
    "bool-for-int": ({"out_dim": True}, "out_dim"),
    "string-for-int": ({"mlp_hidden_dim": "8"}, "mlp_hidden_dim"),
    "float-for-int": ({"num_layers": 3.0}, "num_layers"),
    "string-for-float": ({"omega_0": "10"}, "omega_0"),
    "int-for-bool": ({"use_bias": 1}, "use_bias"),
    "l-cache-bool": ({"L_cache": True}, "L_cache"),
    "l-cache-bool-entry": ({"L_cache": [5, False]}, "L_cache"),
    "l-cache-wrong-length": ({"L_cache": [5, 5, 5]}, "L_cache"),
    "l-cache-too-small": ({"L_cache": [5, 1]}, "L_cache[1]"),
    "too-few-layers": ({"num_layers": 1}, "num_layers"),
    "zero-out-dim": ({"out_dim": 0}, "out_dim"),
    "zero-data-dim": ({"data_dim": 0}, "data_dim"),
    "negative-omega": ({"omega_0": -1.0}, "omega_0"),
    "zero-hidden-omega": ({"hidden_omega_0": 0.0}, "hidden_omega_0"),
    "unknown-key": ({"dropout": 0.1}, "dropout"),
    "unknown-film-key": ({"film": {"cond_dim": 3, "gain": 2}}, "film.gain"),
    "film-missing-cond-dim": ({"film": {"film_hidden_dim": 6}}, "film.cond_dim"),
    "film-zero-cond-dim": ({"film": {"cond_dim": 0}}, "cond_dim"),
    "film-not-an-object": ({"film": 3}, "film"),
    "film-after-pos-embed-without-film": ({"film_after_pos_embed": True}, "film_after_pos_embed"),
    "film-after-pos-embed-width-mismatch": (
        {"film_after_pos_embed": True, "film": {"cond_dim": 3}, "embedding_dim": 4},
        "embedding_dim == mlp_hidden_dim",
    ),
}


@pytest.mark.parametrize(("patch", "key"), INVALID.values(), ids=INVALID.keys())
def test_invalid_config_is_refused_naming_file_and_key(
    tmp_path: Path, patch: dict[str, Any], key: str
) -> None:
    path = write_config(tmp_path, {**BASE, **patch})
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_file(path)
    assert str(path) in str(info.value)
    assert key in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_required_key_is_named(tmp_path: Path) -> None:
    path = write_config(tmp_path, {k: v for k, v in BASE.items() if k != "embedding_dim"})
    with pytest.raises(ConfigError, match=r"missing key 'embedding_dim'") as info:
        ModelConfig.from_file(path)
    assert str(path) in str(info.value)


def test_nan_omega_in_json_text_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(BASE).replace('"omega_0": 10.0', '"omega_0": NaN'))
    with pytest.raises(ConfigError, match=r"omega_0 must be a finite number"):
        ModelConfig.from_file(path)


def test_config_that_is_not_json_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text("{out_dim: 4")
    with pytest.raises(ConfigError, match=r"invalid config: .*Invalid JSON") as info:
        ModelConfig.from_file(path)
    assert str(path) in str(info.value)


def test_config_that_is_not_an_object_is_refused(tmp_path: Path) -> None:
    path = write_config(tmp_path, [BASE])
    with pytest.raises(ConfigError, match=r"object") as info:
        ModelConfig.from_file(path)
    assert str(path) in str(info.value)


def test_missing_config_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "config.json"
    with pytest.raises(ConfigError, match=r"cannot read config") as info:
        ModelConfig.from_file(path)
    assert str(path) in str(info.value)
