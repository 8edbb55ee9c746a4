"""System (POSIX) shared-memory regions of clients on the server's host.

A client creates a POSIX shared-memory object (``shm_open("/name")``, which on
Linux is the file ``/dev/shm/name``) and registers a region of it under a name
(Open Inference Protocol: ``SystemSharedMemoryRegister``; kernelgen.v1:
``RegisterSharedMemory``; one registry per server process serves both).
Requests then name the region for an input, which the server reads from it,
or an output, which the server writes into it instead of the response.

Safety rules:
- off unless the operator starts the server with ``--shared-memory``; at most
  ``--shared-memory-max-regions`` regions at once;
- a key is one POSIX name (``/`` then no other ``/``), opened without
  following links, without creating anything, and only when it is a regular
  file as large as the registered region;
- the server maps nothing: it reads and writes a region through its file
  descriptor (``pread``/``pwrite``), each access checked against the region's
  bounds and the object's current size, so a client that shrinks or removes
  its object gets an error, never a server that faults on a missing page;
- unregistering removes the name at once (new requests fail), waits for the
  reads and writes already under way, then closes the descriptor: once
  ``unregister`` returns, the server never touches the region again.
"""

from __future__ import annotations

import asyncio
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from kernelgen_server.errors import (
    InvalidRequest,
    KernelTooLarge,
    RegionExists,
    RegionNotFound,
    SharedMemoryUnavailable,
)

__all__ = ["Region", "SharedMemoryRegistry", "check_off"]

#: Where Linux keeps POSIX shared-memory objects (glibc's shm_open opens files here).
SHM_ROOT = Path("/dev/shm")
# Accesses at least this large run on a thread, so the event loop keeps serving; smaller ones
# (a 1.29 MB kernel takes ~0.25 ms) cost less inline than the hop to a thread.
_THREAD_BYTES = 4 << 20
_KEY = re.compile(r"/[^/\x00]{1,254}")
_NAME = re.compile(r"[^\x00-\x1f]{1,256}")
T = TypeVar("T")


def check_off(registry: SharedMemoryRegistry | None) -> SharedMemoryRegistry:
    """The registry, or ``SharedMemoryUnavailable`` when the server runs without shared memory."""
    if registry is None:
        raise SharedMemoryUnavailable(
            "shared memory is off on this server; the operator enables it with --shared-memory "
            "(clients on the server's host only)"
        )
    return registry


@dataclass(eq=False)
class Region:
    """One registered region: ``byte_size`` bytes from ``offset`` of the object ``key``."""

    name: str
    key: str
    offset: int
    byte_size: int
    fd: int
    users: int = 0
    closing: bool = False
    idle: asyncio.Event = field(default_factory=asyncio.Event)


class SharedMemoryRegistry:
    """The registered regions of one server process; used from its event loop only."""

    def __init__(self, *, max_regions: int = 256, root: Path = SHM_ROOT) -> None:
        self.max_regions = max_regions
        self._root = root
        self._regions: dict[str, Region] = {}

    def __len__(self) -> int:
        return len(self._regions)

    # --- registration -------------------------------------------------------------------------
    def register(self, name: str, key: str, offset: int, byte_size: int) -> Region:
        if not _NAME.fullmatch(name):
            raise InvalidRequest("a shared-memory region needs a name of 1 to 256 printable characters")
        if name in self._regions:
            raise RegionExists(f"a shared-memory region named {name!r} is already registered")
        if not _KEY.fullmatch(key) or key in ("/.", "/.."):
            raise InvalidRequest(
                f"shared-memory key {key!r} is not a POSIX shared-memory name: '/' then 1 to 254 "
                "characters without '/'"
            )
        if byte_size < 1:
            raise InvalidRequest("a shared-memory region needs a byte_size of at least 1")
        if offset < 0:
            raise InvalidRequest("a shared-memory region's offset cannot be negative")
        if len(self._regions) >= self.max_regions:
            raise KernelTooLarge(
                f"{len(self._regions)} shared-memory regions are registered, the limit of this server "
                "(--shared-memory-max-regions); unregister some first"
            )
        path = self._root / key[1:]
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise InvalidRequest(
                f"no shared-memory object {key!r} on the server's host (shared memory works only "
                "between processes of one host)"
            ) from None
        except OSError as exc:
            raise InvalidRequest(f"cannot open shared-memory object {key!r}: {exc.strerror}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise InvalidRequest(f"shared-memory object {key!r} is not a regular object")
            if offset + byte_size > info.st_size:
                raise InvalidRequest(
                    f"shared-memory object {key!r} holds {info.st_size} bytes, fewer than the region's "
                    f"offset {offset} + byte_size {byte_size}"
                )
        except BaseException:
            os.close(fd)
            raise
        region = Region(name, key, offset, byte_size, fd)
        self._regions[name] = region
        return region

    async def unregister(self, name: str) -> list[str]:
        """Unregister ``name`` (every region when empty); returns once none is in use any more.

        An unknown name is ``RegionNotFound``; with an empty name and no regions,
        nothing happens.
        """
        if name:
            if name not in self._regions:
                raise RegionNotFound(f"no shared-memory region named {name!r} is registered")
            regions = [self._regions.pop(name)]
        else:
            regions = list(self._regions.values())
            self._regions.clear()
        for region in regions:
            region.closing = True
        for region in regions:
            if region.users:
                await region.idle.wait()
            os.close(region.fd)
        return [region.name for region in regions]

    async def close(self) -> None:
        """Unregister every region (server shutdown)."""
        await self.unregister("")

    def status(self, name: str = "") -> list[Region]:
        """The registered regions (only ``name`` when given: ``RegionNotFound`` when unknown)."""
        if name:
            return [self.get(name)]
        return [self._regions[n] for n in sorted(self._regions)]

    def get(self, name: str) -> Region:
        try:
            return self._regions[name]
        except KeyError:
            raise RegionNotFound(f"no shared-memory region named {name!r} is registered") from None

    # --- access -------------------------------------------------------------------------------
    def check(self, name: str, offset: int, byte_size: int, needed: int, what: str) -> Region:
        """The region for ``needed`` bytes at ``offset`` within a named window of ``byte_size``.

        ``byte_size`` is what the request says it gave (0: the rest of the region).
        Raises before any work when the window does not fit the region or is too small.
        """
        region = self.get(name)
        if offset < 0 or byte_size < 0:
            raise InvalidRequest(f"{what}: shared-memory offset and byte_size cannot be negative")
        if offset > region.byte_size or offset + byte_size > region.byte_size:
            raise InvalidRequest(
                f"{what}: offset {offset} + byte_size {byte_size} runs past shared-memory region "
                f"{name!r} of {region.byte_size} bytes"
            )
        room = byte_size or region.byte_size - offset
        if needed > room:
            raise InvalidRequest(
                f"{what} needs {needed} bytes but shared-memory region {name!r} gives {room} from "
                f"offset {offset}"
            )
        return region

    async def read(self, region: Region, offset: int, nbytes: int) -> bytes:
        """``nbytes`` bytes from ``offset`` of the region (checked with ``check`` first)."""
        return await self._access(region, nbytes, self._pread, region, offset, nbytes)

    async def write(self, region: Region, offset: int, data: memoryview) -> None:
        """Write ``data`` at ``offset`` of the region (checked with ``check`` first)."""
        await self._access(region, data.nbytes, self._pwrite, region, offset, data)

    async def _access(self, region: Region, nbytes: int, fn: Callable[..., T], *args: Any) -> T:
        """Run one read or write, holding the region open until it is over.

        A large one runs on a thread; the region is released when the thread is
        done, not when the caller stops waiting (a cancelled call must not let an
        unregister close the descriptor under a write still running).
        """
        if region.closing:
            raise RegionNotFound(f"shared-memory region {region.name!r} was unregistered")
        region.users += 1
        if nbytes < _THREAD_BYTES:
            try:
                return fn(*args)
            finally:
                self._release(region)
        future = asyncio.get_running_loop().run_in_executor(None, fn, *args)
        future.add_done_callback(lambda _: self._release(region))
        return await asyncio.shield(future)

    @staticmethod
    def _release(region: Region) -> None:
        region.users -= 1
        if region.closing and not region.users:
            region.idle.set()

    @staticmethod
    def _within_object(region: Region, start: int, nbytes: int) -> None:
        size = os.fstat(region.fd).st_size
        if start + nbytes > size:
            raise InvalidRequest(
                f"shared-memory object {region.key!r} shrank to {size} bytes, below region "
                f"{region.name!r}; register it again"
            )

    @classmethod
    def _pread(cls, region: Region, offset: int, nbytes: int) -> bytes:
        start = region.offset + offset
        cls._within_object(region, start, nbytes)
        data = os.pread(region.fd, nbytes, start)
        if len(data) != nbytes:
            raise InvalidRequest(f"shared-memory object {region.key!r} ended while being read")
        return data

    @classmethod
    def _pwrite(cls, region: Region, offset: int, data: memoryview) -> None:
        start = region.offset + offset
        cls._within_object(region, start, data.nbytes)
        view = data.cast("B")
        done = 0
        while done < view.nbytes:
            done += os.pwrite(region.fd, view[done:], start + done)
