"""The SIREN generator's variants: per-row and per-block first-layer frequencies, learnable ones.

Each is a ``SIRENKernelND`` with the same ``state_dict`` names and forward,
except where stated (docs/architecture.md, "The model, exactly"):

* ``MultiOmegaSIRENKernelND`` draws row k of the first layer with its own
  frequency ``omega_0_per_row[k]``; ``BlockDiagonalMultiOmegaSIRENKernelND``
  gives each of ``num_blocks`` blocks of rows one frequency of a schedule and
  damps the off-diagonal blocks of the hidden and output weights by
  ``off_block_scale``. Both differ from the SIREN at initialisation only: a
  trained one is served as a SIREN is.
* ``LearnableOmegaSIRENKernelND`` multiplies the first layer's phase by
  ``2*pi*omega_0*s_k`` per row, with ``s = clamp(omega_0_scale, omega_0_scale_min,
  omega_0_scale_max)`` a parameter (``positional_embedding.omega_0_scale``): the
  embedding is ``sin(2*pi*omega_0*s * (W_0 x + b_0))``, the bias scaled too.
  ``BlockDiagonalLearnableOmegaSIRENKernelND`` is one whose ``omega_0`` is the
  largest frequency of a block schedule and whose scales start at each block's
  share of it. Checkpoints may hold scales outside the clamp range (the
  reference package clamps them in place before each forward); the clamp is
  applied in the forward here, so every forward sees the same clamped values.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from kernelgen_server.model.siren import (
    FiLMConfig,
    SIRENKernelND,
    SIRENPositionalEmbeddingND,
    check_frequency,
    check_int,
)

__all__ = [
    "SCHEDULES",
    "BlockDiagonalLearnableOmegaSIRENKernelND",
    "BlockDiagonalMultiOmegaSIRENKernelND",
    "LearnableOmegaSIRENKernelND",
    "LearnableOmegaSIRENPositionalEmbeddingND",
    "MultiOmegaSIRENKernelND",
    "block_schedule",
]

#: The block frequency schedules: evenly spaced, or evenly spaced in log10.
SCHEDULES = ("linear", "log")


def _frequencies(name: str, values: Sequence[float], length: int, what: str) -> tuple[float, ...]:
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise ValueError(f"{name} must be a list of {length} numbers > 0 (one per {what}), got {values!r}")
    if len(values) != length:
        raise ValueError(f"{name} has {len(values)} entries but there are {length} {what}s")
    return tuple(check_frequency(f"{name}[{i}]", v) for i, v in enumerate(values))


def block_schedule(
    num_blocks: int,
    omega_0_min: float,
    omega_0_max: float,
    schedule: str,
    omega_0_per_block: Sequence[float] | None = None,
) -> Tensor:
    """The per-block frequencies, float64 ``[num_blocks]``: given, or ``omega_0_min .. omega_0_max``.

    ``"linear"`` is ``linspace(min, max, n)``; ``"log"`` is ``logspace(log10 min,
    log10 max, n)``, both in float64, as the reference computes them (so a log
    schedule's largest entry may differ from ``omega_0_max`` in its last bit, and
    that entry is the learnable variant's ``omega_0``).
    """
    check_int("num_blocks", num_blocks, 1)
    if omega_0_per_block is not None:
        given = _frequencies("omega_0_per_block", omega_0_per_block, num_blocks, "block")
        return torch.tensor(given, dtype=torch.float64, device="cpu")
    low = check_frequency("omega_0_min", omega_0_min)
    high = check_frequency("omega_0_max", omega_0_max)
    if high < low:
        raise ValueError(f"omega_0_max ({high}) must be >= omega_0_min ({low})")
    if schedule == "linear":
        return torch.linspace(low, high, num_blocks, dtype=torch.float64, device="cpu")
    if schedule == "log":
        return torch.logspace(
            math.log10(low), math.log10(high), num_blocks, dtype=torch.float64, device="cpu"
        )
    raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")


def _float32(value: float) -> float:
    """``value`` rounded to the nearest float32."""
    return float(struct.unpack("<f", struct.pack("<f", value))[0])


def _check_blocks(num_blocks: int, widths: dict[str, int]) -> None:
    check_int("num_blocks", num_blocks, 1)
    for name, width in widths.items():
        if width % num_blocks:
            raise ValueError(f"{name} ({width}) must be divisible by num_blocks ({num_blocks})")


@torch.no_grad()
def _damp_off_blocks(linears: Sequence[nn.Linear], num_blocks: int, off_block_scale: float) -> None:
    """Scale every weight outside the diagonal blocks by ``off_block_scale`` (an initialisation)."""
    for linear in linears:
        rows, cols = linear.out_features // num_blocks, linear.in_features // num_blocks
        scale = torch.full_like(linear.weight, off_block_scale)
        for k in range(num_blocks):
            scale[k * rows : (k + 1) * rows, k * cols : (k + 1) * cols] = 1.0
        linear.weight.mul_(scale)


class MultiOmegaSIRENKernelND(SIRENKernelND):
    """A SIREN whose first-layer row k is initialised with frequency ``omega_0_per_row[k]``.

    ``omega_0`` is the mean of the schedule (as the reference keeps it); the
    forward is the SIREN's.
    """

    def __init__(
        self,
        out_dim: int,
        data_dim: int,
        mlp_hidden_dim: int,
        num_layers: int,
        embedding_dim: int,
        omega_0_per_row: Sequence[float],
        L_cache: int | Sequence[int],
        use_bias: bool,
        hidden_omega_0: float = 1.0,
        film_cfg: FiLMConfig | dict[str, Any] | None = None,
        film_after_pos_embed: bool = False,
    ) -> None:
        rows = _frequencies("omega_0_per_row", omega_0_per_row, embedding_dim, "row of the first layer")
        super().__init__(
            out_dim, data_dim, mlp_hidden_dim, num_layers, embedding_dim, math.fsum(rows) / len(rows),
            L_cache, use_bias, hidden_omega_0, film_cfg, film_after_pos_embed,
        )  # fmt: skip
        self.omega_0_per_row = rows
        with torch.no_grad():
            linear = self.positional_embedding.linear
            for k, omega in enumerate(rows):
                bound = omega / linear.in_features
                linear.weight[k].uniform_(-bound, bound)


class BlockDiagonalMultiOmegaSIRENKernelND(MultiOmegaSIRENKernelND):
    """Blocks of first-layer rows, one frequency each, and block-diagonal hidden weights at init.

    The schedule is ``block_schedule(...)``, each entry repeated for the
    ``embedding_dim / num_blocks`` rows of its block; ``embedding_dim``,
    ``mlp_hidden_dim`` and ``out_dim`` must be divisible by ``num_blocks``.
    """

    def __init__(
        self,
        out_dim: int,
        data_dim: int,
        mlp_hidden_dim: int,
        num_layers: int,
        embedding_dim: int,
        L_cache: int | Sequence[int],
        use_bias: bool,
        num_blocks: int = 8,
        omega_0_min: float = 1.0,
        omega_0_max: float = 12.0,
        schedule: str = "linear",
        off_block_scale: float = 0.1,
        omega_0_per_block: Sequence[float] | None = None,
        hidden_omega_0: float = 1.0,
        film_cfg: FiLMConfig | dict[str, Any] | None = None,
        film_after_pos_embed: bool = False,
    ) -> None:
        _check_blocks(
            num_blocks, {"embedding_dim": embedding_dim, "mlp_hidden_dim": mlp_hidden_dim, "out_dim": out_dim}
        )
        blocks = block_schedule(num_blocks, omega_0_min, omega_0_max, schedule, omega_0_per_block)
        rows = blocks.repeat_interleave(embedding_dim // num_blocks).tolist()
        super().__init__(
            out_dim, data_dim, mlp_hidden_dim, num_layers, embedding_dim, rows, L_cache, use_bias,
            hidden_omega_0, film_cfg, film_after_pos_embed,
        )  # fmt: skip
        self.num_blocks = num_blocks
        self.off_block_scale = float(off_block_scale)
        self.omega_0_per_block = tuple(blocks.tolist())
        _damp_off_blocks([*self.hidden_layers(), self.out_linear], num_blocks, self.off_block_scale)


class LearnableOmegaSIRENPositionalEmbeddingND(SIRENPositionalEmbeddingND):
    """``sin(2*pi*omega_0 * s * (W_0 x + b_0))`` per row, ``s = clamp(omega_0_scale, min, max)``.

    Evaluated in float32 in the reference's order: the phase ``W_0 x + b_0``, then
    its product with the float32 vector ``float32(2*pi*omega_0) * s``.
    """

    def __init__(
        self,
        data_dim: int,
        embedding_dim: int,
        omega_0: float,
        omega_0_scale_init: float | Sequence[float],
        omega_0_scale_min: float,
        omega_0_scale_max: float,
        use_bias: bool,
    ) -> None:
        low = check_frequency("omega_0_scale_min", omega_0_scale_min)
        high = check_frequency("omega_0_scale_max", omega_0_scale_max)
        if high < low:
            raise ValueError(f"omega_0_scale_max ({high}) must be >= omega_0_scale_min ({low})")
        if isinstance(omega_0_scale_init, Sequence):
            init = _frequencies(
                "omega_0_scale_init", omega_0_scale_init, embedding_dim, "row of the first layer"
            )
        else:
            init = (check_frequency("omega_0_scale_init", omega_0_scale_init),) * embedding_dim
        # Compared as the reference compares them: the float32 scales against the bounds.
        scales = torch.tensor(init, dtype=torch.float32, device="cpu")
        if bool((scales < low).any()) or bool((scales > high).any()):
            raise ValueError(
                f"omega_0_scale_init must lie in [omega_0_scale_min, omega_0_scale_max] = [{low}, {high}], "
                f"got {min(init)} .. {max(init)}"
            )
        super().__init__(data_dim, embedding_dim, check_frequency("omega_0", omega_0), use_bias)
        self.omega_0_scale_min, self.omega_0_scale_max = low, high
        self.omega_0_scale_init = init
        #: ``2*pi*omega_0`` rounded to float32: the constant the reference multiplies by.
        self.omega_0_const = _float32(2.0 * math.pi * self.omega_0)
        self.omega_0_scale = nn.Parameter(torch.tensor(init, dtype=torch.float32))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        bound = 1.0 / self.linear.in_features
        self.linear.weight.uniform_(-bound, bound)
        if self.linear.bias is not None:
            self.linear.bias.uniform_(-bound, bound)
        if "omega_0_scale" in self._parameters:  # not yet while the parent constructor runs
            self.omega_0_scale.copy_(torch.tensor(self.omega_0_scale_init))

    def scale(self) -> Tensor:
        """``clamp(omega_0_scale, min, max)`` in float32: what the forward multiplies by."""
        return self.omega_0_scale.float().clamp(self.omega_0_scale_min, self.omega_0_scale_max)

    def affine(self) -> tuple[Tensor, Tensor | None]:
        """``(W_0, b_0)`` with the per-row factor folded in: ``diag(2*pi*omega_0*s) W_0``, float64."""
        weight, bias = super().affine()
        factor = self.omega_0_const * self.scale().double()
        return weight * factor[:, None], None if bias is None else bias * factor

    def forward(self, grid: Tensor) -> Tensor:
        weight = self.linear.weight.float()
        bias = None if self.linear.bias is None else self.linear.bias.float()
        phase = nn.functional.linear(grid.float(), weight, bias)
        factor = torch.tensor(self.omega_0_const, dtype=torch.float32, device=phase.device) * self.scale()
        return torch.sin(phase * factor)


class LearnableOmegaSIRENKernelND(SIRENKernelND):
    """A SIREN whose first layer's phase is scaled per row by a learnable, clamped factor."""

    def __init__(
        self,
        out_dim: int,
        data_dim: int,
        mlp_hidden_dim: int,
        num_layers: int,
        embedding_dim: int,
        omega_0: float,
        L_cache: int | Sequence[int],
        use_bias: bool,
        omega_0_scale_init: float | Sequence[float] = 1.0,
        omega_0_scale_min: float = 1e-2,
        omega_0_scale_max: float = 2.0,
        hidden_omega_0: float = 1.0,
        film_cfg: FiLMConfig | dict[str, Any] | None = None,
        film_after_pos_embed: bool = False,
    ) -> None:
        # Checked (and built) first so that a bad clamp is refused before any weight is drawn.
        embedding = LearnableOmegaSIRENPositionalEmbeddingND(
            data_dim,
            embedding_dim,
            omega_0,
            omega_0_scale_init,
            omega_0_scale_min,
            omega_0_scale_max,
            use_bias,
        )
        super().__init__(
            out_dim, data_dim, mlp_hidden_dim, num_layers, embedding_dim, omega_0, L_cache, use_bias,
            hidden_omega_0, film_cfg, film_after_pos_embed,
        )  # fmt: skip
        self.positional_embedding = embedding


class BlockDiagonalLearnableOmegaSIRENKernelND(LearnableOmegaSIRENKernelND):
    """A learnable-omega SIREN with ``omega_0 = max(schedule)`` and scales starting at ``schedule / omega_0``.

    Hidden and output weights start block-diagonal (off-diagonal blocks scaled
    by ``off_block_scale``); ``embedding_dim``, ``mlp_hidden_dim`` and
    ``out_dim`` must be divisible by ``num_blocks``.
    """

    def __init__(
        self,
        out_dim: int,
        data_dim: int,
        mlp_hidden_dim: int,
        num_layers: int,
        embedding_dim: int,
        L_cache: int | Sequence[int],
        use_bias: bool,
        num_blocks: int = 8,
        omega_0_min: float = 1.0,
        omega_0_max: float = 12.0,
        schedule: str = "linear",
        off_block_scale: float = 0.1,
        omega_0_per_block: Sequence[float] | None = None,
        omega_0_scale_min: float = 1e-2,
        omega_0_scale_max: float = 2.0,
        hidden_omega_0: float = 1.0,
        film_cfg: FiLMConfig | dict[str, Any] | None = None,
        film_after_pos_embed: bool = False,
    ) -> None:
        _check_blocks(
            num_blocks, {"embedding_dim": embedding_dim, "mlp_hidden_dim": mlp_hidden_dim, "out_dim": out_dim}
        )
        blocks = block_schedule(num_blocks, omega_0_min, omega_0_max, schedule, omega_0_per_block)
        omega_0 = float(blocks.max())
        # The reference divides in float32; a share outside the scale's clamp range is refused.
        init = (blocks.float() / omega_0).repeat_interleave(embedding_dim // num_blocks).tolist()
        super().__init__(
            out_dim, data_dim, mlp_hidden_dim, num_layers, embedding_dim, omega_0, L_cache, use_bias,
            init, omega_0_scale_min, omega_0_scale_max, hidden_omega_0, film_cfg, film_after_pos_embed,
        )  # fmt: skip
        self.num_blocks = num_blocks
        self.off_block_scale = float(off_block_scale)
        self.omega_0_per_block = tuple(blocks.tolist())
        _damp_off_blocks([*self.hidden_layers(), self.out_linear], num_blocks, self.off_block_scale)
