"""Kernel responses on the wire, written from tensor memory and read back as views.

``GenerateKernelResponse`` and ``KernelChunk`` are mostly one large ``bytes``
field: the dense kernel, or in the factored representation the kernel's
factors (with the hash of the output head that turns them into the kernel).
The server writes them by hand (``encode_kernel``, ``encode_response``,
``encode_chunks``): the few header bytes are joined with the payload buffer,
one copy of it in all, and a cached kernel is kept in that serialized form and
sent as it is (so the per-call report travels in trailing metadata). The
client reads them by hand (``parse_response``, ``parse_chunk``): the payload
comes back as a ``memoryview`` of the received buffer, no copy beyond the one
gRPC made when it handed the message over.

The written bytes are exactly what ``SerializeToString`` of the equivalent
message yields, and the reader accepts any valid encoding (unpacked shapes,
unknown fields), so either side can talk to a protobuf-built peer; tests check
both. Malformed input raises ``WireFormatError``. Field numbers follow
``proto/kernelgen/v1/kernelgen.proto``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from google.protobuf.message import Message

from kernelgen_wire.metadata import REPORT_TRAILER
from kernelgen_wire.protowire import (
    VARINT,
    WireFormatError,
    fields,
    key,
    length_delimited,
    read_varint,
    signed64,
    varint,
)
from kernelgen_wire.v1 import kernelgen_pb2 as pb

__all__ = [
    "ChunkView",
    "EncodedKernel",
    "Payload",
    "ResponseView",
    "TensorView",
    "encode_chunks",
    "encode_data",
    "encode_header",
    "encode_kernel",
    "encode_response",
    "parse_chunk",
    "parse_response",
    "read_stream_message",
    "report_from_trailers",
]

HeaderT = TypeVar("HeaderT", bound=Message)


# --- writing ------------------------------------------------------------------------------------
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
        parts = [length_delimited(1, len(shape)), shape] if self.shape else []
        if self.dtype:
            parts += [key(2, VARINT), varint(self.dtype)]
        if self.nbytes:
            parts.append(length_delimited(3, self.nbytes))
        return b"".join(parts)


def _tensor_field(field: int, payload: Payload) -> list[bytes | memoryview]:
    header = payload.tensor_header()
    return [length_delimited(field, len(header) + payload.nbytes), header, payload.data]


@dataclass(frozen=True)
class EncodedKernel:
    """A kernel as a serialized ``GenerateKernelResponse`` holding just that kernel.

    ``message`` is sent as it is for a unary call; ``payload`` is a view of the
    kernel bytes (dense) or the factors (factored) inside it, for streaming.
    A factored kernel names its output head (``head_hash``); a dense one has
    none. Immutable, so the cache shares it.
    """

    message: bytes
    payload: Payload
    head_hash: str = ""

    @property
    def nbytes(self) -> int:
        return len(self.message)

    @property
    def representation(self) -> pb.Representation:
        """``REPRESENTATION_FACTORED`` or ``REPRESENTATION_DENSE``."""
        return pb.REPRESENTATION_FACTORED if self.head_hash else pb.REPRESENTATION_DENSE


def encode_kernel(kernel: Payload, head_hash: str = "") -> EncodedKernel:
    """Serialize once (the one copy of the payload bytes); every later use is a view.

    With ``head_hash`` the payload is a factored kernel's factors (field
    ``factors``, then ``head_hash``); without, the dense kernel (``kernel``).
    """
    if not head_hash:
        message = b"".join(_tensor_field(1, kernel))
        start = len(message) - kernel.nbytes
    else:
        parts = _tensor_field(4, kernel)
        start = len(parts[0]) + len(parts[1])
        name = head_hash.encode()
        message = b"".join([*parts, length_delimited(5, len(name)), name])
    view = memoryview(message)[start : start + kernel.nbytes]
    return EncodedKernel(message, Payload(kernel.shape, kernel.dtype, view), head_hash)


def encode_response(kernel: EncodedKernel, grid: Payload | None = None) -> bytes:
    """A serialized ``GenerateKernelResponse``; without a grid it is ``kernel.message`` itself.

    Fields stay in field-number order, as protobuf writes them.
    """
    if grid is None:
        return kernel.message
    if kernel.head_hash:
        return b"".join([*_tensor_field(2, grid), kernel.message])
    return b"".join([kernel.message, *_tensor_field(2, grid)])


def encode_header(
    kernel_shape: Sequence[int],
    kernel_dtype: int,
    kernel_bytes: int,
    grid_shape: Sequence[int],
    grid_bytes: int,
    report: pb.ServerReport,
    head_hash: str = "",
) -> bytes:
    """The first ``KernelChunk`` of a stream: what follows (with ``head_hash``: factors), and the report."""
    header = pb.KernelHeader(
        kernel_shape=kernel_shape,
        kernel_dtype=kernel_dtype,  # type: ignore[arg-type]
        kernel_bytes=kernel_bytes,
        grid_shape=grid_shape,
        grid_bytes=grid_bytes,
        report=report,
        representation=pb.REPRESENTATION_FACTORED if head_hash else pb.REPRESENTATION_DENSE,
        head_hash=head_hash,
    )
    message: bytes = pb.KernelChunk(header=header).SerializeToString()
    return message


def encode_data(offset: int, data: memoryview) -> bytes:
    """A ``KernelChunk`` of payload bytes at ``offset`` (the one copy of them)."""
    parts: list[bytes | memoryview] = []
    if offset:
        parts += [key(2, VARINT), varint(offset)]
    parts += [length_delimited(3, data.nbytes), data]
    return b"".join(parts)


def encode_chunks(
    kernel: Payload,
    grid: Payload | None,
    report: pb.ServerReport,
    chunk_bytes: int,
    *,
    head_hash: str = "",
) -> Iterator[bytes]:
    """Serialized ``KernelChunk`` messages: the header, then ``chunk_bytes`` payload slices.

    The payload is the kernel bytes (or, with ``head_hash``, the factors)
    followed by the grid bytes; each chunk's ``offset`` is its position in
    that concatenation.
    """
    yield encode_header(
        kernel.shape,
        kernel.dtype,
        kernel.nbytes,
        grid.shape if grid is not None else (),
        grid.nbytes if grid is not None else 0,
        report,
        head_hash,
    )
    offset = 0
    buffers: Sequence[memoryview] = [kernel.data] if grid is None else [kernel.data, grid.data]
    for buffer in buffers:
        for start in range(0, buffer.nbytes, chunk_bytes):
            piece = buffer[start : start + chunk_bytes]
            yield encode_data(offset, piece)
            offset += piece.nbytes


# --- reading ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorView:
    """A wire tensor whose ``data`` is a view of the buffer it was read from."""

    shape: tuple[int, ...]
    dtype: int  # a kernelgen.v1.DType value
    data: memoryview


@dataclass(frozen=True)
class ResponseView:
    """A kernel response read: ``kernel`` is the dense kernel, or the factors when ``head_hash`` is set."""

    kernel: TensorView
    grid: TensorView | None
    report: pb.ServerReport
    #: The output head that turns factors into the kernel; empty for a dense kernel.
    head_hash: str = ""
    #: Bytes the server wrote into the request's shared-memory region (0: the kernel is in ``kernel``).
    shared_memory_bytes: int = 0

    @property
    def factored(self) -> bool:
        return bool(self.head_hash)


@dataclass(frozen=True)
class ChunkView:
    header: pb.KernelHeader | None
    offset: int
    data: memoryview


def _tensor(buf: memoryview) -> TensorView:
    shape: list[int] = []
    dtype = 0
    data = memoryview(b"")
    for number, _wire_type, value in fields(buf):
        if number == 1:  # repeated int64 shape: packed, or one varint per element
            if isinstance(value, memoryview):
                pos = 0
                while pos < len(value):
                    item, pos = read_varint(value, pos)
                    shape.append(signed64(item))
            else:
                shape.append(signed64(value))
        elif number == 2 and isinstance(value, int):
            dtype = value
        elif number == 3 and isinstance(value, memoryview):
            data = value
    return TensorView(tuple(shape), dtype, data)


def report_from_trailers(trailers: Iterable[Any] | None) -> pb.ServerReport | None:
    """The ``ServerReport`` a unary call carries in its ``kernelgen-report-bin`` trailer."""
    for pair in trailers or ():
        name, value = pair[0], pair[1]
        if name == REPORT_TRAILER:
            data = value if isinstance(value, bytes) else str(value).encode("latin-1")
            try:
                report: pb.ServerReport = pb.ServerReport.FromString(data)
            except Exception as exc:  # protobuf's DecodeError, whose module varies by backend
                raise WireFormatError(f"the {REPORT_TRAILER} trailer does not decode: {exc}") from None
            return report
    return None


def parse_response(raw: bytes | memoryview, trailers: Iterable[Any] | None = None) -> ResponseView:
    """A serialized ``GenerateKernelResponse``, its tensors viewing ``raw``.

    The report comes from the call's ``kernelgen-report-bin`` trailer (field 3
    of the message is reserved).
    """
    buf = memoryview(raw).cast("B")
    kernel: TensorView | None = None
    factors: TensorView | None = None
    grid: TensorView | None = None
    head_hash = ""
    shared_memory_bytes = 0
    report = report_from_trailers(trailers) or pb.ServerReport()
    for number, _wire_type, value in fields(buf):
        if number == 8 and isinstance(value, int):
            shared_memory_bytes = value
        if not isinstance(value, memoryview):
            continue
        if number == 1:
            kernel = _tensor(value)
        elif number == 2:
            grid = _tensor(value)
        elif number == 4:
            factors = _tensor(value)
        elif number == 5:
            head_hash = _text(value)
    if kernel is not None and factors is None and not head_hash:
        return ResponseView(kernel, grid, report, shared_memory_bytes=shared_memory_bytes)
    if factors is not None and kernel is None and head_hash:
        return ResponseView(factors, grid, report, head_hash, shared_memory_bytes)
    if kernel is None and factors is None:
        raise WireFormatError("the response carries no kernel")
    raise WireFormatError("the response mixes a dense kernel and factors, or factors without their head")


def _text(value: memoryview) -> str:
    try:
        return bytes(value).decode()
    except UnicodeDecodeError:
        raise WireFormatError("a string field is not UTF-8") from None


def parse_chunk(raw: bytes | memoryview) -> ChunkView:
    """A serialized ``KernelChunk``, its data viewing ``raw``."""
    header, offset, data = read_stream_message(raw, pb.KernelHeader, "a stream header")
    return ChunkView(header, offset, memoryview(b"") if data is None else data)


def read_stream_message(
    raw: bytes | memoryview, header_type: type[HeaderT], what: str
) -> tuple[HeaderT | None, int, memoryview | None]:
    """Fields 1, 2 and 3 of a stream's message: its header (``header_type``), a varint, a view of bytes.

    ``KernelChunk`` (header, offset, data) and ``GroupKernelChunk`` (header,
    member, wrapped chunk) share this layout. Absent fields read as None, 0 and
    None; a header that does not decode raises ``WireFormatError`` naming ``what``.
    """
    header: HeaderT | None = None
    number_2 = 0
    data: memoryview | None = None
    for number, _wire_type, value in fields(memoryview(raw).cast("B")):
        if number == 1 and isinstance(value, memoryview):
            try:
                header = header_type.FromString(bytes(value))
            except Exception as exc:  # protobuf's DecodeError, whose module varies by backend
                raise WireFormatError(f"{what} does not decode: {exc}") from None
        elif number == 2 and isinstance(value, int):
            number_2 = value
        elif number == 3 and isinstance(value, memoryview):
            data = value
    return header, number_2, data
