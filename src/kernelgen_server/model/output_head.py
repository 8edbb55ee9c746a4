"""A model's output head: the linear layer that turns factors into the kernel.

Every generator ends in ``out_linear``, which FiLM never modulates, so every
kernel of a model is ``m * (factors @ W^T + b)`` with the model's one ``W``
(``[out_dim, hidden]``) and ``b``, where the factors are the last, modulated,
hidden activation and ``m`` the mask (1 without one). The output head is what
a client needs, once per model, to turn factored responses into kernels (the
mask travels as its per-axis parameters, ``HeadMask``, from which the client
computes ``m`` on each grid); its hash names it in every factored response.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import torch
from torch import Tensor

from kernelgen_server.model.served import ServedModel
from kernelgen_server.model.siren import KernelGenerator

__all__ = ["HeadMask", "OutputHead"]


@dataclass(frozen=True, eq=False)
class HeadMask:
    """A masked model's mask as a factored kernel's reader needs it (the ``KernelMask`` message).

    ``form`` names the axis factor (``Mask.form``), ``parameter`` is its
    ``[D, out_dim]`` float32 values, and the grid's coordinates follow from
    ``cache_lens`` and ``causal``.
    """

    form: str
    parameter: Tensor
    cache_lens: tuple[int, ...]
    causal: bool


@dataclass(frozen=True, eq=False)
class OutputHead:
    """Its hash, ``W^T`` (``[hidden, out_dim]``), ``b`` (``[out_dim]`` or None) and the mask, on CPU.

    The fields are in the order of the client's ``OutputHead`` and of the ``OutputHead`` message.
    """

    head_hash: str
    weight_t: Tensor
    bias: Tensor | None
    mask: HeadMask | None = None

    @classmethod
    def of(cls, module: KernelGenerator | ServedModel) -> OutputHead:
        generator = module.generator if isinstance(module, ServedModel) else module
        linear = generator.out_linear
        weight_t = linear.weight.detach().to("cpu", torch.float32).t().contiguous()
        bias = None if linear.bias is None else linear.bias.detach().to("cpu", torch.float32).contiguous()
        mask = None
        if isinstance(module, ServedModel) and module.mask is not None:
            parameter = module.mask.parameter().to("cpu", torch.float32).contiguous()
            mask = HeadMask(module.mask.form, parameter, module.L_cache, module.causal)
        return cls(_digest(weight_t, bias, mask), weight_t, bias, mask)

    @property
    def hidden(self) -> int:
        return int(self.weight_t.shape[0])

    @property
    def out_dim(self) -> int:
        return int(self.weight_t.shape[1])

    @property
    def nbytes(self) -> int:
        """Bytes of the head's tensors (the mask's parameter included)."""
        mask = 0 if self.mask is None else self.mask.parameter.nbytes
        return self.weight_t.nbytes + (0 if self.bias is None else self.bias.nbytes) + mask


def _digest(weight_t: Tensor, bias: Tensor | None, mask: HeadMask | None) -> str:
    """sha256 over length-prefixed fields: a tag, the shape, W^T's and b's little-endian float32 bytes.

    A mask adds its form, parameter bytes, grid lengths and causal flag (an
    unmasked head's hash is what it was before masks were served).
    """
    h = hashlib.sha256()
    fields = [
        b"kernelgen-output-head/1",
        ",".join(map(str, weight_t.shape)).encode(),
        weight_t.numpy().tobytes(),
        b"" if bias is None else bias.numpy().tobytes(),
    ]
    if mask is not None:
        fields += [
            mask.form.encode(),
            mask.parameter.numpy().tobytes(),
            ",".join(map(str, mask.cache_lens)).encode(),
            b"causal" if mask.causal else b"",
        ]
    for field in fields:
        h.update(struct.pack("<Q", len(field)))
        h.update(field)
    return h.hexdigest()
