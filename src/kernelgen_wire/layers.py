"""A trained network's layer, as both ends identify it: its hash over the tensors it holds.

A group's member is the kernel generator of one layer of a trained network
(a ``CKConvND``-like module holding the generator and, optionally, its mask).
The layer hash is what the importer or exporter records for the member, and
what a client recomputes from the live network before it points the layer at
the server: a layer whose weights changed since then no longer matches.

The hash covers the layer's ``<generator>.*`` and ``mask.*`` tensors, by their
keys relative to the layer, in sorted order; each as its key, dtype name,
shape and raw little-endian bytes, every field length-prefixed (so that no two
different sets of tensors give one byte stream).
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["CAUSAL", "MASK", "LayerTensor", "covered", "layer_hash", "layer_of", "plain_path"]

#: The attribute of a layer that holds its mask (beside its generator).
MASK = "mask"
#: The attribute of a layer that says its kernel is cropped causally (a ``CKConvND``'s flag).
CAUSAL = "is_causal"
#: The part of a module path that ``torch.compile`` adds: the wrapped module's attribute.
_COMPILED = re.compile(r"(^|\.)_orig_mod(?=\.|$)")


def plain_path(path: str) -> str:
    """A module path without what ``torch.compile`` adds (``_orig_mod``): both ends name layers so."""
    return _COMPILED.sub("", path).strip(".")


@dataclass(frozen=True)
class LayerTensor:
    """One tensor of a layer: its key relative to the layer, its dtype name (``"float32"``), shape, bytes."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    data: bytes | memoryview


def layer_of(source: str) -> tuple[str, str] | None:
    """``(layer path, generator attribute)`` of a member's source (``a.b.kernel``: ``("a.b", "kernel")``).

    None for a generator at a checkpoint's root, which belongs to no layer.
    """
    layer, dot, attribute = source.rpartition(".")
    return (layer, attribute) if dot and layer and attribute else None


def covered(key: str, generator: str) -> bool:
    """Whether a layer-relative key belongs to the layer hash: the generator's or the mask's."""
    return key.startswith(f"{generator}.") or key.startswith(f"{MASK}.")


def layer_hash(tensors: Iterable[LayerTensor]) -> str:
    """sha256 (hex) of a layer's tensors, in key order."""
    h = hashlib.sha256()

    def field(data: bytes | memoryview) -> None:
        h.update(struct.pack("<Q", len(data)))
        h.update(data)

    field(b"kernelgen-layer/1")
    for tensor in sorted(tensors, key=lambda t: t.key):
        field(tensor.key.encode())
        field(tensor.dtype.encode())
        field(",".join(map(str, tensor.shape)).encode())
        field(memoryview(tensor.data).cast("B"))
    return h.hexdigest()
