"""Conditioning encoding and kernel decoding: dtypes, views, copies, torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernelgen_client.errors import InvalidRequest, MalformedResponse
from kernelgen_client.tensors import (
    decode_numpy,
    decode_torch,
    dtype_name,
    encode_conditioning,
    itemsize,
    wire_dtype,
)
from kernelgen_wire.v1 import kernelgen_pb2 as pb


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("float32", pb.DTYPE_FLOAT32),
        ("FP32", pb.DTYPE_FLOAT32),
        (np.float32, pb.DTYPE_FLOAT32),
        (np.dtype("float16"), pb.DTYPE_FLOAT16),
        ("half", pb.DTYPE_FLOAT16),
        ("bf16", pb.DTYPE_BFLOAT16),
        (torch.bfloat16, pb.DTYPE_BFLOAT16),
        (torch.float16, pb.DTYPE_FLOAT16),
    ],
)
def test_dtype_names(given: object, expected: int) -> None:
    assert wire_dtype(given) == expected  # type: ignore[arg-type]


def test_unknown_dtype_is_an_invalid_request() -> None:
    with pytest.raises(InvalidRequest, match="float32, float16 or bfloat16"):
        wire_dtype("int8")
    assert dtype_name(pb.DTYPE_UNSPECIFIED) == "float32"
    assert itemsize(pb.DTYPE_BFLOAT16) == 2


@pytest.mark.parametrize(
    "value",
    [
        [[1.0, 2.0, 3.0]],
        [1.0, 2.0, 3.0],  # one row
        np.array([[1, 2, 3]], dtype=np.int64),
        np.array([[1.0, 2.0, 3.0]], dtype=np.float64),
        torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.bfloat16),
        torch.tensor([[1.0, 2.0, 3.0]], requires_grad=True),
        np.asfortranarray(np.array([[1.0, 2.0, 3.0]])),
    ],
)
def test_conditioning_is_encoded_as_float32_rows(value: object) -> None:
    tensor, rows = encode_conditioning(value)  # type: ignore[arg-type]
    assert rows == 1
    assert list(tensor.shape) == [1, 3]
    assert tensor.dtype == pb.DTYPE_FLOAT32
    assert np.frombuffer(tensor.data, "<f4").tolist() == [1.0, 2.0, 3.0]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (np.zeros((2, 3, 4)), "shape"),
        (np.zeros((0, 3)), "shape"),
        ([[1.0, float("nan")]], "NaN"),
        ([[1.0, float("inf")]], "NaN"),
        ([["a", "b"]], "numeric"),
        ([[1.0], [1.0, 2.0]], "numeric"),
    ],
)
def test_bad_conditioning_is_refused_before_sending(value: object, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        encode_conditioning(value)  # type: ignore[arg-type]


@settings(max_examples=50, deadline=None)
@given(values=st.lists(st.floats(allow_nan=False, width=32), min_size=1, max_size=64))
def test_bfloat16_decodes_like_torch(values: list[float]) -> None:
    reference = torch.tensor(values, dtype=torch.float32).to(torch.bfloat16)
    raw = memoryview(reference.view(torch.int16).numpy().tobytes())
    decoded = decode_numpy(raw, [len(values)], pb.DTYPE_BFLOAT16)
    assert decoded.dtype == np.float32
    assert np.array_equal(decoded, reference.float().numpy())
    as_torch = decode_torch(raw, [len(values)], pb.DTYPE_BFLOAT16)
    assert as_torch.dtype == torch.bfloat16
    assert torch.equal(as_torch, reference)


@pytest.mark.parametrize(
    ("wire", "np_dtype"), [(pb.DTYPE_FLOAT32, np.float32), (pb.DTYPE_FLOAT16, np.float16)]
)
def test_numpy_decoding_views_the_bytes(wire: int, np_dtype: type) -> None:
    source = np.arange(12, dtype=np_dtype)
    raw = source.tobytes()
    view = decode_numpy(memoryview(raw), [1, 3, 4], wire)
    assert view.dtype == np_dtype
    assert view.shape == (1, 3, 4)
    assert not view.flags.writeable  # bytes are immutable: a read-only view
    assert np.shares_memory(view, np.frombuffer(raw, np.uint8))
    copied = decode_numpy(memoryview(raw), [1, 3, 4], wire, copy=True)
    assert copied.flags.writeable
    assert copied.flags.owndata
    assert np.array_equal(copied, view)


def test_torch_decoding_is_zero_copy_on_a_writable_buffer() -> None:
    buffer = np.arange(6, dtype=np.float32)
    tensor = decode_torch(memoryview(buffer).cast("B"), [2, 3], pb.DTYPE_FLOAT32)
    buffer[0] = 42.0
    assert tensor[0, 0].item() == 42.0  # the same memory
    readonly = memoryview(buffer.tobytes())
    copied = decode_torch(readonly, [2, 3], pb.DTYPE_FLOAT32)
    assert copied.flatten().tolist() == buffer.tolist()
    assert decode_torch(memoryview(b""), [0, 3], pb.DTYPE_FLOAT16).shape == (0, 3)


def test_size_mismatch_is_a_malformed_response() -> None:
    with pytest.raises(MalformedResponse, match="needs 24 bytes"):
        decode_numpy(memoryview(b"\x00" * 20), [2, 3], pb.DTYPE_FLOAT32)
    with pytest.raises(MalformedResponse, match="unknown dtype"):
        decode_numpy(memoryview(b""), [0], 17)
