"""The supervisor of ``kernelgen serve --workers N``, run over stand-in worker processes.

The stand-in speaks the worker's protocol (a JSON line on stdin, ``READY <index>``
on stdout, drain on SIGTERM or on end-of-file of stdin) and records what happened
to it as files, so the supervisor's start, restart, limit and drain logic is
tested here without torch or gRPC. ``tests/e2e/test_workers.py`` runs real workers.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import kernelgen_server.ops.supervisor as supervisor
from kernelgen_server.ops.supervisor import Supervisor, WorkerExit, reserve_port
from kernelgen_server.settings import ServerSettings, load_settings

# A stand-in worker. FAKE_MODE: "serve" (default); "fail-start": worker 1 exits before
# READY; "crash-once": worker 1 exits right after its first READY; "crash-always":
# worker 1 exits after every READY; "slow-start": no worker ever gets to READY;
# "die-at-once": every worker exits before reading its handshake.
FAKE_WORKER = r"""
import json, os, signal, sys, pathlib
if os.environ.get("FAKE_MODE") == "die-at-once":
    os._exit(5)
handshake = json.loads(sys.stdin.readline())
i = handshake["index"]
state = pathlib.Path(os.environ["FAKE_STATE"])
mode = os.environ.get("FAKE_MODE", "serve")
(state / f"handshake-{i}-{os.getpid()}.json").write_text(json.dumps(handshake))
if mode == "fail-start" and i == 1:
    sys.exit(4)
if mode == "slow-start":
    signal.signal(signal.SIGTERM, lambda *_: ((state / f"stopped-starting-{i}").touch(), sys.exit(0)))
    sys.stdin.read()  # never READY
print(f"worker {i} says hello", flush=True)
print(f"READY {i}", flush=True)
if i == 1 and (mode == "crash-always" or (mode == "crash-once" and not (state / "crashed").exists())):
    (state / "crashed").touch()
    sys.exit(3)
def drain(*_):
    (state / f"drained-{i}-{os.getpid()}").touch()
    sys.exit(0)
signal.signal(signal.SIGTERM, drain)
sys.stdin.read()
(state / f"orphaned-{i}-{os.getpid()}").touch()
"""


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Supervisor]:
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    state = tmp_path / "state"
    state.mkdir()
    monkeypatch.setenv("FAKE_STATE", str(state))

    def make(mode: str = "serve", workers: int = 2, **kwargs: object) -> Supervisor:
        monkeypatch.setenv("FAKE_MODE", mode)
        settings = load_settings({"host": "127.0.0.1", "port": 0, "metrics_port": 0, "workers": workers})
        return Supervisor(settings, command=lambda: [sys.executable, str(script)], **kwargs)  # type: ignore[arg-type]

    return make


def files(tmp_path: Path, prefix: str) -> list[str]:
    return sorted(p.name for p in (tmp_path / "state").glob(prefix + "*"))


async def wait_for(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(20):
        while not condition():
            await asyncio.sleep(0.02)


# --- the port -----------------------------------------------------------------------------
def test_reserve_port_zero_picks_a_port_that_nothing_else_can_bind() -> None:
    with reserve_port("127.0.0.1", 0) as held:
        port = held.getsockname()[1]
        assert port > 0
        # A second supervisor on the same port is refused, although both use SO_REUSEPORT.
        with pytest.raises(
            OSError, match=f"cannot listen for gRPC on 127.0.0.1:{port}: the address is in use"
        ):
            reserve_port("127.0.0.1", port)
        # So is a lone server (no SO_REUSEPORT), with or without SO_REUSEADDR.
        for reuse_address in (0, 1):
            with socket.socket() as other:
                other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, reuse_address)
                with pytest.raises(OSError, match="in use"):
                    other.bind(("127.0.0.1", port))
        # A worker's socket (as gRPC makes it: SO_REUSEADDR and SO_REUSEPORT) joins it and listens.
        with socket.socket() as worker:
            worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            worker.bind(("127.0.0.1", port))
            worker.listen()


def test_reserve_port_refuses_a_port_in_use() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.raises(OSError, match="in use; set --port to another port"):
            reserve_port("127.0.0.1", port)


def test_reserve_port_takes_bracketed_ipv6_hosts() -> None:
    # Needs the IPv6 loopback, which every Linux host of the project has: where it is
    # configured off this fails (binding ::1), rather than skip.
    with reserve_port("[::1]", 0) as held:
        assert held.family == socket.AF_INET6
        assert held.getsockname()[1] > 0


# --- settings -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("workers", "cpus", "cpu_threads", "want"),
    [(1, 2, None, 1), (1, 16, None, 15), (4, 16, None, 3), (2, 2, None, 1), (8, 4, None, 1), (4, 16, 2, 2)],
)
def test_torch_threads_share_the_cpus_left_after_one_per_worker(
    workers: int, cpus: int, cpu_threads: int | None, want: int
) -> None:
    settings = load_settings({"workers": workers, "cpu_threads": cpu_threads})
    assert settings.torch_threads(cpus) == want


@pytest.mark.parametrize("workers", [0, 65])
def test_workers_out_of_range_is_refused(workers: int) -> None:
    from kernelgen_server.settings import SettingsError

    with pytest.raises(SettingsError, match="workers"):
        load_settings({"workers": workers})


def test_handshake_gives_each_worker_the_whole_settings(tmp_path: Path) -> None:
    config = tmp_path / "kernelgen.json"
    config.write_text(json.dumps({"max_batch_size": 7}))
    settings = load_settings({"workers": 3, "port": 0, "metrics_port": 9999, "config": str(config)})
    sup = Supervisor(settings)
    sup.port = 4321
    handshake = json.loads(sup._handshake(2))
    assert handshake["index"] == 2
    got = ServerSettings.model_validate(handshake["settings"])
    assert got.port == 4321  # the reserved port, not 0
    assert got.metrics_port == 0  # the supervisor serves the metrics
    assert got.max_batch_size == 7  # from the config file, which the worker does not read again
    assert got.config is None
    assert got.cpu_threads == settings.torch_threads()
    assert got.workers == 3


# --- life cycle -----------------------------------------------------------------------------
async def test_workers_start_serve_and_drain_on_stop(
    fake: Callable[..., Supervisor], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    sup = fake(workers=3)
    stop = asyncio.Event()
    ready: list[int] = []
    run = asyncio.create_task(sup.run(stop, on_ready=ready.append))
    await wait_for(lambda: bool(ready))
    assert ready == [sup.port]
    assert sup.port > 0
    assert sup.live_workers == 3
    assert sup.serving_workers == 3
    assert len(set(sup.pids)) == 3
    handshakes = [json.loads(p.read_text()) for p in (tmp_path / "state").glob("handshake-*")]
    assert sorted(h["index"] for h in handshakes) == [0, 1, 2]
    assert {h["settings"]["port"] for h in handshakes} == {sup.port}
    stop.set()
    assert await asyncio.wait_for(run, 30) == 0
    assert len(files(tmp_path, "drained-")) == 3
    assert sup.live_workers == 0
    # A worker's own output reaches the supervisor's stdout.
    assert "worker 2 says hello" in capfd.readouterr().out
    # The port is free again once the supervisor is done.
    with socket.socket() as again:
        again.bind(("127.0.0.1", sup.port))


async def test_a_worker_that_exits_is_restarted_under_its_index(
    fake: Callable[..., Supervisor], tmp_path: Path
) -> None:
    sup = fake(mode="crash-once")
    stop = asyncio.Event()
    run = asyncio.create_task(sup.run(stop))
    await wait_for(lambda: sup.restarts == 1 and sup.serving_workers == 2)
    assert len(files(tmp_path, "handshake-1-")) == 2  # worker 1 started twice
    assert len(files(tmp_path, "handshake-0-")) == 1
    stop.set()
    assert await asyncio.wait_for(run, 30) == 0
    assert len(files(tmp_path, "drained-")) == 2


async def test_a_worker_that_keeps_exiting_stops_the_server(
    fake: Callable[..., Supervisor], tmp_path: Path
) -> None:
    sup = fake(mode="crash-always", restart_limit=2)
    with pytest.raises(WorkerExit, match="worker 1 exited 3 times"):
        await asyncio.wait_for(sup.run(asyncio.Event()), 60)
    assert sup.restarts == 2
    assert files(tmp_path, "drained-0-")  # the healthy worker was drained, not left behind
    assert sup.live_workers == 0


async def test_exits_outside_the_restart_window_are_forgotten(
    fake: Callable[..., Supervisor], tmp_path: Path
) -> None:
    now = [0.0]
    sup = fake(mode="crash-always", restart_limit=1, restart_window_s=10.0, clock=lambda: now[0])

    def advance() -> bool:
        now[0] += 100.0  # every exit lands in a fresh window
        return sup.restarts >= 3

    stop = asyncio.Event()
    run = asyncio.create_task(sup.run(stop))
    await wait_for(advance)
    stop.set()
    assert await asyncio.wait_for(run, 30) == 0


async def test_a_worker_that_fails_to_start_fails_the_start(
    fake: Callable[..., Supervisor], tmp_path: Path
) -> None:
    sup = fake(mode="fail-start")
    with pytest.raises(WorkerExit, match="worker 1 exited with code 4 before serving"):
        await asyncio.wait_for(sup.run(asyncio.Event()), 60)
    assert sup.live_workers == 0  # worker 0 did not outlive the failed start


async def test_a_worker_dead_before_its_handshake_fails_the_start_clearly(
    fake: Callable[..., Supervisor],
) -> None:
    sup = fake(mode="die-at-once")
    with pytest.raises(WorkerExit, match="exited with code 5 before serving"):
        await asyncio.wait_for(sup.run(asyncio.Event()), 60)


async def test_a_stop_while_the_workers_start_stops_them_at_once(
    fake: Callable[..., Supervisor], tmp_path: Path
) -> None:
    sup = fake(mode="slow-start")
    stop = asyncio.Event()
    ready: list[int] = []
    run = asyncio.create_task(sup.run(stop, on_ready=ready.append))
    await wait_for(lambda: len(files(tmp_path, "handshake-")) == 2)
    stop.set()
    assert await asyncio.wait_for(run, 30) == 0
    assert ready == []
    assert len(files(tmp_path, "stopped-starting-")) == 2
    assert sup.live_workers == 0


async def test_workers_drain_when_the_supervisor_is_gone(
    fake: Callable[..., Supervisor], tmp_path: Path
) -> None:
    """Closing a worker's stdin is what the supervisor's death does to it."""
    sup = fake()
    stop = asyncio.Event()
    run = asyncio.create_task(sup.run(stop))
    await wait_for(lambda: sup.live_workers == 2 and len(files(tmp_path, "handshake-")) == 2)
    await asyncio.sleep(0.2)  # both have printed READY
    for worker in sup._workers:
        assert worker.process is not None
        assert worker.process.stdin is not None
        worker.process.stdin.close()
    await wait_for(lambda: len(files(tmp_path, "orphaned-")) == 2)
    stop.set()
    await asyncio.wait_for(run, 30)


async def test_watch_supervisor_sets_stop_at_end_of_file(monkeypatch: pytest.MonkeyPatch) -> None:
    read, write = os.pipe()
    with os.fdopen(read, "rb") as stdin:
        monkeypatch.setattr(sys, "stdin", stdin)
        stop = asyncio.Event()
        watch = asyncio.create_task(supervisor._watch_supervisor(stop))
        os.write(write, b"anything\n")
        await asyncio.sleep(0.1)
        assert not stop.is_set()
        os.close(write)
        await asyncio.wait_for(watch, 5)
        assert stop.is_set()


async def test_more_than_one_worker_needs_linux(
    fake: Callable[..., Supervisor], monkeypatch: pytest.MonkeyPatch
) -> None:
    sup = fake()
    monkeypatch.setattr(sys, "platform", "darwin")
    with pytest.raises(OSError, match="needs Linux"):
        await sup.run(asyncio.Event())
    assert sup.live_workers == 0
