"""The layer hashes of a group's member, from the tensors of the layer it came from.

See ``kernelgen_wire.layers``: the hash covers the layer's generator and mask
tensors by their keys relative to the layer, so it does not depend on the
prefix a training wrapper adds (``network.``, ``_orig_mod.``).

A member records the hash of its layer's tensors as saved and, where they
differ, as the layer holds them after any forward: the reference package clamps
a direct Gaussian mask's ``std_param`` and a learnable omega scale in place
before each forward, so a live network that ran once since its checkpoint was
saved holds the clamped values (and serves, from either, the same kernel).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from kernelgen_server.model.config import GaussianMaskSection, ModelConfig
from kernelgen_wire.layers import MASK, LayerTensor, covered, layer_hash, layer_of

__all__ = ["clamped_in_place", "layer_hashes", "layer_tensor", "source_layer_hashes"]


def layer_tensor(key: str, tensor: Tensor) -> LayerTensor:
    """One tensor as the layer hash reads it: its dtype's name and its raw bytes."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return LayerTensor(
        key,
        str(tensor.dtype).removeprefix("torch."),
        tuple(tensor.shape),
        flat.view(torch.uint8).numpy().tobytes(),
    )


def clamped_in_place(tensors: Mapping[str, Tensor], generator: str, config: ModelConfig) -> dict[str, Tensor]:
    """A layer's tensors (keys relative to the layer) after the in-place clamps of a forward.

    The clamps are the reference's: ``clamp_(min, max)`` on the tensor in its own
    dtype, of ``<generator>.positional_embedding.omega_0_scale`` to the scale's
    range and of a direct Gaussian mask's ``mask.std_param`` to ``[min_std,
    max_std]``; every other tensor is as given.
    """
    bounds: dict[str, tuple[float, float]] = {}
    if config.omega_0_scale_min is not None and config.omega_0_scale_max is not None:
        bounds[f"{generator}.positional_embedding.omega_0_scale"] = (
            config.omega_0_scale_min,
            config.omega_0_scale_max,
        )
    mask = config.mask
    if isinstance(mask, GaussianMaskSection) and mask.parametrization == "direct":
        bounds[f"{MASK}.std_param"] = (mask.min_std, mask.max_std)
    out = dict(tensors)
    for key, (low, high) in bounds.items():
        if key in out:
            out[key] = out[key].detach().clone().clamp_(min=low, max=high)
    return out


def layer_hashes(tensors: Mapping[str, Tensor], generator: str, config: ModelConfig) -> tuple[str, ...]:
    """The hash of a layer's tensors (keys relative to the layer; those ``covered`` are hashed) as
    given and, when a forward's clamps change them, as clamped."""
    mine = {key: value for key, value in tensors.items() if covered(key, generator)}
    saved = layer_hash(layer_tensor(key, value) for key, value in mine.items())
    clamped = clamped_in_place(mine, generator, config)
    if all(torch.equal(clamped[key], value) for key, value in mine.items()):
        return (saved,)
    return (saved, layer_hash(layer_tensor(key, value) for key, value in clamped.items()))


def source_layer_hashes(state: Mapping[str, object], source: str, config: ModelConfig) -> tuple[str, ...]:
    """The layer hashes (``layer_hashes``) of the generator at checkpoint prefix ``source`` and its
    sibling mask; none when the generator sits at the checkpoint's root (it belongs to no layer)."""
    found = layer_of(source)
    if found is None:
        return ()
    layer, generator = found
    start = len(layer) + 1
    tensors = {
        key[start:]: value
        for key, value in state.items()
        if isinstance(value, Tensor) and key.startswith(f"{layer}.")
    }
    return layer_hashes(tensors, generator, config)
