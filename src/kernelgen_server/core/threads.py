"""The service's two threads: the device thread and the host thread.

Invariants:
- every tensor operation of the device runs on the one device thread
  (``DeviceQueue``), so a GPU sees one ordered stream and the event loop never
  computes; interactive work (batches, cache misses) runs before bulk work (the
  tiles of large streams), each class in submission order;
- host-memory work that needs no device (encoding responses, cutting cached
  kernels) may run on the one host thread, in submission order;
- a pipelined batch leaves the device thread as a host tensor and is encoded
  on the host thread while the device thread runs the next batch; each
  request's future settles when its batch's encoding has, and ``close()``
  returns only once no encoding is in flight.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

from kernelgen_server.core.device_queue import BULK, INTERACTIVE, DeviceQueue
from kernelgen_server.core.tensors import to_payload
from kernelgen_server.engine.kernel_engine import KernelEngine
from kernelgen_server.errors import Cancelled
from kernelgen_wire.kernel_messages import EncodedKernel, Payload, encode_kernel

__all__ = ["ServiceThreads"]

T = TypeVar("T")
#: Writes one request's rows as its message (``service.Encoder``).
Encoder = Callable[[Payload, str], EncodedKernel]


class ServiceThreads:
    """Runs device work and host work for one device; ``pipelined`` overlaps a batch's two stages."""

    def __init__(self, device: torch.device, *, cpu_threads: int, pipelined: bool) -> None:
        def init_device_thread() -> None:
            # cpu_threads leaves the event loop a core (ServerSettings.torch_threads).
            if device.type == "cpu":
                torch.set_num_threads(cpu_threads)

        init_device_thread()
        self.pipelined = pipelined
        self._device = DeviceQueue("kernelgen-device", init_device_thread)
        self._host = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kernelgen-host")
        self._encoding: set[asyncio.Future[list[EncodedKernel]]] = set()

    def on_device(self, fn: Callable[[], T], *, bulk: bool = False) -> asyncio.Future[T]:
        """Run ``fn`` on the device thread; ``bulk`` work waits for every interactive job."""
        return self._device.submit(fn, BULK if bulk else INTERACTIVE)

    def on_host(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        return asyncio.get_running_loop().run_in_executor(self._host, fn)

    async def run_batch(
        self,
        engine: KernelEngine,
        lens: tuple[int, ...],
        requests: Sequence[tuple[torch.Tensor, bool, Encoder | None]],
        dtype: torch.dtype,
        head_hash: str,
    ) -> list[asyncio.Future[EncodedKernel]]:
        """One batch, a future per ``(conditioning, factored, encoder)`` request; returns once the device
        is free. Each request's rows are written by its encoder (``encode_kernel`` when None).

        Dense and factored requests share the batch: the device computes each
        group's rows in one call (the factored ones stop before the output
        linear), and each request gets its rows of its group's output.
        """
        groups = [[i for i, (_, factored, _) in enumerate(requests) if factored is f] for f in (False, True)]

        def compute() -> list[torch.Tensor | None]:
            return [
                engine.conditioned(lens, [requests[i][0] for i in group], dtype, factored=bool(factored))
                if group
                else None
                for factored, group in enumerate(groups)
            ]

        def encode(outputs: list[torch.Tensor | None]) -> list[EncodedKernel]:
            # Each request's rows are a view of its group's output buffer; encoding them is
            # the only copy they get.
            encoded: list[EncodedKernel | None] = [None] * len(requests)
            for factored, (group, out) in enumerate(zip(groups, outputs, strict=True)):
                start = 0
                for i in group:
                    rows = int(requests[i][0].shape[0])
                    assert out is not None
                    payload = to_payload(out.narrow(0, start, rows))
                    write = requests[i][2] or encode_kernel
                    encoded[i] = write(payload, head_hash if factored else "")
                    start += rows
            return [kernel for kernel in encoded if kernel is not None]

        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[EncodedKernel]] = [loop.create_future() for _ in requests]
        if not self.pipelined:
            kernels = await self.on_device(lambda: encode(compute()))
            for future, kernel in zip(futures, kernels, strict=True):
                future.set_result(kernel)
            return futures
        outputs = await self.on_device(compute)
        # The device thread is free for the next batch from here on; this one's encoding
        # overlaps it. ``_encoding`` holds the stage until it settles.
        stage = self.on_host(functools.partial(encode, outputs))
        self._encoding.add(stage)
        stage.add_done_callback(self._encoding.discard)
        stage.add_done_callback(functools.partial(_settle, futures))
        return futures

    async def close(self) -> None:
        """Wait for the encodings in flight, then stop both threads (after their queued work)."""
        if self._encoding:
            await asyncio.wait(set(self._encoding))
        self._device.shutdown()
        self._host.shutdown(wait=True)


def _settle(futures: list[asyncio.Future[EncodedKernel]], stage: asyncio.Future[list[EncodedKernel]]) -> None:
    """Hand each request its part of a finished encoding stage (or the stage's error)."""
    if stage.cancelled():
        error: BaseException | None = Cancelled("the encoding of this batch was cancelled")
    else:
        error = stage.exception()
    for i, future in enumerate(futures):
        if future.done():  # its caller went away
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(stage.result()[i])
