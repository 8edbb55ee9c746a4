"""Every ``SIRENKernelND`` of a training checkpoint, and the config of each.

A kernel generator is recognised by its parameter structure (docs/architecture.md,
"The model, exactly"): under one key prefix, ``positional_embedding.linear``,
``hidden_linears.{i}`` (or the legacy ``kernel_network.{2*i}``), ``out_linear``
and, optionally, ``film_generator.mlp.{0,2}``. Its tensor shapes determine every
constructor argument but three: ``omega_0``, ``hidden_omega_0`` (both only
shape the initialisation, never a trained kernel) and ``L_cache`` (the grid
spacing), which come from a base config (``kernelgen import --all --config
BASE``), with per-generator overrides keyed by prefix::

    {"omega_0": 30.0, "L_cache": 64,
     "overrides": {"model.blocks.3.filter.kernel": {"L_cache": [64, 32]}}}

A base may also state values the shapes determine (a whole ``config.json`` is
a valid base); each is checked, and one the shapes contradict is refused with
the checkpoint key that says otherwise. Nothing here writes anything.
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

from kernelgen_server.model.config import ConfigError, FiLMSection, ModelConfig, describe_errors
from kernelgen_server.repository.checkpoint import CheckpointError, load_module

__all__ = [
    "BASE_FIELDS",
    "MARKER",
    "SHAPE_FIELDS",
    "Generator",
    "ImportBase",
    "PlannedModel",
    "configure",
    "find_generators",
    "generator_prefixes",
    "natural_key",
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
#: Constructor arguments the weights cannot tell; the first two have no default.
BASE_FIELDS = ("omega_0", "L_cache", "hidden_omega_0")
_REQUIRED = ("omega_0", "L_cache")

_PARAMETER = re.compile(
    r"(positional_embedding\.linear|hidden_linears\.\d+|kernel_network\.\d+|out_linear"
    r"|film_generator\.mlp\.[02])\.(weight|bias)"
)
_HIDDEN = re.compile(r"hidden_linears\.(\d+)\.(?:weight|bias)")
_EXPECTED = (
    "positional_embedding.linear, hidden_linears.{i} or kernel_network.{2i}, out_linear, "
    "film_generator.mlp.{0,2}; each .weight or .bias"
)


def natural_key(prefix: str) -> tuple[tuple[int, int, str], ...]:
    """Order prefixes as people number layers: ``blocks.2`` before ``blocks.10``."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in prefix.split("."))


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _shape(tensor: Tensor) -> list[int]:
    return [int(n) for n in tensor.shape]


# -- finding ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Generator:
    """One generator found in a checkpoint: its tensors under the model's own names, and its shapes' facts."""

    #: The key prefix it sits under ('' for a checkpoint holding one generator at its root).
    prefix: str
    #: Its tensors, named as ``SIRENKernelND.state_dict`` names them.
    tensors: Mapping[str, Tensor]
    #: The checkpoint's key of each tensor.
    keys: Mapping[str, str]
    #: The constructor arguments the shapes determine (``SHAPE_FIELDS``).
    shape_values: Mapping[str, Any]
    #: For each of those, the key that determines it and what that key shows.
    evidence: Mapping[str, tuple[str, str]]
    #: Its hidden layers are named ``kernel_network.{2i}``.
    legacy: bool

    @property
    def parameter_count(self) -> int:
        return sum(t.numel() for t in self.tensors.values())


def find_generators(state: Mapping[str, object], path: Path, under: str = "") -> list[Generator]:
    """Every generator of a flat training state (``checkpoint.training_state``), in prefix order.

    ``under`` keeps the generators whose prefix is it or starts with it. Each
    key belongs to the generator with the longest prefix it starts with; a key
    there that is not a ``SIRENKernelND`` parameter, a non-tensor value, or a
    structure that is not one (a missing layer, a bias on some layers only, a
    FiLM output of the wrong width) is a ``CheckpointError`` naming the key.
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
    return [_generator(prefix, owned[prefix], path) for prefix in chosen]


def generator_prefixes(state: Mapping[str, object]) -> list[str]:
    """The prefix of every generator of a flat training state, in natural order (nothing checked)."""
    found = {
        key[: -len(MARKER)].removesuffix(".") for key in state if key == MARKER or key.endswith("." + MARKER)
    }
    return sorted(found, key=natural_key)


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


def _generator(prefix: str, entries: Mapping[str, object], path: Path) -> Generator:
    tensors: dict[str, Tensor] = {}
    keys: dict[str, str] = {}
    legacy = False
    for key in sorted(entries):
        value = entries[key]
        name = key[len(prefix) + 1 :] if prefix else key
        if _PARAMETER.fullmatch(name) is None:
            raise CheckpointError(
                path,
                f"key {key!r} is under generator {prefix!r} but is no SIRENKernelND parameter "
                f"(those are {_EXPECTED}); kernelgen cannot know what it does to the kernel",
                key=key,
            )
        if not isinstance(value, Tensor):
            raise CheckpointError(path, f"key {key!r} holds a {type(value).__name__}, not a tensor", key=key)
        if name.startswith("kernel_network."):
            index = int(name.split(".")[1])
            if index % 2:  # kernel_network interleaved Linear (even) and activation (odd) modules
                raise CheckpointError(
                    path,
                    f"key {key!r}: odd kernel_network entries are activations and hold no parameters",
                    key=key,
                )
            name = f"hidden_linears.{index // 2}.{name.rsplit('.', 1)[1]}"
            legacy = True
        if name in tensors:
            raise CheckpointError(
                path, f"key {key!r} gives {name!r} a second time (also {keys[name]!r})", key=key
            )
        tensors[name], keys[name] = value, key
    return _infer(prefix, tensors, keys, legacy, path)


def _infer(
    prefix: str, tensors: dict[str, Tensor], keys: dict[str, str], legacy: bool, path: Path
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

    embedding, data = tensor("positional_embedding.linear.weight", 2).shape
    indices = sorted({int(m[1]) for m in map(_HIDDEN.fullmatch, tensors) if m is not None})
    if not indices:
        missing = key("hidden_linears.0.weight")
        raise CheckpointError(path, f"generator {prefix!r} has no hidden layer ({missing!r})", key=missing)
    layers = indices[-1] + 1
    for i in range(layers):
        tensor(f"hidden_linears.{i}.weight", 2)  # numbered from 0 without gaps
    hidden = tensor("hidden_linears.0.weight", 2).shape[0]
    out = tensor("out_linear.weight", 2).shape[0]
    use_bias = "positional_embedding.linear.bias" in tensors
    for layer in [
        "positional_embedding.linear",
        *(f"hidden_linears.{i}" for i in range(layers)),
        "out_linear",
    ]:
        bias = f"{layer}.bias"
        if (bias in tensors) != use_bias:
            first = key("positional_embedding.linear.bias")
            state = "has" if use_bias else "has no"
            raise CheckpointError(
                path,
                f"generator {prefix!r} has {'no ' if use_bias else ''}{key(bias)!r} but {state} {first!r}: "
                "SIRENKernelND has a bias on every linear layer or on none",
                key=key(bias),
            )
    values: dict[str, Any] = {
        "data_dim": int(data),
        "embedding_dim": int(embedding),
        "mlp_hidden_dim": int(hidden),
        "num_layers": layers + 1,
        "out_dim": int(out),
        "use_bias": use_bias,
        "film": None,
        "film_after_pos_embed": False,
    }
    last = f"hidden_linears.{layers - 1}.weight"
    bias_key = key("positional_embedding.linear.bias")
    evidence: dict[str, tuple[str, str]] = {
        "data_dim": shows("positional_embedding.linear.weight"),
        "embedding_dim": shows("positional_embedding.linear.weight"),
        "mlp_hidden_dim": shows("hidden_linears.0.weight"),
        "num_layers": (key(last), f"its last hidden layer is {key(last)!r}"),
        "out_dim": shows("out_linear.weight"),
        "use_bias": (bias_key, f"{'it has' if use_bias else 'it has no'} {bias_key!r}"),
        "film": (key("film_generator.mlp.0.weight"), f"it has no {key('film_generator.mlp.0.weight')!r}"),
        "film_after_pos_embed": (key("film_generator.mlp.2.weight"), "it has no FiLM generator"),
    }
    if any(name.startswith("film_generator.") for name in tensors):
        film_hidden, cond = tensor("film_generator.mlp.0.weight", 2).shape
        width = tensor("film_generator.mlp.2.weight", 2).shape[0]
        tensor("film_generator.mlp.0.bias", 1)  # the FiLM generator always has biases
        tensor("film_generator.mlp.2.bias", 1)
        pairs, rest = divmod(int(width), 2 * int(hidden))
        if rest or pairs not in (layers, layers + 1):
            name = key("film_generator.mlp.2.weight")
            raise CheckpointError(
                path,
                f"tensor {name!r} has {width} output rows, but FiLM of {layers} hidden layer(s) of width "
                f"{hidden} has {2 * hidden * layers} (or {2 * hidden * (layers + 1)} when it also modulates "
                "the positional embedding)",
                key=name,
            )
        if pairs == layers + 1 and embedding != hidden:
            name = key("film_generator.mlp.2.weight")
            raise CheckpointError(
                path,
                f"tensor {name!r} has {width} output rows: FiLM of the positional embedding too, which "
                f"needs embedding_dim == mlp_hidden_dim, but they are {embedding} and {hidden}",
                key=name,
            )
        values["film"] = {"cond_dim": int(cond), "film_hidden_dim": int(film_hidden)}
        values["film_after_pos_embed"] = pairs == layers + 1
        evidence["film"] = shows("film_generator.mlp.0.weight")
        evidence["film_after_pos_embed"] = shows("film_generator.mlp.2.weight")
    return Generator(prefix, tensors, keys, values, evidence, legacy)


# -- the base config ------------------------------------------------------------------------------


class _Values(BaseModel):
    """Config values a base (or one override) gives; the same strict types as ``config.json``."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

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

    @field_validator("L_cache", mode="before")
    @classmethod
    def _list_to_tuple(cls, value: Any) -> Any:
        return tuple(value) if isinstance(value, list) else value

    def given(self) -> dict[str, Any]:
        """The values actually written, ``film: null`` included."""
        return {name: getattr(self, name) for name in self.model_fields_set}


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
            config: ModelConfig | None = configure(generator, base, path)
            error = None
        except ValueError as exc:
            config, error = None, exc
        plans.append(PlannedModel(str(index), generator, config, error))
    return plans


def configure(generator: Generator, base: ImportBase, path: Path) -> ModelConfig:
    """The generator's config: its shapes' values and the base's, checked against every tensor.

    Raises ``CheckpointError`` naming the key when a base value contradicts
    the shapes, ``ConfigError`` when the base lacks what the weights cannot
    tell or gives an invalid value.
    """
    prefix = generator.prefix
    given, origin = base.for_prefix(prefix)
    for name in SHAPE_FIELDS:
        if name in given and not _agrees(given[name], generator.shape_values[name]):
            key, evidence = generator.evidence[name]
            raise CheckpointError(
                path,
                f"generator {prefix!r}: {origin[name]} sets {name} {_show(given[name])}, but {evidence} "
                f"({name} {_show(generator.shape_values[name])})",
                key=key,
            )
    missing = [name for name in _REQUIRED if name not in given]
    if missing:
        raise ConfigError(
            Path(base.source),
            f"generator {prefix!r} needs {' and '.join(missing)}, which the weights cannot tell: "
            f"give {'them' if len(missing) > 1 else 'it'} in --config BASE, for every generator, or under "
            f"overrides[{prefix!r}]",
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
    values = {**generator.shape_values, **{k: given[k] for k in BASE_FIELDS if k in given}}
    config = ModelConfig.from_dict(values, source=f"{origin['L_cache']} for generator {prefix!r}")
    _check_shapes(generator, config, path)
    try:
        load_module(config, generator.tensors, path)  # dtypes, finiteness: the server's own check
    except CheckpointError as exc:
        name = exc.key or ""
        raise CheckpointError(
            path, f"generator {prefix!r}: {exc.detail}", key=generator.keys.get(name, name)
        ) from None
    return config


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
