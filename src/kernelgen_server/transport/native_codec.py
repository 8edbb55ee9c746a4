"""kernelgen.v1's messages to the core's values and back.

Every kernelgen.v1 message the servicers send is written here (or, for the
bytes' layout, in ``kernelgen_wire``), as every Open Inference Protocol
message is in ``oip_codec``: a unary response, a stream's ``KernelChunk``s
from the core's stream parts, a group's stream, an output head. The core
writes no message of its own choosing: its cache and batches write kernels
with the ``Encoder`` they are given (kernelgen.v1's ``encode_kernel`` by
default).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import numpy as np
import torch

from kernelgen_server.core.results import GeneratedGroup, GeneratedKernel
from kernelgen_server.core.streaming import KernelStream, StreamHeader
from kernelgen_server.errors import InvalidRequest
from kernelgen_server.model.output_head import OutputHead
from kernelgen_wire.group_messages import MemberKernel, encode_group
from kernelgen_wire.kernel_messages import encode_data, encode_header, encode_response
from kernelgen_wire.v1 import kernelgen_pb2 as pb

__all__ = [
    "decode_conditioning",
    "group_messages",
    "head_message",
    "response_bytes",
    "stream_messages",
]


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


def response_bytes(generated: GeneratedKernel) -> bytes:
    """A unary ``GenerateKernelResponse``: the kernel's message, and the grid when asked."""
    return encode_response(generated.kernel, generated.grid)


async def stream_messages(stream: KernelStream, chunk_bytes: int) -> AsyncIterator[bytes]:
    """A stream's ``KernelChunk`` messages: its header, then each part cut into ``chunk_bytes`` chunks.

    Each chunk is written (the one copy of its bytes) only when the previous one
    was taken, so a stream holds the chunks gRPC has not sent and no more.
    """
    async for part in stream.parts():
        if isinstance(part, StreamHeader):
            yield encode_header(
                part.kernel_shape,
                part.dtype,
                part.kernel_bytes,
                part.grid_shape,
                part.grid_bytes,
                part.report,
                part.head_hash,
            )
            continue
        for start in range(0, part.data.nbytes, chunk_bytes):
            yield encode_data(part.offset + start, part.data[start : start + chunk_bytes])


def group_messages(generated: GeneratedGroup, chunk_bytes: int) -> Iterator[bytes]:
    """A group's ``GroupKernelChunk`` messages: the header naming the members, then each one's chunks."""
    kernels = [MemberKernel(k.kernel.payload, k.report, k.kernel.head_hash) for k in generated.kernels]
    return encode_group(generated.group.name, generated.group.members, kernels, chunk_bytes)


#: The wire's name of each mask form (``Mask.form``).
MASK_FORMS = {"gaussian": pb.MASK_FORM_GAUSSIAN, "exponential": pb.MASK_FORM_EXPONENTIAL}


def head_message(head: OutputHead) -> pb.OutputHead:
    """A model's output head: float32 ``weight_t`` and ``bias``, its mask, with its hash."""

    def tensor(t: torch.Tensor) -> pb.Tensor:
        return pb.Tensor(shape=t.shape, dtype=pb.DTYPE_FLOAT32, data=t.numpy().tobytes())

    message = pb.OutputHead(head_hash=head.head_hash, weight_t=tensor(head.weight_t))
    if head.bias is not None:
        message.bias.CopyFrom(tensor(head.bias))
    if head.mask is not None:
        mask = head.mask
        message.mask.CopyFrom(
            pb.KernelMask(
                form=MASK_FORMS[mask.form],
                parameter=tensor(mask.parameter),
                L_cache=mask.cache_lens,
                causal=mask.causal,
            )
        )
    return message
