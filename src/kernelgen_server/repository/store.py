"""The model repository: a folder holding one sub-folder per model or group.

    <repo>/<name>/config.json
    <repo>/<name>/model.safetensors   (or model.pt)

    <repo>/<group>/group.json         the members, in order, and where each came from
    <repo>/<group>/<member>/config.json, model.safetensors

A group holds the kernel generators of one trained network (``kernelgen
import --all``); its members are models named ``<group>/<member>``, served
and listed like any other, and fetched together by ``GenerateGroup``.

Every sub-folder is a model or a group, except those whose name starts with
"." or "_" (``.git``, ``__pycache__``, editor droppings, an import in
progress), which are skipped. A model that fails to load is recorded as a
``FailedModel`` with its reason and never stops the others. Loaded models are
immutable; a repository is loaded once. A group is written into a hidden
folder beside its final place and renamed into it, so a reader never sees
half of one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import struct
import tempfile
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, field_validator
from torch import Tensor

from kernelgen_server.errors import GroupNotModel, ModelNotFound, ModelNotGroup, ModelNotReady
from kernelgen_server.model.config import ModelConfig, read_json_file
from kernelgen_server.model.output_head import OutputHead
from kernelgen_server.model.served import ServedModel
from kernelgen_server.repository.checkpoint import (
    WEIGHT_FILES,
    find_weights,
    load_module,
    read_weights,
    save_safetensors,
)

__all__ = [
    "CONFIG_FILE",
    "GROUP_FILE",
    "FailedModel",
    "GroupManifest",
    "LoadedModel",
    "ModelGroup",
    "ModelRepository",
    "NewMember",
    "check_model_name",
    "content_hash",
    "embedded_repository",
    "group_holds",
    "is_model_name",
    "is_served_name",
    "load_group",
    "load_model",
    "write_group",
    "write_model",
]

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
GROUP_FILE = "group.json"

# A model name travels on the wire and names a folder: no separators, no leading dot.
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def embedded_repository() -> Path:
    """The repository shipped inside the package (``kernelgen_server/models``)."""
    return Path(__file__).resolve().parents[1] / "models"


def is_model_name(name: str) -> bool:
    """Whether ``name`` can name a model (checked in constant time per character, no backtracking)."""
    return len(name) <= 128 and _MODEL_NAME.fullmatch(name) is not None


def is_served_name(name: str) -> bool:
    """Whether ``name`` can name a served model: a model's name, or a group member's ``GROUP/MEMBER``."""
    group, slash, member = name.partition("/")
    return is_model_name(group) and (not slash or is_model_name(member))


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
    module: ServedModel
    content_hash: str
    parameter_count: int
    weights_format: Literal["safetensors", "pt"]
    #: The last linear layer, for factored kernels.
    output_head: OutputHead

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
        output_head=OutputHead.of(module),
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
    _write_text(model_dir / CONFIG_FILE, json.dumps(config.to_json_dict(), indent=2) + "\n")
    return model_dir


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# -- groups -----------------------------------------------------------------------------------------


class GroupMember(BaseModel):
    """One entry of ``group.json``: the member's folder name, the checkpoint prefix it came from, and
    the hashes of the layer it came from (``kernelgen_wire.layers``)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    name: str
    source: str = ""
    layer_hashes: tuple[str, ...] = ()

    @field_validator("layer_hashes", mode="before")
    @classmethod
    def _hashes_to_tuple(cls, value: object) -> object:
        return tuple(value) if isinstance(value, list) else value

    @field_validator("name")
    @classmethod
    def _a_model_name(cls, value: str) -> str:
        return check_model_name(value)


class GroupManifest(BaseModel):
    """``group.json``: a group's members in order, and the checkpoint file they were imported from."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    format: Literal["kernelgen-group/1"] = "kernelgen-group/1"
    members: tuple[GroupMember, ...]
    checkpoint: str = ""

    @field_validator("members", mode="before")
    @classmethod
    def _list_to_tuple(cls, value: object) -> object:
        return tuple(value) if isinstance(value, list) else value

    @field_validator("members")
    @classmethod
    def _distinct_and_some(cls, value: tuple[GroupMember, ...]) -> tuple[GroupMember, ...]:
        if not value:
            raise ValueError("a group has at least one member")
        names = [m.name for m in value]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"member {twice[0]!r} is listed twice")
        return value

    @classmethod
    def from_file(cls, path: Path) -> GroupManifest:
        """Read and validate ``group.json``; any failure is a ``ConfigError`` naming the file."""
        return read_json_file(cls, path, "group")


@dataclass(frozen=True)
class ModelGroup:
    """The kernel generators of one network: member models in order, each with its checkpoint prefix."""

    name: str
    path: Path
    #: The members' model names (``<group>/<member>``), in the network's order.
    members: tuple[str, ...]
    #: The checkpoint key prefix each member was imported from ('' when unknown).
    sources: tuple[str, ...]
    #: The layer hashes each member's layer had when it was imported or exported (() when unknown).
    layer_hashes: tuple[tuple[str, ...], ...] = ()
    #: The checkpoint file the group was imported from (its name only).
    checkpoint: str = ""


def load_group(
    group_dir: Path, name: str | None = None
) -> tuple[ModelGroup, dict[str, LoadedModel], dict[str, FailedModel]]:
    """Load a group folder: the group, its members that loaded, and those that did not.

    A sub-folder that ``group.json`` does not list is a failed member (a
    leftover a server must not silently ignore). Raises ``ConfigError`` only
    when ``group.json`` itself is unreadable or invalid.
    """
    name = name or group_dir.name
    manifest = GroupManifest.from_file(group_dir / GROUP_FILE)
    ready: dict[str, LoadedModel] = {}
    failed: dict[str, FailedModel] = {}
    for member in manifest.members:
        full = f"{name}/{member.name}"
        _load_into(group_dir / member.name, full, ready, failed)
    listed = {m.name for m in manifest.members}
    for stray in sorted(p for p in group_dir.iterdir() if p.is_dir() and p.name[0] not in "._"):
        if stray.name not in listed:
            full = f"{name}/{stray.name}"
            reason = f"{stray}: a folder in group {name!r} that {GROUP_FILE} does not list as a member"
            failed[full] = FailedModel(full, stray, reason)
    group = ModelGroup(
        name=name,
        path=group_dir,
        members=tuple(f"{name}/{m.name}" for m in manifest.members),
        sources=tuple(m.source for m in manifest.members),
        layer_hashes=tuple(m.layer_hashes for m in manifest.members),
        checkpoint=manifest.checkpoint,
    )
    return group, ready, failed


def _load_into(
    model_dir: Path, name: str, ready: dict[str, LoadedModel], failed: dict[str, FailedModel]
) -> None:
    """Load one model folder into ``ready``, or record why not in ``failed``."""
    try:
        ready[name] = load_model(model_dir, name)
    except ValueError as exc:  # ConfigError, CheckpointError, a bad name: the reason is the message
        failed[name] = FailedModel(name, model_dir, str(exc))
    except Exception as exc:  # a bug must not take the good models down with it
        log.exception("unexpected error loading model %s", name)
        failed[name] = FailedModel(name, model_dir, f"unexpected {type(exc).__name__}: {exc}")
    else:
        log.info("loaded model %s (%s)", name, ready[name].content_hash[:12])
        return
    log.warning("model %s not loaded: %s", name, failed[name].reason)


@dataclass(frozen=True)
class NewMember:
    """A member to write: its folder name, checkpoint prefix, config and (checked) tensors."""

    name: str
    source: str
    config: ModelConfig
    tensors: Mapping[str, Tensor]
    #: The hashes of the layer it came from (``kernelgen_wire.layers``), when known.
    layer_hashes: tuple[str, ...] = ()


def group_holds(root: Path, name: str, members: Sequence[NewMember]) -> bool:
    """Whether ``root/name`` is already a group of exactly these members (names, prefixes, content hashes)."""
    group_dir = root / check_model_name(name)
    if not (group_dir / GROUP_FILE).is_file():
        return False
    try:
        group, ready, failed = load_group(group_dir, name)
    except ValueError:
        return False
    if failed or group.members != tuple(f"{name}/{m.name}" for m in members):
        return False
    if group.sources != tuple(m.source for m in members):
        return False
    if group.layer_hashes != tuple(m.layer_hashes for m in members):
        return False
    return all(
        ready[full].content_hash == content_hash(m.config, m.tensors)
        for full, m in zip(group.members, members, strict=True)
    )


def write_group(
    root: Path, name: str, members: Sequence[NewMember], *, checkpoint: str = "", force: bool = False
) -> Path:
    """Write a group folder whole, or nothing; return its path.

    Everything is written into a hidden folder beside the final one, loaded
    back strictly, and only then renamed into place, so neither a failure nor
    a reader sees half a group. Refuses (``FileExistsError``) to replace an
    existing model or group unless ``force``. The tensors are checked again by
    the load back; callers check them against the configs first.
    """
    target = root / check_model_name(name)
    if target.exists() and not force and (not target.is_dir() or any(target.iterdir())):
        what = "group" if (target / GROUP_FILE).exists() else "model" if target.is_dir() else "file"
        raise FileExistsError(f"{target} already holds a {what}; pass --force to replace it")
    manifest = GroupManifest(
        members=tuple(
            GroupMember(name=m.name, source=m.source, layer_hashes=m.layer_hashes) for m in members
        ),
        checkpoint=checkpoint,
    )
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".importing", dir=root))
    try:
        for member in members:
            write_model(staging, member.name, member.config, member.tensors)
        _write_text(staging / GROUP_FILE, manifest.model_dump_json(indent=2) + "\n")
        _, _, failed = load_group(staging, name)
        if failed:
            first = next(iter(failed.values()))
            raise ValueError(f"the written group does not load back: {first.reason}")
        os.chmod(staging, 0o755)  # mkdtemp makes 0700; a server may run as another user
        _move_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _move_into_place(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``; an existing ``target`` is set aside first and removed after."""
    if not target.exists() or (target.is_dir() and not any(target.iterdir())):
        os.replace(staging, target)  # an empty folder is replaced; a new entry there makes this fail
        return
    aside = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.replaced")
    os.replace(target, aside)
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(aside, target)
        raise
    if aside.is_dir():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        aside.unlink(missing_ok=True)


class ModelRepository:
    """The models of one folder: those that loaded (``ready``), those that did not (``failed``),
    and the groups some of them form (``groups``)."""

    def __init__(
        self,
        root: Path,
        ready: Mapping[str, LoadedModel],
        failed: Mapping[str, FailedModel],
        groups: Mapping[str, ModelGroup] | None = None,
    ) -> None:
        both = ready.keys() & failed.keys()
        if both:  # invariant: a name is ready or failed, never both
            raise ValueError(f"models both ready and failed: {sorted(both)}")
        self.root = root
        self.ready: Mapping[str, LoadedModel] = dict(ready)
        self.failed: Mapping[str, FailedModel] = dict(failed)
        self.groups: Mapping[str, ModelGroup] = dict(groups or {})
        self._membership: dict[str, tuple[ModelGroup, int]] = {}
        for group in self.groups.values():
            if group.name in self.ready or group.name in self.failed:
                raise ValueError(f"{group.name!r} is both a group and a model")
            for index, member in enumerate(group.members):
                if member not in self.ready and member not in self.failed:  # invariant: members are models
                    raise ValueError(f"member {member!r} of group {group.name!r} is no model")
                self._membership[member] = (group, index)

    @classmethod
    def load(cls, root: str | os.PathLike[str]) -> ModelRepository:
        """Load every model and group under ``root``; raises only if ``root`` is not a readable folder."""
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"model repository {root} does not exist")
        if not root.is_dir():
            raise NotADirectoryError(f"model repository {root} is not a directory")
        ready: dict[str, LoadedModel] = {}
        failed: dict[str, FailedModel] = {}
        groups: dict[str, ModelGroup] = {}
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name[0] not in "._"):
            name = folder.name
            if not (folder / GROUP_FILE).exists():
                try:
                    check_model_name(name)
                except ValueError as exc:
                    failed[name] = FailedModel(name, folder, str(exc))
                    log.warning("model %s not loaded: %s", name, exc)
                    continue
                _load_into(folder, name, ready, failed)
                continue
            try:
                check_model_name(name)
                group, members_ready, members_failed = load_group(folder, name)
            except ValueError as exc:  # the group's own file or name: the group is one failure
                failed[name] = FailedModel(name, folder, str(exc))
                log.warning("group %s not loaded: %s", name, exc)
                continue
            groups[name] = group
            ready.update(members_ready)
            failed.update(members_failed)
        return cls(root, ready, failed, groups)

    def names(self) -> list[str]:
        """Every model name, ready or failed: by name, a group's members in the group's order."""

        def order(name: str) -> tuple[str, int, str]:
            top, _, member = name.partition("/")
            place = self._membership.get(name)
            if place is not None:
                return (top, place[1], name)
            return (top, 1 << 30 if member else -1, name)  # a folder a group does not list: last

        return sorted([*self.ready, *self.failed], key=order)

    def entries(self) -> Iterator[LoadedModel | FailedModel]:
        """Every model, ready or failed, in ``names()`` order."""
        for name in self.names():
            yield self.ready.get(name) or self.failed[name]

    def get(self, name: str) -> LoadedModel:
        """The loaded model ``name``; ``ModelNotFound`` if unknown, ``ModelNotReady`` (with the reason)
        if it failed, ``GroupNotModel`` if ``name`` is a group."""
        model = self.ready.get(name)
        if model is not None:
            return model
        failed = self.failed.get(name)
        if failed is not None:
            raise ModelNotReady(f"model {name!r} is not ready: it failed to load: {failed.reason}")
        group = self.groups.get(name)
        if group is not None:
            raise GroupNotModel(
                f"{name!r} is a group of {len(group.members)} models ({_span(group)}), not a model: "
                "name one of its members, or ask for the whole group's kernels at once"
            )
        raise ModelNotFound(f"unknown model {name!r}")

    def group(self, name: str) -> ModelGroup:
        """The group ``name``; ``ModelNotFound`` if unknown, ``ModelNotReady`` if its group file failed,
        ``ModelNotGroup`` if ``name`` is a model."""
        group = self.groups.get(name)
        if group is not None:
            return group
        failed = self.failed.get(name)
        if failed is not None:
            raise ModelNotReady(f"{name!r} is not ready: it failed to load: {failed.reason}")
        if name in self.ready:
            raise ModelNotGroup(f"{name!r} is a model, not a group: ask for its kernel alone")
        raise ModelNotFound(f"unknown group {name!r}")

    def group_of(self, name: str) -> tuple[ModelGroup, int] | None:
        """The group model ``name`` belongs to and its place there, or None."""
        return self._membership.get(name)

    def group_ready(self, name: str) -> bool:
        """Whether every member of group ``name`` loaded."""
        return all(member in self.ready for member in self.groups[name].members)

    def __contains__(self, name: object) -> bool:
        return name in self.ready or name in self.failed

    def __len__(self) -> int:
        return len(self.ready) + len(self.failed)


def _span(group: ModelGroup) -> str:
    members = group.members
    return members[0] if len(members) == 1 else f"{members[0]} .. {members[-1]}"
