"""Tensors between Python and the wire: dtype names, conditioning encoding, kernel decoding.

Wire tensors are little-endian and row-major; so is every supported host
(checked at import), so decoding is a view of the received bytes:

- float32 and float16 decode to numpy without copying;
- bfloat16 has no numpy dtype: its 16 bits are the upper half of a float32,
  so numpy callers get a float32 array (the bits shifted into place, one new
  array); torch callers get a ``torch.bfloat16`` tensor viewing the bytes.

torch is optional: it is imported only when a torch tensor is passed in or
asked for.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import numpy.typing as npt

from kernelgen_client.errors import InvalidRequest, MalformedResponse
from kernelgen_wire.dtypes import DTYPE_NAMES, ITEMSIZE, dtype_name, itemsize
from kernelgen_wire.v1 import kernelgen_pb2 as pb

if TYPE_CHECKING:
    import torch

__all__ = [
    "DTYPE_NAMES",
    "ConditioningLike",
    "DTypeLike",
    "decode_numpy",
    "decode_torch",
    "dtype_name",
    "encode_conditioning",
    "itemsize",
    "wire_dtype",
]

if sys.byteorder != "little":  # pragma: no cover - no such host is supported
    raise ImportError("kernelgen_client needs a little-endian host")

#: Anything ``generate`` takes as conditioning: an array, nested lists, or a torch tensor.
ConditioningLike = Union[npt.ArrayLike, "torch.Tensor"]
#: An output dtype: a name (``"float32"``, ``"bf16"``, ...), a numpy dtype or a torch dtype.
DTypeLike = Union[str, np.dtype[Any], type[np.floating[Any]], "torch.dtype"]

_ALIASES: dict[str, int] = {
    "float32": pb.DTYPE_FLOAT32,
    "fp32": pb.DTYPE_FLOAT32,
    "f32": pb.DTYPE_FLOAT32,
    "float": pb.DTYPE_FLOAT32,
    "float16": pb.DTYPE_FLOAT16,
    "fp16": pb.DTYPE_FLOAT16,
    "f16": pb.DTYPE_FLOAT16,
    "half": pb.DTYPE_FLOAT16,
    "bfloat16": pb.DTYPE_BFLOAT16,
    "bf16": pb.DTYPE_BFLOAT16,
}


def wire_dtype(dtype: DTypeLike) -> int:
    """The ``kernelgen.v1.DType`` for a dtype name, numpy dtype or torch dtype.

    >>> wire_dtype("bf16") == wire_dtype("bfloat16")
    True
    """
    if isinstance(dtype, str):
        name = dtype
    elif isinstance(dtype, (np.dtype, type)):
        name = np.dtype(dtype).name
    else:
        name = str(dtype).removeprefix("torch.")
    try:
        return _ALIASES[name.strip().lower()]
    except KeyError:
        raise InvalidRequest(f"unsupported dtype {dtype!r}; use float32, float16 or bfloat16") from None


def _is_torch_tensor(value: object) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "detach")


def encode_conditioning(conditioning: ConditioningLike) -> tuple[pb.Tensor, int]:
    """A ``[B, C]`` float32 wire tensor and its row count B.

    A 1-D input is one row. Values must be finite; anything else is refused
    here with ``InvalidRequest`` before a byte is sent.
    """
    if _is_torch_tensor(conditioning):
        tensor: Any = conditioning
        array = tensor.detach().to("cpu").float().numpy()
    else:
        try:
            array = np.asarray(conditioning, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise InvalidRequest(f"conditioning is not a numeric array: {exc}") from None
    if array.ndim == 1:
        array = array.reshape(1, -1)
    if array.ndim != 2 or array.shape[0] < 1 or array.shape[1] < 1:
        raise InvalidRequest(f"conditioning must have shape [B, C] or [C], got {list(array.shape)}")
    array = np.ascontiguousarray(array, dtype="<f4")
    if not np.isfinite(array).all():
        raise InvalidRequest("conditioning contains NaN or Inf")
    tensor_pb = pb.Tensor(shape=array.shape, dtype=pb.DTYPE_FLOAT32, data=array.tobytes())
    return tensor_pb, int(array.shape[0])


def _check(data: memoryview, shape: Sequence[int], wire: int) -> None:
    if wire not in ITEMSIZE and wire != pb.DTYPE_UNSPECIFIED:
        raise MalformedResponse(f"the server sent a tensor of unknown dtype {wire}")
    expected = itemsize(wire)
    for n in shape:
        if n < 0:
            raise MalformedResponse(f"the server sent a negative dimension in shape {list(shape)}")
        expected *= n
    if data.nbytes != expected:
        raise MalformedResponse(
            f"a {dtype_name(wire)} tensor of shape {list(shape)} needs {expected} bytes, got {data.nbytes}"
        )


def decode_numpy(
    data: memoryview, shape: Sequence[int], wire: int, *, copy: bool = False
) -> npt.NDArray[Any]:
    """A numpy array of the wire tensor; a view of ``data`` unless ``copy`` or bfloat16.

    The view is read-only when ``data`` is (a unary response's bytes);
    bfloat16 becomes float32 (a new array).
    """
    _check(data, shape, wire)
    if wire == pb.DTYPE_BFLOAT16:
        bits = np.frombuffer(data, dtype="<u2")
        # bfloat16 is the upper half of a float32: widen, shift into place, reinterpret.
        return (bits.astype(np.uint32) << 16).view(np.float32).reshape(shape)
    array = np.frombuffer(data, dtype="<f2" if wire == pb.DTYPE_FLOAT16 else "<f4").reshape(shape)
    return array.copy() if copy else array


def decode_torch(data: memoryview, shape: Sequence[int], wire: int, *, copy: bool = False) -> torch.Tensor:
    """A torch tensor of the wire tensor, bfloat16 kept as ``torch.bfloat16``.

    Zero-copy when ``data`` is writable (a streamed kernel's buffer) and
    ``copy`` is false; a read-only buffer is copied once, since torch tensors
    are always writable.
    """
    import torch

    _check(data, shape, wire)
    by_wire: dict[int, torch.dtype] = {pb.DTYPE_FLOAT16: torch.float16, pb.DTYPE_BFLOAT16: torch.bfloat16}
    torch_dtype = by_wire.get(wire, torch.float32)
    if data.nbytes == 0:
        return torch.empty(tuple(shape), dtype=torch_dtype)
    if copy or data.readonly:
        data = memoryview(bytearray(data))
    return torch.frombuffer(data, dtype=torch_dtype).reshape(tuple(shape))
