"""Reading, checking and writing the weights of one model.

Two formats are read: ``model.safetensors`` (preferred) and ``model.pt``, a
torch ``state_dict`` read with ``torch.load(weights_only=True)`` only, never a
full unpickle. Both must hold a flat mapping of ``str -> Tensor`` whose keys,
shapes and values match the module the config describes exactly; every refusal
is a ``CheckpointError`` whose message names the file and the key. Only
safetensors are written.

Training checkpoints (``kernelgen import``) may wrap the state under
``"state_dict"``, hold the kernel under a prefix, and use the legacy
``kernel_network.{2*i}`` names; ``extract_kernel_state`` undoes all three.
``read_training_checkpoint`` reads every format a training run leaves: a
``.pt``/``.ckpt`` torch file (``weights_only=True``), a ``.safetensors``
file, sharded safetensors with their index JSON, or a folder holding one of
those; ``training_state`` unwraps and flattens what it read.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from kernelgen_server.model.config import ModelConfig
from kernelgen_server.model.served import ServedModel

__all__ = [
    "ACCEPTED_DTYPES",
    "WEIGHT_FILES",
    "CheckpointError",
    "check_state",
    "extract_kernel_state",
    "find_weights",
    "load_module",
    "read_checkpoint",
    "read_training_checkpoint",
    "read_weights",
    "save_safetensors",
    "training_state",
]

#: Weight file names in order of preference.
WEIGHT_FILES = ("model.safetensors", "model.pt")

#: The index of sharded safetensors, as ``save_pretrained`` and ``save_torch_state_dict`` name it.
SHARD_INDEX_SUFFIX = ".safetensors.index.json"

#: Stored dtypes that are accepted; every one is converted to float32 for serving.
ACCEPTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_LEGACY_HIDDEN = re.compile(r"kernel_network\.(\d+)\.(weight|bias)")


class CheckpointError(ValueError):
    """Weights that cannot be read or do not fit the model; names the file and the key at fault."""

    def __init__(self, path: Path, detail: str, key: str | None = None) -> None:
        super().__init__(f"{path}: {detail}")
        self.path = path
        self.key = key
        self.detail = detail


# -- reading ------------------------------------------------------------------


def find_weights(model_dir: Path) -> Path:
    """The weights file of a model folder: ``model.safetensors`` if present, else ``model.pt``."""
    for name in WEIGHT_FILES:
        candidate = model_dir / name
        if candidate.is_file():
            return candidate
    raise CheckpointError(model_dir, f"no weights file: expected {' or '.join(WEIGHT_FILES)}")


def read_checkpoint(path: Path) -> Mapping[str, object]:
    """The top-level mapping of a ``.safetensors`` or ``.pt`` file, not yet checked for flatness."""
    try:
        if path.suffix == ".safetensors":
            return load_file(path, device="cpu")
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or hostile input: any failure is the file's fault
        raise CheckpointError(path, f"cannot read weights: {_first_line(exc)}") from exc
    if not isinstance(obj, Mapping):
        raise CheckpointError(path, f"expected a mapping of names to tensors, found a {type(obj).__name__}")
    return obj


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_training_checkpoint(path: Path) -> Mapping[str, object]:
    """The top-level mapping of a training checkpoint in any of the formats training runs leave.

    ``path`` is a ``.safetensors`` file, an index of sharded safetensors
    (``*.safetensors.index.json``, whose ``weight_map`` names each key's shard
    beside it), a folder holding such an index or one ``.safetensors`` file, or
    anything else torch saved (``.pt``, ``.ckpt``, ``.pth``, ``.bin``), read
    with ``torch.load(weights_only=True)`` only. Any failure is a
    ``CheckpointError`` naming the file at fault (a shard, the index).
    """
    if path.is_dir():
        path = _checkpoint_in_folder(path)
    if path.name.endswith(SHARD_INDEX_SUFFIX):
        return _read_sharded(path)
    if not path.is_file():
        raise CheckpointError(path, "no such checkpoint file")
    return read_checkpoint(path)


def _checkpoint_in_folder(folder: Path) -> Path:
    indexes = sorted(folder.glob(f"*{SHARD_INDEX_SUFFIX}"))
    if len(indexes) == 1:
        return indexes[0]
    singles = sorted(folder.glob("*.safetensors"))
    if not indexes and len(singles) == 1:
        return singles[0]
    found = [p.name for p in (indexes if len(indexes) > 1 else singles)]
    detail = f"found {', '.join(map(repr, found))}" if found else "found neither"
    raise CheckpointError(
        folder, f"expected one *{SHARD_INDEX_SUFFIX} or one *.safetensors in the folder; {detail}"
    )


def _read_sharded(index: Path) -> dict[str, Tensor]:
    """The tensors of every shard an index names, each shard holding exactly the keys mapped to it."""
    try:
        document = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(index, f"cannot read the shard index: {_first_line(exc)}") from None
    weight_map = document.get("weight_map") if isinstance(document, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(index, "the shard index has no 'weight_map' of tensor names to shard files")
    shards: dict[str, set[str]] = {}
    for key, shard in weight_map.items():
        # A shard is a file beside the index: no folders, no way out of the checkpoint's folder.
        if not isinstance(shard, str) or not _SHARD_NAME.fullmatch(shard):
            detail = f"weight_map[{key!r}] is {shard!r}, not the name of a .safetensors file beside the index"
            raise CheckpointError(index, detail, key=key)
        shards.setdefault(shard, set()).add(key)
    tensors: dict[str, Tensor] = {}
    for shard, keys in sorted(shards.items()):
        shard_path = index.parent / shard
        if not shard_path.is_file():
            raise CheckpointError(shard_path, f"shard named by {index.name} does not exist")
        held = read_checkpoint(shard_path)
        missing = sorted(keys - held.keys())
        if missing:
            detail = f"the index maps {missing[0]!r} to this shard, which does not hold it"
            raise CheckpointError(shard_path, detail, key=missing[0])
        stray = sorted(str(k) for k in held.keys() - keys)
        if stray:
            detail = f"holds {stray[0]!r}, which the index {index.name} does not map to this shard"
            raise CheckpointError(shard_path, detail, key=stray[0])
        tensors.update((k, v) for k, v in held.items() if isinstance(v, Tensor))
    return tensors


_SHARD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*\.safetensors")


def training_state(raw: Mapping[str, object], path: Path) -> dict[str, object]:
    """A training checkpoint's entries under flat dotted names.

    A state wrapped under ``"state_dict"`` (Lightning) is unwrapped; nested
    mappings with string keys are flattened (``{"model": {"w": t}}`` gives
    ``"model.w"``), so a research script's ``{"model": ..., "optimizer": ...}``
    reads as one state. Entries under non-string keys (an optimizer's
    per-parameter state) are left out; other values are kept as they are. Two
    entries reaching one name are refused.
    """
    wrapped = raw.get("state_dict")
    state = wrapped if isinstance(wrapped, Mapping) else raw
    flat: dict[str, object] = {}

    def walk(mapping: Mapping[Any, object], parent: str) -> None:
        for key, value in mapping.items():
            if not isinstance(key, str):
                continue
            name = f"{parent}{key}"
            if isinstance(value, Mapping):
                walk(value, name + ".")
            elif name in flat:
                detail = f"two entries are named {name!r} once nesting is flattened"
                raise CheckpointError(path, detail, key=name)
            else:
                flat[name] = value

    walk(state, "")
    return flat


def read_weights(path: Path) -> dict[str, Tensor]:
    """A flat ``str -> Tensor`` mapping from a weights file."""
    raw = read_checkpoint(path)
    tensors: dict[str, Tensor] = {}
    for key, value in raw.items():
        if not isinstance(key, str):
            raise CheckpointError(path, f"key {key!r} is not a string", key=str(key))
        if not isinstance(value, Tensor):
            hint = "; use `kernelgen import` for training checkpoints" if isinstance(value, Mapping) else ""
            raise CheckpointError(
                path, f"key {key!r} holds a {type(value).__name__}, not a tensor{hint}", key=key
            )
        tensors[key] = value
    return tensors


def extract_kernel_state(
    raw: Mapping[str, object], prefix: str, path: Path, *, legacy_names: bool = True
) -> dict[str, Tensor]:
    """The kernel module's tensors from a training checkpoint, under this module's own names.

    ``raw`` is a state_dict or a mapping with one under ``"state_dict"``. Keys
    starting with ``prefix + "."`` are kept with the prefix removed (an empty
    prefix keeps every key); with ``legacy_names`` (a SIREN's, not a random
    Fourier generator's), ``kernel_network.{2*i}.*`` becomes ``hidden_linears.{i}.*``.
    """
    wrapped = raw.get("state_dict")
    state = wrapped if isinstance(wrapped, Mapping) else raw
    stem = prefix.strip(".")
    stem = stem + "." if stem else ""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if not isinstance(key, str) or not key.startswith(stem):
            continue
        name = _modern_name(key[len(stem) :], path, key) if legacy_names else key[len(stem) :]
        if not isinstance(value, Tensor):
            raise CheckpointError(path, f"key {key!r} holds a {type(value).__name__}, not a tensor", key=key)
        if name in out:
            raise CheckpointError(path, f"key {key!r} gives {name!r} a second time", key=key)
        out[name] = value
    if not out:
        found = _kernel_prefixes(state)
        hint = f"; kernels found under {', '.join(map(repr, found))}" if found else ""
        raise CheckpointError(path, f"no tensor under prefix {prefix!r}{hint}")
    return out


def _modern_name(name: str, path: Path, key: str) -> str:
    match = _LEGACY_HIDDEN.fullmatch(name)
    if match is None:
        return name
    index, param = int(match[1]), match[2]
    # kernel_network interleaved Linear (even) and activation (odd) modules.
    if index % 2:
        raise CheckpointError(
            path, f"key {key!r}: odd kernel_network entries are activations and hold no parameters", key=key
        )
    return f"hidden_linears.{index // 2}.{param}"


def _kernel_prefixes(state: Mapping[str, object]) -> list[str]:
    marker = "positional_embedding.linear.weight"
    return sorted(
        k.removesuffix(marker).rstrip(".") for k in state if isinstance(k, str) and k.endswith(marker)
    )


# -- checking -----------------------------------------------------------------


def check_state(
    tensors: Mapping[str, Tensor], expected: Mapping[str, Tensor], path: Path
) -> dict[str, Tensor]:
    """Check ``tensors`` against a module's ``state_dict`` and return them as float32.

    ``expected`` supplies the key set and shapes only (a meta-device state_dict
    does). Refused: missing or unexpected keys, a non-strided tensor, a dtype
    outside ``ACCEPTED_DTYPES``, a shape mismatch, any value that is not finite
    once in float32.
    """
    missing = sorted(expected.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensor(s) {', '.join(map(repr, missing))}")
        if unexpected:
            parts.append(f"unexpected tensor(s) {', '.join(map(repr, unexpected))}")
        raise CheckpointError(path, "; ".join(parts), key=(missing or unexpected)[0])

    out: dict[str, Tensor] = {}
    for key in sorted(expected):
        tensor, want = tensors[key], expected[key]
        if tensor.layout != torch.strided:
            raise CheckpointError(path, f"tensor {key!r} has layout {tensor.layout}, expected dense", key=key)
        if tensor.dtype not in ACCEPTED_DTYPES:
            accepted = ", ".join(map(_dtype_name, ACCEPTED_DTYPES))
            detail = f"tensor {key!r} has dtype {_dtype_name(tensor.dtype)}, expected one of {accepted}"
            raise CheckpointError(path, detail, key=key)
        if tensor.shape != want.shape:
            detail = f"tensor {key!r} has shape {list(tensor.shape)}, the config needs {list(want.shape)}"
            raise CheckpointError(path, detail, key=key)
        value = tensor.detach().to(torch.float32).contiguous()
        bad = ~torch.isfinite(value)
        if bad.any():
            first = tuple(int(i) for i in bad.nonzero()[0])
            detail = (
                f"tensor {key!r} has {int(bad.sum())} non-finite value(s) in float32, "
                f"first at index {list(first)}: {tensor[first].item()}"
            )
            raise CheckpointError(path, detail, key=key)
        out[key] = value
    return out


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def load_module(config: ModelConfig, tensors: Mapping[str, Tensor], path: Path) -> ServedModel:
    """The module ``config`` describes holding ``tensors``: float32, eval mode, no gradients.

    The module is built on the meta device and the checked tensors are
    assigned into it, so no throw-away initialisation is computed.
    """
    module = config.build(device="meta")
    module.load_state_dict(check_state(tensors, module.state_dict(), path), strict=True, assign=True)
    return module.eval().requires_grad_(False)


# -- writing ------------------------------------------------------------------


def save_safetensors(tensors: Mapping[str, Tensor], path: Path) -> None:
    """Write ``tensors`` to ``path`` atomically (a reader sees the old file or the new one)."""
    # Cloned: safetensors refuses tensors that share storage (views of one flat buffer).
    data = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(data, tmp, metadata={"format": "pt"})
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a server may run as another user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
