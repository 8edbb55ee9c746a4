"""``RandomFourierKernelND``: Fourier features of the coordinates, then an MLP.

``k(x) = out_linear(MLP([cos(W x + b) | sin(W x + b)]))``: the first layer maps
the ``data_dim`` coordinates to ``embedding_dim / 2`` phases (its weights are
the random frequencies, drawn at initialisation and saved with the others),
cosines first; the MLP is ``num_layers - 1`` linears, each followed by the
``nonlinearity``. No FiLM. ``state_dict`` names follow the reference:
``positional_embedding.linear``, ``kernel_network.{2i}`` (the linears, with the
activations between them at the odd indices) and ``out_linear``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from kernelgen_server.model.siren import (
    KernelGenerator,
    check_frequency,
    check_int,
    normalize_lengths,
)

__all__ = [
    "NONLINEARITIES",
    "RandomFourierKernelND",
    "RandomFourierPositionalEmbeddingND",
    "nonlinearity_name",
]

#: The activations a served ``RandomFourierKernelND`` may use, by config name: none has parameters.
NONLINEARITIES: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}


def nonlinearity_name(module: nn.Module) -> str | None:
    """The config name of an activation module, or None when it is none of ``NONLINEARITIES``."""
    kind = type(module).__name__
    if kind == "GELU":
        approximate = getattr(module, "approximate", "none")
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(approximate)
    names = {"ReLU": "relu", "SiLU": "silu", "Tanh": "tanh", "Sigmoid": "sigmoid"}
    if kind in names and not any(True for _ in module.parameters()):
        return names[kind]
    return None


class RandomFourierPositionalEmbeddingND(nn.Module):
    """``[cos(W x + b) | sin(W x + b)]`` with ``W`` ``[embedding_dim / 2, data_dim]``, in float32."""

    def __init__(self, data_dim: int, embedding_dim: int, omega_0: float, use_bias: bool) -> None:
        super().__init__()
        if embedding_dim % 2:
            raise ValueError(f"embedding_dim must be even for Fourier features, got {embedding_dim}")
        self.omega_0 = omega_0
        self.linear = nn.Linear(data_dim, embedding_dim // 2, bias=use_bias)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Frequencies ``N(0, (2*pi*omega_0)^2)``, phases 0 (the reference's initialisation)."""
        self.linear.weight.normal_(0.0, 2.0 * math.pi * self.omega_0)
        if self.linear.bias is not None:
            self.linear.bias.zero_()

    def affine(self) -> tuple[Tensor, Tensor | None]:
        bias = None if self.linear.bias is None else self.linear.bias.detach().double()
        return self.linear.weight.detach().double(), bias

    def forward(self, grid: Tensor) -> Tensor:
        weight = self.linear.weight.float()
        bias = None if self.linear.bias is None else self.linear.bias.float()
        phase = nn.functional.linear(grid.float(), weight, bias)
        return torch.cat([torch.cos(phase), torch.sin(phase)], dim=-1)


class RandomFourierKernelND(KernelGenerator):
    """Convolution kernel from random Fourier features of the grid and an MLP (no FiLM).

    Example::

        >>> m = RandomFourierKernelND(out_dim=4, data_dim=1, mlp_hidden_dim=8, num_layers=3,
        ...                           embedding_dim=8, omega_0=2.0, L_cache=9, use_bias=True,
        ...                           nonlinearity="gelu")
        >>> tuple(m((5,))[0].shape)
        (1, 9, 4)
    """

    features = "fourier"

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
        nonlinearity: str = "gelu",
    ) -> None:
        super().__init__()
        self.out_dim = check_int("out_dim", out_dim, 1)
        self.data_dim = check_int("data_dim", data_dim, 1)
        self.mlp_hidden_dim = check_int("mlp_hidden_dim", mlp_hidden_dim, 1)
        self.num_layers = check_int("num_layers", num_layers, 2)
        self.embedding_dim = check_int("embedding_dim", embedding_dim, 2)
        self.L_cache = normalize_lengths("L_cache", L_cache, data_dim, 2)
        self.omega_0 = check_frequency("omega_0", omega_0)
        if not isinstance(use_bias, bool):
            raise ValueError(f"use_bias must be a bool, got {use_bias!r}")
        if nonlinearity not in NONLINEARITIES:
            raise ValueError(f"nonlinearity must be one of {', '.join(NONLINEARITIES)}, got {nonlinearity!r}")
        self.use_bias = use_bias
        self.nonlinearity = nonlinearity
        self.film_generator = None
        self.film_after_pos_embed = False
        self.num_film_layers = 0
        self.positional_embedding = RandomFourierPositionalEmbeddingND(
            data_dim, embedding_dim, omega_0, use_bias
        )
        layers: list[nn.Module] = []
        for width in [embedding_dim] + [mlp_hidden_dim] * (num_layers - 2):
            layers += [nn.Linear(width, mlp_hidden_dim, bias=use_bias), NONLINEARITIES[nonlinearity]()]
        self.kernel_network = nn.Sequential(*layers)
        self.out_linear = nn.Linear(mlp_hidden_dim, out_dim, bias=use_bias)
        with torch.no_grad():  # Wang scaling: the initial kernel's energy does not depend on the grid volume
            self.out_linear.weight.mul_(math.sqrt(1.0 / math.prod(self.L_cache)))

    def hidden_layers(self) -> list[nn.Linear]:
        return [layer for layer in self.kernel_network if isinstance(layer, nn.Linear)]

    def activation(self, x: Tensor) -> Tensor:
        result: Tensor = self.kernel_network[1](x)  # every activation is the same parameter-free module
        return result

    def embedding_affine(self) -> tuple[Tensor, Tensor | None]:
        return self.positional_embedding.affine()

    def forward(
        self, seq_lens: int | Sequence[int], conditioning: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(kernel [1, *spatial, out_dim], grid)``; the generator takes no conditioning."""
        if conditioning is not None:
            raise ValueError("RandomFourierKernelND takes no conditioning")
        grid = self.grid(seq_lens)
        h = self.positional_embedding(grid).to(self.out_linear.weight.dtype)
        return self.out_linear(self.kernel_network(h)), grid

    def flop_count(self, grid_lens: int | Sequence[int], inference: bool = False) -> int:
        """kernelgen's count (the reference defines none), by the SIREN's rules.

        Zero at inference (no conditioning: the kernel is computed once and
        cached); otherwise, with ``G`` grid points, ``2 G D E/2`` for the phases
        and ``G E`` for their cosines and sines, ``2 G in out + G out`` per hidden
        linear and its activation, and ``2 G H out_dim`` for the output.
        """
        if inference:
            return 0
        g = math.prod(2 * n - 1 for n in self.normalize_seq_lens(grid_lens))
        e, h = self.embedding_dim, self.mlp_hidden_dim
        flops = 2 * g * self.data_dim * (e // 2) + g * e
        flops += sum(
            2 * g * lin.in_features * lin.out_features + g * lin.out_features for lin in self.hidden_layers()
        )
        return flops + 2 * g * h * self.out_dim
