"""Kernel responses as the client receives them: one message, or a stream into one buffer.

``read_unary`` reads a ``GenerateKernel`` response and its trailers; a
``Reassembler`` takes a ``StreamKernel`` stream, and a ``GroupReassembler`` a
``GenerateGroup`` stream (one ``Reassembler`` per member). Both give a ``ResponseView``
whose tensors view the received bytes, and every malformed response is a
``MalformedResponse``. For a stream, the header says how many bytes follow (kernel, then grid); the buffer is
allocated once at that size and every chunk is copied straight to its
``offset``, so a kernel of N bytes costs N bytes plus one chunk in flight,
never a growing concatenation.

Invariants checked (a violation is ``MalformedResponse``): the header comes
first and only once; its byte counts match its shapes and dtypes; every chunk
lies inside the buffer; at the end the chunks cover the buffer exactly once.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol, TypeVar

import numpy as np

from kernelgen_client.errors import MalformedResponse
from kernelgen_wire.dtypes import DTYPE_NAMES
from kernelgen_wire.group_messages import parse_group_chunk
from kernelgen_wire.kernel_messages import ResponseView, TensorView, parse_chunk, parse_response
from kernelgen_wire.protowire import WireFormatError
from kernelgen_wire.sizes import GRID_DTYPE, tensor_bytes
from kernelgen_wire.v1 import kernelgen_pb2 as pb

__all__ = ["Assembled", "Assembler", "GroupReassembler", "Reassembler", "read_unary"]

#: What an ``Assembler`` gives once its stream has ended.
Assembled = TypeVar("Assembled", covariant=True)


class Assembler(Protocol[Assembled]):
    """Takes a server stream's messages one by one and gives what they make (``Reassembler``,
    ``GroupReassembler``)."""

    def add(self, message: bytes | memoryview) -> None: ...

    def finish(self) -> Assembled: ...


def read_unary(raw: bytes, trailers: Iterable[Any] | None) -> ResponseView:
    """A ``GenerateKernel`` response, its report read from the trailers."""
    try:
        return parse_response(raw, trailers)
    except WireFormatError as exc:
        raise MalformedResponse(f"a kernel response does not decode: {exc}") from None


class Reassembler:
    """Feed it each serialized ``KernelChunk`` with ``add``; ``finish`` gives the kernel.

    >>> r = Reassembler()  # doctest: +SKIP
    >>> for message in stream: r.add(message)  # doctest: +SKIP
    >>> view = r.finish()  # doctest: +SKIP
    """

    def __init__(self) -> None:
        self._header: pb.KernelHeader | None = None
        self._buffer: memoryview | None = None
        self._pieces: list[tuple[int, int]] = []  # (offset, length) of every chunk written

    def add(self, message: bytes | memoryview) -> None:
        try:
            chunk = parse_chunk(message)
        except WireFormatError as exc:
            raise MalformedResponse(f"a stream message does not decode: {exc}") from None
        if chunk.header is not None:
            if self._header is not None:
                raise MalformedResponse("the stream sent a second header")
            self._start(chunk.header)
        elif self._header is None:
            raise MalformedResponse("the stream sent data before its header")
        if chunk.data.nbytes:
            self._write(chunk.offset, chunk.data)

    def _start(self, header: pb.KernelHeader) -> None:
        if header.kernel_dtype not in DTYPE_NAMES and header.kernel_dtype != pb.DTYPE_UNSPECIFIED:
            raise MalformedResponse(f"the stream announces an unknown dtype {header.kernel_dtype}")
        factored = header.representation == pb.REPRESENTATION_FACTORED
        if factored != bool(header.head_hash):
            raise MalformedResponse("the stream's header names factors without their head, or the reverse")
        kernel_bytes = tensor_bytes(header.kernel_shape, header.kernel_dtype)
        grid_bytes = tensor_bytes(header.grid_shape, GRID_DTYPE) if header.grid_shape else 0
        if header.kernel_bytes != kernel_bytes or header.grid_bytes != grid_bytes:
            raise MalformedResponse(
                f"stream header announces {header.kernel_bytes}+{header.grid_bytes} bytes but its "
                f"shapes need {kernel_bytes}+{grid_bytes}"
            )
        self._header = header
        # numpy.empty: allocated once, not zero-filled; every byte is written by a chunk.
        self._buffer = np.empty(kernel_bytes + grid_bytes, dtype=np.uint8).data

    def _write(self, offset: int, data: memoryview) -> None:
        assert self._buffer is not None
        end = offset + data.nbytes
        if end > self._buffer.nbytes:
            raise MalformedResponse(
                f"a chunk at offset {offset} ({data.nbytes} bytes) runs past the "
                f"{self._buffer.nbytes}-byte kernel"
            )
        self._buffer[offset:end] = data
        self._pieces.append((offset, data.nbytes))

    def finish(self) -> ResponseView:
        """The whole kernel (and grid); raises ``MalformedResponse`` when bytes are missing."""
        header, buffer = self._header, self._buffer
        if header is None or buffer is None:
            raise MalformedResponse("the stream ended before its header")
        position = 0
        for offset, length in sorted(self._pieces):
            if offset != position:
                what = "overlap" if offset < position else "gap"
                raise MalformedResponse(f"the stream's chunks {what} at byte {min(offset, position)}")
            position += length
        if position != buffer.nbytes:
            raise MalformedResponse(f"the stream ended after {position} of {buffer.nbytes} bytes")
        split = int(header.kernel_bytes)
        kernel = TensorView(tuple(header.kernel_shape), int(header.kernel_dtype), buffer[:split])
        grid = (
            TensorView(tuple(header.grid_shape), pb.DTYPE_FLOAT32, buffer[split:])
            if header.grid_shape
            else None
        )
        return ResponseView(kernel, grid, header.report, header.head_hash)


class GroupReassembler:
    """Feed it each serialized ``GroupKernelChunk`` with ``add``; ``finish`` gives every member's kernel.

    The header (the members, in order) comes first and once; each later
    message carries one member's ``KernelChunk``, read by that member's
    ``Reassembler`` with the same checks as a ``StreamKernel`` stream.
    """

    def __init__(self) -> None:
        self._header: pb.GroupHeader | None = None
        self._members: list[Reassembler] = []

    def add(self, message: bytes | memoryview) -> None:
        try:
            view = parse_group_chunk(message)
        except WireFormatError as exc:
            raise MalformedResponse(f"a group stream message does not decode: {exc}") from None
        if view.header is not None:
            if self._header is not None:
                raise MalformedResponse("the group stream sent a second header")
            if not view.header.members:
                raise MalformedResponse("the group stream names no member")
            self._header = view.header
            self._members = [Reassembler() for _ in view.header.members]
        elif self._header is None:
            raise MalformedResponse("the group stream sent a kernel before its header")
        if view.chunk is None:
            return
        if view.member >= len(self._members):
            raise MalformedResponse(
                f"the group stream sent member {view.member} of a group of {len(self._members)}"
            )
        try:
            self._members[view.member].add(view.chunk)
        except MalformedResponse as exc:
            raise MalformedResponse(f"member {self._header.members[view.member]!r}: {exc.message}") from None

    def finish(self) -> tuple[str, list[str], list[ResponseView]]:
        """The group's name, its members' names and each member's kernel, in the group's order."""
        header = self._header
        if header is None:
            raise MalformedResponse("the group stream ended before its header")
        views = []
        for name, member in zip(header.members, self._members, strict=True):
            try:
                views.append(member.finish())
            except MalformedResponse as exc:
                raise MalformedResponse(f"member {name!r}: {exc.message}") from None
        return header.group, list(header.members), views
