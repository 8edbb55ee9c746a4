"""The model repository: a folder holding one sub-folder per model.

    <repo>/<name>/config.json
    <repo>/<name>/model.safetensors   (or model.pt)

Every sub-folder is a model, except those whose name starts with "." or "_"
(``.git``, ``__pycache__``, editor droppings), which are skipped. A model that
fails to load is recorded as a ``FailedModel`` with its reason and never stops
the others. Loaded models are immutable; a repository is loaded once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from kernelgen_server.checkpoint import (
    WEIGHT_FILES,
    find_weights,
    load_module,
    read_weights,
    save_safetensors,
)
from kernelgen_server.config import ModelConfig
from kernelgen_server.errors import ModelNotFound, ModelNotReady
from kernelgen_server.model import SIRENKernelND
from kernelgen_server.output_head import OutputHead

__all__ = [
    "CONFIG_FILE",
    "FailedModel",
    "LoadedModel",
    "ModelRepository",
    "check_model_name",
    "content_hash",
    "embedded_repository",
    "is_model_name",
    "load_model",
    "write_model",
]

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"

# A model name travels on the wire and names a folder: no separators, no leading dot.
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def embedded_repository() -> Path:
    """The repository shipped inside the package (``kernelgen_server/models``)."""
    return Path(__file__).resolve().parent / "models"


def is_model_name(name: str) -> bool:
    """Whether ``name`` can name a model (checked in constant time per character, no backtracking)."""
    return len(name) <= 128 and _MODEL_NAME.fullmatch(name) is not None


def check_model_name(name: str) -> str:
    """Return ``name`` if it can name a model, else raise ``ValueError``."""
    if not _MODEL_NAME.fullmatch(name):
        raise ValueError(
            f"invalid model name {name!r}: use letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (at most 128 characters)"
        )
    return name


def content_hash(config: ModelConfig, tensors: Mapping[str, Tensor]) -> str:
    """sha256 over the canonical config JSON and every tensor as stored.

    Tensors are taken in sorted key order, each as key, dtype, shape and raw
    (native, i.e. little-endian) bytes; every field is length-prefixed so no
    two different models can produce the same byte stream.
    """
    h = hashlib.sha256()

    def field(data: bytes) -> None:
        h.update(struct.pack("<Q", len(data)))
        h.update(data)

    field(b"kernelgen-model/1")
    field(config.canonical_json().encode())
    for key in sorted(tensors):
        tensor = tensors[key].detach().to("cpu").contiguous()
        field(key.encode())
        field(str(tensor.dtype).removeprefix("torch.").encode())
        field(",".join(map(str, tensor.shape)).encode())
        field(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A model ready to serve. ``module`` is float32, in eval mode, with no gradients.

    Compared by identity: two loads of one folder are two models (``content_hash``
    says whether they hold the same thing).
    """

    name: str
    path: Path
    config: ModelConfig
    module: SIRENKernelND
    content_hash: str
    parameter_count: int
    weights_format: Literal["safetensors", "pt"]
    #: The last linear layer, for factored kernels.
    head: OutputHead

    @property
    def weights_path(self) -> Path:
        return self.path / f"model.{self.weights_format}"


@dataclass(frozen=True)
class FailedModel:
    """A model folder that could not be loaded, and why."""

    name: str
    path: Path
    reason: str


def load_model(model_dir: Path, name: str | None = None) -> LoadedModel:
    """Load one model folder; raises ``ConfigError`` or ``CheckpointError`` naming the file at fault."""
    config = ModelConfig.from_file(model_dir / CONFIG_FILE)
    weights = find_weights(model_dir)
    tensors = read_weights(weights)
    module = load_module(config, tensors, weights)
    return LoadedModel(
        name=name or model_dir.name,
        path=model_dir,
        config=config,
        module=module,
        content_hash=content_hash(config, tensors),
        parameter_count=sum(p.numel() for p in module.parameters()),
        weights_format="safetensors" if weights.suffix == ".safetensors" else "pt",
        head=OutputHead.of(module),
    )


def write_model(
    root: Path, name: str, config: ModelConfig, tensors: Mapping[str, Tensor], *, force: bool = False
) -> Path:
    """Write ``config.json`` and ``model.safetensors`` for ``name`` under ``root``; return the folder.

    Refuses (``FileExistsError``) to replace an existing model unless ``force``;
    with ``force`` a stale ``model.pt`` is removed so the folder holds one model.
    The tensors are not checked here: callers check them against ``config``.
    """
    model_dir = root / check_model_name(name)
    existing = [model_dir / f for f in (CONFIG_FILE, *WEIGHT_FILES) if (model_dir / f).exists()]
    if existing and not force:
        raise FileExistsError(
            f"{model_dir} already holds a model ({existing[0].name}); pass --force to replace it"
        )
    model_dir.mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors, model_dir / "model.safetensors")
    (model_dir / "model.pt").unlink(missing_ok=True)
    _write_text(model_dir / CONFIG_FILE, config.model_dump_json(indent=2) + "\n")
    return model_dir


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class ModelRepository:
    """The models of one folder: those that loaded (``ready``) and those that did not (``failed``)."""

    def __init__(
        self, root: Path, ready: Mapping[str, LoadedModel], failed: Mapping[str, FailedModel]
    ) -> None:
        both = ready.keys() & failed.keys()
        if both:  # invariant: a name is ready or failed, never both
            raise ValueError(f"models both ready and failed: {sorted(both)}")
        self.root = root
        self.ready: Mapping[str, LoadedModel] = dict(ready)
        self.failed: Mapping[str, FailedModel] = dict(failed)

    @classmethod
    def load(cls, root: str | os.PathLike[str]) -> ModelRepository:
        """Load every model under ``root``; raises only if ``root`` itself is not a readable folder."""
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"model repository {root} does not exist")
        if not root.is_dir():
            raise NotADirectoryError(f"model repository {root} is not a directory")
        ready: dict[str, LoadedModel] = {}
        failed: dict[str, FailedModel] = {}
        for model_dir in sorted(p for p in root.iterdir() if p.is_dir() and p.name[0] not in "._"):
            name = model_dir.name
            try:
                check_model_name(name)
                ready[name] = load_model(model_dir, name)
            except ValueError as exc:  # ConfigError, CheckpointError, a bad name: the reason is the message
                failed[name] = FailedModel(name, model_dir, str(exc))
            except Exception as exc:  # a bug must not take the good models down with it
                log.exception("unexpected error loading model %s", name)
                failed[name] = FailedModel(name, model_dir, f"unexpected {type(exc).__name__}: {exc}")
            else:
                log.info("loaded model %s (%s)", name, ready[name].content_hash[:12])
                continue
            log.warning("model %s not loaded: %s", name, failed[name].reason)
        return cls(root, ready, failed)

    def names(self) -> list[str]:
        """Every model name, ready or failed, sorted."""
        return sorted([*self.ready, *self.failed])

    def entries(self) -> Iterator[LoadedModel | FailedModel]:
        """Every model, ready or failed, in name order."""
        for name in self.names():
            yield self.ready.get(name) or self.failed[name]

    def get(self, name: str) -> LoadedModel:
        """The loaded model ``name``; ``ModelNotFound`` if unknown, ``ModelNotReady`` if it failed."""
        model = self.ready.get(name)
        if model is not None:
            return model
        if name in self.failed:
            raise ModelNotReady(f"model {name!r} is not ready: it failed to load")
        raise ModelNotFound(f"unknown model {name!r}")

    def __contains__(self, name: object) -> bool:
        return name in self.ready or name in self.failed

    def __len__(self) -> int:
        return len(self.ready) + len(self.failed)
