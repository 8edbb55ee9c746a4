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
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from kernelgen_server.config import ModelConfig
from kernelgen_server.model import SIRENKernelND

__all__ = [
    "ACCEPTED_DTYPES",
    "WEIGHT_FILES",
    "CheckpointError",
    "check_state",
    "extract_kernel_state",
    "find_weights",
    "load_module",
    "read_checkpoint",
    "read_weights",
    "save_safetensors",
]

#: Weight file names in order of preference.
WEIGHT_FILES = ("model.safetensors", "model.pt")

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
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(path, f"cannot read weights: {first_line}") from exc
    if not isinstance(obj, Mapping):
        raise CheckpointError(path, f"expected a mapping of names to tensors, found a {type(obj).__name__}")
    return obj


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


def extract_kernel_state(raw: Mapping[str, object], prefix: str, path: Path) -> dict[str, Tensor]:
    """The kernel module's tensors from a training checkpoint, under this module's own names.

    ``raw`` is a state_dict or a mapping with one under ``"state_dict"``. Keys
    starting with ``prefix + "."`` are kept with the prefix removed (an empty
    prefix keeps every key); ``kernel_network.{2*i}.*`` becomes
    ``hidden_linears.{i}.*``.
    """
    wrapped = raw.get("state_dict")
    state = wrapped if isinstance(wrapped, Mapping) else raw
    head = prefix.strip(".")
    head = head + "." if head else ""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if not isinstance(key, str) or not key.startswith(head):
            continue
        name = _modern_name(key[len(head) :], path, key)
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


def load_module(config: ModelConfig, tensors: Mapping[str, Tensor], path: Path) -> SIRENKernelND:
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
