"""The one part of a client that depends on how it waits: blocking (grpc) or asyncio (grpc.aio).

``KernelClient`` and ``AsyncKernelClient`` are the same code (``client.py`` is
generated from ``aio.py`` by scripts/gen_sync_client.py); everything that
cannot be written once for both, because grpc's sync and aio call objects
differ, is a method of ``SyncChannels`` or ``AsyncChannels`` with the same name
and meaning; ``SyncOnce`` and ``AsyncOnce`` fetch a value once per key however
many callers ask at the same time (output heads).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import grpc
from grpc import aio

from kernelgen_client._base import Channels, ClientConfig

__all__ = ["AsyncChannels", "AsyncOnce", "SyncChannels", "SyncOnce"]

V = TypeVar("V")


class SyncChannels(Channels):
    """A blocking client's channels."""

    def __init__(self, config: ClientConfig, connections: int = 1) -> None:
        super().__init__(config, grpc, connections)

    def close(self) -> None:
        for channel in self.channels:
            channel.close()

    def ready(self, timeout: float | None) -> bool:
        """Whether every channel connected within ``timeout`` seconds (None: no limit)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            for channel in self.channels:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                grpc.channel_ready_future(channel).result(timeout=left)
        except grpc.FutureTimeoutError:
            return False
        return True

    def unary_with_trailers(self, name: str, request: Any, **kwargs: Any) -> tuple[Any, Any]:
        """A unary call's response and its trailing metadata; raises ``grpc.RpcError``."""
        response, call = self.unary(name).with_call(request, **kwargs)
        return response, call.trailing_metadata()


class AsyncChannels(Channels):
    """An asyncio client's channels, for one event loop."""

    def __init__(self, config: ClientConfig, connections: int = 1) -> None:
        super().__init__(config, aio, connections)

    async def close(self) -> None:
        await asyncio.gather(*(channel.close() for channel in self.channels))

    async def ready(self, timeout: float | None) -> bool:  # noqa: ASYNC109 - the same as the blocking one
        """Whether every channel connected within ``timeout`` seconds (None: no limit)."""
        connected = asyncio.gather(*(channel.channel_ready() for channel in self.channels))
        try:
            await asyncio.wait_for(connected, timeout)
        except TimeoutError:
            return False
        return True

    async def unary_with_trailers(self, name: str, request: Any, **kwargs: Any) -> tuple[Any, Any]:
        """A unary call's response and its trailing metadata; raises ``grpc.RpcError``."""
        call = self.unary(name)(request, **kwargs)
        response = await call
        return response, await call.trailing_metadata()


class SyncOnce(Generic[V]):
    """Values by key, each fetched once however many threads ask at the same time.

    A failed fetch caches nothing: the next caller fetches again. At most
    ``size`` values are kept, the least recently used dropped first.
    """

    def __init__(self, size: int = 256) -> None:
        self._size = size
        self._values: OrderedDict[str, V] = OrderedDict()
        self._pending: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._values

    def get(self, key: str, fetch: Callable[[], V]) -> V:
        while True:
            with self._lock:
                if key in self._values:
                    self._values.move_to_end(key)
                    return self._values[key]
                waiting = self._pending.get(key)
                if waiting is None:
                    done = self._pending[key] = threading.Event()
            if waiting is not None:
                waiting.wait()
                continue  # the value is there now, or its fetch failed and this caller tries
            try:
                value = fetch()
                with self._lock:
                    self._values[key] = value
                    while len(self._values) > self._size:
                        self._values.popitem(last=False)
                return value
            finally:
                with self._lock:
                    del self._pending[key]
                done.set()


class AsyncOnce(Generic[V]):
    """Values by key, each fetched once however many tasks ask at the same time (one event loop).

    A failed fetch caches nothing: the next caller fetches again. At most
    ``size`` values are kept, the least recently used dropped first.
    """

    def __init__(self, size: int = 256) -> None:
        self._size = size
        self._values: OrderedDict[str, V] = OrderedDict()
        self._pending: dict[str, asyncio.Event] = {}

    def __contains__(self, key: str) -> bool:
        return key in self._values

    async def get(self, key: str, fetch: Callable[[], Awaitable[V]]) -> V:
        while True:
            if key in self._values:
                self._values.move_to_end(key)
                return self._values[key]
            waiting = self._pending.get(key)
            if waiting is not None:
                await waiting.wait()
                continue  # the value is there now, or its fetch failed and this caller tries
            done = self._pending[key] = asyncio.Event()
            try:
                value = await fetch()
                self._values[key] = value
                while len(self._values) > self._size:
                    self._values.popitem(last=False)
                return value
            finally:
                del self._pending[key]
                done.set()
