"""What both clients share for a generate call: checks, size prediction, transport choice."""

from __future__ import annotations

import numpy as np
import pytest

from kernelgen_client._generate import STREAM_THRESHOLD_BYTES, check_seq_lens, predict_bytes, prepare
from kernelgen_client.errors import InvalidRequest, KernelTooLarge, MalformedResponse, Overloaded
from kernelgen_client.results import KernelResult, ModelConfig, ModelInfo
from kernelgen_wire.kernel_messages import ResponseView, parse_response
from kernelgen_wire.metadata import REPORT_TRAILER
from kernelgen_wire.v1 import kernelgen_pb2 as pb


def info(out_dim: int = 384, data_dim: int = 2) -> ModelInfo:
    config = ModelConfig(out_dim, data_dim, 32, 3, 32, 10.0, (15,) * data_dim, True, 1.0, False, None)
    return ModelInfo("m", True, "", config, "hash", 1)


def call(**overrides: object) -> object:
    kwargs: dict[str, object] = {
        "dtype": "float32",
        "return_grid": False,
        "as_torch": False,
        "copy": False,
        "with_report": False,
        "stream": None,
    }
    kwargs.update(overrides)
    model = kwargs.pop("model", "m")
    seq_lens = kwargs.pop("seq_lens", [29, 29])
    conditioning = kwargs.pop("conditioning", None)
    return prepare(model, seq_lens, conditioning, **kwargs)  # type: ignore[arg-type]


def test_seq_lens() -> None:
    assert check_seq_lens(7) == (7,)
    assert check_seq_lens(np.int64(7)) == (7,)
    assert check_seq_lens([29, np.int32(3)]) == (29, 3)
    for bad in ([], [0], [2, -1], [True], [2.5], "29,29", ["3"]):
        with pytest.raises(InvalidRequest):
            check_seq_lens(bad)  # type: ignore[arg-type]


def test_prediction_counts_rows_dtype_and_grid() -> None:
    points = 57 * 57
    assert predict_bytes(info(), (29, 29), 1, pb.DTYPE_FLOAT32, False) == points * 384 * 4
    assert predict_bytes(info(), (29, 29), 4, pb.DTYPE_BFLOAT16, False) == 4 * points * 384 * 2
    assert predict_bytes(info(), (29, 29), 1, pb.DTYPE_FLOAT16, True) == points * 384 * 2 + points * 2 * 4
    unknown = ModelInfo("broken", False, "no config", None, "", 0)
    assert predict_bytes(unknown, (29, 29), 1, pb.DTYPE_FLOAT32, False) == 0


def test_transport_choice() -> None:
    big = call(seq_lens=[29, 29])  # 4.99 MB float32
    small = call(seq_lens=[9, 9])
    assert big.use_stream(info())  # type: ignore[attr-defined]
    assert not small.use_stream(info())  # type: ignore[attr-defined]
    assert not big.use_stream(None)  # type: ignore[attr-defined]  # unknown: try unary, fall back
    assert not call(seq_lens=[29, 29], dtype="bf16").use_stream(info(out_dim=128))  # type: ignore[attr-defined]
    assert call(seq_lens=[3, 3], stream=True).use_stream(info())  # type: ignore[attr-defined]
    assert not call(stream=False).use_stream(info())  # type: ignore[attr-defined]
    assert STREAM_THRESHOLD_BYTES < 4 * 1024 * 1024


def test_only_a_one_message_refusal_falls_back_to_streaming() -> None:
    generate = call()
    # The reason says so, not the message's words.
    one_message = KernelTooLarge("the response would be 5 bytes", reason="message-too-large")
    assert generate.wants_stream(one_message)  # type: ignore[attr-defined]
    too_large = KernelTooLarge(
        "the kernel would be 5 bytes; a kernel this large is streamed", reason="too-large"
    )
    assert not generate.wants_stream(too_large)  # type: ignore[attr-defined]
    assert not generate.wants_stream(Overloaded("queue full", reason="queue-full"))  # type: ignore[attr-defined]


def test_request_building() -> None:
    generate = call(conditioning=np.ones((3, 4)), dtype="float16", return_grid=True)
    request = generate.request  # type: ignore[attr-defined]
    assert request.model == "m"
    assert list(request.seq_lens) == [29, 29]
    assert request.dtype == pb.DTYPE_FLOAT16
    assert request.return_grid
    assert list(request.conditioning.shape) == [3, 4]
    assert generate.rows == 3  # type: ignore[attr-defined]
    with pytest.raises(InvalidRequest, match="model"):
        call(model="")
    with pytest.raises(InvalidRequest, match="dtype"):
        call(dtype="int8")


def _response(grid: bool) -> ResponseView:
    message = pb.GenerateKernelResponse(
        kernel=pb.Tensor(shape=[1, 2], dtype=pb.DTYPE_FLOAT32, data=np.ones(2, np.float32).tobytes()),
    )
    if grid:
        message.grid.CopyFrom(pb.Tensor(shape=[1, 2, 1], dtype=pb.DTYPE_FLOAT32, data=b"\x00" * 8))
    report = pb.ServerReport(cache_hit=True, content_hash="h").SerializeToString()
    return parse_response(message.SerializeToString(), [(REPORT_TRAILER, report)])


def test_finish_shapes_the_result() -> None:
    kernel = call().finish((_response(False)), streamed=False)  # type: ignore[attr-defined]
    assert kernel.tolist() == [[1.0, 1.0]]
    kernel, grid = call(return_grid=True).finish((_response(True)), streamed=False)  # type: ignore[attr-defined]
    assert grid.shape == (1, 2, 1)
    result = call(with_report=True).finish((_response(False)), streamed=True)  # type: ignore[attr-defined]
    assert isinstance(result, KernelResult)
    assert result.report.cache_hit
    assert result.report.content_hash == "h"
    assert result.streamed
    assert result.wire_dtype == "float32"
    assert result.nbytes == 8
    assert result.shape == (1, 2)
    assert result.raw.readonly
    assert result.elapsed_ms >= 0
    with pytest.raises(MalformedResponse, match="grid"):
        call(return_grid=True).finish((_response(False)), streamed=False)  # type: ignore[attr-defined]
