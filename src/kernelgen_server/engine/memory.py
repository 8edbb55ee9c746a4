"""Host memory of the engine: the shared-prefix cache and recycled result buffers.

Both are thread safe; the engine uses them from its device thread, and a result
buffer may come back to the pool on whichever thread drops its last reference.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["ALIGN", "HostBufferPool", "PrefixCache", "PrefixCacheInfo"]

#: Per-row operands start at multiples of this many bytes from an allocation's base:
#: a multiple of the CPU (64 bytes) and CUDA (512 bytes) allocators' alignment, so a
#: row inside a batch is aligned as a fresh allocation (a row alone) is.
ALIGN = 512


@dataclass(frozen=True)
class PrefixCacheInfo:
    hits: int
    misses: int
    entries: int
    bytes: int
    max_bytes: int


class PrefixCache:
    """LRU of per-grid tensors that no conditioning changes (the prefix ``[G, H]``, the mask), by key.

    Invariant: ``bytes <= max_bytes``; an entry larger than the bound is computed
    but not kept. Thread safe; two threads missing one key may both compute it
    (the values are identical).
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, Tensor] = OrderedDict()
        self._bytes = self._hits = self._misses = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable, compute: Callable[[], Tensor]) -> Tensor:
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
                self._hits += 1
                return value
            self._misses += 1
        value = compute()
        size = value.numel() * value.element_size()
        with self._lock:
            if size <= self.max_bytes and key not in self._entries:
                self._entries[key] = value
                self._bytes += size
                while self._bytes > self.max_bytes:
                    _, old = self._entries.popitem(last=False)
                    self._bytes -= old.numel() * old.element_size()
        return value

    def info(self) -> PrefixCacheInfo:
        with self._lock:
            return PrefixCacheInfo(self._hits, self._misses, len(self._entries), self._bytes, self.max_bytes)


class HostBufferPool:
    """Recycles large CPU result buffers once nothing uses them any more.

    :meth:`empty` wraps a numpy block with ``torch.from_numpy``; the tensor's
    storage holds the wrapped array, so when the last tensor, view or numpy
    alias of the result is gone, that array is finalised and its block goes back
    on a free list (at most ``max_bytes`` of free blocks are kept, the rest is
    released). Blocks come in power-of-two sizes; pages never written cost no
    memory. Thread safe: a block may come back on any thread.
    """

    def __init__(self, max_bytes: int = 256 << 20, min_bytes: int = 1 << 20) -> None:
        self.max_bytes = max_bytes
        self.min_bytes = min_bytes
        self._free: dict[int, list[np.ndarray]] = {}
        self._free_bytes = self.hits = self.misses = 0
        # Re-entrant: a garbage collection inside a locked section may release a block.
        self._lock = threading.RLock()

    def empty(self, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
        """An uninitialised contiguous CPU tensor whose data is ``ALIGN``-byte aligned."""
        nbytes = math.prod(shape) * int(dtype.itemsize)
        if nbytes < self.min_bytes or self.max_bytes <= 0:
            return torch.empty(tuple(shape), dtype=dtype)
        size = 1 << (nbytes + ALIGN - 1).bit_length()
        with self._lock:
            free = self._free.get(size)
            block = free.pop() if free else None
            if block is None:
                self.misses += 1
            else:
                self.hits += 1
                self._free_bytes -= size
        if block is None:
            block = np.empty(size, dtype=np.uint8)
        start = -block.ctypes.data % ALIGN
        data = block[start : start + nbytes]
        weakref.finalize(data, self._release, block).atexit = False
        return torch.from_numpy(data).view(dtype).view(tuple(shape))

    @property
    def free_bytes(self) -> int:
        return self._free_bytes

    def _release(self, block: np.ndarray) -> None:
        with self._lock:
            if self._free_bytes + block.nbytes <= self.max_bytes:
                self._free.setdefault(block.nbytes, []).append(block)
                self._free_bytes += block.nbytes
