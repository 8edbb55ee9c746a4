"""Kernels delivered through shared memory, for a client on the server's host.

``KernelClient(target, shared_memory=True)`` (or a ``SharedMemoryPolicy``)
gives the client a pool of POSIX shared-memory regions it owns: each
``generate`` takes a free region large enough for the kernel (creating and
registering one when none is free), the server writes the kernel into it
instead of the response, and the result is an array that is a view of the
region. The region returns to the pool when the last array viewing it is
gone, and is reused by a later call; so large kernels skip the socket and
the copies on both of its sides.

Rules:
- the server must run on the same host with ``--shared-memory``, as the same
  user (objects are created with mode 0600), and the client must use one
  target over one connection (a region is registered with the server process
  its connection reaches);
- the pool holds at most ``max_bytes`` of regions: a call that finds none free
  evicts free regions to make room, and when every region is in use it takes
  the socket instead;
- ``close()`` unregisters every region with the server (which then never
  touches them again) and removes the objects; arrays still alive keep their
  memory until they are gone.

Linux only (POSIX shared memory under ``/dev/shm``); in a container, that
``/dev/shm`` must be shared with the server's and large enough.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import secrets
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kernelgen_client.errors import MalformedResponse
from kernelgen_wire.kernel_messages import ResponseView, TensorView
from kernelgen_wire.sizes import tensor_bytes

__all__ = ["SHM_ROOT", "MappedRegion", "RegionPool", "SharedMemoryPolicy", "coerce_policy"]

#: Where Linux keeps POSIX shared-memory objects.
SHM_ROOT = Path("/dev/shm")
_GRANULE = 1 << 20  # regions are sized in whole MiB, so kernels of one size reuse them


@dataclass(frozen=True)
class SharedMemoryPolicy:
    """How a client uses shared memory.

    Args:
        max_bytes: most bytes of regions the client holds at once.
        min_kernel_bytes: kernels predicted smaller than this travel by the socket.
    """

    max_bytes: int = 1 << 30
    min_kernel_bytes: int = 0

    def __post_init__(self) -> None:
        if self.max_bytes < _GRANULE:
            raise ValueError(f"SharedMemoryPolicy.max_bytes must be at least 1 MiB, got {self.max_bytes}")
        if self.min_kernel_bytes < 0:
            raise ValueError("SharedMemoryPolicy.min_kernel_bytes cannot be negative")


def coerce_policy(value: SharedMemoryPolicy | bool | None) -> SharedMemoryPolicy | None:
    if value is None or value is False:
        return None
    if value is True:
        return SharedMemoryPolicy()
    if isinstance(value, SharedMemoryPolicy):
        return value
    raise TypeError(f"shared_memory must be a bool or a SharedMemoryPolicy, got {value!r}")


@dataclass(eq=False)
class MappedRegion:
    """A region the client owns: a shared-memory object it created and mapped whole.

    Registered (when ``registered``) with the server under ``name`` as the
    region of ``byte_size`` bytes from offset 0 of the object ``key``.
    """

    name: str
    byte_size: int
    memory: mmap.mmap
    registered: bool = False
    in_use: bool = False
    uses: int = field(default=0)

    @property
    def key(self) -> str:
        return "/" + self.name


class RegionPool:
    """A client's regions; thread-safe (the blocking client shares it among threads)."""

    def __init__(self, policy: SharedMemoryPolicy, root: Path = SHM_ROOT) -> None:
        if not root.is_dir():
            raise RuntimeError(f"shared memory needs POSIX shared memory at {root} (Linux)")
        self.policy = policy
        self._root = root
        self._prefix = f"kernelgen-{os.getpid()}-{secrets.token_hex(4)}"
        self._regions: list[MappedRegion] = []
        self._count = 0
        self._lock = threading.Lock()
        self._closed = False

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return sum(r.byte_size for r in self._regions)

    def regions(self) -> list[MappedRegion]:
        with self._lock:
            return list(self._regions)

    def acquire(self, nbytes: int) -> tuple[MappedRegion, list[MappedRegion]] | None:
        """A region for ``nbytes`` marked in use, and the free regions evicted to make room.

        The caller unregisters the evicted regions, then ``drop``s them. None when
        no region can be had within ``max_bytes`` (every one in use): use the socket.
        """
        size = max(_GRANULE, math.ceil(nbytes / _GRANULE) * _GRANULE)
        with self._lock:
            if self._closed:
                raise RuntimeError("the client is closed")
            free = [r for r in self._regions if not r.in_use and r.byte_size >= nbytes]
            if free:
                region = min(free, key=lambda r: r.byte_size)
                region.in_use = True
                return region, []
            if size > self.policy.max_bytes:
                return None
            evicted: list[MappedRegion] = []
            total = sum(r.byte_size for r in self._regions)
            for candidate in sorted((r for r in self._regions if not r.in_use), key=lambda r: r.uses):
                if total + size <= self.policy.max_bytes:
                    break
                evicted.append(candidate)
                total -= candidate.byte_size
            if total + size > self.policy.max_bytes:
                return None
            for old in evicted:
                self._regions.remove(old)
            self._count += 1
            region = self._create(f"{self._prefix}-{self._count}", size)
            region.in_use = True
            self._regions.append(region)
            return region, evicted

    def _create(self, name: str, size: int) -> MappedRegion:
        path = self._root / name
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
            memory = mmap.mmap(fd, size)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        return MappedRegion(name, size, memory)

    def release(self, region: MappedRegion) -> None:
        """Back to the pool (the last view of it is gone, or the call failed)."""
        with self._lock:
            region.in_use = False

    def forget(self, region: MappedRegion) -> None:
        """Take a region out of the pool (its registration failed) and remove it."""
        with self._lock:
            if region in self._regions:
                self._regions.remove(region)
        self.drop(region)

    def drop(self, region: MappedRegion) -> None:
        """Remove an object taken out of the pool; its memory lives on while arrays view it."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._root / region.name)
        with contextlib.suppress(BufferError):  # arrays still view it: the mapping goes when they do
            region.memory.close()

    def view(self, region: MappedRegion, response: ResponseView, nbytes: int) -> ResponseView:
        """``response`` with its tensor viewing the region; the region returns to the pool
        when the last array made from the view is gone."""
        tensor = response.kernel
        expected = tensor_bytes(tensor.shape, tensor.dtype)
        if response.shared_memory_bytes != nbytes or expected != nbytes or tensor.data.nbytes:
            raise MalformedResponse(
                f"the server wrote {response.shared_memory_bytes} bytes into shared memory for a "
                f"{list(tensor.shape)} kernel of {expected} bytes; {nbytes} were expected"
            )
        owner = np.frombuffer(region.memory, dtype=np.uint8, count=nbytes)
        region.uses += 1
        weakref.finalize(owner, self.release, region)
        data = owner.data
        return ResponseView(
            TensorView(tensor.shape, tensor.dtype, data),
            response.grid,
            response.report,
            response.head_hash,
            response.shared_memory_bytes,
        )

    def close(self) -> list[MappedRegion]:
        """Empty the pool; returns the regions to unregister, then ``drop``."""
        with self._lock:
            self._closed = True
            regions, self._regions = self._regions, []
        return regions
