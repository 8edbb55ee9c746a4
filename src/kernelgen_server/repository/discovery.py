"""Every kernel generator of a training checkpoint, the mask of its layer, and the config of each.

A kernel generator is recognised by its parameter structure (docs/architecture.md,
"The model, exactly" and "Served models"): under one key prefix,
``positional_embedding.linear``, ``hidden_linears.{i}`` (or the legacy
``kernel_network.{2*i}``), ``out_linear`` and, optionally,
``film_generator.mlp.{0,2}``. The tensors also tell the generator's family
(``FAMILIES``): a ``positional_embedding.omega_0_scale`` is a learnable-omega
SIREN's; ``kernel_network.{2i}`` linears taking twice the embedding's rows are
random Fourier features (cosines and sines), not a legacy SIREN's hidden layers.
The classes of one family hold the same tensors and differ in constructor
arguments only; the base names the class where it is not the family's first.

A generator at ``<layer>.<attribute>`` may have a mask beside it, the layer's
``<layer>.mask.*`` (a ``CKConvND``'s ``kernel`` and ``mask``): ``mask.std_param``
is a Gaussian mask's, ``mask.weight`` an exponential one's. Any other mask is
refused, and so is a mask the base does not describe (its class, its
parametrisation and clamps are not in the weights): a generator is never
imported without its mask.

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
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator
from torch import Tensor

from kernelgen_server.model.config import (
    COMMON_ARGUMENTS,
    KERNEL_ARGUMENTS,
    KERNELS,
    ConfigError,
    FiLMSection,
    ModelConfig,
    describe_errors,
)
from kernelgen_server.model.masks import GAUSSIAN_MASKS, MASKS
from kernelgen_server.repository.checkpoint import CheckpointError, load_module

__all__ = [
    "BASE_FIELDS",
    "FAMILIES",
    "MARKER",
    "MASK_TENSORS",
    "SHAPE_FIELDS",
    "Generator",
    "ImportBase",
    "LayerMask",
    "PlannedModel",
    "configure",
    "find_generators",
    "generator_prefixes",
    "mask_prefix",
    "natural_key",
    "plan_generator",
    "plan_network",
]

#: The key every generator has; what precedes it is the generator's prefix.
MARKER = "positional_embedding.linear.weight"
#: Constructor arguments the tensor shapes determine.
SHAPE_FIELDS = (
    "data_dim",
    "embedding_dim",
    "mlp_hidden_dim",
    "num_layers",
    "out_dim",
    "use_bias",
    "film",
    "film_after_pos_embed",
)
#: Each generator class's family: what its tensors tell of it.
FAMILIES: dict[str, str] = {
    "SIRENKernelND": "siren",
    "MultiOmegaSIRENKernelND": "siren",
    "BlockDiagonalMultiOmegaSIRENKernelND": "siren",
    "LearnableOmegaSIRENKernelND": "learnable",
    "BlockDiagonalLearnableOmegaSIRENKernelND": "learnable",
    "RandomFourierKernelND": "fourier",
}
#: The class a generator of each family is imported as when the base names none.
_FAMILY_CLASS = {"siren": "SIRENKernelND", "learnable": "LearnableOmegaSIRENKernelND",
                 "fourier": "RandomFourierKernelND"}  # fmt: skip
#: The attribute of a layer holding its mask, and the one tensor each kind of mask holds there.
MASK = "mask"
MASK_TENSORS: dict[str, tuple[str, ...]] = {
    "std_param": GAUSSIAN_MASKS,
    "weight": ("ExponentialModulationND",),
}
#: Serving keys the base may give beside the generator's arguments.
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

_SCALE = "positional_embedding.omega_0_scale"
_PARAMETER = re.compile(
    r"(positional_embedding\.linear|hidden_linears\.\d+|kernel_network\.\d+|out_linear"
    r"|film_generator\.mlp\.[02])\.(weight|bias)|positional_embedding\.omega_0_scale"
)
_HIDDEN = re.compile(r"(?:hidden_linears\.(\d+)|kernel_network\.(\d+))\.(?:weight|bias)")
_EXPECTED = (
    "positional_embedding.linear, hidden_linears.{i} or kernel_network.{2i}, out_linear, "
    "film_generator.mlp.{0,2}, each .weight or .bias; positional_embedding.omega_0_scale"
)


def natural_key(prefix: str) -> tuple[tuple[int, int, str], ...]:
    """Order prefixes as people number layers: ``blocks.2`` before ``blocks.10``."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in prefix.split("."))


def mask_prefix(prefix: str) -> str | None:
    """Where the mask of generator ``prefix``'s layer sits: ``<layer>.mask`` (``mask`` for a layer at
    the root, a generator at ``kernel``); None for a generator at the root, which has no layer."""
    if not prefix:
        return None
    layer, _, _ = prefix.rpartition(".")
    return f"{layer}.{MASK}" if layer else MASK


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _shape(tensor: Tensor) -> list[int]:
    return [int(n) for n in tensor.shape]


def _layer_name(prefix: str) -> str:
    layer = prefix.rpartition(".")[0]
    return repr(layer) if layer else "at the root"


# -- finding ------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class LayerMask:
    """The mask beside a generator: its one tensor, that tensor's checkpoint key and name in the mask."""

    key: str
    #: ``std_param`` or ``weight`` (``MASK_TENSORS``).
    name: str
    tensor: Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        """``[data_dim, num_channels]``."""
        return tuple(int(n) for n in self.tensor.shape)

    @property
    def types(self) -> tuple[str, ...]:
        """The mask classes holding this tensor."""
        return MASK_TENSORS[self.name]

    def describe(self) -> str:
        return f"{self.key!r} {list(self.shape)}, as {' and '.join(self.types)} hold"

    def example(self) -> str:
        """The ``mask`` entry a base writes for a mask holding this tensor."""
        if self.name == "std_param":
            return (
                '{"type": "GaussianModulationND" or "BlockAlignedGaussianModulationND", "parametrization": '
                '"direct", "log" or "softplus"} (with its clamps where they are not the layer\'s defaults: '
                "grid_size, min_attenuation_at_step, max_attenuation_at_limit, or min_std and max_std)"
            )
        return '{"type": "ExponentialModulationND"}'


@dataclass(frozen=True)
class Generator:
    """One generator found in a checkpoint: its tensors under the model's own names, and its shapes' facts."""

    #: The key prefix it sits under ('' for a checkpoint holding one generator at its root).
    prefix: str
    #: Its tensors and its layer's mask's (``mask.*``), named as ``ServedModel.state_dict`` names them.
    tensors: Mapping[str, Tensor]
    #: The checkpoint's key of each tensor.
    keys: Mapping[str, str]
    #: The constructor arguments the shapes determine (``SHAPE_FIELDS``).
    shape_values: Mapping[str, Any]
    #: For each of those and for ``kernel``, the key that determines it and what that key shows.
    evidence: Mapping[str, tuple[str, str]]
    #: Its hidden layers are named ``kernel_network.{2i}`` (a SIREN's, renamed ``hidden_linears.{i}``).
    legacy: bool
    #: What its tensors tell of its class (``FAMILIES``).
    family: str = "siren"
    #: Its layer's mask, if the layer has one.
    mask: LayerMask | None = None

    @property
    def parameter_count(self) -> int:
        return sum(t.numel() for t in self.tensors.values())


def find_generators(state: Mapping[str, object], path: Path, under: str = "") -> list[Generator]:
    """Every generator of a flat training state (``checkpoint.training_state``), in prefix order.

    ``under`` keeps the generators whose prefix is it or starts with it. Each
    key belongs to the generator with the longest prefix it starts with; a key
    there that is not a generator's parameter, a non-tensor value, or a
    structure that is not one (a missing layer, a bias on some layers only, a
    FiLM output of the wrong width) is a ``CheckpointError`` naming the key, and
    so is a layer's mask kernelgen does not know (``mask_prefix``).
    """
    prefixes = generator_prefixes(state)
    if not prefixes:
        raise CheckpointError(path, _nothing_found(state))
    wanted = under.strip(".")
    chosen = [p for p in prefixes if not wanted or p == wanted or p.startswith(wanted + ".")]
    if not chosen:
        found = ", ".join(map(repr, prefixes))
        raise CheckpointError(
            path, f"no kernel generator under prefix {wanted!r}; generators found under {found}"
        )
    owned: dict[str, dict[str, object]] = {p: {} for p in chosen}
    longest_first = sorted(prefixes, key=len, reverse=True)
    for key, value in state.items():
        owner = next((p for p in longest_first if not p or key.startswith(p + ".")), None)
        if owner in owned:
            owned[owner][key] = value
    return [_generator(prefix, owned[prefix], _layer_mask(prefix, prefixes, state, path), path)
            for prefix in chosen]  # fmt: skip


def generator_prefixes(state: Mapping[str, object]) -> list[str]:
    """The prefix of every generator of a flat training state, in natural order (nothing checked)."""
    found = {
        key[: -len(MARKER)].removesuffix(".") for key in state if key == MARKER or key.endswith("." + MARKER)
    }
    return sorted(found, key=natural_key)


def _layer_mask(
    prefix: str, prefixes: Sequence[str], state: Mapping[str, object], path: Path
) -> LayerMask | None:
    """The mask of generator ``prefix``'s layer, or None when the layer has none."""
    head = mask_prefix(prefix)
    if head is None:
        return None
    entries = {k: v for k, v in state.items() if k.startswith(head + ".")}
    if not entries:
        return None
    layer = _layer_name(prefix)
    sharing = [p for p in prefixes if p != prefix and mask_prefix(p) == head]
    if sharing:
        raise CheckpointError(
            path,
            f"layer {layer} holds the generators {prefix!r} and {sharing[0]!r} beside one mask "
            f"({head!r}): kernelgen cannot tell which kernel it masks",
            key=min(entries),
        )
    names = sorted(k[len(head) + 1 :] for k in entries)
    if len(names) != 1 or names[0] not in MASK_TENSORS:
        known = "; ".join(f"{', '.join(types)} hold {MASK}.{name}" for name, types in MASK_TENSORS.items())
        raise CheckpointError(
            path,
            f"generator {prefix!r}: its layer {layer} has a mask holding {', '.join(names)} "
            f"({min(entries)!r}), which is no mask kernelgen serves ({known}); its kernel is never "
            "served without its mask",
            key=min(entries),
        )
    key = f"{head}.{names[0]}"
    tensor = entries[key]
    if not isinstance(tensor, Tensor):
        raise CheckpointError(path, f"key {key!r} holds a {type(tensor).__name__}, not a tensor", key=key)
    if tensor.dim() != 2:
        raise CheckpointError(
            path, f"tensor {key!r} has shape {_shape(tensor)}, expected [data_dim, num_channels]", key=key
        )
    return LayerMask(key, names[0], tensor)


def _nothing_found(state: Mapping[str, object]) -> str:
    tensors = [k for k, v in state.items() if isinstance(v, Tensor)]
    if not tensors:
        kinds = sorted({type(v).__name__ for v in state.values()})
        what = f"only {', '.join(kinds)} value(s)" if kinds else "nothing"
        return f"the checkpoint holds no tensors ({what}): not a model's weights"
    sample = ", ".join(map(repr, tensors[:3]))
    return (
        f"no kernel generator found: no key ends in {MARKER!r} among the {len(tensors)} tensors "
        f"(e.g. {sample})"
    )


def _generator(prefix: str, entries: Mapping[str, object], mask: LayerMask | None, path: Path) -> Generator:
    raw: dict[str, Tensor] = {}
    raw_keys: dict[str, str] = {}
    for key in sorted(entries):
        value = entries[key]
        name = key[len(prefix) + 1 :] if prefix else key
        if _PARAMETER.fullmatch(name) is None:
            raise CheckpointError(
                path,
                f"key {key!r} is under generator {prefix!r} but is no generator parameter kernelgen knows "
                f"(those are {_EXPECTED}); kernelgen cannot know what it does to the kernel",
                key=key,
            )
        if not isinstance(value, Tensor):
            raise CheckpointError(path, f"key {key!r} holds a {type(value).__name__}, not a tensor", key=key)
        if name.startswith("kernel_network.") and int(name.split(".")[1]) % 2:
            # kernel_network interleaves Linear (even) and activation (odd) modules.
            raise CheckpointError(
                path,
                f"key {key!r}: odd kernel_network entries are activations and hold no parameters",
                key=key,
            )
        raw[name], raw_keys[name] = value, key
    family = _family(prefix, raw, raw_keys, path)
    tensors: dict[str, Tensor] = {}
    keys: dict[str, str] = {}
    legacy = False
    for name, value in raw.items():
        key = raw_keys[name]
        if name.startswith("kernel_network.") and family != "fourier":
            name = f"hidden_linears.{int(name.split('.')[1]) // 2}.{name.rsplit('.', 1)[1]}"
            legacy = True
        if name in tensors:
            raise CheckpointError(
                path, f"key {key!r} gives {name!r} a second time (also {keys[name]!r})", key=key
            )
        tensors[name], keys[name] = value, key
    if mask is not None:
        name = f"{MASK}.{mask.name}"
        tensors[name], keys[name] = mask.tensor, mask.key
    return _infer(prefix, tensors, keys, legacy, family, mask, path)


def _family(prefix: str, raw: Mapping[str, Tensor], raw_keys: Mapping[str, str], path: Path) -> str:
    """``fourier`` when ``kernel_network.0`` takes twice the embedding's rows (cosines and sines),
    ``learnable`` with an ``omega_0_scale``, else ``siren``."""
    embedding, network = raw.get("positional_embedding.linear.weight"), raw.get("kernel_network.0.weight")
    fourier = (
        embedding is not None
        and network is not None
        and embedding.dim() == 2
        and network.dim() == 2
        and network.shape[1] == 2 * embedding.shape[0]
    )
    if not fourier:
        return "learnable" if _SCALE in raw else "siren"
    for name in raw:
        if name == _SCALE or name.startswith("film_generator."):
            what = "a learnable omega scale" if name == _SCALE else "FiLM"
            raise CheckpointError(
                path,
                f"generator {prefix!r} has random Fourier features ({raw_keys['kernel_network.0.weight']!r} "
                f"takes the cosines and sines of {embedding.shape[0]} phases) and {what} "  # type: ignore[union-attr]
                f"({raw_keys[name]!r}): no generator kernelgen serves has both",
                key=raw_keys[name],
            )
    return "fourier"


def _infer(
    prefix: str,
    tensors: dict[str, Tensor],
    keys: dict[str, str],
    legacy: bool,
    family: str,
    mask: LayerMask | None,
    path: Path,
) -> Generator:
    def key(name: str) -> str:
        return keys.get(name, _join(prefix, name))

    def tensor(name: str, dims: int) -> Tensor:
        found = tensors.get(name)
        if found is None:
            raise CheckpointError(path, f"generator {prefix!r} has no {key(name)!r}", key=key(name))
        if found.dim() != dims:
            raise CheckpointError(
                path,
                f"tensor {key(name)!r} has shape {_shape(found)}, expected {dims} dimension(s)",
                key=key(name),
            )
        return found

    def shows(name: str) -> tuple[str, str]:
        return key(name), f"tensor {key(name)!r} has shape {_shape(tensors[name])}"

    def hidden(i: int) -> str:
        return f"kernel_network.{2 * i}" if family == "fourier" else f"hidden_linears.{i}"

    rows, data = tensor("positional_embedding.linear.weight", 2).shape
    embedding = 2 * rows if family == "fourier" else rows
    indices = sorted(
        {int(m[1]) if m[1] is not None else int(m[2]) // 2 for m in map(_HIDDEN.fullmatch, tensors) if m}
    )
    if not indices:
        missing = key(f"{hidden(0)}.weight")
        raise CheckpointError(path, f"generator {prefix!r} has no hidden layer ({missing!r})", key=missing)
    layers = indices[-1] + 1
    for i in range(layers):
        tensor(f"{hidden(i)}.weight", 2)  # numbered from 0 without gaps
    hidden_width = tensor(f"{hidden(0)}.weight", 2).shape[0]
    out = tensor("out_linear.weight", 2).shape[0]
    use_bias = "positional_embedding.linear.bias" in tensors
    for layer in ["positional_embedding.linear", *(hidden(i) for i in range(layers)), "out_linear"]:
        bias = f"{layer}.bias"
        if (bias in tensors) != use_bias:
            first = key("positional_embedding.linear.bias")
            state = "has" if use_bias else "has no"
            raise CheckpointError(
                path,
                f"generator {prefix!r} has {'no ' if use_bias else ''}{key(bias)!r} but {state} {first!r}: "
                "a generator has a bias on every linear layer or on none",
                key=key(bias),
            )
    values: dict[str, Any] = {
        "data_dim": int(data),
        "embedding_dim": int(embedding),
        "mlp_hidden_dim": int(hidden_width),
        "num_layers": layers + 1,
        "out_dim": int(out),
        "use_bias": use_bias,
        "film": None,
        "film_after_pos_embed": False,
    }
    last = f"{hidden(layers - 1)}.weight"
    bias_key = key("positional_embedding.linear.bias")
    first_hidden = f"{hidden(0)}.weight"
    evidence: dict[str, tuple[str, str]] = {
        "data_dim": shows("positional_embedding.linear.weight"),
        "embedding_dim": shows(first_hidden if family == "fourier" else "positional_embedding.linear.weight"),
        "mlp_hidden_dim": shows(first_hidden),
        "num_layers": (key(last), f"its last hidden layer is {key(last)!r}"),
        "out_dim": shows("out_linear.weight"),
        "use_bias": (bias_key, f"{'it has' if use_bias else 'it has no'} {bias_key!r}"),
        "film": (key("film_generator.mlp.0.weight"), f"it has no {key('film_generator.mlp.0.weight')!r}"),
        "film_after_pos_embed": (key("film_generator.mlp.2.weight"), "it has no FiLM generator"),
        "kernel": _family_evidence(family, key, tensors),
    }
    if any(name.startswith("film_generator.") for name in tensors):
        film_hidden, cond = tensor("film_generator.mlp.0.weight", 2).shape
        width = tensor("film_generator.mlp.2.weight", 2).shape[0]
        tensor("film_generator.mlp.0.bias", 1)  # the FiLM generator always has biases
        tensor("film_generator.mlp.2.bias", 1)
        pairs, rest = divmod(int(width), 2 * int(hidden_width))
        if rest or pairs not in (layers, layers + 1):
            name = key("film_generator.mlp.2.weight")
            raise CheckpointError(
                path,
                f"tensor {name!r} has {width} output rows, but FiLM of {layers} hidden layer(s) of width "
                f"{hidden_width} has {2 * hidden_width * layers} (or {2 * hidden_width * (layers + 1)} when "
                "it also modulates the positional embedding)",
                key=name,
            )
        if pairs == layers + 1 and embedding != hidden_width:
            name = key("film_generator.mlp.2.weight")
            raise CheckpointError(
                path,
                f"tensor {name!r} has {width} output rows: FiLM of the positional embedding too, which "
                f"needs embedding_dim == mlp_hidden_dim, but they are {embedding} and {hidden_width}",
                key=name,
            )
        values["film"] = {"cond_dim": int(cond), "film_hidden_dim": int(film_hidden)}
        values["film_after_pos_embed"] = pairs == layers + 1
        evidence["film"] = shows("film_generator.mlp.0.weight")
        evidence["film_after_pos_embed"] = shows("film_generator.mlp.2.weight")
    return Generator(prefix, tensors, keys, values, evidence, legacy, family, mask)


def _family_evidence(family: str, key: Any, tensors: Mapping[str, Tensor]) -> tuple[str, str]:
    """The key that tells the generator's family, and what it shows."""
    classes = ", ".join(kind for kind, of in FAMILIES.items() if of == family)
    if family == "fourier":
        name = key("kernel_network.0.weight")
        return name, (
            f"tensor {name!r} has shape {_shape(tensors['kernel_network.0.weight'])}: the cosines and sines "
            f"of random Fourier features ({classes})"
        )
    name = key(_SCALE)
    if family == "learnable":
        return name, f"it has {name!r}, a learnable omega scale ({classes})"
    return name, f"it has no {name!r}: a SIREN's tensors ({classes})"


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
        return _FAMILY_CLASS[family]
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
                f"generator {prefix!r}: {origin['mask']} sets a mask, but its layer {_layer_name(prefix)} "
                f"has none (no key under {head + '.'!r})",
                key=f"{head}.",
            )
        return None
    if section is None:
        stated = "sets mask null" if "mask" in given else "describes no mask"
        raise ConfigError(
            Path(base.source),
            f"generator {prefix!r}: its layer {_layer_name(prefix)} has a mask ({found.describe()}) whose "
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
                f"tensor {key!r} has shape {_shape(have)}, but the generator's other tensors ({dims}) "
                f"make it {_shape(want)}",
                key=key,
            )
