"""A kernel's coordinate grid, as both ends compute it.

Axis ``i`` of a model with ``L_cache`` ``L_i`` has coordinates ``k / (L_i - 1)``
for ``k = -(s_i - 1) .. (s_i - 1)``: each the float32 rounding of the float64
quotient, so a shorter ``seq_lens``'s grid is, bit for bit, the centre of a
longer one's (docs/architecture.md, "The model, exactly"). A causal (1-D)
kernel keeps the centre and the positive half: ``k = 0 .. s - 1``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["axis_coordinates", "kernel_grid"]


def axis_coordinates(seq_len: int, cache_len: int, *, causal: bool = False) -> np.ndarray:
    """One axis's float32 coordinates (``causal``: from the centre on)."""
    start = 0 if causal else -(seq_len - 1)
    k = np.arange(start, seq_len, dtype=np.float64)
    return (k / (cache_len - 1)).astype(np.float32)


def kernel_grid(seq_lens: Sequence[int], cache_lens: Sequence[int], *, causal: bool = False) -> np.ndarray:
    """The ``[1, *spatial, D]`` float32 grid (``ij`` indexing); ``causal`` crops the one axis."""
    axes = [
        axis_coordinates(int(s), int(c), causal=causal) for s, c in zip(seq_lens, cache_lens, strict=True)
    ]
    mesh = np.meshgrid(*axes, indexing="ij")
    return np.stack(mesh, axis=-1)[None].astype(np.float32, copy=False)
