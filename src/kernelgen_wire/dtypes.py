"""The wire dtypes: names, element sizes and little-endian numpy layouts.

numpy has no bfloat16; its 16-bit patterns travel, and are laid out in numpy,
as ``uint16``.
"""

from __future__ import annotations

from kernelgen_wire.v1 import kernelgen_pb2 as pb

__all__ = ["DTYPE_BY_NAME", "DTYPE_NAMES", "ITEMSIZE", "NUMPY_LAYOUTS", "dtype_name", "itemsize", "known"]

#: Canonical name of each wire dtype.
DTYPE_NAMES: dict[int, str] = {
    pb.DTYPE_FLOAT32: "float32",
    pb.DTYPE_FLOAT16: "float16",
    pb.DTYPE_BFLOAT16: "bfloat16",
}
#: The wire dtype of each canonical name.
DTYPE_BY_NAME: dict[str, int] = {name: wire for wire, name in DTYPE_NAMES.items()}
ITEMSIZE: dict[int, int] = {pb.DTYPE_FLOAT32: 4, pb.DTYPE_FLOAT16: 2, pb.DTYPE_BFLOAT16: 2}
#: numpy dtype string of each wire dtype's bytes (bfloat16 as its bit patterns).
NUMPY_LAYOUTS: dict[int, str] = {pb.DTYPE_FLOAT32: "<f4", pb.DTYPE_FLOAT16: "<f2", pb.DTYPE_BFLOAT16: "<u2"}


def known(wire: int) -> bool:
    """A dtype this version knows; unspecified counts (it means float32)."""
    return wire == pb.DTYPE_UNSPECIFIED or wire in DTYPE_NAMES


def dtype_name(wire: int) -> str:
    """``"float32"``, ``"float16"`` or ``"bfloat16"`` (unspecified means float32)."""
    return DTYPE_NAMES[wire or pb.DTYPE_FLOAT32]


def itemsize(wire: int) -> int:
    """Bytes per element (unspecified means float32)."""
    return ITEMSIZE[wire or pb.DTYPE_FLOAT32]
