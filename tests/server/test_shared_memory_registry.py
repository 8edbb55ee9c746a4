"""The server's shared-memory registry: what it accepts, its bounds, and unregistering under I/O."""

from __future__ import annotations

import asyncio
import os
import re
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest

from kernelgen_server.errors import InvalidRequest, KernelTooLarge, RegionExists, RegionNotFound
from kernelgen_server.transport.shared_memory import SharedMemoryRegistry, check_off


def _open_files() -> set[str]:
    folder = Path("/proc/self/fd")
    names = set()
    for entry in folder.iterdir():
        try:
            names.add(os.readlink(entry))
        except OSError:  # closed while listing
            continue
    return names


def _object(root: Path, name: str, size: int) -> Path:
    path = root / name
    path.write_bytes(bytes(size))
    return path


async def test_register_write_read_and_status(tmp_path: Path) -> None:
    path = _object(tmp_path, "obj", 4096)
    registry = SharedMemoryRegistry(root=tmp_path)
    region = registry.register("out", "/obj", 1024, 2048)
    assert [r.name for r in registry.status()] == ["out"]
    assert registry.status("out")[0].key == "/obj"
    data = np.arange(256, dtype=np.float32)
    checked = registry.check("out", 16, 0, data.nbytes, "the kernel")
    await registry.write(checked, 16, data.data)
    raw = path.read_bytes()
    assert raw[1024 + 16 : 1024 + 16 + data.nbytes] == data.tobytes()  # at the region's offset
    assert raw[:1024] == bytes(1024)  # nothing outside the region
    assert await registry.read(region, 16, data.nbytes) == data.tobytes()
    assert await registry.unregister("out") == ["out"]
    assert len(registry) == 0


@pytest.mark.parametrize(
    ("name", "key", "offset", "size", "message"),
    [
        ("", "/obj", 0, 8, "needs a name"),
        ("r", "obj", 0, 8, "not a POSIX shared-memory name"),
        ("r", "/a/b", 0, 8, "not a POSIX shared-memory name"),
        ("r", "/..", 0, 8, "not a POSIX shared-memory name"),
        ("r", "/missing", 0, 8, "no shared-memory object '/missing' on the server's host"),
        ("r", "/obj", 0, 0, "byte_size of at least 1"),
        ("r", "/obj", 60, 8, "holds 64 bytes, fewer than the region's offset 60 + byte_size 8"),
        ("r", "/fifo", 0, 8, "not a regular object"),
        ("r", "/dir", 0, 8, "cannot open shared-memory object '/dir'"),
    ],
)
def test_register_refuses_bad_regions(
    tmp_path: Path, name: str, key: str, offset: int, size: int, message: str
) -> None:
    _object(tmp_path, "obj", 64)
    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "fifo")
    registry = SharedMemoryRegistry(root=tmp_path)
    with pytest.raises(InvalidRequest, match=re.escape(message)) as caught:
        registry.register(name, key, offset, size)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert len(registry) == 0


def test_register_does_not_follow_links(tmp_path: Path) -> None:
    target = _object(tmp_path, "secret", 64)
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(InvalidRequest, match="cannot open"):
        SharedMemoryRegistry(root=tmp_path).register("r", "/link", 0, 8)


def test_names_are_unique_and_regions_bounded(tmp_path: Path) -> None:
    _object(tmp_path, "obj", 64)
    registry = SharedMemoryRegistry(root=tmp_path, max_regions=2)
    registry.register("a", "/obj", 0, 8)
    with pytest.raises(RegionExists) as exists:
        registry.register("a", "/obj", 0, 8)
    assert exists.value.code == grpc.StatusCode.ALREADY_EXISTS
    registry.register("b", "/obj", 8, 8)
    with pytest.raises(KernelTooLarge, match="--shared-memory-max-regions"):
        registry.register("c", "/obj", 16, 8)


def test_check_bounds_before_any_work(tmp_path: Path) -> None:
    _object(tmp_path, "obj", 1024)
    registry = SharedMemoryRegistry(root=tmp_path)
    registry.register("r", "/obj", 0, 512)
    with pytest.raises(RegionNotFound):
        registry.check("nope", 0, 0, 8, "the kernel")
    with pytest.raises(InvalidRequest, match="runs past shared-memory region 'r' of 512 bytes"):
        registry.check("r", 500, 100, 8, "the kernel")
    with pytest.raises(
        InvalidRequest, match="the kernel needs 600 bytes but shared-memory region 'r' gives 512"
    ):
        registry.check("r", 0, 0, 600, "the kernel")
    with pytest.raises(InvalidRequest, match=r"needs 64 bytes .* gives 32 from offset 0"):
        registry.check("r", 0, 32, 64, "the kernel")
    assert registry.check("r", 256, 256, 256, "the kernel").name == "r"


async def test_an_object_that_shrank_is_refused_not_faulted(tmp_path: Path) -> None:
    path = _object(tmp_path, "obj", 4096)
    registry = SharedMemoryRegistry(root=tmp_path)
    region = registry.register("r", "/obj", 0, 4096)
    os.truncate(path, 100)
    with pytest.raises(InvalidRequest, match="shrank to 100 bytes"):
        await registry.write(region, 0, memoryview(bytes(4096)))
    with pytest.raises(InvalidRequest, match="shrank"):
        await registry.read(region, 0, 4096)
    assert path.stat().st_size == 100  # never grown by the server


async def test_unregister_waits_for_the_write_under_way_then_never_writes(tmp_path: Path) -> None:
    size = 8 << 20  # above the inline threshold: written on a thread
    path = _object(tmp_path, "obj", size)
    registry = SharedMemoryRegistry(root=tmp_path)
    region = registry.register("r", "/obj", 0, size)
    started, release = threading.Event(), threading.Event()
    original = registry._pwrite

    def slow_write(*args: object) -> None:
        started.set()
        release.wait(10)
        original(*args)  # type: ignore[arg-type]

    registry._pwrite = slow_write  # type: ignore[method-assign]
    writer = asyncio.create_task(registry.write(region, 0, memoryview(b"\x01" * size)))
    await asyncio.to_thread(started.wait, 10)
    unregister = asyncio.create_task(registry.unregister("r"))
    await asyncio.sleep(0.05)
    assert not unregister.done()  # it waits for the write
    with pytest.raises(RegionNotFound):
        registry.check("r", 0, 0, 1, "x")  # but the name is gone at once
    writer.cancel()  # a caller that stops waiting does not release the region early
    await asyncio.sleep(0.05)
    assert not unregister.done()
    release.set()
    assert await unregister == ["r"]
    assert str(path) not in _open_files()  # the descriptor is closed
    assert path.read_bytes()[:1] == b"\x01"
    with pytest.raises(RegionNotFound, match="was unregistered"):
        await registry.write(region, 0, memoryview(b"\x02"))
    assert path.read_bytes()[:1] == b"\x01"


async def test_unregister_all_and_unknown(tmp_path: Path) -> None:
    _object(tmp_path, "obj", 64)
    registry = SharedMemoryRegistry(root=tmp_path)
    assert await registry.unregister("") == []  # nothing registered: nothing to do
    registry.register("a", "/obj", 0, 8)
    registry.register("b", "/obj", 8, 8)
    with pytest.raises(RegionNotFound):
        await registry.unregister("c")
    assert sorted(await registry.unregister("")) == ["a", "b"]
    assert registry.status() == []


def test_off_unless_enabled() -> None:
    with pytest.raises(Exception, match="--shared-memory") as caught:
        check_off(None)
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]


async def test_a_real_posix_object() -> None:
    from multiprocessing import shared_memory

    block = shared_memory.SharedMemory(create=True, size=4096)
    try:
        registry = SharedMemoryRegistry()
        region = registry.register("real", "/" + block.name, 0, 4096)
        await registry.write(region, 8, memoryview(b"kernel"))
        assert bytes(block.buf[8:14]) == b"kernel"
        await registry.unregister("real")
    finally:
        block.close()
        block.unlink()
