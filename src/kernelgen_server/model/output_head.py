"""A model's output head: the linear layer that turns factors into the kernel.

``SIRENKernelND`` ends in ``out_linear``, which FiLM never modulates, so every
kernel of a model is ``factors @ W^T + b`` with the model's one ``W``
(``[out_dim, hidden]``) and ``b``, where the factors are the last, modulated,
hidden activation. The output head is what a client needs, once per model, to turn
factored responses into kernels; its hash names it in every factored response.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import torch
from torch import Tensor

from kernelgen_server.model.siren import SIRENKernelND

__all__ = ["OutputHead"]


@dataclass(frozen=True, eq=False)
class OutputHead:
    """Its hash, ``W^T`` (``[hidden, out_dim]``) and ``b`` (``[out_dim]`` or None), float32 on CPU.

    The fields are in the order of the client's ``OutputHead`` and of the ``OutputHead`` message.
    """

    head_hash: str
    weight_t: Tensor
    bias: Tensor | None

    @classmethod
    def of(cls, module: SIRENKernelND) -> OutputHead:
        linear = module.out_linear
        weight_t = linear.weight.detach().to("cpu", torch.float32).t().contiguous()
        bias = None if linear.bias is None else linear.bias.detach().to("cpu", torch.float32).contiguous()
        return cls(_digest(weight_t, bias), weight_t, bias)

    @property
    def hidden(self) -> int:
        return int(self.weight_t.shape[0])

    @property
    def out_dim(self) -> int:
        return int(self.weight_t.shape[1])

    @property
    def nbytes(self) -> int:
        return self.weight_t.nbytes + (0 if self.bias is None else self.bias.nbytes)


def _digest(weight_t: Tensor, bias: Tensor | None) -> str:
    """sha256 over length-prefixed fields: a tag, the shape, W^T's and b's little-endian float32 bytes."""
    h = hashlib.sha256()
    for field in (
        b"kernelgen-output-head/1",
        ",".join(map(str, weight_t.shape)).encode(),
        weight_t.numpy().tobytes(),
        b"" if bias is None else bias.numpy().tobytes(),
    ):
        h.update(struct.pack("<Q", len(field)))
        h.update(field)
    return h.hexdigest()
