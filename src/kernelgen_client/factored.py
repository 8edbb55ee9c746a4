"""Factored kernels: the kernel's factors and the model's output head, materialised where used.

A SIREN kernel ends in one linear layer that FiLM never modulates, so every
kernel of a model is ``factors @ output_head.weight_t + output_head.bias``:
``factors`` is ``[B, *spatial, hidden]``, the output head ``[hidden, out_dim]``
and ``[out_dim]``. A masked model's kernel is that times its mask, a product
over axes that the output head describes by its parameters (``KernelMask``)
and that is computed here on each kernel's grid. With ``hidden`` much smaller than ``out_dim`` the factors
are many times smaller than the kernel, and the output head is fetched once
per model.

Exactness: float32 factors give the server's dense kernel up to the rounding
of the last GEMM, done here instead of on the server (a few units of float32
rounding of ``sum_i |factors_i * weight_t[i, j]|``; tests hold it within
``1e-5 x max|kernel|``). bfloat16 and float16 factors round each factor once
(relative ``2**-8`` and ``2**-11``), so each kernel element is off by at most
that much of ``sum_i |factors_i * weight_t[i, j]|``. A mask (at most 1) adds
a few float32 roundings of its value: the client computes it in float64 from
the head's parameters, the server in float32 as the reference does.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import numpy as np
import numpy.typing as npt

from kernelgen_client.errors import MalformedResponse
from kernelgen_wire.masks import MASK_FORMS, mask_values
from kernelgen_wire.v1 import kernelgen_pb2 as pb

if TYPE_CHECKING:
    import torch

__all__ = ["FactoredKernel", "KernelMask", "OutputHead"]

ArrayT = TypeVar("ArrayT")
#: How many masks a ``KernelMask`` keeps (each ``[*spatial, out_dim]`` float32, a kernel row's size),
#: numpy and per torch device together.
MASKS_KEPT = 4


@dataclass(frozen=True, eq=False)
class KernelMask:
    """The mask of a masked model: ``kernel = mask * (factors @ weight_t + bias)``.

    A product over axes, per output channel, of ``form``'s factor
    (``kernelgen_wire.masks``) with ``parameter[d, c]`` (``[data_dim, out_dim]``
    float32), on the kernel's grid (coordinates from ``L_cache`` and ``causal``).
    """

    form: int  # a kernelgen.v1.MaskForm value
    parameter: npt.NDArray[np.float32]
    L_cache: tuple[int, ...]
    causal: bool
    #: The mask on the last few grids asked for, as numpy (key ``None``) or on a torch device.
    _kept: OrderedDict[tuple[tuple[int, ...], str | None], Any] = field(
        default_factory=OrderedDict, repr=False
    )
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def from_pb(cls, message: pb.KernelMask, out_dim: int) -> KernelMask:
        if message.form not in MASK_FORMS:
            raise MalformedResponse(f"an output head's mask has an unknown form {message.form}")
        parameter = _float32(message.parameter, 2, "mask parameter")
        cache = tuple(int(n) for n in message.L_cache)
        if parameter.shape != (len(cache), out_dim) or min(cache, default=0) < 2:
            raise MalformedResponse(
                f"an output head's mask parameter of shape {list(parameter.shape)} does not fit "
                f"{len(cache)} axes (L_cache {list(cache)}) of {out_dim} outputs"
            )
        return cls(int(message.form), parameter, cache, bool(message.causal))

    def values(self, spatial: tuple[int, ...]) -> npt.NDArray[np.float32]:
        """The mask on the grid of a kernel of ``spatial`` shape: ``[*spatial, out_dim]`` float32, read-only.

        The masks of the last ``MASKS_KEPT`` grids are kept: a repeated grid costs one computation.
        """
        if len(spatial) != len(self.L_cache):
            raise MalformedResponse(f"a {len(spatial)}-D kernel for a mask over {len(self.L_cache)} axes")

        def compute() -> npt.NDArray[np.float32]:
            values = mask_values(self.form, self.parameter, spatial, self.L_cache, self.causal)
            values.flags.writeable = False
            return values

        found: npt.NDArray[np.float32] = self._kept_or(spatial, None, compute)
        return found

    def torch(self, spatial: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """``values(spatial)`` as a float32 tensor on ``device``, copied there once (kept like ``values``)."""
        import torch

        def compute() -> torch.Tensor:
            return torch.from_numpy(self.values(spatial).copy()).to(device)

        found: torch.Tensor = self._kept_or(spatial, str(device), compute)
        return found

    def _kept_or(self, spatial: tuple[int, ...], device: str | None, compute: Callable[[], Any]) -> Any:
        key = (spatial, device)
        with self._lock:
            found = self._kept.get(key)
            if found is not None:
                self._kept.move_to_end(key)
                return found
        found = compute()  # outside the lock: two threads may both compute one grid's (equal) mask
        with self._lock:
            self._kept[key] = found
            while len(self._kept) > MASKS_KEPT:
                self._kept.popitem(last=False)
        return found


@dataclass(frozen=True, eq=False)
class OutputHead:
    """A model's last linear layer: ``kernel = factors @ weight_t + bias``, times ``mask`` where set.

    ``weight_t`` is ``[hidden, out_dim]`` and ``bias`` ``[out_dim]`` (``None``
    for a model without biases), float32, read-only; ``mask`` is the mask of
    a masked model (``None`` without one). ``head_hash`` names it in every
    factored response; a client fetches each output head once.
    """

    head_hash: str
    weight_t: npt.NDArray[np.float32]
    bias: npt.NDArray[np.float32] | None
    mask: KernelMask | None = None
    _on_devices: dict[str, tuple[Any, Any]] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def hidden(self) -> int:
        return int(self.weight_t.shape[0])

    @property
    def out_dim(self) -> int:
        return int(self.weight_t.shape[1])

    @property
    def nbytes(self) -> int:
        return self.weight_t.nbytes + (0 if self.bias is None else self.bias.nbytes)

    @classmethod
    def from_pb(cls, message: pb.OutputHead) -> OutputHead:
        weight_t = _float32(message.weight_t, 2, "weight_t")
        bias = _float32(message.bias, 1, "bias") if message.HasField("bias") else None
        if bias is not None and bias.shape[0] != weight_t.shape[1]:
            raise MalformedResponse(
                f"an output head's bias has {bias.shape[0]} values for {weight_t.shape[1]} outputs"
            )
        if not message.head_hash:
            raise MalformedResponse("an output head came without its hash")
        mask = KernelMask.from_pb(message.mask, weight_t.shape[1]) if message.HasField("mask") else None
        return cls(message.head_hash, weight_t, bias, mask)

    def torch(self, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(weight_t, bias)`` as float32 torch tensors on ``device``, copied there once."""
        import torch

        target = torch.device(device or "cpu")
        key = str(target)
        with self._lock:
            found = self._on_devices.get(key)
            if found is None:
                weight_t = torch.from_numpy(self.weight_t.copy()).to(target)
                bias = None if self.bias is None else torch.from_numpy(self.bias.copy()).to(target)
                found = self._on_devices[key] = (weight_t, bias)
        return found


def _float32(tensor: pb.Tensor, ndim: int, name: str) -> npt.NDArray[np.float32]:
    shape = tuple(int(n) for n in tensor.shape)
    if tensor.dtype not in (pb.DTYPE_UNSPECIFIED, pb.DTYPE_FLOAT32) or len(shape) != ndim or min(shape) < 1:
        raise MalformedResponse(f"an output head's {name} is not a float32 tensor of {ndim} dimensions")
    if len(tensor.data) != 4 * int(np.prod(shape)):
        raise MalformedResponse(
            f"an output head's {name} of shape {list(shape)} has {len(tensor.data)} bytes"
        )
    array = np.frombuffer(tensor.data, dtype="<f4").reshape(shape)
    return array


class FactoredKernel(Generic[ArrayT]):
    """A kernel as ``factors @ output_head.weight_t + output_head.bias``, computed when asked for.

    ``factors`` is a numpy array (bfloat16 factors widened to float32) or, with
    ``as_torch=True``, a torch tensor (bfloat16 kept). ``np.asarray(kernel)``
    works as for a dense kernel; ``dense()`` materialises it, optionally into
    ``out`` or, for torch factors, on another ``device``.

    Example::

        factored = client.generate("hyena-2d", [29, 29], rows, representation="factored")
        factored.shape                       # (B, 57, 57, 384), as the dense kernel
        kernel = factored.dense()            # numpy float32
        kernel = np.asarray(factored)        # the same
    """

    def __init__(self, factors: ArrayT, output_head: OutputHead, nbytes: int) -> None:
        shape = tuple(int(n) for n in factors.shape)  # type: ignore[attr-defined]
        if not shape or shape[-1] != output_head.hidden:
            raise MalformedResponse(
                f"factors of shape {list(shape)} do not fit an output head of width {output_head.hidden}"
            )
        self.factors = factors
        self.output_head = output_head
        self._nbytes = nbytes

    @property
    def shape(self) -> tuple[int, ...]:
        """The dense kernel's shape: ``[B, *spatial, out_dim]``."""
        factors_shape: Any = self.factors.shape  # type: ignore[attr-defined]
        return (*(int(n) for n in factors_shape[:-1]), self.output_head.out_dim)

    @property
    def nbytes(self) -> int:
        """Bytes of the factors as they travelled (the output head is fetched once per model, apart)."""
        return self._nbytes

    @property
    def dtype(self) -> np.dtype[np.float32]:
        """The dense kernel's dtype: always float32."""
        return np.dtype(np.float32)

    def dense(self, out: Any = None, *, device: torch.device | str | None = None) -> ArrayT:
        """The kernel, float32: numpy for numpy factors, torch (on ``device``) for torch factors.

        ``out``, when given, is a C-contiguous float32 array (or tensor) of the
        kernel's shape that receives it.
        """
        if isinstance(self.factors, np.ndarray):
            if device is not None:
                raise ValueError("device= needs torch factors: generate(..., as_torch=True)")
            return self._dense_numpy(out)  # type: ignore[return-value]
        return self._dense_torch(out, device)  # type: ignore[return-value]

    def _dense_numpy(self, out: npt.NDArray[np.float32] | None) -> npt.NDArray[np.float32]:
        factors: npt.NDArray[Any] = self.factors  # type: ignore[assignment]
        flat = factors.reshape(-1, self.output_head.hidden).astype(np.float32, copy=False)
        result = np.empty(self.shape, np.float32) if out is None else out
        if result.shape != self.shape or result.dtype != np.float32 or not result.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous float32 array of shape {self.shape}")
        rows = result.reshape(-1, self.output_head.out_dim)
        np.matmul(flat, self.output_head.weight_t, out=rows)
        if self.output_head.bias is not None:
            rows += self.output_head.bias
        mask = self._mask()
        if mask is not None:
            result *= mask
        return result

    def _mask(self) -> npt.NDArray[np.float32] | None:
        """The mask on this kernel's grid, ``[*spatial, out_dim]``, or None for an unmasked model."""
        mask = self.output_head.mask
        return None if mask is None else mask.values(self.shape[1:-1])

    def _dense_torch(self, out: Any, device: torch.device | str | None) -> torch.Tensor:
        import torch

        factors: torch.Tensor = self.factors  # type: ignore[assignment]
        target = torch.device(device) if device is not None else factors.device
        weight_t, bias = self.output_head.torch(target)
        flat = factors.to(target, torch.float32).reshape(-1, self.output_head.hidden)
        result = torch.empty(self.shape, dtype=torch.float32, device=target) if out is None else out
        if tuple(result.shape) != self.shape or result.dtype != torch.float32 or not result.is_contiguous():
            raise ValueError(f"out must be a contiguous float32 tensor of shape {self.shape}")
        rows = result.view(-1, self.output_head.out_dim)
        if bias is None:
            torch.mm(flat, weight_t, out=rows)
        else:
            torch.addmm(bias, flat, weight_t, out=rows)
        mask = self.output_head.mask
        if mask is not None:
            result.mul_(mask.torch(self.shape[1:-1], target))
        return result

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> npt.NDArray[Any]:
        kernel = self.dense()
        array = kernel if isinstance(kernel, np.ndarray) else kernel.cpu().numpy()  # type: ignore[attr-defined]
        return array if dtype is None else array.astype(dtype, copy=False)

    def __repr__(self) -> str:
        factors_shape: Any = self.factors.shape  # type: ignore[attr-defined]
        return (
            f"FactoredKernel(shape={list(self.shape)}, factors={list(factors_shape)}, "
            f"output_head={self.output_head.head_hash[:12]}, nbytes={self.nbytes})"
        )
