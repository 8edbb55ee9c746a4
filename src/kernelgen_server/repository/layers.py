"""The layer hash of a group's member, from the tensors of the training checkpoint it came from.

See ``kernelgen_wire.layers``: the hash covers the layer's generator and mask
tensors by their keys relative to the layer, so it does not depend on the
prefix a training wrapper adds (``network.``, ``_orig_mod.``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from kernelgen_wire.layers import LayerTensor, covered, layer_hash, layer_of

__all__ = ["layer_tensor", "source_layer_hash"]


def layer_tensor(key: str, tensor: Tensor) -> LayerTensor:
    """One tensor as the layer hash reads it: its dtype's name and its raw bytes."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return LayerTensor(
        key,
        str(tensor.dtype).removeprefix("torch."),
        tuple(tensor.shape),
        flat.view(torch.uint8).numpy().tobytes(),
    )


def source_layer_hash(state: Mapping[str, object], source: str) -> str:
    """The layer hash of the generator at checkpoint prefix ``source`` and its sibling mask; '' when
    the generator sits at the checkpoint's root (it belongs to no layer)."""
    found = layer_of(source)
    if found is None:
        return ""
    layer, generator = found
    start = len(layer) + 1
    tensors = [
        layer_tensor(key[start:], value)
        for key, value in state.items()
        if isinstance(value, Tensor) and key.startswith(f"{layer}.") and covered(key[start:], generator)
    ]
    return layer_hash(tensors)
