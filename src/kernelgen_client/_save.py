"""Writing a generated kernel to ``.npy`` or ``.safetensors`` (no extra dependency).

``.safetensors`` keeps the wire dtype exactly, bfloat16 included (its raw
bits); ``.npy`` has no bfloat16, so a bfloat16 kernel is saved as the float32
numpy array the client decoded it to.

A group's kernels go into one ``.safetensors`` file, one tensor per member
named by its model (``vision-net/0``, ...).

A factored kernel is saved as its dense kernel (float32), unless ``factors``
is asked: then ``.safetensors`` holds ``factors`` (as they travelled),
``head.weight_t`` and ``head.bias`` (the output head's ``weight_t`` and
``bias``), with ``kernel = factors @ head.weight_t + head.bias``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

from kernelgen_client.factored import FactoredKernel
from kernelgen_client.results import KernelResult

__all__ = ["SUFFIXES", "save_group", "save_kernel"]

SUFFIXES = (".npy", ".safetensors")
_Entry = tuple[str, tuple[int, ...], bytes | memoryview]  # (safetensors dtype, shape, raw bytes)
_SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def _safetensors(path: Path, tensors: dict[str, _Entry], meta: dict[str, str]) -> None:
    """The safetensors layout: u64 header length, JSON header (8-byte aligned), raw data."""
    header: dict[str, Any] = {"__metadata__": meta}
    offset = 0
    for name, (dtype, shape, data) in tensors.items():
        size = memoryview(data).nbytes
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for _dtype, _shape, data in tensors.values():
            f.write(data)


def save_kernel(
    path: Path, result: KernelResult[Any], meta: dict[str, str], *, factors: bool = False
) -> None:
    """Save ``result.kernel`` (and ``result.grid`` for safetensors) by the file's suffix.

    ``factors``: save a factored kernel's factors and output head instead (``.safetensors`` only).
    """
    suffix = path.suffix.lower()
    factored = result.kernel if isinstance(result.kernel, FactoredKernel) else None
    if factors and (factored is None or suffix != ".safetensors"):
        raise ValueError("factors are saved from a factored kernel into a .safetensors file")
    if suffix == ".npy":
        np.save(path, result.kernel if factored is None else factored.dense(), allow_pickle=False)
    elif suffix == ".safetensors":
        tensors: dict[str, _Entry]
        if factored is None or not factors:
            tensors = {"kernel": _dense_entry(result)}
        else:
            output_head = factored.output_head
            factors_shape = tuple(int(n) for n in factored.factors.shape)
            tensors = {
                "factors": (_SAFETENSORS_DTYPES[result.wire_dtype], factors_shape, result.raw),
                "head.weight_t": ("F32", tuple(output_head.weight_t.shape), output_head.weight_t.tobytes()),
            }
            if output_head.bias is not None:
                tensors["head.bias"] = ("F32", tuple(output_head.bias.shape), output_head.bias.tobytes())
            meta = {**meta, "head_hash": output_head.head_hash}
        if result.grid is not None:
            grid = np.ascontiguousarray(result.grid, dtype="<f4")
            tensors["grid"] = ("F32", tuple(grid.shape), grid.tobytes())
        _safetensors(path, tensors, meta)
    else:
        raise ValueError(f"--out must end in {' or '.join(SUFFIXES)}, got {path.name!r}")


def _dense_entry(result: KernelResult[Any]) -> _Entry:
    """A result's dense kernel as it travelled, or (factored) materialised as float32."""
    if isinstance(result.kernel, FactoredKernel):
        dense = np.ascontiguousarray(result.kernel.dense(), dtype="<f4")
        return ("F32", tuple(dense.shape), dense.data.cast("B"))
    return (_SAFETENSORS_DTYPES[result.wire_dtype], result.shape, result.raw)


def save_group(path: Path, results: dict[str, KernelResult[Any]], meta: dict[str, str]) -> None:
    """Save a group's kernels into one ``.safetensors`` file, each under its member's model name."""
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"a group's kernels are saved into a .safetensors file, got {path.name!r}")
    _safetensors(path, {name: _dense_entry(result) for name, result in results.items()}, meta)
