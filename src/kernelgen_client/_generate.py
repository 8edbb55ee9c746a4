"""What the sync and async clients share for one ``generate``: everything but the I/O.

Flow of a call, identical in both clients:

1. ``prepare`` checks the arguments and builds the request (nothing is sent
   for a malformed one);
2. the client looks up the model (``GetModel``, cached per client);
   ``choose_representation`` settles ``"auto"`` (factored when that moves
   fewer bytes, the output head counted unless already held) and
   ``use_stream`` predicts the response size from its config: above
   ``STREAM_THRESHOLD_BYTES`` the kernel comes by ``StreamKernel``;
3. a unary call that is refused as too large for one message (a stale
   prediction) is redone once as a stream (``wants_stream``);
4. an unconditioned call carries its cache key in the ``kernelgen-cache-key``
   header (``affinity``), so that a proxy in front of several replicas sends
   each key to the replica that caches it; a conditioned one carries none;
5. a factored response names its output head, which the client fetches once
   per output head (``GetOutputHead``);
6. ``finish`` decodes the received bytes into what the caller asked for.

A ``generate_group`` call is the same for every member of the group at once
(``prepare_group``, ``GroupCall``): it always streams (``GenerateGroup``),
settles ``"auto"`` over the members together, and decodes each member's
kernel as a ``generate`` call of that member would.
"""

from __future__ import annotations

import contextlib
import numbers
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from kernelgen_client.errors import InvalidRequest, KernelServiceError, KernelTooLarge, MalformedResponse
from kernelgen_client.factored import FactoredKernel, OutputHead
from kernelgen_client.results import KernelResult, ModelInfo, ServerReport
from kernelgen_client.tensors import (
    ConditioningLike,
    DTypeLike,
    decode_numpy,
    decode_torch,
    dtype_name,
    encode_conditioning,
    wire_dtype,
)
from kernelgen_wire.kernel_messages import ResponseView, TensorView
from kernelgen_wire.metadata import CACHE_KEY_HEADER, Reason, cache_key
from kernelgen_wire.sizes import GRID_DTYPE, kernel_spatial, tensor_bytes
from kernelgen_wire.v1 import kernelgen_pb2 as pb

__all__ = [
    "REPRESENTATIONS",
    "STREAM_THRESHOLD_BYTES",
    "Deadline",
    "GenerateCall",
    "GroupCall",
    "SeqLens",
    "check_seq_lens",
    "pointing",
    "predict_bytes",
    "prepare",
    "prepare_group",
]

#: What ``generate(seq_lens=...)`` takes: one length per spatial axis (an int: one axis).
SeqLens = int | Sequence[int]

#: What ``generate(representation=...)`` takes.
REPRESENTATIONS = ("dense", "factored", "auto")

#: Call metadata, as ``(key, value)`` pairs.
Pairs = tuple[tuple[str, str], ...]

#: Responses predicted above this many bytes are streamed. Below the server's
#: default unary limit (4 MiB) with room for the envelope and a raised grid.
STREAM_THRESHOLD_BYTES = 3_670_016  # 3.5 MiB


#: The largest length the wire carries (``int64``).
_MAX_LENGTH = (1 << 63) - 1

#: The client call to make instead, when a name is of the other kind: (method, reason) -> hint.
_OTHER_CALL: dict[tuple[str, str], str] = {
    ("generate", Reason.GROUP_NOT_MODEL): "generate_group({name!r}, seq_lens, conditioning) fetches "
    "all of its kernels in one call; get_group({name!r}) lists its members",
    ("get_model", Reason.GROUP_NOT_MODEL): "get_group({name!r}) describes it and its members",
    (
        "generate_group",
        Reason.MODEL_NOT_GROUP,
    ): "generate({name!r}, seq_lens, conditioning) fetches its kernel",
    ("get_group", Reason.MODEL_NOT_GROUP): "get_model({name!r}) describes it",
}


@contextlib.contextmanager
def pointing(method: str, name: str) -> Iterator[None]:
    """Within it, an ``InvalidRequest`` of client ``method`` saying that ``name`` is a group's where a
    model's is expected (or the reverse) points to the client method that fits; others pass as they are.

    The server's message names no call of any protocol; the client names its own. The error raised
    instead has the server's (the original) as its ``__cause__``.
    """
    try:
        yield
    except InvalidRequest as error:
        hint = _OTHER_CALL.get((method, error.reason or ""))
        if hint is None:
            raise
        raise type(error)(
            f"{error.message}; {hint.format(name=name)}",
            code=error.code,
            reason=error.reason,
            retry_pushback_ms=error.retry_pushback_ms,
        ) from error


class Deadline:
    """One deadline shared by every RPC of a client call (lookup, generate, fallback)."""

    def __init__(self, timeout: float | None) -> None:
        self._end = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        """Seconds left (never below a millisecond, so an expired call fails as DEADLINE_EXCEEDED)."""
        if self._end is None:
            return None
        return max(self._end - time.monotonic(), 0.001)


def check_seq_lens(seq_lens: SeqLens) -> tuple[int, ...]:
    """``seq_lens`` as a tuple of ints >= 1; an int is one axis."""
    if isinstance(seq_lens, (str, bytes)):
        raise InvalidRequest(f"seq_lens must be integers, got {seq_lens!r}")
    values = cast(Sequence[Any], [seq_lens] if isinstance(seq_lens, numbers.Integral) else seq_lens)
    lens = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise InvalidRequest(f"seq_lens must be integers, got {value!r}")
        length = int(value)
        if length < 1:
            raise InvalidRequest(f"seq_lens must all be >= 1, got {list(values)}")
        if length > _MAX_LENGTH:
            raise InvalidRequest(f"seq_lens must each fit in int64 (below 2**63), got {length}")
        lens.append(length)
    if not lens:
        raise InvalidRequest("seq_lens is empty; give one length per spatial axis")
    return tuple(lens)


def predict_bytes(
    info: ModelInfo, seq_lens: Sequence[int], rows: int, wire: int, return_grid: bool, factored: bool = False
) -> int:
    """Bytes of kernel or factors (and grid) the server will send, or 0 when the config is unknown."""
    config = info.config
    if config is None:
        return 0
    spatial = kernel_spatial(seq_lens, config.causal)
    grid = tensor_bytes((1, *spatial, config.data_dim), GRID_DTYPE) if return_grid else 0
    width = config.mlp_hidden_dim if factored else config.out_dim
    return tensor_bytes((rows, *spatial, width), wire) + grid


def head_bytes(info: ModelInfo) -> int:
    """Bytes of a model's output head (float32 ``W^T`` and bias)."""
    config = info.config
    if config is None:
        return 0
    rows = config.mlp_hidden_dim + (1 if config.use_bias else 0) + (config.data_dim if config.mask else 0)
    return 4 * config.out_dim * rows


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
    representation: str = "dense"
    started: float = field(default_factory=time.perf_counter)

    @property
    def needs_info(self) -> bool:
        """Whether the call needs the model's info: to pick a transport or a representation, or
        (unconditioned) for the content hash of its cache key."""
        return self.stream is None or self.representation == "auto" or not self.conditioned

    @property
    def factored(self) -> bool:
        return self.request.representation == pb.REPRESENTATION_FACTORED

    @property
    def conditioned(self) -> bool:
        return bool(self.request.HasField("conditioning"))

    def affinity(self, info: ModelInfo | None) -> Pairs:
        """The ``kernelgen-cache-key`` header of an unconditioned call, once its representation is
        settled; none for a conditioned call (no cache holds it) or a model of unknown hash."""
        if self.conditioned or info is None or not info.content_hash:
            return ()
        representation = _representation(self.factored)
        key = cache_key(info.content_hash, self.seq_lens, dtype_name(self.wire), representation)
        return ((CACHE_KEY_HEADER, key),)

    def choose_representation(self, info: ModelInfo | None, head_held: bool) -> None:
        """Settle ``"auto"``: factored when fewer bytes, the output head's counted unless ``head_held``."""
        if self.representation != "auto":
            return
        factored = False
        if info is not None and info.config is not None:
            dense = predict_bytes(info, self.seq_lens, self.rows, self.wire, False)
            factors = predict_bytes(info, self.seq_lens, self.rows, self.wire, False, factored=True)
            factored = factors + (0 if head_held else head_bytes(info)) < dense
        self.request.representation = pb.REPRESENTATION_FACTORED if factored else pb.REPRESENTATION_DENSE  # type: ignore[assignment]

    def use_stream(self, info: ModelInfo | None, threshold: int = STREAM_THRESHOLD_BYTES) -> bool:
        """Stream when asked to, or when the predicted response is above ``threshold``."""
        if self.stream is not None:
            return self.stream
        if info is None:
            return False
        size = predict_bytes(info, self.seq_lens, self.rows, self.wire, self.return_grid, self.factored)
        return size > threshold

    def payload_bytes(self, info: ModelInfo | None) -> int:
        """Bytes of the kernel (or factors) without the grid, or 0 when the config is unknown."""
        if info is None:
            return 0
        return predict_bytes(info, self.seq_lens, self.rows, self.wire, False, self.factored)

    @staticmethod
    def wants_stream(error: KernelServiceError) -> bool:
        """A unary call refused only because its response is over the one-message limit."""
        return isinstance(error, KernelTooLarge) and error.reason == Reason.MESSAGE_TOO_LARGE

    def finish(self, response: ResponseView, *, streamed: bool, output_head: OutputHead | None = None) -> Any:
        """The caller's result from a decoded response: array(s), or a ``KernelResult``.

        A factored response becomes a ``FactoredKernel`` with ``output_head``.
        """
        decode = decode_torch if self.as_torch else decode_numpy
        kernel_view = response.kernel
        if response.factored != self.factored:
            raise MalformedResponse(
                f"asked for a {'factored' if self.factored else 'dense'} kernel, got "
                f"{'factors' if response.factored else 'a dense kernel'}"
            )
        kernel: Any = decode(kernel_view.data, kernel_view.shape, kernel_view.dtype, copy=self.copy)
        if response.factored:
            if output_head is None or output_head.head_hash != response.head_hash:
                raise MalformedResponse("a factored kernel came without its output head")
            kernel = FactoredKernel(kernel, output_head, kernel_view.data.nbytes)
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
                representation="factored" if response.factored else "dense",
            )
        return (kernel, grid) if self.return_grid else kernel


@dataclass
class GroupCall:
    """One ``generate_group`` call's request and the caller's wishes for every member's result."""

    group: str
    seq_lens: tuple[int, ...]
    request: pb.GenerateGroupRequest
    rows: int
    wire: int
    as_torch: bool
    copy: bool
    with_report: bool
    representation: str = "dense"
    started: float = field(default_factory=time.perf_counter)

    def choose_representation(self, members: Sequence[ModelInfo], head_held: Callable[[str], bool]) -> None:
        """Settle ``"auto"`` for the group: factored when the members' factors, with the output heads
        not yet held, are fewer bytes than their dense kernels."""
        if self.representation != "auto":
            return
        known = bool(members) and all(m.config is not None for m in members)
        dense = sum(predict_bytes(m, self.seq_lens, self.rows, self.wire, False) for m in members)
        factored = sum(
            predict_bytes(m, self.seq_lens, self.rows, self.wire, False, factored=True)
            + (0 if head_held(m.head_hash) else head_bytes(m))
            for m in members
        )
        chosen = pb.REPRESENTATION_FACTORED if known and factored < dense else pb.REPRESENTATION_DENSE
        self.request.representation = chosen  # type: ignore[assignment]

    def affinity(self) -> Pairs:
        """The ``kernelgen-cache-key`` header of an unconditioned group call (once ``"auto"`` is
        settled), keyed by the group's name; none for a conditioned call."""
        if self.request.HasField("conditioning"):
            return ()
        representation = _representation(self.request.representation == pb.REPRESENTATION_FACTORED)
        key = cache_key(f"group:{self.group}", self.seq_lens, dtype_name(self.wire), representation)
        return ((CACHE_KEY_HEADER, key),)

    def member_call(self, model: str) -> GenerateCall:
        """The ``generate`` call of one member this call stands for, to decode its kernel."""
        request = pb.GenerateKernelRequest(model=model, representation=self.request.representation)
        return GenerateCall(
            model=model,
            seq_lens=self.seq_lens,
            request=request,
            rows=self.rows,
            wire=self.wire,
            return_grid=False,
            as_torch=self.as_torch,
            copy=self.copy,
            with_report=self.with_report,
            stream=True,
            representation=self.representation,
            started=self.started,
        )

    def finish(
        self,
        group: str,
        members: Sequence[str],
        views: Sequence[ResponseView],
        output_heads: Mapping[str, OutputHead],
    ) -> dict[str, Any]:
        """Each member's result by model name, in the group's order (``output_heads``: factored members')."""
        if group != self.group:
            raise MalformedResponse(f"asked for group {self.group!r}, got {group!r}")
        return {
            name: self.member_call(name).finish(view, streamed=True, output_head=output_heads.get(name))
            for name, view in zip(members, views, strict=True)
        }


def prepare_group(
    group: str,
    seq_lens: SeqLens,
    conditioning: ConditioningLike | None,
    *,
    dtype: DTypeLike,
    as_torch: bool,
    copy: bool,
    with_report: bool,
    representation: str = "dense",
) -> GroupCall:
    """Check the arguments and build a group's request; raises ``InvalidRequest`` before any I/O."""
    _check_name_and_representation("group", group, representation)
    lens = check_seq_lens(seq_lens)
    wire = wire_dtype(dtype)
    request = pb.GenerateGroupRequest(group=group, seq_lens=lens, dtype=wire)  # type: ignore[arg-type]
    rows = _fill(request, representation, conditioning)
    return GroupCall(
        group=group,
        seq_lens=lens,
        request=request,
        rows=rows,
        wire=wire,
        as_torch=as_torch,
        copy=copy,
        with_report=with_report,
        representation=representation,
    )


def prepare(
    model: str,
    seq_lens: SeqLens,
    conditioning: ConditioningLike | None,
    *,
    dtype: DTypeLike,
    return_grid: bool,
    as_torch: bool,
    copy: bool,
    with_report: bool,
    stream: bool | None,
    representation: str = "dense",
) -> GenerateCall:
    """Check the arguments and build the request; raises ``InvalidRequest`` before any I/O."""
    _check_name_and_representation("model", model, representation)
    lens = check_seq_lens(seq_lens)
    wire = wire_dtype(dtype)
    request = pb.GenerateKernelRequest(model=model, seq_lens=lens, dtype=wire, return_grid=return_grid)  # type: ignore[arg-type]
    rows = _fill(request, representation, conditioning)
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
        representation=representation,
    )


def _representation(factored: bool) -> str:
    return "factored" if factored else "dense"


def _check_name_and_representation(what: str, name: object, representation: object) -> None:
    if not isinstance(name, str) or not name:
        raise InvalidRequest(f"{what} must be a non-empty name, got {name!r}")
    if representation not in REPRESENTATIONS:
        choices = ", ".join(REPRESENTATIONS)
        raise InvalidRequest(f"representation must be one of {choices}, got {representation!r}")


def _fill(
    request: pb.GenerateKernelRequest | pb.GenerateGroupRequest,
    representation: str,
    conditioning: ConditioningLike | None,
) -> int:
    """Set what both request kinds carry alike (the representation, the conditioning); the rows asked."""
    if representation == "factored":
        request.representation = pb.REPRESENTATION_FACTORED
    if conditioning is None:
        return 1
    tensor, rows = encode_conditioning(conditioning)
    request.conditioning.CopyFrom(tensor)
    return rows
