"""The batch stage: one bucket's conditioned requests computed together, each request's rows encoded.

``BatchRunner.run`` is the one batch function the dynamic batcher is built
with. A batch goes one way: the device thread computes every row (the engine),
then each request's rows are written as its message by the request's own
encoder, from one output buffer (the rows' one copy); the batcher hands each
request its pending message.

Invariants:
- dense and factored requests of one bucket share the batch: the device
  computes each representation's rows in one call (factored ones stop before
  the output linear), and each request gets its rows of its representation's
  output;
- the batch function returns once the device is free; with ``pipelined`` the
  encoding then runs on the host thread while the device computes the next
  batch, each request's message settling when its batch's encoding has, and
  ``close()`` returns only once no encoding is in flight;
- a batch the device could not hold raises ``BatchOutOfMemory`` (the batcher
  splits it); any other failure fails that batch's requests only.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from kernelgen_server.core.batch_policy import BatchOutOfMemory
from kernelgen_server.core.payloads import output_dtype, to_payload
from kernelgen_server.core.results import Encoder
from kernelgen_server.core.threads import ServiceThreads
from kernelgen_server.engine.kernel_engine import KernelEngine, is_oom
from kernelgen_server.errors import Cancelled
from kernelgen_wire.kernel_messages import EncodedKernel

__all__ = ["BatchRunner", "BucketKey", "ConditionedItem", "PendingKernel"]

#: The requests that may share a batch: (model name, seq_lens, wire dtype).
BucketKey = tuple[str, tuple[int, ...], int]
#: A request's message, settled once its batch is encoded.
PendingKernel = asyncio.Future[EncodedKernel]


@dataclass(frozen=True, slots=True)
class ConditionedItem:
    """One conditioned request in a bucket: its ``[rows, C]`` conditioning, output bytes,
    representation, and the encoder that writes its message."""

    conditioning: torch.Tensor
    nbytes: int
    factored: bool
    encoder: Encoder

    @property
    def rows(self) -> int:
        return int(self.conditioning.shape[0])


class BatchRunner:
    """Computes and encodes batches of one service's models on its threads."""

    def __init__(
        self,
        engines: Mapping[str, KernelEngine],
        head_hashes: Mapping[str, str],
        threads: ServiceThreads,
        *,
        pipelined: bool,
    ) -> None:
        self._engines = engines
        self._head_hashes = head_hashes
        self._threads = threads
        self.pipelined = pipelined
        self._encoding: set[asyncio.Future[list[EncodedKernel]]] = set()

    async def run(self, key: BucketKey, items: Sequence[ConditionedItem]) -> list[PendingKernel]:
        """One batch, a pending message per item; returns once the device is free."""
        name, lens, wire_dtype = key
        engine, dtype, head_hash = self._engines[name], output_dtype(wire_dtype), self._head_hashes[name]
        # The items of each representation, in request order: [dense, factored].
        parts = [[i for i, item in enumerate(items) if item.factored is f] for f in (False, True)]

        def compute() -> list[torch.Tensor | None]:
            return [
                engine.conditioned(
                    lens, [items[i].conditioning for i in part], dtype, factored=bool(factored)
                )
                if part
                else None
                for factored, part in enumerate(parts)
            ]

        def encode(outputs: list[torch.Tensor | None]) -> list[EncodedKernel]:
            # Each request's rows are a view of its representation's output buffer; encoding
            # them is the only copy they get.
            encoded: list[EncodedKernel | None] = [None] * len(items)
            for factored, (part, out) in enumerate(zip(parts, outputs, strict=True)):
                start = 0
                for i in part:
                    assert out is not None
                    rows = items[i].rows
                    encoded[i] = items[i].encoder(
                        to_payload(out.narrow(0, start, rows)), head_hash if factored else ""
                    )
                    start += rows
            return [kernel for kernel in encoded if kernel is not None]

        loop = asyncio.get_running_loop()
        pending: list[PendingKernel] = [loop.create_future() for _ in items]
        try:
            if not self.pipelined:
                kernels = await self._threads.on_device(lambda: encode(compute()))
                for future, kernel in zip(pending, kernels, strict=True):
                    future.set_result(kernel)
                return pending
            outputs = await self._threads.on_device(compute)
        except Exception as exc:
            if is_oom(exc):
                raise BatchOutOfMemory(str(exc)) from exc
            raise
        # The device thread is free for the next batch from here on; this one's encoding
        # overlaps it. ``_encoding`` holds the stage until it settles.
        stage = self._threads.on_host(functools.partial(encode, outputs))
        self._encoding.add(stage)
        stage.add_done_callback(self._encoding.discard)
        stage.add_done_callback(functools.partial(_settle, pending))
        return pending

    async def close(self) -> None:
        """Wait for the encodings in flight."""
        if self._encoding:
            await asyncio.wait(set(self._encoding))


def _settle(pending: list[PendingKernel], stage: asyncio.Future[list[EncodedKernel]]) -> None:
    """Hand each request its part of a finished encoding stage (or the stage's error)."""
    if stage.cancelled():
        error: BaseException | None = Cancelled("the encoding of this batch was cancelled")
    else:
        error = stage.exception()
    for i, future in enumerate(pending):
        if future.done():  # its caller went away
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(stage.result()[i])
