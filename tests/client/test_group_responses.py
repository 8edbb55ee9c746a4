"""A GenerateGroup stream read into each member's kernel; every malformed stream is refused."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from kernelgen_client._generate import prepare_group
from kernelgen_client._responses import GroupReassembler
from kernelgen_client.errors import InvalidRequest, MalformedResponse
from kernelgen_wire.group_messages import MemberKernel, encode_group
from kernelgen_wire.kernel_messages import Payload
from kernelgen_wire.v1 import kernelgen_pb2 as pb


def array(i: int) -> np.ndarray:
    return np.arange(60 * (i + 1), dtype=np.float32).reshape(1, -1, 3) + i


def kernels(count: int) -> list[MemberKernel]:
    report = pb.ServerReport(batch_size=1)
    return [MemberKernel(Payload.from_array(array(i), pb.DTYPE_FLOAT32), report) for i in range(count)]


def group_call(name: str, seq_lens: object, conditioning: object = None, **kwargs: object) -> object:
    options = {"dtype": "float32", "as_torch": False, "copy": False, "with_report": False, **kwargs}
    return prepare_group(name, seq_lens, conditioning, **options)  # type: ignore[arg-type]


def stream(count: int = 2, chunk: int = 64) -> list[bytes]:
    return list(encode_group("net", [f"net/{i}" for i in range(count)], kernels(count), chunk))


def read(messages: list[bytes]) -> tuple[str, list[str], list[object]]:
    reader = GroupReassembler()
    for message in messages:
        reader.add(message)
    group, members, views = reader.finish()
    return group, members, list(views)


def test_a_stream_gives_each_members_kernel_in_order() -> None:
    group, members, views = read(stream(3))
    assert (group, members) == ("net", ["net/0", "net/1", "net/2"])
    result = group_call("net", [2]).finish(group, members, views, {})  # type: ignore[attr-defined]
    for i, (name, kernel) in enumerate(result.items()):
        assert name == f"net/{i}"
        np.testing.assert_array_equal(kernel, array(i))
    with pytest.raises(MalformedResponse, match="asked for group 'other', got 'net'"):
        group_call("other", [2]).finish(group, members, views, {})  # type: ignore[attr-defined]


def test_interleaved_members_are_read_too() -> None:
    messages = stream(2)
    header, rest = messages[0], messages[1:]
    first = [m for m in rest if not m.startswith(b"\x10")]  # member 0 carries no member field
    second = [m for m in rest if m.startswith(b"\x10")]
    mixed = [header] + [m for pair in zip(second, first, strict=False) for m in pair]
    mixed += first[len(second) :] + second[len(first) :]
    assert read(mixed)[1] == ["net/0", "net/1"]


STRAY = pb.GroupKernelChunk(member=5, chunk=pb.KernelChunk(offset=0, data=b"x")).SerializeToString()
NO_MEMBERS = pb.GroupKernelChunk(group=pb.GroupHeader(group="net")).SerializeToString()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda m: m[1:], "the group stream sent a kernel before its header"),
        (lambda m: [m[0], *m], "the group stream sent a second header"),
        (lambda m: m[:-1], "member 'net/1': the stream ended after"),
        (lambda m: [m[0]], "member 'net/0': the stream ended before its header"),
        (lambda m: [], "the group stream ended before its header"),
        (lambda m: [m[0], STRAY], "the group stream sent member 5 of a group of 2"),
        (lambda m: [NO_MEMBERS], "names no member"),
        (lambda m: [m[0], m[2], *m[1:]], "member 'net/0': the stream sent data before its header"),
        (lambda m: [m[0], b"\x1a\x40abc"], "a group stream message does not decode"),
    ],
    ids=["no-header", "two-headers", "short", "no-member-stream", "empty", "bad-index", "no-members",
         "data-first", "garbage"],
)  # fmt: skip
def test_malformed_streams_are_refused(mutate: object, message: str) -> None:
    with pytest.raises(MalformedResponse, match=message):
        read(mutate(stream(2)))  # type: ignore[operator]


def test_prepare_group_checks_before_any_io() -> None:
    with pytest.raises(InvalidRequest, match="seq_lens must all be >= 1"):
        group_call("net", [0])
    with pytest.raises(InvalidRequest, match="conditioning"):
        group_call("net", [3], np.ones((2, 2, 2)))
    call: Any = group_call("net", 3, np.ones((2, 4)), dtype="float16", representation="factored")
    assert list(call.request.seq_lens) == [3] and call.rows == 2
    assert call.request.representation == pb.REPRESENTATION_FACTORED
    assert call.request.dtype == pb.DTYPE_FLOAT16
    assert list(call.request.conditioning.shape) == [2, 4]
