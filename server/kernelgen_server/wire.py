"""Protobuf wire encoding of kernel responses, straight from tensor memory.

A kernel response is mostly one large ``bytes`` field. Building it through
protobuf message objects would copy the payload into the message and again
into the serialized string; here the few header bytes are encoded by hand
(proto3 wire format: varint keys, packed ``repeated int64``, length-delimited
``bytes``) and joined with the payload buffer, one copy in all, made on the
device worker. A cached kernel is kept in that serialized form and handed to
gRPC as it is, so a cache hit copies nothing (the per-call report travels in
trailing metadata for that reason). The bytes are exactly what
``SerializeToString`` of the equivalent message yields (tests check it).

Field numbers follow ``proto/kernelgen/v1/kernelgen.proto``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from kernelgen_client._proto.kernelgen.v1 import kernelgen_pb2 as pb
from kernelgen_client._wire import encode_varint as varint

__all__ = ["EncodedKernel", "Payload", "encode_chunks", "encode_kernel", "encode_response"]

_LEN = 2  # wire type of length-delimited fields
_VARINT = 0


def _key(field: int, wire_type: int) -> bytes:
    return varint((field << 3) | wire_type)


def _length_delimited(field: int, size: int) -> bytes:
    return _key(field, _LEN) + varint(size)


@dataclass(frozen=True)
class Payload:
    """A tensor ready for the wire: shape, wire dtype and its raw little-endian bytes.

    ``data`` is any C-contiguous buffer (a numpy array's memory, bytes); it is
    never modified, so one Payload may be shared by many responses (the cache).
    """

    shape: tuple[int, ...]
    dtype: int  # a kernelgen.v1.DType value
    data: memoryview

    @classmethod
    def from_array(cls, array: np.ndarray, dtype: int) -> Payload:
        if not array.flags.c_contiguous:
            raise ValueError("payload arrays must be C-contiguous")
        view = array.data.cast("B")
        return cls(tuple(int(n) for n in array.shape), dtype, view.toreadonly())

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def tensor_header(self) -> bytes:
        """Bytes of a ``Tensor`` message up to (and including) the length of its ``data``."""
        shape = b"".join(varint(n) for n in self.shape)
        parts = [_length_delimited(1, len(shape)), shape] if self.shape else []
        if self.dtype:
            parts += [_key(2, _VARINT), varint(self.dtype)]
        if self.nbytes:
            parts.append(_length_delimited(3, self.nbytes))
        return b"".join(parts)


def _tensor_field(field: int, payload: Payload) -> list[bytes | memoryview]:
    header = payload.tensor_header()
    return [_length_delimited(field, len(header) + payload.nbytes), header, payload.data]


@dataclass(frozen=True)
class EncodedKernel:
    """A kernel as a serialized ``GenerateKernelResponse`` holding just that kernel.

    ``message`` is sent as it is for a unary call; ``payload`` is a view of the
    kernel bytes inside it, for streaming. Immutable, so the cache shares it.
    """

    message: bytes
    payload: Payload

    @property
    def nbytes(self) -> int:
        return len(self.message)


def encode_kernel(kernel: Payload) -> EncodedKernel:
    """Serialize once (the one copy of the kernel bytes); every later use is a view."""
    message = b"".join(_tensor_field(1, kernel))
    start = len(message) - kernel.nbytes
    view = memoryview(message)[start:]
    return EncodedKernel(message, Payload(kernel.shape, kernel.dtype, view))


def encode_response(kernel: EncodedKernel, grid: Payload | None = None) -> bytes:
    """A serialized ``GenerateKernelResponse``; without a grid it is ``kernel.message`` itself."""
    if grid is None:
        return kernel.message
    return b"".join([kernel.message, *_tensor_field(2, grid)])


def encode_chunks(
    kernel: Payload, grid: Payload | None, report: pb.ServerReport, chunk_bytes: int
) -> Iterator[bytes]:
    """Serialized ``KernelChunk`` messages: the header, then ``chunk_bytes`` payload slices.

    The payload is the kernel bytes followed by the grid bytes; each chunk's
    ``offset`` is its position in that concatenation.
    """
    header = pb.KernelHeader(
        kernel_shape=kernel.shape,
        kernel_dtype=kernel.dtype,  # type: ignore[arg-type]
        kernel_bytes=kernel.nbytes,
        grid_shape=grid.shape if grid is not None else (),
        grid_bytes=grid.nbytes if grid is not None else 0,
        report=report,
    )
    yield pb.KernelChunk(header=header).SerializeToString()
    offset = 0
    buffers: Sequence[memoryview] = [kernel.data] if grid is None else [kernel.data, grid.data]
    for buffer in buffers:
        for start in range(0, buffer.nbytes, chunk_bytes):
            piece = buffer[start : start + chunk_bytes]
            parts: list[bytes | memoryview] = []
            if offset:
                parts += [_key(2, _VARINT), varint(offset)]
            parts += [_length_delimited(3, piece.nbytes), piece]
            yield b"".join(parts)
            offset += piece.nbytes
