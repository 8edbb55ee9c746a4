"""``StreamKernel``'s messages: a whole kernel in chunks, or a large one computed tile by tile.

A kernel of up to ``stream_tile_bytes`` (and an unconditioned one the cache
keeps) is computed whole, as for a unary call, and sent as chunks of its
encoded bytes. A larger one is never held whole: its grid points are
independent, so it is computed in tiles of about ``stream_tile_bytes``, each
a bulk slice of device time (``device_queue``: behind any waiting small
request), while the previous tile is being sent. A tiled stream holds at
most two tiles and the chunks gRPC has not yet sent, which is what it
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
from typing import TYPE_CHECKING

import torch

from kernelgen_server.core.inflight import Reservation
from kernelgen_server.core.tensors import to_payload
from kernelgen_server.core.threads import ServiceThreads
from kernelgen_server.engine.kernel_engine import KernelEngine, tile_coordinates
from kernelgen_wire.kernel_messages import encode_chunks, encode_data, encode_header
from kernelgen_wire.v1 import kernelgen_pb2 as pb

if TYPE_CHECKING:
    from kernelgen_server.core.service import GeneratedKernel

__all__ = ["KernelStream", "Tile", "TiledStream", "WholeStream", "tiles"]


class KernelStream:
    """The messages of one ``StreamKernel`` call; ``close`` returns its reservation."""

    reservation: Reservation | None = None

    def messages(self, chunk_bytes: int) -> AsyncIterator[bytes]:
        raise NotImplementedError

    def close(self) -> None:
        if self.reservation is not None:
            self.reservation.release()


class WholeStream(KernelStream):
    """A kernel computed whole, sent as chunks of its encoded bytes (views, no copy)."""

    def __init__(self, generated: GeneratedKernel) -> None:
        self._generated = generated  # holds its bytes, and their reservation, until close
        self.reservation = generated.reservation

    async def messages(self, chunk_bytes: int) -> AsyncIterator[bytes]:
        generated = self._generated
        kernel = generated.kernel
        chunks = encode_chunks(
            kernel.payload, generated.grid, generated.report, chunk_bytes, head_hash=kernel.head_hash
        )
        for message in chunks:
            yield message


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
        *,
        engine: KernelEngine,
        threads: ServiceThreads,
        lens: tuple[int, ...],
        conditioning: torch.Tensor | None,
        dtype: torch.dtype,
        wire_dtype: int,
        factored: bool,
        head_hash: str,
        kernel_shape: tuple[int, ...],
        grid_shape: tuple[int, ...] | None,
        cache_lens: tuple[int, ...],
        tile_bytes: int,
        report: pb.ServerReport,
        reservation: Reservation,
        on_done: Callable[[int], None],
    ) -> None:
        self._engine, self._threads = engine, threads
        self._lens, self._conditioning, self._dtype, self._factored = lens, conditioning, dtype, factored
        self._wire_dtype, self._head_hash = wire_dtype, head_hash
        self._kernel_shape, self._grid_shape, self._cache_lens = kernel_shape, grid_shape, cache_lens
        self._tile_bytes = tile_bytes
        self._report = report
        self._on_done = on_done
        self.reservation = reservation
        self._accepted = time.monotonic()

    def _compute(self, tile: Tile) -> tuple[torch.Tensor, float]:
        started = time.perf_counter()
        cond = None if self._conditioning is None else self._conditioning[tile.row : tile.row + 1]
        values = self._engine.points(
            self._lens, tile.start, tile.stop, self._dtype, conditioning=cond, factored=self._factored
        )
        return values, time.perf_counter() - started

    def _submit(self, tile: Tile) -> asyncio.Future[tuple[torch.Tensor, float]]:
        return self._threads.on_device(functools.partial(self._compute, tile), bulk=True)

    async def messages(self, chunk_bytes: int) -> AsyncIterator[bytes]:
        rows, *spatial, width = self._kernel_shape
        points = math.prod(spatial)
        itemsize = int(self._dtype.itemsize)
        kernel_bytes = rows * points * width * itemsize
        plan = list(tiles(rows, points, width * itemsize, self._tile_bytes))
        pending: asyncio.Future[tuple[torch.Tensor, float]] | None = self._submit(plan[0])
        try:
            for i, tile in enumerate(plan):
                assert pending is not None
                values, compute_s = await pending
                pending = self._submit(plan[i + 1]) if i + 1 < len(plan) else None
                if i == 0:
                    self._report.queue_ms = (time.monotonic() - self._accepted - compute_s) * 1000.0
                    self._report.compute_ms = compute_s * 1000.0
                    grid_shape = self._grid_shape or ()
                    grid_bytes = math.prod(grid_shape) * 4 if grid_shape else 0
                    yield encode_header(
                        self._kernel_shape, self._wire_dtype, kernel_bytes, grid_shape, grid_bytes,
                        self._report, self._head_hash,
                    )  # fmt: skip
                for message in _chunks(to_payload(values).data, tile.offset, chunk_bytes):
                    yield message
                del values
            if self._grid_shape is not None:
                async for message in self._grid(points, kernel_bytes, chunk_bytes):
                    yield message
            self._on_done(kernel_bytes)
        finally:
            if pending is not None:
                pending.cancel()  # skipped unless it already started; the stream is over

    async def _grid(self, points: int, kernel_bytes: int, chunk_bytes: int) -> AsyncIterator[bytes]:
        point_bytes = 4 * len(self._lens)
        for tile in tiles(1, points, point_bytes, self._tile_bytes):
            coordinates = await self._threads.on_host(
                functools.partial(tile_coordinates, self._lens, self._cache_lens, tile.start, tile.stop)
            )
            for message in _chunks(to_payload(coordinates).data, kernel_bytes + tile.offset, chunk_bytes):
                yield message


def _chunks(data: memoryview, offset: int, chunk_bytes: int) -> Iterator[bytes]:
    for start in range(0, data.nbytes, chunk_bytes):
        yield encode_data(offset + start, data[start : start + chunk_bytes])
