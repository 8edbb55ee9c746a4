"""config.json for served models (generator type, mask, causal) and their strict loading.

A config without ``kernel``, ``mask`` and ``causal`` is today's model, byte for
byte; every mistake is refused with one line naming the file and the key; the
repository loads the new types strictly and refuses, with the reason, those the
serving engine does not compute yet.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import reference_network
import torch

from kernelgen_server.engine.kernel_engine import KernelEngine
from kernelgen_server.model.config import ConfigError, ModelConfig
from kernelgen_server.model.masks import gaussian_std_bounds
from kernelgen_server.model.served import ServedModel
from kernelgen_server.repository.checkpoint import CheckpointError, save_safetensors
from kernelgen_server.repository.store import ModelRepository, content_hash, load_model, write_model

BASE: dict[str, Any] = {
    "out_dim": 4,
    "data_dim": 2,
    "mlp_hidden_dim": 8,
    "num_layers": 3,
    "embedding_dim": 8,
    "omega_0": 10.0,
    "L_cache": [5, 6],
    "use_bias": True,
}
GAUSSIAN = {"type": "GaussianModulationND", "data_dim": 2, "num_channels": 4}
LEARNABLE = {**BASE, "kernel": "LearnableOmegaSIRENKernelND"}
BLOCKS = {key: value for key, value in BASE.items() if key != "omega_0"}
BLOCKS.update(kernel="BlockDiagonalMultiOmegaSIRENKernelND", num_blocks=2)


def write_config(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    return path


def test_a_config_without_the_new_keys_is_today_s_model() -> None:
    plain = ModelConfig.from_dict(BASE)
    spelled = ModelConfig.from_dict({**BASE, "kernel": "SIRENKernelND", "causal": False, "mask": None})
    assert plain == spelled
    assert plain.canonical_json() == spelled.canonical_json()
    assert not {"kernel", "mask", "causal"} & set(plain.to_json_dict())
    tensors = plain.build(seed=0).state_dict()
    assert content_hash(plain, tensors) == content_hash(spelled, tensors)
    model = plain.build(seed=0)
    assert model.kind == "SIRENKernelND" and model.mask is None and not model.causal


def test_the_canonical_form_names_the_new_keys_when_they_are_not_the_defaults() -> None:
    config = ModelConfig.from_dict(
        {**BASE, "data_dim": 1, "L_cache": 9, "causal": True, "mask": GAUSSIAN | {"data_dim": 1}}
    )
    data = config.to_json_dict()
    assert data["causal"] is True and "kernel" not in data
    low, high = gaussian_std_bounds(2 * 9 - 1)
    assert data["mask"] == {
        **GAUSSIAN,
        "data_dim": 1,
        "parametrization": "direct",
        "min_std": low,
        "max_std": high,
        "init_extent": 1.0,
    }
    assert ModelConfig.from_dict(data) == config  # the stored bounds read back as the same config


def test_gaussian_bounds_follow_the_layer_s_grid_size_and_may_be_given_either_way() -> None:
    by_grid = ModelConfig.from_dict(
        {**BASE, "mask": GAUSSIAN | {"grid_size": 21, "min_attenuation_at_step": 0.2}}
    )
    assert by_grid.mask is not None
    low, high = gaussian_std_bounds(21, 0.2)
    assert (by_grid.mask.min_std, by_grid.mask.max_std) == (low, high)
    default = ModelConfig.from_dict({**BASE, "mask": GAUSSIAN})
    assert default.mask is not None
    assert (default.mask.min_std, default.mask.max_std) == gaussian_std_bounds(
        2 * 6 - 1
    )  # 2 max(L_cache) - 1


def test_each_variant_takes_its_own_arguments_and_the_reference_defaults() -> None:
    config = ModelConfig.from_dict(BLOCKS)
    assert (config.omega_0_min, config.omega_0_max, config.schedule, config.off_block_scale) == (
        1.0,
        12.0,
        "linear",
        0.1,
    )
    assert config.omega_0 is None and "omega_0" not in config.to_json_dict()
    learnable = ModelConfig.from_dict(LEARNABLE)
    assert (learnable.omega_0_scale_min, learnable.omega_0_scale_max) == (1e-2, 2.0)


INVALID: dict[str, tuple[dict[str, Any], str]] = {
    "unknown-kernel": ({**BASE, "kernel": "FourierKernelND"}, "kernel"),
    "unknown-mask": ({**BASE, "mask": {**GAUSSIAN, "type": "HannModulationND"}}, "mask.type"),
    "mask-channels": ({**BASE, "mask": {**GAUSSIAN, "num_channels": 5}}, "mask.num_channels"),
    "mask-data-dim": ({**BASE, "mask": {**GAUSSIAN, "data_dim": 1}}, "mask.data_dim"),
    "mask-clamps-out-of-order": ({**BASE, "mask": {**GAUSSIAN, "min_std": 2.0, "max_std": 1.0}}, "min_std"),
    "mask-clamps-two-ways": (
        {**BASE, "mask": {**GAUSSIAN, "min_std": 0.1, "max_std": 1.0, "grid_size": 9}},
        "grid_size",
    ),
    "mask-unknown-key": (
        {**BASE, "mask": {**GAUSSIAN, "sharpness": 2.0}},
        "'mask.sharpness'",
    ),
    "mask-parametrization": ({**BASE, "mask": {**GAUSSIAN, "parametrization": "exp"}}, "parametrization"),
    "mask-attenuation": (
        {**BASE, "mask": {**GAUSSIAN, "min_attenuation_at_step": 1.5}},
        "min_attenuation_at_step",
    ),
    "scale-clamps-out-of-order": (
        {**LEARNABLE, "omega_0_scale_min": 2.0, "omega_0_scale_max": 1.0},
        "omega_0_scale_max",
    ),
    "scale-init-out-of-range": ({**LEARNABLE, "omega_0_scale_init": 3.0}, "omega_0_scale_init"),
    "schedule-out-of-order": ({**BLOCKS, "omega_0_min": 5.0, "omega_0_max": 2.0}, "omega_0_max"),
    "blocks-do-not-divide": ({**BLOCKS, "num_blocks": 3}, "num_blocks"),
    "foreign-argument": ({**BLOCKS, "omega_0": 3.0}, "omega_0"),
    "missing-own-argument": ({**BASE, "kernel": "RandomFourierKernelND"}, "nonlinearity"),
    "film-for-fourier": (
        {**BASE, "kernel": "RandomFourierKernelND", "nonlinearity": "gelu", "film": {"cond_dim": 2}},
        "film",
    ),
    "unknown-nonlinearity": (
        {**BASE, "kernel": "RandomFourierKernelND", "nonlinearity": "swish"},
        "nonlinearity",
    ),
    "causal-2d": ({**BASE, "causal": True}, "causal"),
    "causal-not-bool": ({**BASE, "data_dim": 1, "L_cache": 5, "causal": 1}, "causal"),
    "film-after-pos-embed-without-film": ({**BASE, "film_after_pos_embed": True}, "film_after_pos_embed"),
}


@pytest.mark.parametrize(("data", "key"), INVALID.values(), ids=INVALID.keys())
def test_invalid_config_is_refused_naming_file_and_key(
    tmp_path: Path, data: dict[str, Any], key: str
) -> None:
    path = write_config(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_file(path)
    message = str(info.value)
    assert str(path) in message and key in message and "\n" not in message


def test_film_after_pos_embed_without_film_says_why() -> None:
    with pytest.raises(ConfigError, match=r"nothing to modulate.*set film_after_pos_embed to false"):
        ModelConfig.from_dict({**BASE, "film_after_pos_embed": True})


# -- loading -----------------------------------------------------------------------------------


def _write(
    root: Path, name: str, data: dict[str, Any], seed: int = 0
) -> tuple[Path, dict[str, torch.Tensor]]:
    config = ModelConfig.from_dict(data)
    tensors = config.build(seed=seed).state_dict()
    return write_model(root, name, config, tensors), tensors


MASKED = {**BASE, "mask": GAUSSIAN}


def test_a_masked_model_loads_strictly_and_is_the_served_model(tmp_path: Path) -> None:
    folder, tensors = _write(tmp_path, "masked", MASKED)
    loaded = load_model(folder)
    assert isinstance(loaded.module, ServedModel) and loaded.module.mask is not None
    assert set(loaded.module.state_dict()) == set(tensors) and "mask.std_param" in tensors
    assert (loaded.module.out_dim, loaded.module.data_dim, loaded.module.L_cache) == (4, 2, (5, 6))
    with torch.no_grad():
        kernel, _ = loaded.module((3, 4))
        plain, _ = loaded.module.generator((3, 4))
    assert not torch.equal(kernel, plain)  # the mask is applied


@pytest.mark.parametrize(
    ("edit", "key", "what"),
    [
        (lambda t: t.pop("mask.std_param"), "mask.std_param", "missing"),
        (lambda t: t.update({"mask.weight": torch.zeros(2, 4)}), "mask.weight", "unexpected"),
        (lambda t: t.update({"mask.std_param": torch.zeros(4, 2)}), "mask.std_param", "shape"),
    ],
    ids=["missing", "unexpected", "misshaped"],
)
def test_a_tensor_that_does_not_fit_is_named_with_its_file(
    tmp_path: Path, edit: Any, key: str, what: str
) -> None:
    folder, tensors = _write(tmp_path, "masked", MASKED)
    tensors = dict(tensors)
    edit(tensors)
    save_safetensors(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError) as info:
        load_model(folder)
    assert key in str(info.value) and what in str(info.value) and "model.safetensors" in str(info.value)


def test_a_learnable_omega_scale_of_the_wrong_shape_is_named(tmp_path: Path) -> None:
    folder, tensors = _write(tmp_path, "learnable", LEARNABLE)
    save_safetensors(
        {**tensors, "positional_embedding.omega_0_scale": torch.ones(7)}, folder / "model.safetensors"
    )
    with pytest.raises(CheckpointError, match=r"positional_embedding\.omega_0_scale"):
        load_model(folder)


def test_the_repository_serves_every_generator_mask_and_crop(tmp_path: Path) -> None:
    _write(tmp_path, "masked", MASKED)
    _write(tmp_path, "learnable", LEARNABLE)
    _write(tmp_path, "causal", {**BASE, "data_dim": 1, "L_cache": 7, "causal": True})
    _write(tmp_path, "blocks", BLOCKS)
    _write(tmp_path, "plain", BASE)
    repository = ModelRepository.load(tmp_path)
    assert set(repository.ready) == {"masked", "learnable", "causal", "blocks", "plain"}, repository.failed
    assert repository.ready["masked"].module.mask is not None
    assert repository.ready["causal"].module.causal


def test_the_engine_serves_a_block_diagonal_multi_omega_model_as_its_forward(tmp_path: Path) -> None:
    folder, _ = _write(tmp_path, "blocks", {**BLOCKS, "film": {"cond_dim": 3}})
    model = load_model(folder)
    engine = KernelEngine(model.module)
    conditioning = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain, _ = model.module((4, 6))
        conditioned, _ = model.module((4, 6), conditioning)
    torch.testing.assert_close(engine.unconditioned((4, 6)), plain, rtol=0, atol=2e-6)
    torch.testing.assert_close(engine.conditioned((4, 6), [conditioning]), conditioned, rtol=0, atol=2e-6)


def test_the_reference_network_trains_out_of_range_and_saves_a_lightning_checkpoint(tmp_path: Path) -> None:
    network, _ = reference_network.trained_network(steps=2)
    assert reference_network.clamped_out_of_range(network) > 0
    path = reference_network.save_lightning(network, tmp_path / "net.ckpt", compiled=True)
    saved = torch.load(path, weights_only=True)
    prefix = "network._orig_mod.blocks.0.mixer.global_conv."
    assert f"{prefix}mask.std_param" in saved["state_dict"]
    assert f"{prefix}kernel.positional_embedding.linear.weight" in saved["state_dict"]
