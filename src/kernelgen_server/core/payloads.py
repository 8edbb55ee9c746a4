"""Torch tensors as wire payloads: the dtypes a kernel travels in, and zero-copy views of its memory.

Wire tensors are little-endian; every supported host is little-endian too
(checked at import), so a payload is a view of the tensor's memory.
"""

from __future__ import annotations

import sys

import torch

from kernelgen_server.errors import InvalidRequest
from kernelgen_wire.kernel_messages import Payload
from kernelgen_wire.v1 import kernelgen_pb2 as pb

__all__ = ["output_dtype", "to_payload"]

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


def output_dtype(wire: int) -> torch.dtype:
    """The torch dtype a request's wire ``dtype`` asks the kernel (or its factors) in."""
    try:
        return _OUTPUT_DTYPES[wire]
    except KeyError:
        names = ", ".join(pb.DType.Name(v) for v in _OUTPUT_DTYPES if v)
        raise InvalidRequest(f"dtype {int(wire)} is not supported; use one of {names}") from None


def to_payload(tensor: torch.Tensor) -> Payload:
    """A view of a contiguous CPU tensor's memory for the wire (no copy)."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError("payload tensors must be contiguous and on the CPU")
    wire = _WIRE_DTYPES[tensor.dtype]
    # numpy has no bfloat16: ship its bits as uint16, which is exactly the wire format.
    array = tensor.view(torch.uint16).numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
    return Payload.from_array(array, wire)
