"""GenerateGroup's stream, written and read by hand, is exactly what protobuf writes and reads."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernelgen_wire.group_messages import MemberKernel, encode_group, parse_group_chunk
from kernelgen_wire.kernel_messages import Payload, encode_chunks, parse_chunk
from kernelgen_wire.protowire import WireFormatError
from kernelgen_wire.v1 import kernelgen_pb2 as pb


def member(rows: int, points: int, width: int, seed: int, head_hash: str = "") -> MemberKernel:
    array = np.random.default_rng(seed).standard_normal((rows, points, width), dtype=np.float32)
    report = pb.ServerReport(batch_size=rows, content_hash=f"hash-{seed}", worker=seed % 3)
    return MemberKernel(Payload.from_array(array, pb.DTYPE_FLOAT32), report, head_hash)


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(
        st.tuples(st.integers(1, 3), st.integers(1, 400), st.integers(1, 9)), min_size=1, max_size=4
    ),
    chunk=st.sampled_from([64, 1000, 1 << 20]),
    factored=st.booleans(),
)
def test_group_messages_equal_protobuf_and_carry_each_members_stream(
    sizes: list[tuple[int, int, int]], chunk: int, factored: bool
) -> None:
    kernels = [member(*size, seed=i, head_hash="h" * 64 if factored else "") for i, size in enumerate(sizes)]
    names = [f"net/{i}" for i in range(len(kernels))]
    messages = list(encode_group("net", names, kernels, chunk))

    first = pb.GroupKernelChunk.FromString(messages[0])
    assert first == pb.GroupKernelChunk(group=pb.GroupHeader(group="net", members=names))
    expected: list[bytes] = []
    for index, kernel in enumerate(kernels):
        for inner in encode_chunks(kernel.payload, None, kernel.report, chunk, head_hash=kernel.head_hash):
            wrapped = pb.GroupKernelChunk(member=index, chunk=pb.KernelChunk.FromString(inner))
            expected.append(wrapped.SerializeToString(deterministic=True))
    assert messages[1:] == expected

    received: list[bytearray] = [bytearray() for _ in kernels]
    headers: list[pb.KernelHeader] = []
    for message in messages[1:]:
        view = parse_group_chunk(message)
        assert view.header is None and view.chunk is not None
        chunk_view = parse_chunk(view.chunk)
        if chunk_view.header is not None:
            assert view.member == len(headers)  # members in order, each from its header on
            headers.append(chunk_view.header)
        assert chunk_view.offset == len(received[view.member])
        received[view.member] += chunk_view.data
    assert [h.report for h in headers] == [k.report for k in kernels]
    assert [h.head_hash for h in headers] == [k.head_hash for k in kernels]
    assert [bytes(r) for r in received] == [k.payload.data.tobytes() for k in kernels]


def test_the_reader_takes_any_valid_encoding() -> None:
    header = pb.GroupKernelChunk(group=pb.GroupHeader(group="g", members=["g/0", "g/1"]))
    view = parse_group_chunk(header.SerializeToString() + b"\xa0\x06\x05")  # unknown field 100 = 5
    assert view.header is not None and list(view.header.members) == ["g/0", "g/1"]
    assert (view.member, view.chunk) == (0, None)
    inner = pb.KernelChunk(offset=8, data=b"abcd")
    view = parse_group_chunk(pb.GroupKernelChunk(member=1, chunk=inner).SerializeToString())
    assert view.member == 1 and view.chunk is not None
    assert pb.KernelChunk.FromString(bytes(view.chunk)) == inner


def test_malformed_group_messages_are_refused() -> None:
    with pytest.raises(WireFormatError, match="a group header does not decode"):
        parse_group_chunk(b"\x0a\x02\x0a\xff")  # a header whose string runs past its end
    with pytest.raises(WireFormatError):
        parse_group_chunk(b"\x1a\x10abc")  # a chunk longer than the message
    with pytest.raises(ValueError, match="2 members but 1 kernels"):
        list(encode_group("g", ["g/0", "g/1"], [member(1, 2, 3, 0)], 1024))
