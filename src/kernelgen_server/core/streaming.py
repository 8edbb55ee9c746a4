"""A streamed kernel's parts: a whole kernel in parts of its bytes, or a large one computed tile by tile.

A stream is a ``StreamHeader`` (what follows, and the report) and then
``StreamData`` parts: payload bytes at their offset in the kernel's bytes
(or its factors'), followed by the grid's. The parts are protocol-free: the
transport writes them as its messages (kernelgen.v1's ``KernelChunk``s,
cutting each part into chunks).

A kernel of up to ``stream_tile_bytes`` (and an unconditioned one the cache
keeps) is computed whole, as for a unary call, and streamed as views of its
encoded bytes. A larger one is never held whole: its grid points are
independent, so it is computed in tiles of about ``stream_tile_bytes``, each a
bulk slice of device time (``device_queue``: behind any waiting small
request), while the previous tile is being sent. A tiled stream holds at most
two tiles and the messages the transport has not yet sent, which is what it
reserves in the in-flight budget for its whole life.

Tiles follow the payload's row-major order: row by row (one per conditioning
row), points ``start:stop`` within a row; the grid, when asked, follows the
kernel as in every stream. The header, sent first, reports the first tile's
queue and compute time.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import torch

from kernelgen_server.core.inflight import Reservation
from kernelgen_server.core.payloads import to_payload
from kernelgen_server.core.plan import KernelPlan
from kernelgen_server.core.results import GeneratedKernel
from kernelgen_server.core.threads import ServiceThreads
from kernelgen_server.engine.kernel_engine import KernelEngine, tile_coordinates
from kernelgen_wire.sizes import GRID_DTYPE, tensor_bytes
from kernelgen_wire.v1 import kernelgen_pb2 as pb

__all__ = [
    "KernelStream",
    "StreamData",
    "StreamHeader",
    "StreamPart",
    "Tile",
    "TiledStream",
    "WholeStream",
    "tiles",
]


@dataclass(frozen=True)
class StreamHeader:
    """What a stream will carry: the kernel's (or factors') shape, dtype and bytes, the grid's, the report."""

    kernel_shape: tuple[int, ...]
    dtype: int  # a kernelgen.v1.DType value
    kernel_bytes: int
    grid_shape: tuple[int, ...]  # () without a grid
    grid_bytes: int
    report: pb.ServerReport
    #: The output head's hash when the payload is factors; empty for a dense kernel.
    head_hash: str = ""


@dataclass(frozen=True)
class StreamData:
    """Payload bytes at ``offset`` of the kernel's bytes followed by the grid's."""

    offset: int
    data: memoryview


StreamPart = StreamHeader | StreamData


class KernelStream:
    """The parts of one streamed kernel; ``close`` returns its reservation."""

    reservation: Reservation | None = None

    def parts(self) -> AsyncIterator[StreamPart]:
        raise NotImplementedError

    def close(self) -> None:
        if self.reservation is not None:
            self.reservation.release()


class WholeStream(KernelStream):
    """A kernel computed whole, streamed as views of its encoded bytes (no copy)."""

    def __init__(self, generated: GeneratedKernel) -> None:
        self._generated = generated  # holds its bytes, and their reservation, until close
        self.reservation = generated.reservation

    async def parts(self) -> AsyncIterator[StreamPart]:
        generated = self._generated
        payload, grid = generated.kernel.payload, generated.grid
        yield StreamHeader(
            payload.shape,
            payload.dtype,
            payload.nbytes,
            grid.shape if grid is not None else (),
            grid.nbytes if grid is not None else 0,
            generated.report,
            generated.kernel.head_hash,
        )
        yield StreamData(0, payload.data)
        if grid is not None:
            yield StreamData(payload.nbytes, grid.data)


@dataclass(frozen=True)
class Tile:
    """Points ``start:stop`` of conditioning row ``row``, at byte ``offset`` of the payload."""

    row: int
    start: int
    stop: int
    offset: int


def tiles(rows: int, points: int, point_bytes: int, tile_bytes: int) -> Iterator[Tile]:
    """The tiles of a ``[rows, points, width]`` payload, in its byte order."""
    per_tile = max(1, tile_bytes // point_bytes)
    for row in range(rows):
        for start in range(0, points, per_tile):
            stop = min(points, start + per_tile)
            yield Tile(row, start, stop, (row * points + start) * point_bytes)


class TiledStream(KernelStream):
    """A large kernel computed tile by tile as it is sent; one tile computed ahead."""

    def __init__(
        self,
        plan: KernelPlan,
        *,
        engine: KernelEngine,
        threads: ServiceThreads,
        tile_bytes: int,
        report: pb.ServerReport,
        reservation: Reservation,
        on_done: Callable[[int], None],
    ) -> None:
        self._plan = plan
        self._engine, self._threads = engine, threads
        cond = plan.conditioning
        self._conditioning = None if cond is None else torch.from_numpy(cond.copy())
        self._tile_bytes = tile_bytes
        self._report = report
        self._on_done = on_done
        self.reservation = reservation
        self._accepted = time.monotonic()

    def _compute(self, tile: Tile) -> tuple[torch.Tensor, float]:
        started = time.perf_counter()
        plan = self._plan
        cond = None if self._conditioning is None else self._conditioning[tile.row : tile.row + 1]
        values = self._engine.points(
            plan.lens, tile.start, tile.stop, plan.out_dtype, conditioning=cond, factored=plan.factored
        )
        return values, time.perf_counter() - started

    def _submit(self, tile: Tile) -> asyncio.Future[tuple[torch.Tensor, float]]:
        return self._threads.on_device(functools.partial(self._compute, tile), bulk=True)

    async def parts(self) -> AsyncIterator[StreamPart]:
        plan = self._plan
        rows, *spatial, width = plan.kernel_shape
        points = math.prod(spatial)
        point_bytes = tensor_bytes((width,), plan.wire_dtype)
        schedule = list(tiles(rows, points, point_bytes, self._tile_bytes))
        pending: asyncio.Future[tuple[torch.Tensor, float]] | None = self._submit(schedule[0])
        try:
            for i, tile in enumerate(schedule):
                assert pending is not None
                values, compute_s = await pending
                pending = self._submit(schedule[i + 1]) if i + 1 < len(schedule) else None
                if i == 0:
                    self._report.queue_ms = (time.monotonic() - self._accepted - compute_s) * 1000.0
                    self._report.compute_ms = compute_s * 1000.0
                    yield StreamHeader(
                        plan.kernel_shape,
                        plan.wire_dtype,
                        plan.kernel_bytes,
                        plan.grid_shape or (),
                        plan.grid_bytes,
                        self._report,
                        plan.head_hash,
                    )
                yield StreamData(tile.offset, to_payload(values).data)
                del values  # the transport has written its messages from it
            if plan.grid_bytes:
                async for part in self._grid(points):
                    yield part
            self._on_done(plan.kernel_bytes)
        finally:
            if pending is not None:
                pending.cancel()  # skipped unless it already started; the stream is over

    async def _grid(self, points: int) -> AsyncIterator[StreamData]:
        plan = self._plan
        point_bytes = tensor_bytes((len(plan.lens),), GRID_DTYPE)
        module = plan.model.module
        cache_lens, causal = tuple(module.L_cache), module.causal
        for tile in tiles(1, points, point_bytes, self._tile_bytes):
            coordinates = await self._threads.on_host(
                functools.partial(tile_coordinates, plan.lens, cache_lens, tile.start, tile.stop, causal)
            )
            yield StreamData(plan.kernel_bytes + tile.offset, to_payload(coordinates).data)
