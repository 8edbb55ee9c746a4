"""The one part of a client that depends on how it waits: blocking (grpc) or asyncio (grpc.aio).

``KernelClient`` and ``AsyncKernelClient`` are the same code (``client.py`` is
generated from ``aio.py`` by scripts/gen_sync_client.py); everything that
cannot be written once for both, because grpc's sync and aio call objects
differ, is a method of ``SyncChannels`` or ``AsyncChannels`` with the same name
and meaning.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
from grpc import aio

from kernelgen_client._base import Channels, ClientConfig

__all__ = ["AsyncChannels", "SyncChannels"]


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
