"""What the sync and async clients share for one ``generate``: everything but the I/O.

Flow of a call, identical in both clients:

1. ``prepare`` checks the arguments and builds the request (nothing is sent
   for a malformed one);
2. the client looks up the model (``GetModel``, cached per client) and
   ``use_stream`` predicts the response size from its config: above
   ``STREAM_THRESHOLD_BYTES`` the kernel comes by ``StreamKernel``;
3. a unary call that is refused as too large for one message (a stale
   prediction) is redone once as a stream (``wants_stream``);
4. ``finish`` decodes the received bytes into what the caller asked for.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from kernelgen_client.errors import InvalidRequest, KernelServiceError, KernelTooLarge, MalformedResponse
from kernelgen_client.tensors import (
    ConditioningLike,
    DTypeLike,
    decode_numpy,
    decode_torch,
    dtype_name,
    encode_conditioning,
    itemsize,
    wire_dtype,
)
from kernelgen_client.types import KernelResult, ModelInfo, ServerReport
from kernelgen_wire.kernel_messages import ResponseView, TensorView
from kernelgen_wire.v1 import kernelgen_pb2 as pb

__all__ = [
    "STREAM_THRESHOLD_BYTES",
    "Deadline",
    "GenerateCall",
    "check_seq_lens",
    "predict_bytes",
    "prepare",
]

#: Responses predicted above this many bytes are streamed. Below the server's
#: default unary limit (4 MiB) with room for the envelope and a raised grid.
STREAM_THRESHOLD_BYTES = 3_670_016  # 3.5 MiB


class Deadline:
    """One deadline shared by every RPC of a client call (lookup, generate, fallback)."""

    def __init__(self, timeout: float | None) -> None:
        self._end = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        """Seconds left (never below a millisecond, so an expired call fails as DEADLINE_EXCEEDED)."""
        if self._end is None:
            return None
        return max(self._end - time.monotonic(), 0.001)


def check_seq_lens(seq_lens: int | Sequence[int]) -> tuple[int, ...]:
    """``seq_lens`` as a tuple of ints >= 1; an int is one axis."""
    if isinstance(seq_lens, (str, bytes)):
        raise InvalidRequest(f"seq_lens must be integers, got {seq_lens!r}")
    values = cast(Sequence[Any], [seq_lens] if isinstance(seq_lens, numbers.Integral) else seq_lens)
    lens = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise InvalidRequest(f"seq_lens must be integers, got {value!r}")
        if value < 1:
            raise InvalidRequest(f"seq_lens must all be >= 1, got {list(values)}")
        lens.append(int(value))
    if not lens:
        raise InvalidRequest("seq_lens is empty; give one length per spatial axis")
    return tuple(lens)


def predict_bytes(info: ModelInfo, seq_lens: Sequence[int], rows: int, wire: int, return_grid: bool) -> int:
    """Bytes of kernel (and grid) the server will send, or 0 when the config is unknown."""
    config = info.config
    if config is None:
        return 0
    points = math.prod(2 * n - 1 for n in seq_lens)
    grid = points * config.data_dim * 4 if return_grid else 0
    return rows * points * config.out_dim * itemsize(wire) + grid


@dataclass
class GenerateCall:
    """One ``generate`` call's request and the caller's wishes for the result."""

    model: str
    seq_lens: tuple[int, ...]
    request: pb.GenerateKernelRequest
    rows: int
    wire: int
    return_grid: bool
    as_torch: bool
    copy: bool
    with_report: bool
    stream: bool | None
    started: float = field(default_factory=time.perf_counter)

    def use_stream(self, info: ModelInfo | None, threshold: int = STREAM_THRESHOLD_BYTES) -> bool:
        """Stream when asked to, or when the predicted response is above ``threshold``."""
        if self.stream is not None:
            return self.stream
        if info is None:
            return False
        return predict_bytes(info, self.seq_lens, self.rows, self.wire, self.return_grid) > threshold

    @staticmethod
    def wants_stream(error: KernelServiceError) -> bool:
        """A unary call refused only because its response is over the one-message limit."""
        return isinstance(error, KernelTooLarge) and "StreamKernel" in error.message

    def finish(self, response: ResponseView, *, streamed: bool) -> Any:
        """The caller's result from a decoded response: array(s), or a ``KernelResult``."""
        decode = decode_torch if self.as_torch else decode_numpy
        kernel_view = response.kernel
        kernel = decode(kernel_view.data, kernel_view.shape, kernel_view.dtype, copy=self.copy)
        grid = None
        if self.return_grid:
            grid_view: TensorView | None = response.grid
            if grid_view is None:
                raise MalformedResponse("the grid was asked for but the response has none")
            grid = decode(grid_view.data, grid_view.shape, grid_view.dtype, copy=self.copy)
        if self.with_report:
            return KernelResult(
                kernel=kernel,
                grid=grid,
                report=ServerReport.from_pb(response.report),
                wire_dtype=dtype_name(kernel_view.dtype),
                raw=kernel_view.data.toreadonly(),
                streamed=streamed,
                elapsed_ms=(time.perf_counter() - self.started) * 1000.0,
            )
        return (kernel, grid) if self.return_grid else kernel


def prepare(
    model: str,
    seq_lens: int | Sequence[int],
    conditioning: ConditioningLike | None,
    *,
    dtype: DTypeLike,
    return_grid: bool,
    as_torch: bool,
    copy: bool,
    with_report: bool,
    stream: bool | None,
) -> GenerateCall:
    """Check the arguments and build the request; raises ``InvalidRequest`` before any I/O."""
    if not isinstance(model, str) or not model:
        raise InvalidRequest(f"model must be a non-empty name, got {model!r}")
    lens = check_seq_lens(seq_lens)
    wire = wire_dtype(dtype)
    request = pb.GenerateKernelRequest(model=model, seq_lens=lens, dtype=wire, return_grid=return_grid)  # type: ignore[arg-type]
    rows = 1
    if conditioning is not None:
        tensor, rows = encode_conditioning(conditioning)
        request.conditioning.CopyFrom(tensor)
    return GenerateCall(
        model=model,
        seq_lens=lens,
        request=request,
        rows=rows,
        wire=wire,
        return_grid=return_grid,
        as_torch=as_torch,
        copy=copy,
        with_report=with_report,
        stream=stream,
    )
