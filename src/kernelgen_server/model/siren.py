"""The SIREN kernel generator: exact reference semantics, no serving concerns.

``SIRENKernelND`` maps a coordinate grid to convolution-kernel values with a
sine-activated MLP, optionally modulated per input by FiLM parameters computed
from a conditioning vector. Constructor arguments, ``state_dict`` names and
output shapes follow the reference model; docs/architecture.md ("The model,
exactly") states the facts the reference documentation leaves implicit.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "FiLMConfig",
    "KernelFiLMGenerator",
    "KernelGenerator",
    "SIRENKernelND",
    "SIRENPositionalEmbeddingND",
    "axis_coordinates",
    "kernel_grid",
    "normalize_lengths",
]


def check_int(name: str, value: object, minimum: int) -> int:
    """``value`` if it is an int (not a bool) of at least ``minimum``, else ``ValueError`` naming it."""
    # bool is an int subclass; a flag passed where a size belongs is a bug.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_frequency(name: str, value: object) -> float:
    """``value`` as a float if it is a finite number > 0 (not a bool), else ``ValueError`` naming it."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def normalize_lengths(name: str, value: int | Sequence[int], data_dim: int, minimum: int) -> tuple[int, ...]:
    """Broadcast an int to ``data_dim`` axes or check a per-axis sequence."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != data_dim:
            raise ValueError(
                f"{name} has {len(value)} entries but data_dim is {data_dim}: give one int or one per axis"
            )
        return tuple(check_int(f"{name}[{i}]", v, minimum) for i, v in enumerate(value))
    return (check_int(name, value, minimum),) * data_dim


def axis_coordinates(seq_len: int, cache_len: int) -> Tensor:
    """Coordinates of one axis: ``k / (cache_len - 1)`` for ``k = -(s-1)..(s-1)``, float32.

    This is the central ``2*s - 1`` points of ``linspace(-1, 1, 2*cache_len - 1)``
    and, for ``s > cache_len``, its extension with the same step. Each value is
    the float32 rounding of the exact rational, so the grid for a shorter
    ``seq_len`` is bit-for-bit the centre of the grid for a longer one.
    """
    k = torch.arange(-(seq_len - 1), seq_len, dtype=torch.float64)
    return (k / (cache_len - 1)).to(torch.float32)


def kernel_grid(seq_lens: Sequence[int], cache_lens: Sequence[int]) -> Tensor:
    """The ``[1, 2*s_0-1, ..., 2*s_{D-1}-1, D]`` float32 coordinate grid (``ij`` indexing)."""
    axes = [axis_coordinates(s, c) for s, c in zip(seq_lens, cache_lens, strict=True)]
    mesh = torch.meshgrid(*axes, indexing="ij")
    return torch.stack(mesh, dim=-1).unsqueeze(0)


@dataclass(frozen=True)
class FiLMConfig:
    """Shape of the FiLM generator: ``Linear(cond_dim, film_hidden_dim) -> GELU -> Linear``.

    ``num_film_layers`` may be given to state the expected number of modulated
    layers; a mismatch with the architecture is refused at construction.
    """

    cond_dim: int
    film_hidden_dim: int = 64
    num_film_layers: int | None = None

    @classmethod
    def coerce(cls, value: FiLMConfig | dict[str, Any] | None) -> FiLMConfig | None:
        if value is None or isinstance(value, FiLMConfig):
            return value
        if isinstance(value, dict):
            unknown = set(value) - {"cond_dim", "film_hidden_dim", "num_film_layers"}
            if unknown:
                raise ValueError(f"film config has unknown keys {sorted(unknown)}")
            if "cond_dim" not in value:
                raise ValueError("film config needs cond_dim")
            return cls(**value)
        raise ValueError(f"film_cfg must be a mapping or None, got {type(value).__name__}")


class KernelFiLMGenerator(nn.Module):
    """Maps a ``[B, cond_dim]`` conditioning to ``num_film_layers`` (gamma, beta) pairs.

    The second linear's output splits into ``num_film_layers`` equal chunks in
    layer order; each chunk is ``[gamma | beta]``, both ``[B, hidden_dim]``.
    """

    def __init__(
        self, cond_dim: int, hidden_dim: int, num_film_layers: int, film_hidden_dim: int = 64
    ) -> None:
        super().__init__()
        self.cond_dim = check_int("film cond_dim", cond_dim, 1)
        self.hidden_dim = check_int("film hidden_dim", hidden_dim, 1)
        self.num_film_layers = check_int("num_film_layers", num_film_layers, 1)
        self.film_hidden_dim = check_int("film_hidden_dim", film_hidden_dim, 1)
        self.mlp = nn.Sequential(
            nn.Linear(cond_dim, film_hidden_dim),
            nn.GELU(),  # exact (erf) GELU
            nn.Linear(film_hidden_dim, num_film_layers * 2 * hidden_dim),
        )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, spread: float = 0.5) -> None:
        """Start near gamma = 1, beta = 0, with enough spread that conditioning matters.

        An exact identity start (zero last layer) would make every conditioning
        produce the same kernel; a fresh model should visibly respond to it.
        """
        first, last = self.first_linear, self.last_linear
        first.reset_parameters()
        bound = spread / math.sqrt(self.film_hidden_dim)
        last.weight.uniform_(-bound, bound)
        bias = last.bias.view(self.num_film_layers, 2, self.hidden_dim)
        bias[:, 0].fill_(1.0)
        bias[:, 1].zero_()

    @property
    def first_linear(self) -> nn.Linear:
        layer = self.mlp[0]
        assert isinstance(layer, nn.Linear)
        return layer

    @property
    def last_linear(self) -> nn.Linear:
        layer = self.mlp[2]
        assert isinstance(layer, nn.Linear)
        return layer

    def forward(self, conditioning: Tensor) -> list[tuple[Tensor, Tensor]]:
        out = self.mlp(conditioning)
        chunks = out.chunk(self.num_film_layers, dim=-1)
        return [(c[..., : self.hidden_dim], c[..., self.hidden_dim :]) for c in chunks]

    def flop_count(self) -> int:
        """FLOPs for one conditioning row: two linears (2*in*out each) plus one per GELU."""
        out = self.num_film_layers * 2 * self.hidden_dim
        return (
            2 * self.cond_dim * self.film_hidden_dim + self.film_hidden_dim + 2 * self.film_hidden_dim * out
        )


class SIRENPositionalEmbeddingND(nn.Module):
    """``phi(x) = sin(W_0 x + b_0)``; the first-layer frequency ``omega_0`` lives in W_0."""

    def __init__(self, data_dim: int, embedding_dim: int, omega_0: float, use_bias: bool) -> None:
        super().__init__()
        self.omega_0 = omega_0
        self.linear = nn.Linear(data_dim, embedding_dim, bias=use_bias)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        fan_in = self.linear.in_features
        self.linear.weight.uniform_(-self.omega_0 / fan_in, self.omega_0 / fan_in)
        if self.linear.bias is not None:
            self.linear.bias.uniform_(-1.0, 1.0)

    def affine(self) -> tuple[Tensor, Tensor | None]:
        """The first layer as the forward applies it, ``(W_0, b_0)`` in float64 (phase ``W_0 x + b_0``)."""
        bias = None if self.linear.bias is None else self.linear.bias.detach().double()
        return self.linear.weight.detach().double(), bias

    def forward(self, grid: Tensor) -> Tensor:
        # The embedding is evaluated in at least float32 whatever the weights are:
        # sine arguments reach |omega_0| and half precision would wreck them.
        dtype = torch.promote_types(torch.float32, self.linear.weight.dtype)
        weight = self.linear.weight.to(dtype)
        bias = None if self.linear.bias is None else self.linear.bias.to(dtype)
        return torch.sin(nn.functional.linear(grid.to(dtype), weight, bias))


class KernelGenerator(nn.Module):
    """What every kernel generator is to the rest of kernelgen: a map from ``seq_lens`` to a kernel.

    ``forward(seq_lens, conditioning)`` returns ``(kernel [1|B, *spatial, out_dim],
    grid [1, *spatial, data_dim])`` on the grid ``kernel_grid(seq_lens, L_cache)``.
    Every generator is an embedding of the coordinates (``features``: ``"sine"``,
    ``sin(W_0 x + b_0)``, or ``"fourier"``, ``[cos(W_0 x + b_0) | sin(W_0 x + b_0)]``,
    with ``embedding_affine()`` the effective ``(W_0, b_0)``), then
    ``hidden_layers()`` each followed by ``activation``, then ``out_linear``; FiLM
    (``film_generator``, where the class takes it) modulates the activations. The
    engine serves any generator from these facts alone. A subclass holds every
    parameter and buffer in its child modules, never on itself.
    """

    out_dim: int
    data_dim: int
    mlp_hidden_dim: int
    num_layers: int
    embedding_dim: int
    L_cache: tuple[int, ...]
    use_bias: bool
    film_after_pos_embed: bool
    num_film_layers: int
    film_generator: KernelFiLMGenerator | None
    out_linear: nn.Linear
    #: How the first layer's phases become features: ``"sine"`` or ``"fourier"``.
    features: str = "sine"

    @property
    def cond_dim(self) -> int | None:
        return None if self.film_generator is None else self.film_generator.cond_dim

    def hidden_layers(self) -> list[nn.Linear]:
        """The linears between the embedding and ``out_linear``, in order, each followed by ``activation``."""
        raise NotImplementedError

    def activation(self, x: Tensor) -> Tensor:
        """The hidden activation (it may work in place on ``x``)."""
        raise NotImplementedError

    def embedding_affine(self) -> tuple[Tensor, Tensor | None]:
        """The first layer as the forward applies it, ``(W_0, b_0)`` in float64, any scaling folded in."""
        raise NotImplementedError

    def normalize_seq_lens(self, seq_lens: int | Sequence[int]) -> tuple[int, ...]:
        return normalize_lengths("seq_lens", seq_lens, self.data_dim, 1)

    def grid(self, seq_lens: int | Sequence[int]) -> Tensor:
        return kernel_grid(self.normalize_seq_lens(seq_lens), self.L_cache)

    def flop_count(self, grid_lens: int | Sequence[int], inference: bool = False) -> int:
        raise NotImplementedError


class SIRENKernelND(KernelGenerator):
    """Convolution kernel parametrised by a SIREN MLP over a coordinate grid.

    ``k(x) = W_out h_{N-1} + b_out`` with ``h_0 = sin(W_0 x + b_0)`` and
    ``h_i = sin(W_i h_{i-1} + b_i)``; with conditioning, each hidden ``h_i``
    (and ``h_0`` when ``film_after_pos_embed``) becomes ``gamma_i * h_i + beta_i``.

    Example::

        >>> m = SIRENKernelND(out_dim=8, data_dim=2, mlp_hidden_dim=16, num_layers=3,
        ...                   embedding_dim=16, omega_0=10.0, L_cache=15, use_bias=True)
        >>> kernel, grid = m((5, 7))
        >>> tuple(kernel.shape), tuple(grid.shape)
        ((1, 9, 13, 8), (1, 9, 13, 2))
    """

    film_generator: KernelFiLMGenerator | None

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
        hidden_omega_0: float = 1.0,
        film_cfg: FiLMConfig | dict[str, Any] | None = None,
        film_after_pos_embed: bool = False,
    ) -> None:
        super().__init__()
        self.out_dim = check_int("out_dim", out_dim, 1)
        self.data_dim = check_int("data_dim", data_dim, 1)
        self.mlp_hidden_dim = check_int("mlp_hidden_dim", mlp_hidden_dim, 1)
        self.num_layers = check_int("num_layers", num_layers, 2)
        self.embedding_dim = check_int("embedding_dim", embedding_dim, 1)
        self.L_cache = normalize_lengths("L_cache", L_cache, data_dim, 2)
        check_frequency("omega_0", omega_0)
        check_frequency("hidden_omega_0", hidden_omega_0)
        for name, flag in (("use_bias", use_bias), ("film_after_pos_embed", film_after_pos_embed)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be a bool, got {flag!r}")
        self.omega_0 = float(omega_0)
        self.hidden_omega_0 = float(hidden_omega_0)
        self.use_bias = use_bias
        self.film_after_pos_embed = film_after_pos_embed
        film = FiLMConfig.coerce(film_cfg)
        if film_after_pos_embed:
            if film is None:
                raise ValueError(
                    "film_after_pos_embed=True needs a FiLM config (film_cfg): without FiLM it modulates "
                    "nothing (the reference package accepts it as a no-op); set it false"
                )
            if embedding_dim != mlp_hidden_dim:
                raise ValueError(
                    "film_after_pos_embed=True requires embedding_dim == mlp_hidden_dim, got "
                    f"{embedding_dim} != {mlp_hidden_dim}"
                )

        self.positional_embedding = SIRENPositionalEmbeddingND(data_dim, embedding_dim, omega_0, use_bias)
        dims = [embedding_dim] + [mlp_hidden_dim] * (num_layers - 1)
        self.hidden_linears = nn.ModuleList(
            nn.Linear(d_in, d_out, bias=use_bias) for d_in, d_out in itertools.pairwise(dims)
        )
        self.out_linear = nn.Linear(mlp_hidden_dim, out_dim, bias=use_bias)
        self.num_film_layers = len(self.hidden_linears)

        self.film_generator = None
        if film is not None:
            expected = self.num_film_layers + int(film_after_pos_embed)
            if film.num_film_layers is not None and film.num_film_layers != expected:
                raise ValueError(
                    f"FiLM config asks for {film.num_film_layers} FiLM layers but the model has "
                    f"{expected} (num_layers - 1 = {self.num_film_layers}"
                    f"{' + 1 for film_after_pos_embed' if film_after_pos_embed else ''})"
                )
            self.film_generator = KernelFiLMGenerator(
                film.cond_dim, mlp_hidden_dim, expected, film.film_hidden_dim
            )
        self.reset_parameters()

    def hidden_layers(self) -> list[nn.Linear]:
        return [layer for layer in self.hidden_linears if isinstance(layer, nn.Linear)]

    def activation(self, x: Tensor) -> Tensor:
        return x.sin_()

    def embedding_affine(self) -> tuple[Tensor, Tensor | None]:
        return self.positional_embedding.affine()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """SIREN initialisation, plus Wang scaling of the readout."""
        self.positional_embedding.reset_parameters()
        for linear in [*self.hidden_linears, self.out_linear]:
            bound = self.hidden_omega_0 * math.sqrt(6.0 / linear.in_features)
            linear.weight.uniform_(-bound, bound)
            if linear.bias is not None:
                b = 1.0 / math.sqrt(linear.in_features)
                linear.bias.uniform_(-b, b)
        for linear in self.hidden_linears:
            linear.weight._no_weight_decay = True  # type: ignore[union-attr,attr-defined]
        # Wang init: the initial kernel's energy does not depend on the grid volume.
        self.out_linear.weight.mul_(math.sqrt(1.0 / math.prod(self.L_cache)))
        if self.out_linear.bias is not None:
            self.out_linear.bias._no_weight_decay = True  # type: ignore[attr-defined]
        if self.film_generator is not None:
            self.film_generator.reset_parameters()

    def forward(
        self, seq_lens: int | Sequence[int], conditioning: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Return ``(kernel [1|B, *spatial, out_dim], grid [1, *spatial, data_dim])``."""
        grid = self.grid(seq_lens)
        weight_dtype = self.out_linear.weight.dtype
        films: list[tuple[Tensor, Tensor]] = []
        if conditioning is not None and self.film_generator is not None:
            if conditioning.dim() != 2 or conditioning.shape[1] != self.film_generator.cond_dim:
                want, got = self.film_generator.cond_dim, list(conditioning.shape)
                raise ValueError(f"conditioning must be [B, {want}], got {got}")
            cond_dtype = self.film_generator.first_linear.weight.dtype
            films = self.film_generator(conditioning.to(cond_dtype))
        spatial = len(grid.shape) - 2
        # gamma/beta [B, H] broadcast over the spatial axes: [B, 1, ..., 1, H].
        films = [
            (g.reshape(g.shape[0], *([1] * spatial), -1), b.reshape(b.shape[0], *([1] * spatial), -1))
            for g, b in films
        ]
        pairs = iter(films)

        h = self.positional_embedding(grid).to(weight_dtype)
        if films and self.film_after_pos_embed:
            gamma, beta = next(pairs)
            h = gamma * h + beta
        for linear in self.hidden_linears:
            h = torch.sin(linear(h))
            if films:
                gamma, beta = next(pairs)
                h = gamma * h + beta
        return self.out_linear(h), grid

    def flop_count(self, grid_lens: int | Sequence[int], inference: bool = False) -> int:
        """Integer FLOP estimate for one forward pass, as the reference defines it.

        Zero at inference without a FiLM generator: such a kernel is input
        independent and is computed once and cached.
        """
        if inference and self.film_generator is None:
            return 0
        lens = self.normalize_seq_lens(grid_lens)
        g = math.prod(2 * n - 1 for n in lens)
        e, h, d = self.embedding_dim, self.mlp_hidden_dim, self.data_dim
        flops = 2 * g * d * e + g * e
        flops += 2 * g * e * h + g * h
        flops += (self.num_layers - 2) * (2 * g * h * h + g * h)
        flops += 2 * g * h * self.out_dim
        if self.film_generator is not None:
            modulated = self.num_film_layers + int(self.film_after_pos_embed)
            flops += self.film_generator.flop_count() + modulated * 2 * g * h
        return flops
