"""Reading kernel responses by hand: the same values as protobuf, views of the received bytes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernelgen_wire.kernel_messages import parse_chunk, parse_response
from kernelgen_wire.metadata import REPORT_TRAILER
from kernelgen_wire.protowire import WireFormatError
from kernelgen_wire.protowire import varint as encode_varint
from kernelgen_wire.v1 import kernelgen_pb2 as pb

shapes = st.lists(st.integers(0, 5), min_size=0, max_size=4)
dtypes = st.sampled_from([pb.DTYPE_UNSPECIFIED, pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16])
reports = st.builds(
    pb.ServerReport,
    cache_hit=st.booleans(),
    batch_size=st.integers(0, 2**32 - 1),
    queue_ms=st.floats(0, 1e6),
    content_hash=st.text(max_size=8),
)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, dtype=dtypes, data=st.binary(max_size=300), grid=st.booleans(), report=reports)
def test_parse_response_matches_protobuf(
    shape: list[int], dtype: int, data: bytes, grid: bool, report: pb.ServerReport
) -> None:
    message = pb.GenerateKernelResponse(kernel=pb.Tensor(shape=shape, dtype=dtype, data=data))  # type: ignore[arg-type]
    if grid:
        message.grid.CopyFrom(pb.Tensor(shape=[1, 2], dtype=pb.DTYPE_FLOAT32, data=b"\x01" * 8))
    trailers = [("kernelgen-reason", "x"), (REPORT_TRAILER, report.SerializeToString())]
    view = parse_response(message.SerializeToString(), trailers)
    assert view.kernel.shape == tuple(shape)
    assert view.kernel.dtype == dtype
    assert bytes(view.kernel.data) == data
    assert view.report == report
    assert (view.grid is not None) == grid
    if view.grid is not None:
        assert view.grid.shape == (1, 2)
        assert bytes(view.grid.data) == b"\x01" * 8


def test_the_report_comes_from_the_trailer() -> None:
    report = pb.ServerReport(cache_hit=True, batch_size=3, content_hash="abc")
    message = pb.GenerateKernelResponse(kernel=pb.Tensor(shape=[1], data=b"\x00" * 4)).SerializeToString()
    assert parse_response(message).report == pb.ServerReport()  # none sent: an empty report
    assert parse_response(message, [(REPORT_TRAILER, report.SerializeToString())]).report == report
    # Field 3 is reserved: a message carrying it does not supply the report.
    stray = message + b"\x1a" + encode_varint(report.ByteSize()) + report.SerializeToString()
    assert parse_response(stray).report == pb.ServerReport()
    with pytest.raises(WireFormatError, match="trailer"):
        parse_response(message, [(REPORT_TRAILER, b"\xff\xff")])


def test_parse_response_views_the_received_bytes_without_copying() -> None:
    payload = np.arange(1000, dtype=np.float32).tobytes()
    raw = pb.GenerateKernelResponse(kernel=pb.Tensor(shape=[1, 1000, 1], data=payload)).SerializeToString()
    view = parse_response(raw)
    assert view.kernel.data.obj is raw  # a view, not a copy


def test_unpacked_shapes_and_unknown_fields_are_read() -> None:
    # shape as one varint per element (unpacked), then an unknown fixed64 and an unknown string
    tensor = b"".join([b"\x08\x02", b"\x08\x03", b"\x10\x01", b"\x1a\x00"])
    unknown = b"\x49" + b"\x00" * 8 + b"\x52\x03abc"  # field 9 (I64), field 10 (LEN)
    raw = b"\x0a" + encode_varint(len(tensor)) + tensor + unknown
    view = parse_response(raw)
    assert view.kernel.shape == (2, 3)
    assert view.kernel.dtype == pb.DTYPE_FLOAT32


@pytest.mark.parametrize(
    "raw",
    [b"", b"\x0a\x05\x08", b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff", b"\x0b"],
    ids=["no-kernel", "truncated", "overlong-varint", "group-wire-type"],
)
def test_malformed_responses_are_refused(raw: bytes) -> None:
    with pytest.raises(WireFormatError):
        parse_response(raw)


def test_parse_chunk_offset_and_data() -> None:
    chunk = parse_chunk(pb.KernelChunk(offset=2**40, data=b"abc").SerializeToString())
    assert chunk.header is None
    assert chunk.offset == 2**40
    assert bytes(chunk.data) == b"abc"


def test_a_factored_response_is_read_with_its_head_hash() -> None:
    factors = np.arange(24, dtype=np.float32)
    raw = pb.GenerateKernelResponse(
        factors=pb.Tensor(shape=[1, 3, 8], dtype=pb.DTYPE_FLOAT32, data=factors.tobytes()), head_hash="cafe"
    ).SerializeToString()
    view = parse_response(raw)
    assert view.factored and view.head_hash == "cafe"
    assert view.kernel.shape == (1, 3, 8)
    assert view.kernel.data.obj is raw  # a view, not a copy
    dense = parse_response(pb.GenerateKernelResponse(kernel=pb.Tensor(shape=[1])).SerializeToString())
    assert not dense.factored and dense.head_hash == ""


@pytest.mark.parametrize(
    "message",
    [
        pb.GenerateKernelResponse(factors=pb.Tensor(shape=[1])),  # factors without their head
        pb.GenerateKernelResponse(kernel=pb.Tensor(shape=[1]), factors=pb.Tensor(shape=[1]), head_hash="x"),
        pb.GenerateKernelResponse(kernel=pb.Tensor(shape=[1]), head_hash="x"),  # a head for a dense kernel
    ],
    ids=["no-head", "both", "dense-with-head"],
)
def test_inconsistent_factored_responses_are_refused(message: pb.GenerateKernelResponse) -> None:
    with pytest.raises(WireFormatError):
        parse_response(message.SerializeToString())
