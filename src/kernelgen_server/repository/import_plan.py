"""The config of each generator found in a checkpoint: its shapes' values completed from a base.

The tensor shapes determine every size. What the weights cannot tell comes from
a base config (``kernelgen import --all --config BASE``), with per-generator
overrides keyed by prefix::

    {"omega_0": 30.0, "L_cache": 64,
     "mask": {"type": "GaussianModulationND", "parametrization": "log"},
     "overrides": {"model.blocks.3.filter.kernel": {"L_cache": [64, 32], "causal": true}}}

The base's values reach every generator whose class takes them (an override's
go to its generator, and one its class does not take is refused); a base
``mask`` describes the mask of every layer that has one. A base may also state
values the shapes determine (a whole ``config.json`` is a valid base); each is
checked, and one the shapes contradict is refused with the checkpoint key that
says otherwise. Nothing here writes anything.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from kernelgen_server.model.config import (
    COMMON_ARGUMENTS,
    KERNEL_ARGUMENTS,
    KERNELS,
    ConfigError,
    FiLMSection,
    ModelConfig,
    describe_errors,
)
from kernelgen_server.model.masks import MASKS
from kernelgen_server.repository.checkpoint import CheckpointError, load_module
from kernelgen_server.repository.discovery import (
    FAMILIES,
    FAMILY_CLASS,
    SHAPE_FIELDS,
    Generator,
    layer_name,
    mask_prefix,
    natural_key,
    tensor_shape,
)
from kernelgen_wire.layers import MASK

__all__ = [
    "BASE_FIELDS",
    "ImportBase",
    "PlannedModel",
    "configure",
    "plan_generator",
    "plan_network",
]

_SERVING = ("kernel", "mask", "causal")
#: Constructor arguments with defaults that the forward uses (not only the initialisation): an
#: import that takes their default says so.
_LEARNABLE_CLAMPS = ("omega_0_scale_min", "omega_0_scale_max")
_FORWARD_DEFAULTS: dict[str, tuple[str, ...]] = {
    "LearnableOmegaSIRENKernelND": _LEARNABLE_CLAMPS,
    # omega_0 is the largest frequency of the block schedule, which the forward multiplies by.
    "BlockDiagonalLearnableOmegaSIRENKernelND": (
        *_LEARNABLE_CLAMPS, "num_blocks", "omega_0_min", "omega_0_max", "schedule",
    ),
}  # fmt: skip


# -- the base config ------------------------------------------------------------------------------


class _Values(BaseModel):
    """Config values a base (or one override) gives; the same strict types as ``config.json``.

    ``mask`` is the ``config.json`` mask section as written, its ``data_dim`` and
    ``num_channels`` optional (the mask's tensor gives them); the config checks it.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    kernel: str | None = None
    out_dim: int | None = None
    data_dim: int | None = None
    mlp_hidden_dim: int | None = None
    num_layers: int | None = None
    embedding_dim: int | None = None
    omega_0: float | None = None
    L_cache: int | tuple[int, ...] | None = None
    use_bias: bool | None = None
    hidden_omega_0: float | None = None
    film_after_pos_embed: bool | None = None
    film: FiLMSection | None = None
    omega_0_per_row: tuple[float, ...] | None = None
    num_blocks: int | None = None
    omega_0_min: float | None = None
    omega_0_max: float | None = None
    schedule: str | None = None
    off_block_scale: float | None = None
    omega_0_per_block: tuple[float, ...] | None = None
    omega_0_scale_init: float | tuple[float, ...] | None = None
    omega_0_scale_min: float | None = None
    omega_0_scale_max: float | None = None
    nonlinearity: str | None = None
    mask: dict[str, Any] | None = None
    causal: bool | None = None

    @field_validator("L_cache", "omega_0_per_row", "omega_0_per_block", "omega_0_scale_init", mode="before")
    @classmethod
    def _list_to_tuple(cls, value: Any) -> Any:
        return tuple(value) if isinstance(value, list) else value

    def given(self) -> dict[str, Any]:
        """The values actually written, ``film: null`` and ``mask: null`` included."""
        return {name: getattr(self, name) for name in self.model_fields_set}


#: What a base may give: every ``config.json`` key.
BASE_FIELDS = tuple(_Values.model_fields)


class _BaseFile(_Values):
    overrides: dict[str, _Values] = {}


@dataclass(frozen=True)
class ImportBase:
    """What ``--config BASE`` gives every generator, and the overrides of single generators by prefix."""

    #: Where it came from, for messages.
    source: str
    values: Mapping[str, Any]
    overrides: Mapping[str, Mapping[str, Any]]

    @classmethod
    def empty(cls) -> ImportBase:
        return cls("no --config BASE", {}, {})

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> ImportBase:
        """Read and validate a base; any failure is a ``ConfigError`` naming the file."""
        path = Path(path)
        try:
            document = json.loads(path.read_bytes())
        except OSError as exc:
            raise ConfigError(path, f"cannot read the base config: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise ConfigError(path, f"invalid JSON: {exc}") from None
        if not isinstance(document, dict):
            raise ConfigError(path, "a base config is a JSON object of config.json keys and 'overrides'")
        try:
            parsed = _BaseFile.model_validate(document)
        except ValidationError as exc:
            raise ConfigError(path, f"invalid base config: {describe_errors(exc)}") from None
        values = parsed.given()
        values.pop("overrides", None)
        overrides = {prefix.strip("."): v.given() for prefix, v in parsed.overrides.items()}
        return cls(str(path), values, overrides)

    def for_prefix(self, prefix: str) -> tuple[dict[str, Any], dict[str, str]]:
        """The values one generator gets, and where each came from (the base or its override)."""
        values = dict(self.values)
        origin = dict.fromkeys(values, f"{self.source}")
        override = self.overrides.get(prefix, {})
        values.update(override)
        origin.update(dict.fromkeys(override, f"{self.source} overrides[{prefix!r}]"))
        return values, origin


# -- planning ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedModel:
    """One generator as it would be imported: its member name and config, or why it cannot be."""

    member: str
    generator: Generator
    config: ModelConfig | None
    #: Why the generator cannot be imported (``None`` when it can).
    error: ValueError | None
    #: What the importer should be told although the generator can be imported (warnings).
    notes: tuple[str, ...] = ()

    def value(self, name: str) -> Any:
        """A config value: the config's, or for an unconfigured generator what is known of it (else None)."""
        if self.config is not None:
            return getattr(self.config, name)
        return self.generator.shape_values.get(name)


def plan_network(
    generators: Sequence[Generator],
    base: ImportBase,
    path: Path,
    checkpoint_prefixes: Iterable[str] = (),
) -> list[PlannedModel]:
    """Each generator's member name (``0``, ``1``, ... in prefix order) and checked config.

    Nothing is raised for one generator's fault: its ``PlannedModel.error``
    says it, so a dry run can show every generator. An override naming no
    generator of the checkpoint (``generators``, and ``checkpoint_prefixes``
    left out of this import) is raised at once: a typo must not pass.
    """
    prefixes = {g.prefix for g in generators} | set(checkpoint_prefixes)
    unknown = sorted(set(base.overrides) - prefixes)
    if unknown:
        found = ", ".join(map(repr, sorted(prefixes, key=natural_key)))
        raise ConfigError(
            Path(base.source), f"overrides name {unknown[0]!r}, which is no generator found (found: {found})"
        )
    plans = []
    for index, generator in enumerate(generators):
        try:
            config, notes = plan_generator(generator, base, path)
            plans.append(PlannedModel(str(index), generator, config, None, notes))
        except ValueError as exc:
            plans.append(PlannedModel(str(index), generator, None, exc))
    return plans


def configure(generator: Generator, base: ImportBase, path: Path) -> ModelConfig:
    """The generator's config (``plan_generator`` without its notes)."""
    return plan_generator(generator, base, path)[0]


def plan_generator(generator: Generator, base: ImportBase, path: Path) -> tuple[ModelConfig, tuple[str, ...]]:
    """The generator's config, from its shapes' values and the base's, checked against every tensor;
    and the notes the importer should read (warnings: what was assumed or written otherwise).

    Raises ``CheckpointError`` naming the key when a base value contradicts the
    tensors, ``ConfigError`` when the base lacks what the weights cannot tell
    (a required argument, the description of a mask) or gives an invalid value.
    """
    prefix = generator.prefix
    given, origin = base.for_prefix(prefix)
    overridden = set(base.overrides.get(prefix, {}))
    notes: list[str] = []
    kind = _kind(generator, given, origin, base, path)
    if given.get("film_after_pos_embed") is True and generator.shape_values["film"] is None:
        # The package accepts the flag without FiLM and modulates nothing; config.json refuses the pair.
        notes.append(
            f"generator {prefix!r}: {origin['film_after_pos_embed']} sets film_after_pos_embed true, but "
            f"{generator.evidence['film'][1]}: without FiLM the flag modulates nothing (the layer ignores "
            "it), so the config says false; the served kernel is the layer's"
        )
        del given["film_after_pos_embed"]
    for name in SHAPE_FIELDS:
        if name in given and not _agrees(given[name], generator.shape_values[name]):
            key, evidence = generator.evidence[name]
            raise CheckpointError(
                path,
                f"generator {prefix!r}: {origin[name]} sets {name} {_show(given[name])}, but {evidence} "
                f"({name} {_show(generator.shape_values[name])})",
                key=key,
            )
    required, optional = KERNEL_ARGUMENTS[kind]
    missing = [name for name in (*required, "L_cache") if name not in given]
    if missing:
        names = ", ".join(missing[:-1]) + (" and " if len(missing) > 1 else "") + missing[-1]
        mask = generator.mask
        also = ""
        if mask is not None and given.get("mask") is None:
            also = f'; its layer\'s mask ({mask.describe()}) needs "mask": {mask.example()} too'
        raise ConfigError(
            Path(base.source),
            f"generator {prefix!r} needs {names}, which the weights cannot tell"
            f"{f' ({kind})' if kind != 'SIRENKernelND' else ''}: give {'them' if len(missing) > 1 else 'it'} "
            f"in --config BASE, for every generator, or under overrides[{prefix!r}]{also}",
        )
    data_dim = generator.shape_values["data_dim"]
    lengths = given["L_cache"]
    if isinstance(lengths, tuple | list) and len(lengths) != data_dim:
        key, evidence = generator.evidence["data_dim"]
        raise CheckpointError(
            path,
            f"generator {prefix!r}: {origin['L_cache']} sets L_cache {list(lengths)} ({len(lengths)} axes), "
            f"but {evidence} (data_dim {data_dim}); give one int or {data_dim} per axis",
            key=key,
        )
    takes = {*COMMON_ARGUMENTS, *required, *optional}
    values: dict[str, Any] = {k: v for k, v in generator.shape_values.items() if k in takes}
    values["kernel"] = kind
    for name, value in given.items():
        # The base's values go to the classes that take them; an override's to its generator, where
        # the config refuses one its class does not take.
        if name not in SHAPE_FIELDS and name not in _SERVING and (name in takes or name in overridden):
            values[name] = value
    assumed = [name for name in _FORWARD_DEFAULTS.get(kind, ()) if name not in given]
    if "omega_0_per_block" in given:  # the blocks' frequencies given outright: no schedule is used
        assumed = [name for name in assumed if name in _LEARNABLE_CLAMPS]
    if assumed:
        defaults = ", ".join(f"{name} {_show(optional[name])}" for name in assumed)
        notes.append(
            f"generator {prefix!r} ({kind}): {defaults} change its kernel but are neither in the weights "
            f"nor in the base ({base.source}): imported with the package's defaults (give them in the base "
            f"or under overrides[{prefix!r}] if the layer was built with others)"
        )
    section = _mask_section(generator, given, origin, overridden, base, path)
    if section is not None:
        values["mask"] = section
    if "causal" in overridden or ("causal" in given and data_dim == 1):  # a base's causal is the 1-D layers'
        values["causal"] = given["causal"]
    elif data_dim == 1:
        notes.append(
            f"generator {prefix!r} is 1-D, and whether its layer is causal is neither in the weights nor in "
            f'the base ({base.source}): imported as not causal (say "causal": true or false in the base or '
            f"under overrides[{prefix!r}])"
        )
    config = ModelConfig.from_dict(values, source=f"{origin['L_cache']} for generator {prefix!r}")
    _check_shapes(generator, config, path)
    try:
        load_module(config, generator.tensors, path)  # dtypes, finiteness: the server's own check
    except CheckpointError as exc:
        name = exc.key or ""
        raise CheckpointError(
            path, f"generator {prefix!r}: {exc.detail}", key=generator.keys.get(name, name)
        ) from None
    return config, tuple(notes)


def _kind(
    generator: Generator, given: Mapping[str, Any], origin: Mapping[str, str], base: ImportBase, path: Path
) -> str:
    """The generator's class: the base's (checked against the family its tensors show) or the family's."""
    family = generator.family
    if "kernel" not in given:
        return FAMILY_CLASS[family]
    kind = given["kernel"]
    if kind not in FAMILIES:
        raise ConfigError(
            Path(base.source),
            f"generator {generator.prefix!r}: kernel: unknown generator {kind!r} ({origin['kernel']}); "
            f"kernelgen serves {', '.join(KERNELS)}",
        )
    if FAMILIES[kind] != family:
        key, evidence = generator.evidence["kernel"]
        raise CheckpointError(
            path,
            f"generator {generator.prefix!r}: {origin['kernel']} sets kernel {kind}, but {evidence}",
            key=key,
        )
    return str(kind)


def _mask_section(
    generator: Generator,
    given: Mapping[str, Any],
    origin: Mapping[str, str],
    overridden: set[str],
    base: ImportBase,
    path: Path,
) -> dict[str, Any] | None:
    """The ``mask`` section of the generator's config: the base's, completed and checked against the
    layer's mask tensor; None for a layer without a mask. A masked layer the base does not describe is
    refused: its kernel is never imported without its mask."""
    prefix, found = generator.prefix, generator.mask
    section = given.get("mask")
    if found is None:
        if "mask" in overridden and section is not None:
            head = mask_prefix(prefix) or MASK
            raise CheckpointError(
                path,
                f"generator {prefix!r}: {origin['mask']} sets a mask, but its layer {layer_name(prefix)} "
                f"has none (no key under {head + '.'!r})",
                key=f"{head}.",
            )
        return None
    if section is None:
        stated = "sets mask null" if "mask" in given else "describes no mask"
        raise ConfigError(
            Path(base.source),
            f"generator {prefix!r}: its layer {layer_name(prefix)} has a mask ({found.describe()}) whose "
            f"class and settings the weights cannot tell, and {origin.get('mask', base.source)} {stated}: "
            f'add "mask": {found.example()} to --config BASE, for every masked layer, or under '
            f"overrides[{prefix!r}]; a kernel is never imported without its mask",
        )
    section = dict(section)
    kind = section.get("type")
    if kind in MASKS and kind not in found.types:
        raise CheckpointError(
            path,
            f"generator {prefix!r}: {origin['mask']} sets a {kind} mask, but its layer's mask holds "
            f"{found.describe()}",
            key=found.key,
        )
    for name, want in zip(("data_dim", "num_channels"), found.shape, strict=True):
        if name in section and section[name] != want:
            raise CheckpointError(
                path,
                f"generator {prefix!r}: {origin['mask']} sets mask.{name} {_show(section[name])}, but tensor "
                f"{found.key!r} has shape {list(found.shape)} (mask.{name} {want})",
                key=found.key,
            )
        section.setdefault(name, want)
    return section


def _agrees(given: Any, inferred: Any) -> bool:
    if isinstance(given, FiLMSection):  # only the FiLM keys the base wrote are compared
        return inferred is not None and all(getattr(given, f) == inferred[f] for f in given.model_fields_set)
    if given is None or inferred is None:  # film: null
        return given is None and inferred is None
    return bool(given == inferred)


def _show(value: Any) -> str:
    if isinstance(value, FiLMSection):
        return json.dumps(value.model_dump(include=value.model_fields_set))
    if isinstance(value, dict | bool) or value is None:
        return json.dumps(value)
    return repr(value)


def _check_shapes(generator: Generator, config: ModelConfig, path: Path) -> None:
    """Every tensor against the module the config describes; a misfit names its checkpoint key."""
    expected = config.build(device="meta").state_dict()
    dims = ", ".join(f"{name} {generator.shape_values[name]}" for name in SHAPE_FIELDS[:5])
    for name, want in expected.items():
        have = generator.tensors.get(name)
        if have is not None and have.shape != want.shape:
            key = generator.keys[name]
            raise CheckpointError(
                path,
                f"tensor {key!r} has shape {tensor_shape(have)}, but the generator's other tensors ({dims}) "
                f"make it {tensor_shape(want)}",
                key=key,
            )
