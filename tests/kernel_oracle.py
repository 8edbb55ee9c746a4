"""The reference package's layers as the oracle of kernelgen's served models.

A ``Case`` is one ``CKConvND`` of the reference package (nvSubquadratic): a
generator class, a mask, FiLM or not, and a geometry (1-D causal, 2-D, 3-D).
``trained(case)`` builds it from the package's own modules, moves its weights
off their initialisation by a few optimiser steps (the clamped parameters, a
direct Gaussian's stds and learnable omega scales, and the log / softplus stds
pushed out of their clamp ranges, as a checkpoint saved right after a step holds
them), and gives the kernelgen ``config.json`` that describes the same layer
(written from the same constructor arguments, by their names) and the
``state_dict`` kernelgen loads (the layer's ``kernel.*`` keys without the prefix,
its ``mask.*`` keys as they are).

``layer_kernel`` is the reference: what ``CKConvND.forward`` convolves with
(``mask(kernel)`` on the generator's whole grid, then the causal crop), on a
fresh copy of the saved layer, so that neither the package's in-place clamps nor
its grid growth touch the saved layer and every evaluation sees it as saved.

``grid_sensitivity`` bounds how much a served kernel moves when its coordinates
move: the float32 bound of the fidelity tests (see there) is this times the
grid's rounding.
"""

from __future__ import annotations

import copy
import functools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from kernelgen_server.model.masks import ExponentialModulationND, GaussianModulationND
from kernelgen_server.model.served import ServedModel
from kernelgen_server.model.siren import SIRENKernelND, kernel_grid

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from nvsubquadratic.lazy_config import LazyConfig
    from nvsubquadratic.modules import kernels_nd as K
    from nvsubquadratic.modules import masks_nd as M
    from nvsubquadratic.modules.ckconv_nd import CKConvND
    from nvsubquadratic.modules.film import KernelFiLMGenerator

CHANNELS = 4  # the layer's hidden_dim, the kernel's out_dim
HIDDEN = 8  # mlp_hidden_dim = embedding_dim (film_after_pos_embed allowed; divisible by the blocks)
LAYERS = 3
COND_DIM = 3
FILM_HIDDEN = 8

#: The generator classes, by name, with their own constructor arguments (the package's names).
GENERATORS: dict[str, dict[str, Any]] = {
    "SIRENKernelND": {"omega_0": 3.0, "hidden_omega_0": 2.0},
    "MultiOmegaSIRENKernelND": {"omega_0_per_row": [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0]},
    "BlockDiagonalMultiOmegaSIRENKernelND": {"num_blocks": 2, "omega_0_min": 1.0, "omega_0_max": 4.0},
    "LearnableOmegaSIRENKernelND": {"omega_0": 3.0, "omega_0_scale_min": 0.5, "omega_0_scale_max": 1.5},
    "BlockDiagonalLearnableOmegaSIRENKernelND": {
        "num_blocks": 2, "omega_0_min": 1.0, "omega_0_max": 4.0, "schedule": "log",
    },
    "RandomFourierKernelND": {"omega_0": 1.0},
}  # fmt: skip
#: The masks: (class name, its own constructor arguments); "none" is ``nn.Identity``.
MASKS: dict[str, tuple[str, dict[str, Any]]] = {
    "none": ("Identity", {}),
    "gaussian-direct": ("GaussianModulationND", {}),
    "gaussian-log": ("GaussianModulationND", {"parametrization": "log"}),
    "gaussian-softplus": ("GaussianModulationND", {"parametrization": "softplus", "init_extent": 0.5}),
    "blockaligned-direct": ("BlockAlignedGaussianModulationND", {}),
    "blockaligned-softplus": ("BlockAlignedGaussianModulationND", {"parametrization": "softplus"}),
    "exponential": ("ExponentialModulationND", {}),
}
#: Geometries: (data_dim, L_cache, causal).
GEOMETRIES: dict[str, tuple[int, int | list[int], bool]] = {
    "1d-causal": (1, 8, True),
    "2d": (2, [4, 5], False),
    "3d": (3, [3, 2, 4], False),
}


@dataclass(frozen=True)
class Case:
    kernel: str
    mask: str
    film: bool
    geometry: str

    @property
    def id(self) -> str:
        return f"{self.kernel}-{self.mask}-{'film' if self.film else 'plain'}-{self.geometry}"

    @property
    def data_dim(self) -> int:
        return GEOMETRIES[self.geometry][0]

    @property
    def causal(self) -> bool:
        return GEOMETRIES[self.geometry][2]

    @property
    def film_after_pos_embed(self) -> bool:
        # Every other geometry modulates the embedding too.
        return self.film and self.geometry == "2d"

    @property
    def use_bias(self) -> bool:
        return self.geometry != "3d" or self.kernel == "RandomFourierKernelND"


def cases() -> list[Case]:
    """Every generator with every mask, with and without FiLM where the class takes it, in every geometry."""
    out = []
    for kernel in GENERATORS:
        for mask in MASKS:
            for film in (False, True) if kernel != "RandomFourierKernelND" else (False,):
                for geometry in GEOMETRIES:
                    out.append(Case(kernel, mask, film, geometry))
    return out


def _sizes(case: Case) -> dict[str, Any]:
    data_dim, cache, _ = GEOMETRIES[case.geometry]
    return {
        "out_dim": CHANNELS, "data_dim": data_dim, "mlp_hidden_dim": HIDDEN, "num_layers": LAYERS,
        "embedding_dim": HIDDEN, "L_cache": cache, "use_bias": case.use_bias,
    }  # fmt: skip


def package_layer(case: Case) -> CKConvND:
    """The reference package's ``CKConvND`` for ``case``, freshly initialised."""
    kwargs = {**_sizes(case), **GENERATORS[case.kernel]}
    if case.kernel == "RandomFourierKernelND":
        kwargs["nonlinear_cfg"] = LazyConfig(nn.GELU)()
    if case.film:
        film_layers = LAYERS - 1 + int(case.film_after_pos_embed)
        kwargs["film_cfg"] = LazyConfig(KernelFiLMGenerator)(
            cond_dim=COND_DIM, kernel_hidden_dim=HIDDEN, num_film_layers=film_layers,
            film_hidden_dim=FILM_HIDDEN, init_type="small_random", init_std=0.3,
        )  # fmt: skip
        kwargs["film_after_pos_embed"] = case.film_after_pos_embed
    kernel_cfg = LazyConfig(getattr(K, case.kernel))(**kwargs)
    mask_name, mask_args = MASKS[case.mask]
    if mask_name == "Identity":
        mask_cfg = LazyConfig(nn.Identity)()
    else:
        mask_cfg = LazyConfig(getattr(M, mask_name))(
            data_dim=case.data_dim, num_channels=CHANNELS, **mask_args
        )
    return CKConvND(
        data_dim=case.data_dim, hidden_dim=CHANNELS, kernel_cfg=kernel_cfg, mask_cfg=mask_cfg,
        grid_type="double", fft_padding="zero", is_causal=case.causal,
    )  # fmt: skip


def kernelgen_config(case: Case) -> dict[str, Any]:
    """kernelgen's ``config.json`` for ``case``: the same constructor arguments, by the same names."""
    config: dict[str, Any] = {"kernel": case.kernel, **_sizes(case), **GENERATORS[case.kernel]}
    if case.kernel == "RandomFourierKernelND":
        config["nonlinearity"] = "gelu"
    if case.film:
        config["film"] = {"cond_dim": COND_DIM, "film_hidden_dim": FILM_HIDDEN}
        config["film_after_pos_embed"] = case.film_after_pos_embed
    mask_name, mask_args = MASKS[case.mask]
    if mask_name != "Identity":
        config["mask"] = {"type": mask_name, "data_dim": case.data_dim, "num_channels": CHANNELS, **mask_args}
    if case.causal:
        config["causal"] = True
    return config


def kernelgen_state(conv: CKConvND) -> dict[str, Tensor]:
    """The tensors kernelgen loads for ``conv``: its ``kernel.*`` without the prefix, ``mask.*`` as is."""
    state = {}
    for key, value in conv.state_dict().items():
        if key.startswith("kernel."):
            state[key.removeprefix("kernel.")] = value.detach().clone()
        elif key.startswith("mask."):
            state[key] = value.detach().clone()
    return state


def _clamped(conv: CKConvND) -> list[nn.Parameter]:
    pushed = []
    embedding = conv.kernel.positional_embedding
    if hasattr(embedding, "omega_0_scale"):
        pushed.append(embedding.omega_0_scale)
    if isinstance(conv.mask, M.GaussianModulationND):
        pushed.append(conv.mask.std_param)
    return pushed


def out_of_range(conv: CKConvND) -> int:
    """How many saved clamped values lie outside their clamp ranges."""
    count = 0
    embedding = conv.kernel.positional_embedding
    if hasattr(embedding, "omega_0_scale"):
        scale = embedding.omega_0_scale.detach()
        count += int(((scale < embedding.omega_0_scale_min) | (scale > embedding.omega_0_scale_max)).sum())
    if isinstance(conv.mask, M.GaussianModulationND):
        raw = conv.mask.std_param.detach()
        parametrization = conv.mask.parametrization
        std = {"direct": raw, "log": raw.exp(), "softplus": nn.functional.softplus(raw)}[parametrization]
        count += int(((std < conv.mask.min_std) | (std > conv.mask.max_std)).sum())
    return count


@dataclass(frozen=True)
class Trained:
    """A trained layer (as saved: never run after its last step), kernelgen's config and tensors."""

    case: Case
    conv: CKConvND
    config: dict[str, Any]
    state: dict[str, Tensor]
    conditioning: Tensor | None
    #: The smallest, over the tensors, of each one's largest change from its initial value.
    moved: float


@functools.cache
def trained(case: Case, steps: int = 3) -> Trained:
    """``case``'s layer after ``steps`` Adam steps on a toy loss (seeded: the same every call)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(hash(case.id) % (1 << 31))
        conv = package_layer(case)
        rng = torch.Generator().manual_seed(1)
        cache = conv.kernel.L_cache_per_axis
        x = torch.randn(2, *cache, CHANNELS, generator=rng)
        target = torch.randn(2, *cache, CHANNELS, generator=rng)
        conditioning = torch.randn(2, COND_DIM, generator=rng) if case.film else None
        initial = {k: v.detach().clone() for k, v in conv.state_dict().items()}
        pushed = _clamped(conv)
        ids = {id(p) for p in pushed}
        rest = [p for p in conv.parameters() if id(p) not in ids]
        optimizer = torch.optim.Adam([{"params": rest, "lr": 3e-2}, {"params": pushed, "lr": 0.5}])
        for _ in range(steps):
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(conv(x, conditioning=conditioning), target)
            for p in pushed:  # half of the channels pulled down, half up: out of the clamp range
                n = p.shape[-1]
                loss = loss + (p * torch.cat([torch.ones(n // 2), -torch.ones(n - n // 2)])).sum()
            loss.backward()
            optimizer.step()  # not followed by a forward: the saved values are unclamped
    conv = conv.eval().requires_grad_(False)
    moved = min(float((v - initial[k]).abs().max()) for k, v in conv.state_dict().items())
    return Trained(case, conv, kernelgen_config(case), kernelgen_state(conv), conditioning, moved)


def layer_kernel(conv: CKConvND, seq_lens: Sequence[int], conditioning: Tensor | None = None) -> Tensor:
    """What ``conv`` convolves with for generator ``seq_lens``, on a fresh copy of it."""
    fresh = copy.deepcopy(conv)
    with torch.no_grad():
        kernel, grid = fresh.kernel(list(seq_lens), conditioning=conditioning)
        if not isinstance(fresh.mask, nn.Identity):
            kernel = fresh.mask(grid=grid, x=kernel)
        if fresh.is_causal:
            kernel = kernel[..., kernel.shape[-2] // 2 :, :]
    return kernel


def layer_kernel_on_grid(
    conv: CKConvND, seq_lens: Sequence[int], conditioning: Tensor | None = None
) -> Tensor:
    """``layer_kernel`` with the package's grid cache replaced by kernelgen's coordinates.

    The cache becomes kernelgen's grid for ``max(L_cache, seq_lens)`` per axis, so
    the package slices exactly kernelgen's coordinates for ``seq_lens``: the two
    then compute one function on the same inputs.
    """
    fresh = copy.deepcopy(conv)
    embedding = fresh.kernel.positional_embedding
    lens = tuple(max(n, s) for n, s in zip(embedding.L_cache_per_axis, seq_lens, strict=True))
    embedding.grid_cache = kernel_grid(lens, fresh.kernel.L_cache_per_axis)
    embedding.L_cache_per_axis = lens
    return layer_kernel(fresh, seq_lens, conditioning)


def package_grid(conv: CKConvND, seq_lens: Sequence[int]) -> Tensor:
    """The coordinates a fresh copy of ``conv``'s generator evaluates ``seq_lens`` on."""
    fresh = copy.deepcopy(conv)
    with torch.no_grad():
        return fresh.kernel.positional_embedding(tuple(seq_lens))[1]


def seq_lens_around_cache(conv: CKConvND) -> dict[str, tuple[int, ...]]:
    """Generator ``seq_lens`` below, at and above the layer's L_cache (above: on every axis, and on one)."""
    cache = tuple(conv.kernel.L_cache_per_axis)
    return {
        "below": tuple(max(1, n // 2) for n in cache),
        "at": cache,
        "above": tuple(n + 3 for n in cache),
        "above-one-axis": (*cache[:-1], cache[-1] + 2),
    }


# -- the float32 bound ---------------------------------------------------------------------------

#: Lipschitz constants of the activations a served random Fourier generator may use.
_ACTIVATION_LIPSCHITZ = {
    "gelu": 1.13,
    "gelu_tanh": 1.13,
    "relu": 1.0,
    "silu": 1.1,
    "tanh": 1.0,
    "sigmoid": 0.25,
}


def _norm(linear: nn.Linear) -> float:
    return float(torch.linalg.matrix_norm(linear.weight.detach().double(), ord=2))


def grid_sensitivity(model: ServedModel, conditioning: Tensor | None, peak: float) -> float:
    """An upper bound of ``|k(x') - k(x)|`` per entry over ``||x' - x||_2``, to first order.

    The kernel is a chain of maps whose Lipschitz constants multiply: the
    embedding's ``||W_0||_2`` (sine and Fourier features are 1-Lipschitz in the
    phase, the learnable scales folded into ``W_0``), each modulation's largest
    ``|gamma|``, each hidden linear's ``||W||_2`` times its activation's constant,
    the readout's ``||W_out||_2``. A mask ``m`` (at most 1) adds ``peak *
    max_c ||grad m_c||``: a Gaussian's per-axis slope is at most ``1 / (std *
    sqrt(e))``, an exponential's ``|w|``. ``peak`` is the unmasked kernel's largest
    magnitude.
    """
    generator = model.generator
    weight, _ = generator.embedding_affine()
    bound = float(torch.linalg.matrix_norm(weight, ord=2))
    gammas: list[float] = []
    if conditioning is not None and generator.film_generator is not None:
        with torch.no_grad():
            gammas = [float(g.abs().max()) for g, _ in generator.film_generator(conditioning)]
    film = iter(gammas)
    if gammas and generator.film_after_pos_embed:
        bound *= next(film)
    activation = 1.0
    if not isinstance(generator, SIRENKernelND):
        activation = _ACTIVATION_LIPSCHITZ[getattr(generator, "nonlinearity")]  # noqa: B009
    for linear in generator.hidden_layers():
        bound *= _norm(linear) * activation * (next(film) if gammas else 1.0)
    bound *= _norm(generator.out_linear)
    mask = model.mask
    d = math.sqrt(generator.data_dim)
    if isinstance(mask, GaussianModulationND):
        bound += peak * d / (float(mask.std().min()) * math.sqrt(math.e))
    elif isinstance(mask, ExponentialModulationND):
        bound += peak * d * float(mask.weight.detach().abs().max())
    return bound
