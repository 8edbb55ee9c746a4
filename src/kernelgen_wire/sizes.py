"""The sizes of what travels, for both ends: a kernel's shape from its seq_lens, and a tensor's bytes.

One definition each: the server plans its limits and shared-memory regions
with them, the client predicts a response's size with them (to choose between
a unary call and a stream, or to size a region), and the load tester sizes its
regions with them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from kernelgen_wire.dtypes import itemsize
from kernelgen_wire.v1 import kernelgen_pb2 as pb

__all__ = ["GRID_DTYPE", "kernel_spatial", "seq_lens_of", "tensor_bytes"]

#: The wire dtype of a coordinate grid: always float32, whatever the kernel's dtype.
GRID_DTYPE = pb.DTYPE_FLOAT32


def kernel_spatial(seq_lens: Sequence[int], causal: bool = False) -> tuple[int, ...]:
    """A kernel's spatial shape for ``seq_lens``: ``2 * s - 1`` grid points on each axis.

    ``causal``: a causal (1-D) model's kernel keeps the centre and the positive
    half of its first axis, ``s`` points (``kernelgen_wire.grids``).
    """
    shape = [2 * int(s) - 1 for s in seq_lens]
    if causal and shape:
        shape[0] = int(seq_lens[0])
    return tuple(shape)


def seq_lens_of(spatial: Sequence[int], causal: bool = False) -> tuple[int, ...]:
    """The ``seq_lens`` whose kernel has ``spatial`` shape: the inverse of ``kernel_spatial``."""
    lens = [(int(n) + 1) // 2 for n in spatial]
    if causal and lens:
        lens[0] = int(spatial[0])
    return tuple(lens)


def tensor_bytes(shape: Sequence[int], dtype: int) -> int:
    """Bytes of a tensor of ``shape`` in wire ``dtype`` (unspecified means float32)."""
    return math.prod(int(n) for n in shape) * itemsize(dtype)
