"""Proto3 wire-format primitives for the messages kernelgen encodes and reads by hand.

A kernel message is mostly one large ``bytes`` field; building or parsing it
through protobuf message objects would copy that payload. The few header
fields around it are cheap to write and read directly: a key is the varint
``field_number << 3 | wire_type``, a length-delimited field is its key, the
varint length, then the bytes.
"""

from __future__ import annotations

from collections.abc import Iterator

__all__ = [
    "I32",
    "I64",
    "LEN",
    "VARINT",
    "WireFormatError",
    "fields",
    "key",
    "length_delimited",
    "read_varint",
    "signed64",
    "varint",
]

VARINT, I64, LEN, I32 = 0, 1, 2, 5


class WireFormatError(ValueError):
    """Bytes that are not a well-formed message of the expected kind."""


def varint(value: int) -> bytes:
    """Base-128 varint of a non-negative int."""
    if value < 0:
        raise ValueError("varint of a negative value")
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def key(field: int, wire_type: int) -> bytes:
    return varint((field << 3) | wire_type)


def length_delimited(field: int, size: int) -> bytes:
    """Key and length of a length-delimited field of ``size`` bytes (its bytes follow)."""
    return key(field, LEN) + varint(size)


def read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it."""
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise WireFormatError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise WireFormatError("over-long varint")


def signed64(value: int) -> int:
    """A varint read as ``int64`` (two's complement)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def fields(buf: memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """(field number, wire type, value): an int for scalars, a view of ``buf`` for length-delimited."""
    pos = 0
    end = len(buf)
    while pos < end:
        field_key, pos = read_varint(buf, pos)
        number, wire_type = field_key >> 3, field_key & 7
        value: int | memoryview
        if wire_type == VARINT:
            value, pos = read_varint(buf, pos)
        elif wire_type == LEN:
            size, pos = read_varint(buf, pos)
            if pos + size > end:
                raise WireFormatError("a field runs past the end of the message")
            value, pos = buf[pos : pos + size], pos + size
        elif wire_type == I64:
            value, pos = int.from_bytes(buf[pos : pos + 8], "little"), pos + 8
        elif wire_type == I32:
            value, pos = int.from_bytes(buf[pos : pos + 4], "little"), pos + 4
        else:
            raise WireFormatError(f"unsupported wire type {wire_type}")
        if pos > end:
            raise WireFormatError("a field runs past the end of the message")
        yield number, wire_type, value
