"""Reading kernel responses straight from the received bytes.

Parsing a ``GenerateKernelResponse`` or ``KernelChunk`` through protobuf
message objects copies the payload out of the received buffer into a new
``bytes``. Here the few header fields are read by hand (proto3 wire format)
and the payload is returned as a ``memoryview`` of the received buffer, so a
kernel costs no copy beyond the one gRPC makes when it hands the message over.

Unknown fields are skipped, so newer servers stay readable. Small nested
messages (``ServerReport``, ``KernelHeader``) go through protobuf as usual. A
unary call's ``ServerReport`` travels in its trailing metadata
(``kernelgen-report-bin``), so the server can send cached kernel bytes as they are.
Field numbers follow ``proto/kernelgen/v1/kernelgen.proto``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from kernelgen_client._proto.kernelgen.v1 import kernelgen_pb2 as pb
from kernelgen_client.errors import MalformedResponse

__all__ = [
    "REPORT_TRAILER",
    "ChunkView",
    "ResponseView",
    "TensorView",
    "encode_varint",
    "fields",
    "parse_chunk",
    "parse_response",
    "report_from_trailers",
]

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
#: Trailing metadata key of a unary call's serialized ``ServerReport``.
REPORT_TRAILER = "kernelgen-report-bin"


@dataclass(frozen=True)
class TensorView:
    """A wire tensor whose ``data`` is a view of the buffer it was read from."""

    shape: tuple[int, ...]
    dtype: int  # a kernelgen.v1.DType value
    data: memoryview


@dataclass(frozen=True)
class ResponseView:
    kernel: TensorView
    grid: TensorView | None
    report: pb.ServerReport


@dataclass(frozen=True)
class ChunkView:
    header: pb.KernelHeader | None
    offset: int
    data: memoryview


def encode_varint(value: int) -> bytes:
    """Base-128 varint of a non-negative int (the server encodes responses with it too)."""
    if value < 0:
        raise ValueError("varint of a negative value")
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise MalformedResponse("truncated varint in a kernel response")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise MalformedResponse("over-long varint in a kernel response")


def fields(buf: memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """(field number, wire type, value): an int for scalars, a view for length-delimited fields."""
    pos = 0
    end = len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        value: int | memoryview
        if wire_type == _VARINT:
            value, pos = _varint(buf, pos)
        elif wire_type == _LEN:
            size, pos = _varint(buf, pos)
            if pos + size > end:
                raise MalformedResponse("a field runs past the end of a kernel response")
            value, pos = buf[pos : pos + size], pos + size
        elif wire_type == _I64:
            value, pos = int.from_bytes(buf[pos : pos + 8], "little"), pos + 8
        elif wire_type == _I32:
            value, pos = int.from_bytes(buf[pos : pos + 4], "little"), pos + 4
        else:
            raise MalformedResponse(f"unsupported wire type {wire_type} in a kernel response")
        if pos > end:
            raise MalformedResponse("a field runs past the end of a kernel response")
        yield number, wire_type, value


def _int64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _tensor(buf: memoryview) -> TensorView:
    shape: list[int] = []
    dtype = 0
    data = memoryview(b"")
    for number, _wire_type, value in fields(buf):
        if number == 1:  # repeated int64 shape: packed, or one varint per element
            if isinstance(value, memoryview):
                pos = 0
                while pos < len(value):
                    item, pos = _varint(value, pos)
                    shape.append(_int64(item))
            else:
                shape.append(_int64(value))
        elif number == 2 and isinstance(value, int):
            dtype = value
        elif number == 3 and isinstance(value, memoryview):
            data = value
    return TensorView(tuple(shape), dtype, data)


def report_from_trailers(trailers: Iterable[Any] | None) -> pb.ServerReport | None:
    """The ``ServerReport`` a unary call carries in its ``kernelgen-report-bin`` trailer."""
    for pair in trailers or ():
        key, value = pair[0], pair[1]
        if key == REPORT_TRAILER:
            data = value if isinstance(value, bytes) else str(value).encode("latin-1")
            try:
                report: pb.ServerReport = pb.ServerReport.FromString(data)
            except Exception as exc:  # protobuf's DecodeError, whose module varies by backend
                raise MalformedResponse(f"the {REPORT_TRAILER} trailer does not decode: {exc}") from None
            return report
    return None


def parse_response(raw: bytes | memoryview, trailers: Iterable[Any] | None = None) -> ResponseView:
    """A serialized ``GenerateKernelResponse``, its tensors viewing ``raw``.

    The report comes from the call's ``kernelgen-report-bin`` trailer (field 3
    of the message is reserved).
    """
    buf = memoryview(raw).cast("B")
    kernel: TensorView | None = None
    grid: TensorView | None = None
    report = report_from_trailers(trailers) or pb.ServerReport()
    for number, _wire_type, value in fields(buf):
        if not isinstance(value, memoryview):
            continue
        if number == 1:
            kernel = _tensor(value)
        elif number == 2:
            grid = _tensor(value)
    if kernel is None:
        raise MalformedResponse("the response carries no kernel")
    return ResponseView(kernel, grid, report)


def parse_chunk(raw: bytes | memoryview) -> ChunkView:
    """A serialized ``KernelChunk``, its data viewing ``raw``."""
    buf = memoryview(raw).cast("B")
    header: pb.KernelHeader | None = None
    offset = 0
    data = memoryview(b"")
    for number, _wire_type, value in fields(buf):
        if number == 1 and isinstance(value, memoryview):
            header = pb.KernelHeader.FromString(bytes(value))
        elif number == 2 and isinstance(value, int):
            offset = value
        elif number == 3 and isinstance(value, memoryview):
            data = value
    return ChunkView(header, offset, data)
