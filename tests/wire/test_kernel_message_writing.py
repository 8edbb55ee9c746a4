"""Hand-encoded responses are exactly what protobuf would serialize."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernelgen_server.core.payloads import output_dtype, to_payload
from kernelgen_server.errors import InvalidRequest
from kernelgen_server.transport.native_codec import decode_conditioning
from kernelgen_wire.kernel_messages import Payload, encode_chunks, encode_kernel, encode_response
from kernelgen_wire.protowire import varint
from kernelgen_wire.v1 import kernelgen_pb2 as pb


def reference_response(kernel: Payload, grid: Payload | None) -> bytes:
    msg = pb.GenerateKernelResponse(
        kernel=pb.Tensor(shape=kernel.shape, dtype=kernel.dtype, data=kernel.data.tobytes())
    )
    if grid is not None:
        msg.grid.CopyFrom(pb.Tensor(shape=grid.shape, dtype=grid.dtype, data=grid.data.tobytes()))
    return msg.SerializeToString(deterministic=True)


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(1, 300), min_size=1, max_size=4),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    with_grid=st.booleans(),
    hit=st.booleans(),
)
def test_response_bytes_equal_protobuf(
    shape: list[int], dtype: torch.dtype, with_grid: bool, hit: bool
) -> None:
    if np.prod(shape) > 200_000:
        shape = shape[:1]
    kernel = to_payload(torch.randn(*shape).to(dtype))
    grid = to_payload(torch.randn(1, shape[0], 2)) if with_grid else None
    encoded = encode_kernel(kernel)
    response = encode_response(encoded, grid)
    assert response == reference_response(kernel, grid)
    if grid is None:
        assert response is encoded.message  # no copy: the cached bytes go out as they are
    assert encoded.payload.data.tobytes() == kernel.data.tobytes()
    assert encoded.nbytes == len(encoded.message)
    parsed = pb.GenerateKernelResponse.FromString(response)
    assert list(parsed.kernel.shape) == shape


def test_varint() -> None:
    for value in (0, 1, 127, 128, 300, 2**32, 2**63 - 1):
        msg = pb.FlopCountResponse(flops=value)
        assert msg.SerializeToString() in (b"", b"\x08" + varint(value))
    with pytest.raises(ValueError, match="negative"):
        varint(-1)


def test_bfloat16_bits_on_the_wire() -> None:
    t = torch.tensor([1.0, -2.5, 3.140625], dtype=torch.bfloat16)
    payload = to_payload(t)
    assert payload.dtype == pb.DTYPE_BFLOAT16
    bits = np.frombuffer(payload.data, dtype="<u2").astype(np.uint32) << 16
    np.testing.assert_array_equal(bits.view(np.float32), t.float().numpy())


@pytest.mark.parametrize("chunk", [1024, 4096, 1 << 20])
def test_chunks_reassemble(chunk: int) -> None:
    kernel = to_payload(torch.randn(1, 999, 7))
    grid = to_payload(torch.randn(1, 999, 1))
    report = pb.ServerReport(batch_size=1)
    messages = [pb.KernelChunk.FromString(m) for m in encode_chunks(kernel, grid, report, chunk)]
    header = messages[0].header
    assert list(header.kernel_shape) == [1, 999, 7]
    assert header.kernel_bytes == kernel.nbytes
    assert header.grid_bytes == grid.nbytes
    assert header.report == report
    buffer = bytearray(header.kernel_bytes + header.grid_bytes)
    for m in messages[1:]:
        assert len(m.data) <= chunk
        buffer[m.offset : m.offset + len(m.data)] = m.data
    assert bytes(buffer) == kernel.data.tobytes() + grid.data.tobytes()
    assert len(messages) - 1 == -(-kernel.nbytes // chunk) + -(-grid.nbytes // chunk)


def test_decode_conditioning() -> None:
    c = np.arange(6, dtype="<f4").reshape(2, 3)
    out = decode_conditioning(pb.Tensor(shape=[2, 3], dtype=pb.DTYPE_FLOAT32, data=c.tobytes()))
    np.testing.assert_array_equal(out, c)
    with pytest.raises(InvalidRequest, match="must be float32"):
        decode_conditioning(pb.Tensor(shape=[2, 3], dtype=pb.DTYPE_FLOAT16, data=c.tobytes()))
    with pytest.raises(InvalidRequest, match=r"shape \[B, C\]"):
        decode_conditioning(pb.Tensor(shape=[6], data=c.tobytes()))
    with pytest.raises(InvalidRequest, match="needs 24 bytes"):
        decode_conditioning(pb.Tensor(shape=[2, 3], data=c.tobytes()[:-4]))
    bad = c.copy()
    bad[1, 1] = np.nan
    with pytest.raises(InvalidRequest, match="NaN or Inf"):
        decode_conditioning(pb.Tensor(shape=[2, 3], data=bad.tobytes()))


def test_output_dtypes() -> None:
    assert output_dtype(pb.DTYPE_UNSPECIFIED) == torch.float32
    assert output_dtype(pb.DTYPE_BFLOAT16) == torch.bfloat16
    with pytest.raises(InvalidRequest, match="dtype 9 is not supported"):
        output_dtype(9)


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(1, 40), min_size=2, max_size=4),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    with_grid=st.booleans(),
    head_hash=st.text(alphabet="0123456789abcdef", min_size=1, max_size=64),
)
def test_factored_response_bytes_equal_protobuf(
    shape: list[int], dtype: torch.dtype, with_grid: bool, head_hash: str
) -> None:
    factors = to_payload(torch.randn(*shape).to(dtype))
    grid = to_payload(torch.randn(1, shape[0], 2)) if with_grid else None
    encoded = encode_kernel(factors, head_hash)
    assert encoded.representation == pb.REPRESENTATION_FACTORED
    assert encoded.payload.data.tobytes() == factors.data.tobytes()  # a view inside the message
    want = pb.GenerateKernelResponse(
        factors=pb.Tensor(shape=factors.shape, dtype=factors.dtype, data=factors.data.tobytes()),  # type: ignore[arg-type]
        head_hash=head_hash,
    )
    if grid is not None:
        want.grid.CopyFrom(pb.Tensor(shape=grid.shape, dtype=grid.dtype, data=grid.data.tobytes()))  # type: ignore[arg-type]
    assert encode_response(encoded, grid) == want.SerializeToString(deterministic=True)


def test_a_factored_stream_names_its_representation_and_head() -> None:
    factors = to_payload(torch.randn(1, 50, 8))
    messages = [
        pb.KernelChunk.FromString(m)
        for m in encode_chunks(factors, None, pb.ServerReport(), 128, head_hash="ab12")
    ]
    header = messages[0].header
    assert header.representation == pb.REPRESENTATION_FACTORED
    assert header.head_hash == "ab12"
    assert list(header.kernel_shape) == [1, 50, 8]
    dense = pb.KernelChunk.FromString(next(encode_chunks(factors, None, pb.ServerReport(), 128))).header
    assert dense.representation == pb.REPRESENTATION_DENSE and not dense.head_hash
