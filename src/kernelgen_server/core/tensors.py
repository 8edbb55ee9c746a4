"""Tensors between the wire and torch: dtype mapping and strict decoding.

Wire tensors are little-endian; every supported host is little-endian too
(checked at import), so decoding is a view of the received bytes and encoding
a view of the tensor's memory.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np
import torch

from kernelgen_server.errors import InvalidRequest
from kernelgen_wire.dtypes import NUMPY_LAYOUTS
from kernelgen_wire.kernel_messages import Payload
from kernelgen_wire.v1 import kernelgen_pb2 as pb

__all__ = [
    "centre",
    "decode_conditioning",
    "decode_output_dtype",
    "decode_representation",
    "itemsize",
    "to_payload",
]

if sys.byteorder != "little":  # pragma: no cover - no such host is supported
    raise ImportError("kernelgen_server needs a little-endian host")

_OUTPUT_DTYPES: dict[int, torch.dtype] = {
    pb.DTYPE_UNSPECIFIED: torch.float32,
    pb.DTYPE_FLOAT32: torch.float32,
    pb.DTYPE_FLOAT16: torch.float16,
    pb.DTYPE_BFLOAT16: torch.bfloat16,
}
_WIRE_DTYPES: dict[torch.dtype, int] = {
    torch.float32: pb.DTYPE_FLOAT32,
    torch.float16: pb.DTYPE_FLOAT16,
    torch.bfloat16: pb.DTYPE_BFLOAT16,
}


def decode_output_dtype(value: int) -> torch.dtype:
    try:
        return _OUTPUT_DTYPES[value]
    except KeyError:
        names = ", ".join(pb.DType.Name(v) for v in _OUTPUT_DTYPES if v)
        raise InvalidRequest(f"dtype {int(value)} is not supported; use one of {names}") from None


def decode_representation(value: int) -> bool:
    """Whether a request asks for the factored representation (unset means dense)."""
    if value in (pb.REPRESENTATION_UNSPECIFIED, pb.REPRESENTATION_DENSE):
        return False
    if value == pb.REPRESENTATION_FACTORED:
        return True
    raise InvalidRequest(f"representation {value} is not supported; use DENSE or FACTORED")


def itemsize(dtype: torch.dtype) -> int:
    return int(dtype.itemsize)


def decode_conditioning(tensor: pb.Tensor) -> np.ndarray:
    """A ``[B, C]`` float32 conditioning, checked for dtype, shape, size and finiteness."""
    if tensor.dtype not in (pb.DTYPE_UNSPECIFIED, pb.DTYPE_FLOAT32):
        known = tensor.dtype in pb.DType.values()
        name = pb.DType.Name(tensor.dtype) if known else f"unknown dtype {tensor.dtype}"
        raise InvalidRequest(f"conditioning must be float32, got {name}")
    shape = tuple(tensor.shape)
    if len(shape) != 2 or min(shape) < 1:
        raise InvalidRequest(f"conditioning must have shape [B, C] with B, C >= 1, got {list(shape)[:4]}")
    expected = shape[0] * shape[1] * 4
    if len(tensor.data) != expected:
        raise InvalidRequest(
            f"conditioning of shape {list(shape)} needs {expected} bytes of float32, got {len(tensor.data)}"
        )
    array = np.frombuffer(tensor.data, dtype="<f4").reshape(shape)
    if not np.isfinite(array).all():
        raise InvalidRequest("conditioning contains NaN or Inf")
    return array


def centre(kernel: Payload, spatial: Sequence[int]) -> Payload:
    """The central ``spatial`` block of a ``[B, *S, C]`` kernel, as a new contiguous payload.

    Every ``S_i - spatial_i`` must be even and >= 0: the kernel of ``seq_lens``
    ``n`` is the centre of the kernel of any ``m >= n`` of the same model, since
    its grid is the centre of the larger grid (``model.axis_coordinates``).
    """
    big = kernel.shape[1:-1]
    if len(big) != len(spatial) or any(b < s or (b - s) % 2 for b, s in zip(big, spatial, strict=True)):
        raise ValueError(f"no centred {list(spatial)} block in a kernel of shape {list(kernel.shape)}")
    array = np.frombuffer(kernel.data, NUMPY_LAYOUTS[kernel.dtype]).reshape(kernel.shape)
    middle = [slice((b - s) // 2, (b + s) // 2) for b, s in zip(big, spatial, strict=True)]
    block = array[(slice(None), *middle, slice(None))]
    return Payload.from_array(np.ascontiguousarray(block), kernel.dtype)


def to_payload(tensor: torch.Tensor) -> Payload:
    """A view of a contiguous CPU tensor's memory for the wire (no copy)."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError("payload tensors must be contiguous and on the CPU")
    wire = _WIRE_DTYPES[tensor.dtype]
    # numpy has no bfloat16: ship its bits as uint16, which is exactly the wire format.
    array = tensor.view(torch.uint16).numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
    return Payload.from_array(array, wire)
