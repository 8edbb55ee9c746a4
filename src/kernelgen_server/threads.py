"""The service's two threads: the device thread and the host thread.

Invariants:
- every tensor operation of the device runs on the one device thread, in
  submission order, so a GPU sees one ordered stream and the event loop never
  computes;
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

from kernelgen_server.engine import KernelEngine
from kernelgen_server.errors import Cancelled
from kernelgen_server.tensors import to_payload
from kernelgen_wire.kernel_messages import EncodedKernel, encode_kernel

__all__ = ["ServiceThreads"]

T = TypeVar("T")


class ServiceThreads:
    """Runs device work and host work for one device; ``pipelined`` overlaps a batch's two stages."""

    def __init__(self, device: torch.device, *, cpu_threads: int, pipelined: bool) -> None:
        def init_device_thread() -> None:
            # cpu_threads leaves the event loop a core (ServerSettings.torch_threads).
            if device.type == "cpu":
                torch.set_num_threads(cpu_threads)

        init_device_thread()
        self.pipelined = pipelined
        self._device = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="kernelgen-device", initializer=init_device_thread
        )
        self._host = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kernelgen-host")
        self._encoding: set[asyncio.Future[list[EncodedKernel]]] = set()

    def on_device(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        return asyncio.get_running_loop().run_in_executor(self._device, fn)

    def on_host(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        return asyncio.get_running_loop().run_in_executor(self._host, fn)

    async def run_batch(
        self, engine: KernelEngine, lens: tuple[int, ...], conds: Sequence[torch.Tensor], dtype: torch.dtype
    ) -> list[asyncio.Future[EncodedKernel]]:
        """One batch's kernels, a future per conditioning; returns once the device is free."""

        def encode(out: torch.Tensor) -> list[EncodedKernel]:
            # Each request's rows are a view of the one output buffer; encoding them is
            # the only copy they get.
            encoded, start = [], 0
            for cond in conds:
                rows = int(cond.shape[0])
                encoded.append(encode_kernel(to_payload(out.narrow(0, start, rows))))
                start += rows
            return encoded

        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[EncodedKernel]] = [loop.create_future() for _ in conds]
        if not self.pipelined:
            encoded = await self.on_device(lambda: encode(engine.conditioned(lens, conds, dtype)))
            for future, kernel in zip(futures, encoded, strict=True):
                future.set_result(kernel)
            return futures
        out = await self.on_device(functools.partial(engine.conditioned, lens, conds, dtype))
        # The device thread is free for the next batch from here on; this one's encoding
        # overlaps it. ``_encoding`` holds the stage until it settles.
        stage = self.on_host(functools.partial(encode, out))
        self._encoding.add(stage)
        stage.add_done_callback(self._encoding.discard)
        stage.add_done_callback(functools.partial(_settle, futures))
        return futures

    async def close(self) -> None:
        """Wait for the encodings in flight, then stop both threads (after their queued work)."""
        if self._encoding:
            await asyncio.wait(set(self._encoding))
        self._device.shutdown(wait=True)
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
