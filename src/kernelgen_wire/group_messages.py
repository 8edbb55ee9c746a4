"""``GenerateGroup``'s stream: each member's ``KernelChunk`` messages wrapped with the member's index.

The first ``GroupKernelChunk`` carries the ``GroupHeader`` (the group and its
members in order); each later one carries one ``KernelChunk`` of one member,
exactly as ``StreamKernel`` would send it, and that member's index. The server
writes them by hand (``encode_group``) around views of the kernels' memory, so
each payload byte is copied once, as for ``StreamKernel``; the client reads
them by hand (``parse_group_chunk``), the wrapped chunk a view of the received
buffer that ``kernel_messages.parse_chunk`` then reads. Both are byte-for-byte
what protobuf writes and reads (tests in ``tests/wire/`` check it).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from kernelgen_wire.kernel_messages import Payload, encode_header, read_stream_message
from kernelgen_wire.protowire import VARINT, key, length_delimited, varint
from kernelgen_wire.v1 import kernelgen_pb2 as pb

__all__ = ["GroupChunkView", "MemberKernel", "encode_group", "parse_group_chunk"]


class MemberKernel(NamedTuple):
    """One member's result: its kernel (or factors), report, and the output head's hash when factored."""

    payload: Payload
    report: pb.ServerReport
    head_hash: str = ""


def encode_group(
    group: str, members: Sequence[str], kernels: Sequence[MemberKernel], chunk_bytes: int
) -> Iterator[bytes]:
    """Serialized ``GroupKernelChunk`` messages: the header, then each member's chunks in order.

    Each member's ``KernelChunk`` messages are those ``encode_chunks`` writes
    (its header, then ``chunk_bytes`` slices), written here inside the wrapper
    so that each payload byte is copied once.
    """
    if len(members) != len(kernels):
        raise ValueError(f"{len(members)} members but {len(kernels)} kernels")
    yield pb.GroupKernelChunk(group=pb.GroupHeader(group=group, members=members)).SerializeToString()
    for index, kernel in enumerate(kernels):
        member = [key(2, VARINT), varint(index)] if index else []  # proto3 leaves a zero out
        payload = kernel.payload
        header = encode_header(
            payload.shape, payload.dtype, payload.nbytes, (), 0, kernel.report, kernel.head_hash
        )
        yield b"".join([*member, length_delimited(3, len(header)), header])
        for offset in range(0, payload.nbytes, chunk_bytes):
            piece = payload.data[offset : offset + chunk_bytes]
            chunk: list[bytes | memoryview] = [key(2, VARINT), varint(offset)] if offset else []
            chunk += [length_delimited(3, piece.nbytes), piece]
            size = sum(part.nbytes if isinstance(part, memoryview) else len(part) for part in chunk)
            yield b"".join([*member, length_delimited(3, size), *chunk])


@dataclass(frozen=True)
class GroupChunkView:
    """One message of the stream read: the header (first message), the member index, a wrapped chunk."""

    header: pb.GroupHeader | None
    member: int
    #: A serialized ``KernelChunk`` viewing the received buffer, or None.
    chunk: memoryview | None


def parse_group_chunk(raw: bytes | memoryview) -> GroupChunkView:
    """A serialized ``GroupKernelChunk``; malformed input raises ``WireFormatError``."""
    return GroupChunkView(*read_stream_message(raw, pb.GroupHeader, "a group header"))
