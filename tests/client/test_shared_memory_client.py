"""The client's shared-memory pool: kernels written by the server into regions the client owns,
results that are views of them, regions reused, bounded, re-registered and released on close."""

from __future__ import annotations

import asyncio
import gc
import mmap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kernelgen_client import AsyncKernelClient, KernelClient
from kernelgen_client.errors import SharedMemoryUnavailable
from kernelgen_client.shared_memory import SHM_ROOT, SharedMemoryPolicy

from support import run_server, threaded_server

ROWS = np.random.default_rng(5).standard_normal((4, 384), dtype=np.float32)
MiB = 1 << 20


def in_region(array: Any) -> bool:
    """Whether an array views a region of the pool (its bases lead to a mapping)."""
    seen = array
    while seen is not None:
        if isinstance(seen, mmap.mmap):
            return True
        seen = getattr(seen, "base", None) if isinstance(seen, np.ndarray) else getattr(seen, "obj", None)
    return False


def objects(client: Any) -> set[str]:
    return {p.name for p in Path(SHM_ROOT).iterdir() if p.name.startswith(client._shared_memory._prefix)}


@pytest.fixture(scope="module")
def server() -> Any:
    with threaded_server(shared_memory=True) as running:
        yield running


def test_kernels_arrive_as_views_of_a_reused_region(server: Any) -> None:
    target = f"127.0.0.1:{server.port}"
    with KernelClient(target) as plain, KernelClient(target, shared_memory=True) as client:
        want = plain.generate("hyena-2d", [15, 15], ROWS[:1])
        got = client.generate("hyena-2d", [15, 15], ROWS[:1])
        np.testing.assert_array_equal(got, want)
        assert in_region(got) and not in_region(want)
        pool = client._shared_memory
        [region] = pool.regions()
        assert region.in_use and region.registered
        assert {r.name for r in server.shared_memory.status()} == {region.name}
        held = client.generate("hyena-2d", [15, 15], ROWS[1:2])  # the first is still in use
        assert len(pool.regions()) == 2
        del got, held
        gc.collect()
        assert not any(r.in_use for r in pool.regions())
        for _ in range(3):
            np.testing.assert_array_equal(client.generate("hyena-2d", [15, 15], ROWS[:1]), want)
        assert len(pool.regions()) == 2  # reused, not grown
        factored = client.generate("hyena-2d", [15, 15], ROWS[:2], representation="factored")
        np.testing.assert_allclose(
            factored.dense(), plain.generate("hyena-2d", [15, 15], ROWS[:2]), atol=1e-5
        )
        names = objects(client)
        assert names
    assert not objects(client) and not names & {p.name for p in Path(SHM_ROOT).iterdir()}
    assert server.shared_memory.status() == []  # unregistered on close


def test_the_pool_is_bounded_and_falls_back_to_the_socket(server: Any) -> None:
    target = f"127.0.0.1:{server.port}"
    with KernelClient(target, shared_memory=SharedMemoryPolicy(max_bytes=2 * MiB)) as client:
        first = client.generate("hyena-2d", [15, 15], ROWS[:1])  # 1.29 MB: a 2 MiB region
        second = client.generate("hyena-2d", [15, 15], ROWS[1:2])  # no room: the socket
        assert in_region(first) and not in_region(second)
        assert client._shared_memory.total_bytes == 2 * MiB
        del first
        gc.collect()
        small = client.generate("hyena-2d", [5, 5], ROWS[:1])  # the free region fits it
        assert in_region(small) and len(client._shared_memory.regions()) == 1
        del small, second
        gc.collect()
        big = client.generate("volume-3d", [9, 9, 9], None)
        assert client._shared_memory.total_bytes <= 2 * MiB
        assert big.shape[0] == 1


def test_small_kernels_can_take_the_socket(server: Any) -> None:
    policy = SharedMemoryPolicy(min_kernel_bytes=1 * MiB)
    with KernelClient(f"127.0.0.1:{server.port}", shared_memory=policy) as client:
        assert not in_region(client.generate("hyena-2d", [5, 5], ROWS[:1]))
        assert in_region(client.generate("hyena-2d", [15, 15], ROWS[:1]))


def test_one_connection_only() -> None:
    with pytest.raises(ValueError, match="one connection"):
        KernelClient("127.0.0.1:1", connections=2, shared_memory=True)


def test_a_server_without_shared_memory_says_so() -> None:
    with (
        threaded_server() as plain_server,
        KernelClient(f"127.0.0.1:{plain_server.port}", shared_memory=True) as client,
    ):
        with pytest.raises(SharedMemoryUnavailable, match="--shared-memory"):
            client.generate("hyena-2d", [5, 5], ROWS[:1])
        assert client._shared_memory.regions() == [] and not objects(client)


async def test_async_client_and_a_server_that_lost_its_regions() -> None:
    async with run_server(shared_memory=True) as server:
        target = f"127.0.0.1:{server.port}"
        async with (
            AsyncKernelClient(target) as plain,
            AsyncKernelClient(target, shared_memory=True) as client,
        ):
            kernels = await asyncio.gather(
                *(client.generate("hyena-2d", [15, 15], ROWS[i : i + 1]) for i in range(4))
            )
            for i, kernel in enumerate(kernels):
                np.testing.assert_array_equal(
                    kernel, await plain.generate("hyena-2d", [15, 15], ROWS[i : i + 1])
                )
            assert len(client._shared_memory.regions()) == 4
            del kernels, kernel
            gc.collect()
            await server.shared_memory.unregister("")  # as a restarted server would have none
            again = await client.generate("hyena-2d", [15, 15], ROWS[:1])  # registered again, once
            np.testing.assert_array_equal(again, await plain.generate("hyena-2d", [15, 15], ROWS[:1]))
            assert len(server.shared_memory.status()) == 1
            long = await client.generate("long-1d", [40000])
            assert long.nbytes == 79999 * 256 * 4 and in_region(long)
        assert server.shared_memory.status() == []
        assert not objects(client)
