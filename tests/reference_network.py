"""A small network built from the reference package's own modules (nvSubquadratic's ``CKConvND``
layers), trained a few steps, and what each of its layers convolves with: the oracle of every
fidelity test of a served network.

The layers cover every generator (SIREN, MultiOmega, BlockDiagonalMultiOmega, LearnableOmega,
BlockDiagonalLearnableOmega, RandomFourier), every mask (Gaussian direct / log / softplus,
BlockAligned direct / softplus, Exponential, none), 1-D causal and circular (single grid) layers,
2-D zero, 2-D mixed per-axis padding and 3-D layers, with and without FiLM. Training pushes the
clamped parameters (a direct Gaussian's stds, learnable omega scales) and the log / softplus stds
out of their clamp ranges, as a checkpoint saved right after an optimiser step holds them.

``layer_kernel`` is the reference: ``CKConvND.forward``'s kernel, evaluated on a deep copy of the
layer (the package clamps parameters in place and grows its grid cache; the network itself
stays as saved).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from nvsubquadratic.lazy_config import LazyConfig
    from nvsubquadratic.modules import kernels_nd as K
    from nvsubquadratic.modules import masks_nd as M
    from nvsubquadratic.modules.ckconv_nd import CKConvND
    from nvsubquadratic.modules.film import KernelFiLMGenerator

# What a layer convolves with (mask, then causal crop, on a fresh copy): the oracle's one definition.
from kernel_oracle import layer_kernel

CHANNELS = 8  # every layer's hidden_dim, the kernels' out_dim
HIDDEN = 8  # mlp_hidden_dim = embedding_dim (film_after_pos_embed allowed)
COND_DIM = 6


@dataclass(frozen=True)
class Layer:
    """One ``CKConvND`` of the network: its name, constructor, and whether it takes conditioning."""

    name: str
    conv: dict[str, Any]
    kernel: Any
    mask: Any
    film: bool


def _film(layers: int) -> Any:
    return LazyConfig(KernelFiLMGenerator)(
        cond_dim=COND_DIM, kernel_hidden_dim=HIDDEN, num_film_layers=layers, film_hidden_dim=16,
        init_type="small_random", init_std=0.1,
    )  # fmt: skip


def _sizes(data_dim: int, L_cache: Any, layers: int = 3, use_bias: bool = True) -> dict[str, Any]:
    return dict(out_dim=CHANNELS, data_dim=data_dim, mlp_hidden_dim=HIDDEN, num_layers=layers,
                embedding_dim=HIDDEN, L_cache=L_cache, use_bias=use_bias)  # fmt: skip


def _double(data_dim: int, causal: bool = False) -> dict[str, Any]:
    return dict(data_dim=data_dim, grid_type="double", fft_padding="zero", is_causal=causal)


LAYERS = (
    Layer(
        "1d-causal-siren-gaussian",
        _double(1, causal=True),
        LazyConfig(K.SIRENKernelND)(**_sizes(1, 16), omega_0=12.0),
        LazyConfig(M.GaussianModulationND)(data_dim=1, num_channels=CHANNELS),
        False,
    ),
    Layer(
        "1d-causal-learnable-film-exponential",
        _double(1, causal=True),
        LazyConfig(K.LearnableOmegaSIRENKernelND)(
            **_sizes(1, 16), omega_0=8.0, omega_0_scale_min=0.5, omega_0_scale_max=1.5, film_cfg=_film(2)
        ),
        LazyConfig(M.ExponentialModulationND)(data_dim=1, num_channels=CHANNELS),
        True,
    ),
    Layer(
        "1d-circular-fourier",
        dict(data_dim=1, grid_type="single", fft_padding="circular"),
        LazyConfig(K.RandomFourierKernelND)(
            **_sizes(1, 15), omega_0=2.0, nonlinear_cfg=LazyConfig(nn.GELU)()
        ),
        LazyConfig(nn.Identity)(),
        False,
    ),
    Layer(
        "2d-multiomega-film-embedding-gaussian-log",
        _double(2),
        LazyConfig(K.MultiOmegaSIRENKernelND)(
            **_sizes(2, [6, 8]),
            omega_0_per_row=[1, 2, 3, 4, 5, 6, 7, 8],
            film_cfg=_film(3),
            film_after_pos_embed=True,
        ),
        LazyConfig(M.GaussianModulationND)(data_dim=2, num_channels=CHANNELS, parametrization="log"),
        True,
    ),
    Layer(
        "2d-blockdiagonal-blockaligned",
        _double(2),
        LazyConfig(K.BlockDiagonalMultiOmegaSIRENKernelND)(**_sizes(2, 6, use_bias=False), num_blocks=4),
        LazyConfig(M.BlockAlignedGaussianModulationND)(data_dim=2, num_channels=CHANNELS),
        False,
    ),
    Layer(
        "2d-mixed-blockdiagonal-learnable-film-blockaligned-softplus",
        dict(data_dim=2, grid_type=None, fft_padding=["circular", "zero"]),
        LazyConfig(K.BlockDiagonalLearnableOmegaSIRENKernelND)(
            **_sizes(2, 8), num_blocks=2, omega_0_min=2.0, omega_0_max=12.0, schedule="log", film_cfg=_film(2)
        ),
        LazyConfig(M.BlockAlignedGaussianModulationND)(
            data_dim=2, num_channels=CHANNELS, parametrization="softplus"
        ),
        True,
    ),
    Layer(
        "3d-siren-film-gaussian-softplus",
        _double(3),
        LazyConfig(K.SIRENKernelND)(
            **_sizes(3, 4, layers=4), omega_0=6.0, hidden_omega_0=3.0, film_cfg=_film(3)
        ),
        LazyConfig(M.GaussianModulationND)(data_dim=3, num_channels=CHANNELS, parametrization="softplus"),
        True,
    ),
    Layer(
        "3d-learnable-gaussian-extent",
        _double(3),
        LazyConfig(K.LearnableOmegaSIRENKernelND)(**_sizes(3, [3, 4, 5]), omega_0=5.0),
        LazyConfig(M.GaussianModulationND)(data_dim=3, num_channels=CHANNELS, init_extent=[2.0, 1.0, 0.5]),
        False,
    ),
)


class Mixer(nn.Module):
    def __init__(self, conv: CKConvND) -> None:
        super().__init__()
        self.global_conv = conv


class Block(nn.Module):
    def __init__(self, conv: CKConvND) -> None:
        super().__init__()
        self.mixer = Mixer(conv)
        self.proj = nn.Linear(CHANNELS, CHANNELS)  # not a kernel: import and export leave it

    def forward(self, x: Tensor, conditioning: Tensor | None) -> Tensor:
        out: Tensor = self.proj(self.mixer.global_conv(x, conditioning=conditioning))
        return out


class Network(nn.Module):
    def __init__(self, layers: Sequence[Layer] = LAYERS) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(CKConvND(hidden_dim=CHANNELS, kernel_cfg=layer.kernel, mask_cfg=layer.mask, **layer.conv))
            for layer in layers
        )

    def convs(self) -> list[CKConvND]:
        return [block.mixer.global_conv for block in self.blocks]  # type: ignore[union-attr]


class Lightning(nn.Module):
    """What a LightningModule holding the network as ``self.network`` saves and holds."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network


#: Where each layer's CKConvND sits in ``Network``.
def conv_path(index: int) -> str:
    return f"blocks.{index}.mixer.global_conv"


def grid_lens(conv: CKConvND, spatial: Sequence[int]) -> tuple[int, ...]:
    """The generator's ``seq_lens`` for an input of ``spatial`` size, as ``CKConvND.forward`` takes them."""
    single = [
        conv.grid_type == "single" if conv.grid_type is not None else p for p in conv._periodic_per_axis
    ]
    return tuple((s + 1) // 2 if one else s for s, one in zip(spatial, single, strict=True))


def seq_lens_around_cache(conv: CKConvND) -> dict[str, tuple[int, ...]]:
    """Generator ``seq_lens`` below, at and above the layer's (effective) L_cache on every axis."""
    cache = tuple(conv.kernel.L_cache_per_axis)
    return {
        "below": tuple(max(1, n // 2) for n in cache),
        "at": cache,
        "above": tuple(n + 3 for n in cache),
    }


def clamped_out_of_range(network: Network) -> int:
    """How many saved clamped values lie outside their clamp ranges (training must have made some)."""
    count = 0
    for conv in network.convs():
        embedding = conv.kernel.positional_embedding
        if hasattr(embedding, "omega_0_scale"):
            scale = embedding.omega_0_scale.detach()
            count += int(
                ((scale < embedding.omega_0_scale_min) | (scale > embedding.omega_0_scale_max)).sum()
            )
        if isinstance(conv.mask, M.GaussianModulationND):
            raw = conv.mask.std_param.detach()
            std = {"direct": raw, "log": raw.exp(), "softplus": nn.functional.softplus(raw)}[
                conv.mask.parametrization
            ]
            count += int(((std < conv.mask.min_std) | (std > conv.mask.max_std)).sum())
    return count


def trained_network(seed: int = 0, steps: int = 4) -> tuple[Network, Tensor]:
    """The network after ``steps`` Adam steps on a toy loss, and a conditioning batch ``[2, COND_DIM]``.

    The clamped parameters get a large learning rate and a pull half down, half up, so that
    after the last step (no forward after it) some saved values are outside their ranges.
    """
    torch.manual_seed(seed)
    network = Network()
    generator = torch.Generator().manual_seed(seed + 1)
    conditioning = torch.randn(2, COND_DIM, generator=generator)
    pushed = []
    for conv in network.convs():
        if hasattr(conv.kernel.positional_embedding, "omega_0_scale"):
            pushed.append(conv.kernel.positional_embedding.omega_0_scale)
        if isinstance(conv.mask, M.GaussianModulationND):
            pushed.append(conv.mask.std_param)
    ids = {id(p) for p in pushed}
    rest = [p for p in network.parameters() if id(p) not in ids]
    optimizer = torch.optim.Adam([{"params": rest, "lr": 2e-2}, {"params": pushed, "lr": 0.5}])
    inputs = []
    for conv in network.convs():
        spatial = [
            2 * n - 1 if one else n
            for n, one in zip(conv.kernel.L_cache_per_axis, _single(conv), strict=True)
        ]
        inputs.append((torch.randn(2, *spatial, CHANNELS, generator=generator),
                       torch.randn(2, *spatial, CHANNELS, generator=generator)))  # fmt: skip
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.zeros(())
        for block, layer, (x, target) in zip(network.blocks, LAYERS, inputs, strict=True):
            out = block(x, conditioning if layer.film else None)
            loss = loss + nn.functional.mse_loss(out, target)
        for p in pushed:
            n = p.shape[-1]
            sign = torch.cat([torch.ones(n // 2), -torch.ones(n - n // 2)])
            loss = loss + (p * sign).sum()
        loss.backward()
        optimizer.step()
    return network.eval(), conditioning


@functools.cache
def shared_trained_network() -> tuple[Network, Tensor]:
    """``trained_network()`` built once per test process: read only (copy it to change it)."""
    return trained_network()


def _single(conv: CKConvND) -> list[bool]:
    return [conv.grid_type == "single" if conv.grid_type is not None else p for p in conv._periodic_per_axis]


def save_lightning(network: nn.Module, path: Path, *, compiled: bool = False) -> Path:
    """A Lightning-style checkpoint of ``network`` held as ``self.network``.

    ``compiled``: its keys as a ``torch.compile``'d network's (``network._orig_mod.``).
    """
    head = "network._orig_mod." if compiled else "network."
    state = {head + key: value.detach().clone() for key, value in network.state_dict().items()}
    torch.save(
        {
            "epoch": 1,
            "global_step": 4,
            "pytorch-lightning_version": "2.4.0",
            "state_dict": state,
            "optimizer_states": [],
            "lr_schedulers": [],
            "hparams_name": "kwargs",
            "hyper_parameters": {"lr": 2e-2},
        },
        path,
    )
    return path


def load_member(folder: Path) -> Any:
    """A written member read back as the repository reads it: ``config.json`` and its weights, strictly."""
    from kernelgen_server.model.config import ModelConfig
    from kernelgen_server.repository.checkpoint import find_weights, load_module, read_weights

    weights = find_weights(folder)
    return load_module(ModelConfig.from_file(folder / "config.json"), read_weights(weights), weights)


def assert_serves_layer(model: Any, conv: CKConvND, conditioning: Tensor | None, label: str = "") -> None:
    """``model`` (a ``ServedModel``) gives what ``conv`` convolves with, below, at and above its L_cache,
    plain and (for a FiLM layer) conditioned, within the float32 bound of the fidelity tests: one float32
    ulp of the grid times the kernel's Lipschitz bound (``kernel_oracle.grid_sensitivity``)."""
    import math

    import kernel_oracle

    for where, lens in seq_lens_around_cache(conv).items():
        for rows in [None] if conditioning is None else [None, conditioning]:
            with torch.no_grad():
                got = model(lens, rows)[0]
                unmasked = model.generator(lens, rows)[0]
            want = layer_kernel(conv, lens, rows)
            what = f"{label} {where} {lens}{'' if rows is None else ' conditioned'}"
            assert got.shape == want.shape, what
            ulp = 2.0**-23 * max(1.0, float(model.generator.grid(lens).abs().max()))
            sensitivity = kernel_oracle.grid_sensitivity(model, rows, float(unmasked.abs().max()))
            bound = sensitivity * math.sqrt(conv.data_dim) * ulp
            assert float((got - want).abs().max()) <= bound, (
                f"{what}: {float((got - want).abs().max())} > {bound}"
            )
