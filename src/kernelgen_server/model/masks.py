"""Attenuation masks: what a layer multiplies its generator's kernel by before it convolves.

Every mask is a product over axes, per channel: ``m_c(p) = prod_d g_{d,c}(p_d)``
for a point ``p`` of the coordinate grid, with ``g`` one function of the mask's
``form`` and ``[D, C]`` ``parameter()``: a factored kernel's reader computes the
mask from these (``kernelgen_wire.masks``). ``forward(grid, x)`` computes
``x * m`` in float32 as the reference does (mask in float32, cast to ``x``'s
dtype, then the product).

* ``GaussianModulationND``: ``g_{d,c}(t) = exp(-t^2 / (2 std_{d,c}^2))`` with
  ``std = clamp(f(std_param), min_std, max_std)``, ``f`` the parametrisation
  (``direct``: identity, ``log``: exp, ``softplus``). Checkpoints may hold
  values outside the bounds (the reference clamps a direct one in place before
  each forward); the clamp is part of every forward here.
  ``BlockAlignedGaussianModulationND`` is the same mask initialised with its
  channels in reverse order.
* ``ExponentialModulationND``: ``g_{d,c}(t) = exp(-|t| |w_{d,c}|)``, no clamp.

The bounds derive from the reference's constructor arguments by
``gaussian_std_bounds``: a layer's ``grid_size`` and attenuation targets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from kernelgen_server.model.siren import check_frequency, check_int

__all__ = [
    "GAUSSIAN_MASKS",
    "MASKS",
    "PARAMETRIZATIONS",
    "BlockAlignedGaussianModulationND",
    "ExponentialModulationND",
    "GaussianModulationND",
    "Mask",
    "gaussian_std_bounds",
]

#: How a Gaussian mask's ``std_param`` becomes its standard deviations.
PARAMETRIZATIONS = ("direct", "log", "softplus")
#: The 1-D attenuation a Gaussian's initial ramp reaches at coordinate 1 for ``init_extent`` 1.
_INIT_ATTENUATION = 0.1


def _std_at(attenuation: float, position: float) -> float:
    """The std of a 1-D Gaussian that equals ``attenuation`` at ``position``."""
    return position * math.sqrt(-1.0 / (2.0 * math.log(attenuation)))


def gaussian_std_bounds(
    grid_size: int, min_attenuation_at_step: float = 0.1, max_attenuation_at_limit: float = 0.95
) -> tuple[float, float]:
    """``(min_std, max_std)`` of a Gaussian mask, as the reference's constructor computes them.

    ``min_std`` makes a 1-D Gaussian ``min_attenuation_at_step`` one grid step
    (``2 / (grid_size - 1)``) from the centre; ``max_std`` makes it
    ``max_attenuation_at_limit`` at coordinate 1. A layer sets ``grid_size`` to
    ``2 * max(L_cache) - 1``, so the step is the kernel grid's.
    """
    check_int("grid_size", grid_size, 2)
    for name, value in (
        ("min_attenuation_at_step", min_attenuation_at_step),
        ("max_attenuation_at_limit", max_attenuation_at_limit),
    ):
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 < value < 1.0:
            raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")
    step = 2.0 / (grid_size - 1)
    return _std_at(min_attenuation_at_step, step), _std_at(max_attenuation_at_limit, 1.0)


class _AxisProductMask(nn.Module):
    """A mask ``m_c(p) = prod_d g(p_d; parameter[d, c])``; subclasses define ``parameter`` and ``mask``."""

    def __init__(self, data_dim: int, num_channels: int) -> None:
        super().__init__()
        self.data_dim = check_int("mask data_dim", data_dim, 1)
        self.num_channels = check_int("mask num_channels", num_channels, 1)

    #: The axis factor's form, as the wire names it (``kernelgen_wire.masks``).
    form: str

    def parameter(self) -> Tensor:
        """The ``[D, C]`` float32 values ``g`` takes per axis and channel, as the forward uses them."""
        raise NotImplementedError

    def mask(self, grid: Tensor) -> Tensor:
        """The mask on ``grid`` (``[1, *spatial, D]``) as the reference computes it: ``[1, *spatial, C]``.

        Computed in float32 (``grid`` is taken as float32).
        """
        raise NotImplementedError

    def forward(self, grid: Tensor, x: Tensor) -> Tensor:
        return x * self.mask(grid).to(x.dtype)


class GaussianModulationND(_AxisProductMask):
    """A per-axis, per-channel Gaussian window with clamped standard deviations (``std_param [D, C]``)."""

    def __init__(
        self,
        data_dim: int,
        num_channels: int,
        min_std: float,
        max_std: float,
        parametrization: str = "direct",
        init_extent: float | Sequence[float] = 1.0,
    ) -> None:
        super().__init__(data_dim, num_channels)
        self.min_std = check_frequency("mask min_std", min_std)
        self.max_std = check_frequency("mask max_std", max_std)
        if self.max_std < self.min_std:
            raise ValueError(f"mask max_std ({max_std}) must be >= min_std ({min_std})")
        if parametrization not in PARAMETRIZATIONS:
            raise ValueError(
                f"mask parametrization must be one of {', '.join(PARAMETRIZATIONS)}, got {parametrization!r}"
            )
        self.parametrization = parametrization
        if isinstance(init_extent, Sequence):
            if len(init_extent) != data_dim:
                raise ValueError(
                    f"mask init_extent has {len(init_extent)} entries but data_dim is {data_dim}"
                )
            extents = tuple(check_frequency(f"mask init_extent[{i}]", e) for i, e in enumerate(init_extent))
        else:
            extents = (check_frequency("mask init_extent", init_extent),) * data_dim
        self.init_extent = extents
        self.std_param = nn.Parameter(torch.empty(data_dim, num_channels))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Per axis, a log-spaced ramp of stds over the channels, narrowest first, times ``init_extent``."""
        high_unit = _std_at(_INIT_ATTENUATION, 1.0)
        rows = []
        for extent in self.init_extent:
            low = min(max(self.min_std * extent, self.min_std), self.max_std)
            high = min(max(high_unit * extent, self.min_std), self.max_std)
            rows.append(torch.logspace(math.log10(low), math.log10(high), self.num_channels))
        std = torch.stack(rows)
        if self.parametrization == "log":
            std = std.log()
        elif self.parametrization == "softplus":
            std = std.expm1().log()
        self.std_param.copy_(self._ordered(std))

    def _ordered(self, std: Tensor) -> Tensor:
        return std

    form = "gaussian"

    def parameter(self) -> Tensor:
        return self.std().detach()

    def std(self) -> Tensor:
        """The standard deviations the forward uses, ``[D, C]`` float32: parametrised, then clamped."""
        raw = self.std_param.float()
        if self.parametrization == "log":
            raw = raw.exp()
        elif self.parametrization == "softplus":
            raw = nn.functional.softplus(raw)
        return raw.clamp(self.min_std, self.max_std)

    def mask(self, grid: Tensor) -> Tensor:
        inverse = self.std().square().reciprocal()
        return torch.exp(-0.5 * torch.einsum("b...d,dc->b...c", grid.float().square(), inverse))


class BlockAlignedGaussianModulationND(GaussianModulationND):
    """A Gaussian mask initialised widest channel first (for block-frequency generators); same forward."""

    def _ordered(self, std: Tensor) -> Tensor:
        return std.flip(-1)


class ExponentialModulationND(_AxisProductMask):
    """A per-axis, per-channel exponential decay ``exp(-|t| |w|)`` (``weight [D, C]``, no clamp)."""

    def __init__(
        self, data_dim: int, num_channels: int, fast_decay_pct: float = 13.81, slow_decay_pct: float = 2.3
    ) -> None:
        super().__init__(data_dim, num_channels)
        self.fast_decay_pct = check_frequency("mask fast_decay_pct", fast_decay_pct)
        self.slow_decay_pct = check_frequency("mask slow_decay_pct", slow_decay_pct)
        self.weight = nn.Parameter(torch.empty(data_dim, num_channels))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Rates from ``slow_decay_pct`` to ``fast_decay_pct`` over the channels, divided by ``data_dim``."""
        ramp = torch.linspace(self.slow_decay_pct, self.fast_decay_pct, self.num_channels) / self.data_dim
        self.weight.copy_(ramp.expand(self.data_dim, -1))

    form = "exponential"

    def parameter(self) -> Tensor:
        return self.weight.detach().float().abs()

    def mask(self, grid: Tensor) -> Tensor:
        decay = torch.exp(-grid.float().abs().unsqueeze(-1) * self.weight.float().abs())
        return decay.prod(dim=-2)


Mask = GaussianModulationND | ExponentialModulationND
#: The mask classes by name (as configs and the reference name them).
MASKS: dict[str, type[GaussianModulationND] | type[ExponentialModulationND]] = {
    "GaussianModulationND": GaussianModulationND,
    "BlockAlignedGaussianModulationND": BlockAlignedGaussianModulationND,
    "ExponentialModulationND": ExponentialModulationND,
}
#: The names of the Gaussian family (one ``std_param``, the same forward).
GAUSSIAN_MASKS = ("GaussianModulationND", "BlockAlignedGaussianModulationND")
