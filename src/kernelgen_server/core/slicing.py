"""Cache slicing: a kernel cut from the centre of a cached larger kernel of the same model.

The grid of ``seq_lens`` ``n`` is, bit for bit, the centre of the grid of any
``m >= n`` (axis by axis) of the same model (``model.siren.axis_coordinates``),
and grid points are independent (the generator and the mask alike: a masked
kernel is the kernel times the mask point by point), so the kernel of ``n``
(or its factors) is the centre of the kernel of ``m``: cutting it is exact.
A causal kernel's axis starts at the centre, so there the kernel of ``n`` is
the first ``n`` points of that of ``m``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kernelgen_wire.dtypes import NUMPY_LAYOUTS
from kernelgen_wire.kernel_messages import Payload

__all__ = ["centre", "covers"]


def covers(larger: Sequence[int], lens: Sequence[int]) -> bool:
    """Whether the kernel of ``larger`` seq_lens is larger and holds the kernel of ``lens`` at its centre."""
    return tuple(larger) != tuple(lens) and all(m >= n for m, n in zip(larger, lens, strict=True))


def centre(kernel: Payload, spatial: Sequence[int], *, causal: bool = False) -> Payload:
    """The central ``spatial`` block of a ``[B, *S, C]`` kernel, as a new contiguous payload.

    Every ``S_i - spatial_i`` must be even and >= 0; ``causal``: the first axis
    keeps its first ``spatial_0`` points instead (any ``S_0 >= spatial_0``).
    """
    big = kernel.shape[1:-1]
    # A causal kernel's one axis is cut from its start, every other axis around its centre.
    from_start = [causal and axis == 0 for axis in range(len(big))]
    if len(big) != len(spatial) or any(
        b < s or (not first and (b - s) % 2) for b, s, first in zip(big, spatial, from_start, strict=True)
    ):
        raise ValueError(f"no centred {list(spatial)} block in a kernel of shape {list(kernel.shape)}")
    array = np.frombuffer(kernel.data, NUMPY_LAYOUTS[kernel.dtype]).reshape(kernel.shape)
    middle = [
        slice(0, s) if first else slice((b - s) // 2, (b + s) // 2)
        for b, s, first in zip(big, spatial, from_start, strict=True)
    ]
    block = array[(slice(None), *middle, slice(None))]
    return Payload.from_array(np.ascontiguousarray(block), kernel.dtype)
