"""``export(module, repo, name)``: the kernel generators of a live network, written as one group.

A trained network is most often held as a live ``torch.nn.Module``. ``export``
walks its tree (nvSubquadratic is never imported: classes are recognised by
name, their settings read from their attributes) and writes every kernel
generator as a member ``NAME/0``, ``NAME/1``, ... in module order, with its
layer's mask and causal crop: what the layer convolves with.

* A generator is a module whose class is one ``config.KERNELS`` names, or any
  module that looks like one (a ``positional_embedding`` and an ``out_linear``)
  or sits where a ``CKConvND``-like layer keeps its kernel (``kernel`` beside a
  ``mask`` or an ``is_causal``); one of another class is refused, naming it.
* Its layer is its parent: the layer's ``mask`` (``nn.Identity`` for none) is
  one of ``masks.MASKS`` by class name, or refused; ``is_causal`` is the crop.
* The weights give every size, exactly as ``kernelgen import --all`` infers them
  (``discovery``: the same code reads both). The attributes give what the
  weights cannot: ``omega_0``, ``hidden_omega_0``, ``L_cache`` (the
  constructor's: the package keeps it as ``L_cache`` and grows only its
  embedding's ``L_cache_per_axis`` and grid cache past it, at the step
  ``step_sizes`` keeps), the variants' per-row and per-block frequencies and
  clamp ranges, the random Fourier activation, the mask's parametrisation,
  clamp bounds (``min_std``, ``max_std``, which the package derives from the
  layer's grid size and attenuation settings) and initial extents, and
  ``is_causal``.
* ``torch.compile`` wrappers (``_orig_mod``) are left out of every path.
* With ``check`` (the default) each member's served kernel is compared, at
  ``seq_lens = L_cache`` (fewer on a large grid), with the live generator and
  mask evaluated on a copy (so neither in-place clamps nor grid growth touch
  the network) on kernelgen's coordinates: a misread setting is refused
  rather than served.

Nothing is written unless every generator can be: the group is written
whole by ``store.write_group``. Each member records its layer's hashes
(``layers.layer_hashes``). What was written otherwise than the module says
(``film_after_pos_embed`` without FiLM: false) is an ``ExportWarning``.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kernelgen_server.model.config import KERNELS, ModelConfig
from kernelgen_server.model.fourier import nonlinearity_name
from kernelgen_server.model.masks import GAUSSIAN_MASKS, MASKS
from kernelgen_server.model.siren import kernel_grid
from kernelgen_server.model.variants import block_schedule
from kernelgen_server.repository.checkpoint import load_module
from kernelgen_server.repository.discovery import find_generators, mask_prefix
from kernelgen_server.repository.import_plan import ImportBase, plan_generator
from kernelgen_server.repository.layers import layer_hashes
from kernelgen_server.repository.store import NewMember, check_model_name, group_holds, write_group
from kernelgen_wire.layers import CAUSAL, MASK, plain_path

__all__ = ["ExportWarning", "export", "find_layers"]

#: How close a member's served kernel must be to its live layer's on the same coordinates (relative
#: to the kernel's magnitude): far above float32 rounding, far below any misread setting.
CHECK_TOLERANCE = 1e-4
#: The most grid points the check evaluates a member on.
CHECK_POINTS = 1 << 16


class ExportWarning(UserWarning):
    """Something exported otherwise than the module says, though the served kernel is the layer's."""


@dataclass(frozen=True)
class LiveLayer:
    """One generator of a live network: where it sits, the layer holding it, and that layer's mask."""

    #: The generator's module path (``compile`` wrappers left out): the member's source.
    source: str
    generator: nn.Module
    #: The module holding the generator (None for a generator at the root).
    layer: nn.Module | None
    #: The layer's mask module, None where it has none (or ``nn.Identity``).
    mask: nn.Module | None
    causal: bool

    @property
    def attribute(self) -> str:
        return self.source.rpartition(".")[2]

    @property
    def layer_path(self) -> str:
        return self.source.rpartition(".")[0]

    def where(self) -> str:
        return f"generator {self.source!r}" if self.source else "the generator at the module's root"


def _looks_like_generator(module: nn.Module) -> bool:
    return all(
        isinstance(getattr(module, name, None), nn.Module) for name in ("positional_embedding", "out_linear")
    )


def _is_layer(module: nn.Module) -> bool:
    """A ``CKConvND``-like layer: a ``kernel`` module beside a mask or a causal flag."""
    return isinstance(getattr(module, "kernel", None), nn.Module) and (
        hasattr(module, MASK) or hasattr(module, CAUSAL)
    )


def find_layers(module: nn.Module) -> list[LiveLayer]:
    """Every generator of ``module``'s tree in module order, with its layer's mask and causal flag.

    Raises ``ValueError`` naming the generator for one of an unknown class, a
    layer whose mask is of an unknown class, or a layer holding two generators
    beside one mask.
    """
    modules: dict[str, nn.Module] = {}
    for path, child in module.named_modules():
        modules[plain_path(path)] = child  # a compile wrapper's inner module replaces it under its path
    found: list[LiveLayer] = []
    inside: list[str] = []
    for path, child in modules.items():
        if any(path == g or path.startswith(f"{g}.") for g in inside):
            continue  # a generator's own parts
        parent_path, _, attribute = path.rpartition(".")
        parent = modules.get(parent_path) if path else None
        held = parent is not None and attribute == "kernel" and _is_layer(parent)
        if type(child).__name__ not in KERNELS and not _looks_like_generator(child) and not held:
            continue
        inside.append(path)
        where = f"generator {path!r}" if path else "the generator at the module's root"
        if type(child).__name__ == "RemoteKernel":
            raise ValueError(f"{where} is served by kernelgen (a RemoteKernel): restore() the network first")
        if type(child).__name__ not in KERNELS:
            raise ValueError(
                f"{where} is a {type(child).__name__}, which kernelgen does not know (it serves "
                f"{', '.join(KERNELS)}, recognised by class name); nothing written"
            )
        mask = getattr(parent, MASK, None) if parent is not None else None
        if mask is not None:
            if not isinstance(mask, nn.Module):
                raise ValueError(f"{where}: its layer's {MASK!r} is a {type(mask).__name__}, not a module")
            if type(mask).__name__ == "Identity":
                mask = None
            elif type(mask).__name__ not in MASKS:
                raise ValueError(
                    f"{where}: its layer {parent_path!r} masks its kernel with a {type(mask).__name__}, "
                    f"which kernelgen does not know (it serves {', '.join(MASKS)}): the kernel is never "
                    "served without its mask; nothing written"
                )
        causal = bool(getattr(parent, CAUSAL, False)) if parent is not None else False
        found.append(LiveLayer(path, child, parent, mask, causal))
    for layer in found:
        twins = [
            o.source for o in found if o is not layer and o.layer is layer.layer and layer.layer is not None
        ]
        if twins and layer.mask is not None:
            raise ValueError(
                f"{layer.where()}: its layer {layer.layer_path!r} also holds {twins[0]!r} beside one mask: "
                "kernelgen cannot tell which kernel it masks"
            )
    return found


# -- what the attributes say --------------------------------------------------------------------


def _attribute(owner: Any, name: str, where: str) -> Any:
    if not hasattr(owner, name):
        raise ValueError(f"{where}: its {type(owner).__name__} has no attribute {name!r} to read")
    return getattr(owner, name)


def _floats(value: Any) -> list[float]:
    """A sequence or 1-D tensor of floats as float64 numbers; a float32 tensor's entries as the shortest
    decimals that round to them (the constructor's values, when those were float64 decimals)."""
    if isinstance(value, Tensor):
        flat = value.detach().to("cpu").reshape(-1)
        if flat.dtype == torch.float32:
            return [float(str(np.float32(v))) for v in flat.tolist()]
        return [float(v) for v in flat.double().tolist()]
    return [float(v) for v in value]


def _cache_lengths(generator: Any, where: str) -> int | list[int]:
    """The constructor's ``L_cache``, checked against the grid step the generator keeps."""
    raw = _attribute(generator, "L_cache", where)
    lengths = [int(n) for n in raw] if isinstance(raw, Sequence) else [int(raw)] * int(generator.data_dim)
    steps = getattr(generator.positional_embedding, "step_sizes", None)
    if steps is not None and [1.0 / (n - 1) if n > 1 else math.inf for n in lengths] != [
        float(s) for s in steps
    ]:
        raise ValueError(
            f"{where}: L_cache is {raw!r} but its grid's step is {tuple(steps)}: L_cache was changed after "
            "the generator was built; nothing written"
        )
    return lengths[0] if len(set(lengths)) == 1 else lengths  # one int for every axis where they agree


def _block_values(generator: Any, learnable: bool, where: str) -> dict[str, Any]:
    """The block schedule: as ``omega_0_min``, ``omega_0_max`` and ``schedule`` where those rebuild
    the generator's exactly, else as ``omega_0_per_block``. A learnable one's ``omega_0`` (its
    schedule's largest entry, which its forward multiplies by) is kept to the last bit."""
    blocks = _attribute(generator, "omega_0_per_block", where)
    if isinstance(blocks, Tensor):
        blocks = blocks.detach().to("cpu")
    count = int(_attribute(generator, "num_blocks", where))
    scale = float(_attribute(generator, "off_block_scale", where))
    values: dict[str, Any] = {"num_blocks": count, "off_block_scale": scale}
    per_block = _floats(blocks)
    exact = torch.as_tensor(blocks, dtype=torch.float64) if not isinstance(blocks, Tensor) else None
    omega_0 = float(generator.positional_embedding.omega_0) if learnable else None
    # The shortest decimals first (what a constructor was given), then the exact omega_0.
    highs = list(dict.fromkeys([max(per_block), per_block[-1], *([omega_0] if omega_0 is not None else [])]))
    for high in highs:
        for schedule in ("linear", "log"):
            try:
                rebuilt = block_schedule(count, per_block[0], high, schedule)
            except ValueError:
                continue
            same = torch.equal(rebuilt, exact) if exact is not None else torch.equal(rebuilt.float(), blocks)
            if same and (omega_0 is None or float(rebuilt.max()) == omega_0):
                return {**values, "omega_0_min": per_block[0], "omega_0_max": high, "schedule": schedule}
    if exact is not None:
        per_block = exact.tolist()
    elif omega_0 is not None:  # the float32 buffer's largest entry is the float64 omega_0, rounded
        top = max(per_block)
        per_block = [omega_0 if v == top else v for v in per_block]
    return {**values, "omega_0_per_block": per_block}


def _generator_values(live: LiveLayer) -> dict[str, Any]:
    """The config values the weights cannot tell, from the generator's attributes."""
    generator: Any = live.generator
    where = live.where()
    kind = type(generator).__name__
    embedding = generator.positional_embedding
    values: dict[str, Any] = {
        "kernel": kind,
        "L_cache": _cache_lengths(generator, where),
        "causal": live.causal,
    }
    learnable = kind in ("LearnableOmegaSIRENKernelND", "BlockDiagonalLearnableOmegaSIRENKernelND")
    if kind == "RandomFourierKernelND":
        values["omega_0"] = float(_attribute(generator, "omega_0", where))
        activation = next((m for m in generator.kernel_network if not isinstance(m, nn.Linear)), None)
        name = None if activation is None else nonlinearity_name(activation)
        if name is None:
            raise ValueError(
                f"{where}: its activation is a {type(activation).__name__}, which kernelgen does not know "
                "(it serves GELU (exact or tanh), ReLU, SiLU, Tanh and Sigmoid); nothing written"
            )
        values["nonlinearity"] = name
        return values
    values["hidden_omega_0"] = float(_attribute(generator, "hidden_omega_0", where))
    values["film_after_pos_embed"] = bool(getattr(generator, "film_after_pos_embed", False))
    if kind in ("SIRENKernelND", "LearnableOmegaSIRENKernelND"):
        values["omega_0"] = float(_attribute(embedding if learnable else generator, "omega_0", where))
    if kind == "MultiOmegaSIRENKernelND":
        values["omega_0_per_row"] = _floats(_attribute(generator, "omega_0_per_row", where))
    if kind.startswith("BlockDiagonal"):
        values.update(_block_values(generator, learnable, where))
    if learnable:
        low = float(_attribute(embedding, "omega_0_scale_min", where))
        high = float(_attribute(embedding, "omega_0_scale_max", where))
        values["omega_0_scale_min"], values["omega_0_scale_max"] = low, high
        if kind == "LearnableOmegaSIRENKernelND":
            # Only the initialisation: the module's own when it keeps it, else one inside the range.
            initial = getattr(embedding, "omega_0_scale_init", None)
            if initial is not None:
                values["omega_0_scale_init"] = (
                    _floats(initial) if isinstance(initial, Sequence) else float(initial)
                )
            elif not low <= 1.0 <= high:
                values["omega_0_scale_init"] = low
    return values


def _mask_values(live: LiveLayer) -> dict[str, Any] | None:
    """The ``mask`` section the layer's mask module describes (its sizes come from its tensor)."""
    mask, where = live.mask, live.where()
    if mask is None:
        return None
    kind = type(mask).__name__
    section: dict[str, Any] = {"type": kind}
    for name in ("data_dim", "num_channels"):
        if hasattr(mask, name):
            section[name] = int(getattr(mask, name))
    if kind in GAUSSIAN_MASKS:
        section["parametrization"] = str(_attribute(mask, "parametrization", where))
        section["min_std"] = float(_attribute(mask, "min_std", where))
        section["max_std"] = float(_attribute(mask, "max_std", where))
        extent = getattr(mask, "init_extent", None)
        if extent is not None:  # only the initialisation; one number where every axis has it
            extents = _floats(extent) if isinstance(extent, Sequence | Tensor) else [float(extent)]
            section["init_extent"] = extents[0] if len(set(extents)) == 1 else extents
    else:
        section["fast_decay_pct"] = float(_attribute(mask, "fast_decay_pct", where))
        section["slow_decay_pct"] = float(_attribute(mask, "slow_decay_pct", where))
    return section


# -- the members ----------------------------------------------------------------------------------


def _state(live: LiveLayer) -> dict[str, Tensor]:
    """The generator's and the mask's tensors under their paths in the network, as a checkpoint's."""
    head = f"{live.source}." if live.source else ""
    state = {f"{head}{k}": v.detach().to("cpu") for k, v in live.generator.state_dict().items()}
    where = mask_prefix(live.source)
    if live.mask is not None and where is not None:
        state.update({f"{where}.{k}": v.detach().to("cpu") for k, v in live.mask.state_dict().items()})
    return state


def _member(index: int, live: LiveLayer, label: Path, check: bool) -> tuple[NewMember, tuple[str, ...]]:
    """One member: its config and tensors, read and checked as an import reads them; its notes."""
    given = _generator_values(live)
    mask = _mask_values(live)
    if mask is not None:
        given["mask"] = mask
    source = f"layer {live.layer_path!r}" if live.layer_path else "the module"
    base = ImportBase(f"{source}'s attributes", given, {})
    (generator,) = find_generators(_state(live), label, live.source)
    if generator.prefix != live.source:
        raise ValueError(f"{live.where()}: its tensors were found under {generator.prefix!r}")
    config, notes = plan_generator(generator, base, label)
    history = _grid_history(live, config.cache_lens)
    notes = (*notes, *([history] if history is not None else []))
    if check:
        _check(live, config, generator.tensors, label)
    hashes: tuple[str, ...] = ()
    if live.layer is not None and live.layer_path:
        hashes = layer_hashes(live.layer.state_dict(), live.attribute, config)
    return NewMember(str(index), live.source, config, generator.tensors, hashes), notes


def _grid_history(live: LiveLayer, cache_lens: Sequence[int]) -> str | None:
    """A note when the live generator's grid has grown past L_cache onto another step (the package
    grows it in place from its current extent, so a second growth changes the step), else None."""
    embedding = live.generator.positional_embedding
    cache, grown = getattr(embedding, "grid_cache", None), getattr(embedding, "L_cache_per_axis", None)
    if not isinstance(cache, Tensor) or grown is None or tuple(grown) == tuple(cache_lens):
        return None
    for axis, length in enumerate(cache_lens):
        line = cache[(0, *(slice(None) if i == axis else 0 for i in range(len(cache_lens))), axis)]
        step = float(line[-1] - line[0]) / (line.numel() - 1)
        if abs(step * (length - 1) - 1.0) > 1e-5:
            return (
                f"{live.where()}: its grid has grown past L_cache {tuple(cache_lens)} to {tuple(grown)} more "
                f"than once, and its step on axis {axis} is now {step:.6g}, not 1/(L_cache - 1): the live "
                "layer's kernels now depend on its history; kernelgen serves what the layer computes freshly "
                "loaded (docs/architecture.md, 'Grid past L_cache')"
            )
    return None


def check_lens(cache_lens: Sequence[int]) -> list[int]:
    """The ``seq_lens`` the check evaluates: ``L_cache``, scaled down on every axis where its grid
    would exceed ``CHECK_POINTS`` points (the check is of settings, which every point shows)."""
    lens = list(cache_lens)
    while math.prod(2 * n - 1 for n in lens) > CHECK_POINTS and max(lens) > 2:
        lens = [max(2, n * 3 // 4) for n in lens]
    return lens


def _check(live: LiveLayer, config: ModelConfig, tensors: Mapping[str, Tensor], label: Path) -> None:
    """The member's served kernel at ``check_lens(L_cache)`` against the live layer's, on a float32
    copy of the layer evaluated on kernelgen's coordinates: a generator keeping a grid cache (the
    package's) has it replaced by kernelgen's grid, so neither float32 rounding of the two grids nor
    the cache's history plays a part, and the two compute one function of the same inputs."""
    served = load_module(config, tensors, label)
    lens = check_lens(config.cache_lens)
    conditionings: list[Tensor | None] = [None]
    if config.cond_dim is not None:
        conditionings.append(torch.linspace(-1.0, 1.0, 2 * config.cond_dim).reshape(2, config.cond_dim))
    for conditioning in conditionings:
        generator: Any = copy.deepcopy(live.generator).to("cpu", torch.float32)
        embedding = generator.positional_embedding
        if hasattr(embedding, "grid_cache") and hasattr(embedding, "L_cache_per_axis"):
            embedding.grid_cache = kernel_grid(lens, config.cache_lens)
            embedding.L_cache_per_axis = tuple(lens)
        mask = None if live.mask is None else copy.deepcopy(live.mask).to("cpu", torch.float32)
        with torch.no_grad():
            theirs, grid = generator(lens, conditioning=conditioning)
            if mask is not None:
                theirs = mask(grid=grid, x=theirs)
            if live.causal:
                theirs = theirs[..., theirs.shape[-2] // 2 :, :]
            ours = served(lens, conditioning)[0]
        if ours.shape != theirs.shape:
            raise ValueError(
                f"{live.where()}: the served kernel's shape {list(ours.shape)} is not the layer's "
                f"{list(theirs.shape)} at seq_lens {lens}; nothing written"
            )
        scale = float(theirs.abs().max())
        error = float((ours - theirs).abs().max())
        if not error <= CHECK_TOLERANCE * max(scale, 1e-12):
            raise ValueError(
                f"{live.where()}: the served kernel differs from the layer's by {error:.3g} (its largest "
                f"value {scale:.3g}) at seq_lens {lens}{'' if conditioning is None else ', conditioned'}: "
                "kernelgen would serve it wrong (a setting read otherwise than the layer uses it); nothing "
                "written (check=False writes it all the same)"
            )


def export(
    module: nn.Module,
    repo: str | os.PathLike[str],
    name: str,
    *,
    force: bool = False,
    check: bool = True,
) -> Path:
    """Write every kernel generator of ``module`` (with its layer's mask and crop) as the group ``name``
    of the repository ``repo``; return the group's folder.

    Members are numbered in module order, each with its module path as its
    source and its layer's hashes. Raises ``ValueError`` naming the generator
    (an unknown class, a setting that cannot be read or served, a served
    kernel that is not the layer's) and ``FileExistsError`` for an existing
    group of other members without ``force``; either way nothing is written,
    and nothing either when the group holds these members already. The module
    is not changed (the check runs on copies).
    """
    check_model_name(name)
    label = Path(f"<{type(module).__name__}>")
    layers = find_layers(module)
    if not layers:
        raise ValueError(
            f"{label}: no kernel generator found (kernelgen serves {', '.join(KERNELS)}, recognised by "
            "class name); nothing written"
        )
    members: list[NewMember] = []
    notes: list[str] = []
    for index, live in enumerate(layers):
        member, said = _member(index, live, label, check)
        members.append(member)
        notes.extend(said)
    if group_holds(Path(repo), name, members):  # the same members again: nothing to write
        path = Path(repo) / name
    else:
        path = write_group(Path(repo), name, members, force=force)
    for note in notes:
        warnings.warn(note, ExportWarning, stacklevel=2)
    return path
