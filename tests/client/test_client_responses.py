"""What the client makes of kernel responses: streams reassembled, malformed bytes refused, health."""

from __future__ import annotations

import numpy as np
import pytest

from kernelgen_client._health import decode_response, encode_request
from kernelgen_client._responses import Reassembler, read_unary
from kernelgen_client.errors import MalformedResponse
from kernelgen_client.results import HealthStatus
from kernelgen_wire.metadata import REPORT_TRAILER
from kernelgen_wire.v1 import kernelgen_pb2 as pb


@pytest.mark.parametrize(
    "raw",
    [b"", b"\x0a\x05\x08", b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff", b"\x0b"],
    ids=["no-kernel", "truncated", "overlong-varint", "group-wire-type"],
)
def test_a_malformed_unary_response_is_malformed_response(raw: bytes) -> None:
    with pytest.raises(MalformedResponse):
        read_unary(raw, None)


def test_an_undecodable_report_trailer_is_malformed_response() -> None:
    message = pb.GenerateKernelResponse(kernel=pb.Tensor(shape=[1], data=b"\x00" * 4)).SerializeToString()
    with pytest.raises(MalformedResponse, match="trailer"):
        read_unary(message, [(REPORT_TRAILER, b"\xff\xff")])


def test_an_undecodable_stream_header_is_malformed_response() -> None:
    assembler = Reassembler()
    with pytest.raises(MalformedResponse):
        assembler.add(b"\x0a\x02\xff\xff")  # field 1 (header) holding bytes that do not decode


def _chunks(kernel: bytes, grid: bytes, size: int, shape: list[int], grid_shape: list[int]) -> list[bytes]:
    header = pb.KernelHeader(
        kernel_shape=shape,
        kernel_dtype=pb.DTYPE_FLOAT32,
        kernel_bytes=len(kernel),
        grid_shape=grid_shape,
        grid_bytes=len(grid),
        report=pb.ServerReport(batch_size=3),
    )
    payload = kernel + grid
    out = [pb.KernelChunk(header=header).SerializeToString()]
    for start in range(0, len(payload), size):
        out.append(pb.KernelChunk(offset=start, data=payload[start : start + size]).SerializeToString())
    return out


def test_reassembler_puts_chunks_in_place_in_any_order() -> None:
    kernel = np.arange(60, dtype=np.float32).tobytes()
    grid = np.arange(10, dtype=np.float32).tobytes()
    messages = _chunks(kernel, grid, 64, [1, 5, 12], [1, 5, 2])
    body = messages[1:]
    for order in (body, body[::-1]):
        assembler = Reassembler()
        assembler.add(messages[0])
        for message in order:
            assembler.add(message)
        view = assembler.finish()
        assert bytes(view.kernel.data) == kernel
        assert view.grid is not None
        assert bytes(view.grid.data) == grid
        assert view.kernel.shape == (1, 5, 12)
        assert view.report.batch_size == 3
        assert not view.kernel.data.readonly  # its own buffer: torch can view it


def test_reassembler_refuses_inconsistent_streams() -> None:
    kernel = b"\x00" * 40
    header, first, second = _chunks(kernel, b"", 20, [1, 10], [])

    def run(*messages: bytes) -> None:
        assembler = Reassembler()
        for message in messages:
            assembler.add(message)
        assembler.finish()

    run(header, first, second)  # the consistent stream is fine
    cases = {
        "data before header": (first, header, second),
        "two headers": (header, header, first, second),
        "gap": (header, first),
        "overlap": (header, first, first, second),
        "past the end": (header, first, second, pb.KernelChunk(offset=40, data=b"x").SerializeToString()),
        "no header": (),
        "header lies": (
            pb.KernelChunk(
                header=pb.KernelHeader(kernel_shape=[1, 10], kernel_dtype=1, kernel_bytes=8)
            ).SerializeToString(),
        ),
        "unknown dtype": (
            pb.KernelChunk(
                header=pb.KernelHeader(kernel_shape=[1], kernel_dtype=9, kernel_bytes=4)  # type: ignore[arg-type]
            ).SerializeToString(),
        ),
    }
    for name, messages in cases.items():
        with pytest.raises(MalformedResponse):  # noqa: PT012 - the name says which case failed
            run(*messages)
            pytest.fail(name)


def test_health_messages_match_protobuf() -> None:
    health_pb2 = pytest.importorskip("grpc_health.v1.health_pb2")
    for service in ("", "hyena-2d", "x" * 300):
        assert encode_request(service) == health_pb2.HealthCheckRequest(service=service).SerializeToString()
    for status in (0, 1, 2, 3):
        raw = health_pb2.HealthCheckResponse(status=status).SerializeToString()
        assert decode_response(raw) is HealthStatus(status)
    assert decode_response(b"\x08\x07") is HealthStatus.UNKNOWN  # a status from the future
