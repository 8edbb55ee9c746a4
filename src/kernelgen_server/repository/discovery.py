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

What the weights cannot tell comes from a base config: ``repository.import_plan``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from kernelgen_server.model.masks import GAUSSIAN_MASKS
from kernelgen_server.repository.checkpoint import CheckpointError
from kernelgen_wire.layers import MASK

__all__ = [
    "FAMILIES",
    "FAMILY_CLASS",
    "MARKER",
    "MASK_TENSORS",
    "SHAPE_FIELDS",
    "Generator",
    "LayerMask",
    "find_generators",
    "generator_prefixes",
    "layer_name",
    "mask_prefix",
    "natural_key",
    "tensor_shape",
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
#: The class a family's generator is imported as when the base names none.
FAMILY_CLASS = {"siren": "SIRENKernelND", "learnable": "LearnableOmegaSIRENKernelND",
                 "fourier": "RandomFourierKernelND"}  # fmt: skip
#: The attribute of a layer holding its mask, and the one tensor each kind of mask holds there.
MASK_TENSORS: dict[str, tuple[str, ...]] = {
    "std_param": GAUSSIAN_MASKS,
    "weight": ("ExponentialModulationND",),
}
#: Serving keys the base may give beside the generator's arguments.
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


def tensor_shape(tensor: Tensor) -> list[int]:
    """A tensor's shape as plain ints (for messages and comparisons)."""
    return [int(n) for n in tensor.shape]


def layer_name(prefix: str) -> str:
    """The layer of the generator at ``prefix``, quoted, for messages (``at the root`` for none)."""
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
    layer = layer_name(prefix)
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
            path,
            f"tensor {key!r} has shape {tensor_shape(tensor)}, expected [data_dim, num_channels]",
            key=key,
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
                f"tensor {key(name)!r} has shape {tensor_shape(found)}, expected {dims} dimension(s)",
                key=key(name),
            )
        return found

    def shows(name: str) -> tuple[str, str]:
        return key(name), f"tensor {key(name)!r} has shape {tensor_shape(tensors[name])}"

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
        shape = tensor_shape(tensors["kernel_network.0.weight"])
        return (
            name,
            f"tensor {name!r} has shape {shape}: cosines and sines of random Fourier features ({classes})",
        )
    name = key(_SCALE)
    if family == "learnable":
        return name, f"it has {name!r}, a learnable omega scale ({classes})"
    return name, f"it has no {name!r}: a SIREN's tensors ({classes})"
