"""The service's two threads: the device thread and the host thread.

Invariants:
- every tensor operation of the device runs on the one device thread
  (``DeviceQueue``), so a GPU sees one ordered stream and the event loop never
  computes; interactive work (batches, cache misses, grids) runs before bulk
  work (the tiles of large streams), each class in submission order;
- host-memory work that needs no device (encoding a pipelined batch, cutting a
  cached kernel, a tiled stream's grid) runs on the one host thread, in
  submission order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

from kernelgen_server.core.device_queue import BULK, INTERACTIVE, DeviceQueue

__all__ = ["ServiceThreads"]

T = TypeVar("T")


class ServiceThreads:
    """The device thread and the host thread of one ``KernelService``, on one device."""

    def __init__(self, device: torch.device, *, cpu_threads: int) -> None:
        def init_device_thread() -> None:
            # cpu_threads leaves the event loop a core (ServerSettings.torch_threads).
            if device.type == "cpu":
                torch.set_num_threads(cpu_threads)

        init_device_thread()
        self.device = device
        self._device = DeviceQueue("kernelgen-device", init_device_thread)
        self._host = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kernelgen-host")

    def on_device(self, fn: Callable[[], T], *, bulk: bool = False) -> asyncio.Future[T]:
        """Run ``fn`` on the device thread; ``bulk`` work waits for every interactive job."""
        return self._device.submit(fn, BULK if bulk else INTERACTIVE)

    def on_host(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """Run ``fn`` on the host thread."""
        return asyncio.get_running_loop().run_in_executor(self._host, fn)

    def close(self) -> None:
        """Stop both threads once their queued work is done."""
        self._device.shutdown()
        self._host.shutdown(wait=True)
