"""A served model: a kernel generator, an optional mask and a causal flag.

This is the kernel a layer convolves with (nvSubquadratic's ``CKConvND``): the
generator's kernel on the grid of ``seq_lens``, multiplied by the mask on that
whole grid, and, for a causal (1-D) layer, then cropped to its second half
along the axis: the centre and the positive coordinates, ``[1|B, s, C]`` for
``seq_lens = (s,)``. The crop keeps grid coordinates ``k / (L - 1)`` for
``k = 0 .. s-1``, so the causal kernel of ``s`` is a prefix of that of any
longer ``s'``, as a symmetric kernel is the centre of a longer one.

Every mask is a product over axes, per channel, on the served kernel's
(cropped) axes ``axes(seq_lens)``: the mask's ``form`` and ``parameter()``
describe it exactly (``masks``).

Weights: a served model's ``state_dict`` is its generator's (the same keys, so
a bare generator's weights load unchanged) plus the mask's under ``mask.``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from kernelgen_server.model.masks import Mask
from kernelgen_server.model.siren import (
    KernelFiLMGenerator,
    KernelGenerator,
    SIRENKernelND,
    SIRENPositionalEmbeddingND,
    axis_coordinates,
    normalize_lengths,
)
from kernelgen_wire.sizes import kernel_spatial

__all__ = ["ServedModel", "has_siren_forward", "output_axes", "output_grid"]


def output_axes(seq_lens: Sequence[int], cache_lens: Sequence[int], causal: bool) -> list[Tensor]:
    """Each axis's float32 coordinates of a served kernel (``axis_coordinates``, cropped when causal)."""
    axes = [axis_coordinates(s, c) for s, c in zip(seq_lens, cache_lens, strict=True)]
    if causal:
        axes[0] = axes[0][seq_lens[0] - 1 :]
    return axes


def output_grid(seq_lens: Sequence[int], cache_lens: Sequence[int], causal: bool) -> Tensor:
    """The ``[1, *spatial, D]`` float32 grid of a served kernel (``ij`` indexing)."""
    mesh = torch.meshgrid(*output_axes(seq_lens, cache_lens, causal), indexing="ij")
    return torch.stack(mesh, dim=-1).unsqueeze(0)


def has_siren_forward(generator: KernelGenerator) -> bool:
    """Whether ``generator``'s forward is ``SIRENKernelND``'s (its embedding ``sin(W_0 x + b_0)``)."""
    return (
        isinstance(generator, SIRENKernelND)
        and type(generator.positional_embedding) is SIRENPositionalEmbeddingND
    )


class ServedModel(nn.Module):
    """``crop(mask(generator(seq_lens, conditioning)))``: the kernel a layer convolves with.

    The generator's layers are this module's own children, under their own
    names (it holds no parameter of its own: ``KernelGenerator``'s rule), and
    the mask is the child ``mask``.
    """

    mask: Mask | None
    film_generator: KernelFiLMGenerator | None

    def __init__(self, generator: KernelGenerator, mask: Mask | None = None, causal: bool = False) -> None:
        super().__init__()
        if not isinstance(causal, bool):
            raise ValueError(f"causal must be a bool, got {causal!r}")
        if causal and generator.data_dim != 1:
            raise ValueError(
                f"causal is for 1-D kernels (a causal layer's), but data_dim is {generator.data_dim}"
            )
        if mask is not None:
            if mask.data_dim != generator.data_dim:
                raise ValueError(f"the mask is {mask.data_dim}-D but the kernel is {generator.data_dim}-D")
            if mask.num_channels != generator.out_dim:
                raise ValueError(
                    f"the mask has {mask.num_channels} channels "
                    f"but the kernel's out_dim is {generator.out_dim}"
                )
        own = [name for name, _ in generator.named_parameters(recurse=False)]
        own += [name for name, _ in generator.named_buffers(recurse=False)]
        assert not own, f"a generator keeps its tensors in its children, not {own}"
        # Not a child: its children are ours already, and registering it would name each tensor twice.
        object.__setattr__(self, "_generator", generator)
        for name, child in generator.named_children():
            self.add_module(name, child)
        self.film_generator = generator.film_generator  # the child, or None
        self.mask = mask
        self.causal = causal

    @property
    def generator(self) -> KernelGenerator:
        """The kernel generator; its layers are this module's children too."""
        generator: KernelGenerator = self.__dict__["_generator"]
        return generator

    @property
    def kind(self) -> str:
        """The generator's class name, as ``config.json``'s ``kernel`` names it."""
        return type(self.generator).__name__

    # -- the generator's facts -------------------------------------------------------------------

    @property
    def out_dim(self) -> int:
        return self.generator.out_dim

    @property
    def data_dim(self) -> int:
        return self.generator.data_dim

    @property
    def mlp_hidden_dim(self) -> int:
        return self.generator.mlp_hidden_dim

    @property
    def L_cache(self) -> tuple[int, ...]:
        return self.generator.L_cache

    @property
    def film_after_pos_embed(self) -> bool:
        return self.generator.film_after_pos_embed

    @property
    def cond_dim(self) -> int | None:
        return self.generator.cond_dim

    def flop_count(self, grid_lens: int | Sequence[int], inference: bool = False) -> int:
        """The generator's count on the full grid (what the layer computes before it masks and crops)."""
        return self.generator.flop_count(grid_lens, inference)

    # -- shapes and grids ------------------------------------------------------------------------

    def normalize_seq_lens(self, seq_lens: int | Sequence[int]) -> tuple[int, ...]:
        return normalize_lengths("seq_lens", seq_lens, self.data_dim, 1)

    def spatial_shape(self, seq_lens: int | Sequence[int]) -> tuple[int, ...]:
        return kernel_spatial(self.normalize_seq_lens(seq_lens), self.causal)

    def grid(self, seq_lens: int | Sequence[int]) -> Tensor:
        """The served kernel's ``[1, *spatial, D]`` grid (cropped when causal)."""
        return output_grid(self.normalize_seq_lens(seq_lens), self.L_cache, self.causal)

    def grid_points(self, seq_lens: int | Sequence[int]) -> int:
        return math.prod(self.spatial_shape(seq_lens))

    def axes(self, seq_lens: int | Sequence[int]) -> list[Tensor]:
        """Each axis's float32 coordinates of the served kernel (the first one cropped when causal)."""
        return output_axes(self.normalize_seq_lens(seq_lens), self.L_cache, self.causal)

    def forward(
        self, seq_lens: int | Sequence[int], conditioning: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(kernel [1|B, *spatial, out_dim], grid [1, *spatial, D])`` as the layer computes them.

        The generator's kernel on its whole grid, the mask on that grid, then
        the causal crop of both.
        """
        kernel, grid = self.generator(seq_lens, conditioning)
        if self.mask is not None:
            kernel = self.mask(grid, kernel)
        if self.causal:
            half = kernel.shape[-2] // 2
            kernel, grid = kernel[..., half:, :], grid[..., half:, :]
        return kernel, grid
