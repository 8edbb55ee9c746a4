"""Idle TCP connections that never start HTTP/2 cannot lock clients out of ``kernelgen serve``.

The server runs as a process started with a lowered open-files limit and is flooded with more
idle sockets than that limit. With a higher hard limit the server raises its soft limit at start
and holds them all while new clients connect; with the hard limit as low, its connection limit
(``--max-connections``' default) keeps descriptors free: sockets over it are closed at once and
the clients already connected go on. Either way a socket that has not started HTTP/2 within the
handshake timeout is closed, and then a new client connects.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import socket
import time
from collections.abc import Iterator

import pytest

from kernelgen_client import HealthStatus, KernelClient

from support import ServeProcess, serve_process

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

LOWERED = 512
IDLE = 700
#: transport/server.py's bound on the time a connection may take to start HTTP/2.
HANDSHAKE_TIMEOUT_S = 10.0


def descriptors(server: ServeProcess) -> int:
    return len(os.listdir(f"/proc/{server.proc.pid}/fd"))


@contextlib.contextmanager
def idle_sockets(server: ServeProcess, count: int) -> Iterator[list[socket.socket]]:
    """``count`` connections to ``server`` that never send a byte (this process may need more
    descriptors than its soft limit: raised towards the hard one, restored after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = count + 256
    assert hard == resource.RLIM_INFINITY or hard >= needed, f"hard open-files limit {hard} < {needed}"
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, needed), hard))
    held: list[socket.socket] = []
    try:
        for _ in range(count):
            held.append(socket.create_connection(("127.0.0.1", server.port), timeout=5))
        time.sleep(0.5)  # the server accepts them (and closes those over its limit)
        yield held
    finally:
        for sock in held:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def closed_by_server(held: list[socket.socket]) -> int:
    """How many of ``held`` the server has closed: read to the end of what it sent (its HTTP/2
    settings, and a GOAWAY before it closes), then end of stream or a reset."""
    closed = 0
    for sock in held:
        sock.setblocking(False)
        try:
            while sock.recv(1 << 16):
                pass
            closed += 1
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
    return closed


def health(server: ServeProcess) -> HealthStatus:
    with KernelClient(server.target, timeout=5, retries=0) as client:
        return client.health()


def wait_until_reaped(server: ServeProcess, below: int) -> float:
    """Seconds until the server holds fewer than ``below`` descriptors (the idle sockets closed)."""
    started = time.monotonic()
    while descriptors(server) >= below:
        assert time.monotonic() - started < HANDSHAKE_TIMEOUT_S + 10, descriptors(server)
        time.sleep(0.2)
    return time.monotonic() - started


def test_more_idle_sockets_than_the_lowered_soft_limit_leave_room_for_new_clients() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    hard = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    assert hard >= IDLE + 256, f"the hard open-files limit {hard} is too low for this test"
    with serve_process("--log-level", "INFO", open_files=(LOWERED, hard)) as server:
        baseline = descriptors(server)
        with idle_sockets(server, IDLE) as held:
            # The server raised its soft limit and holds every idle socket, more than it started with.
            assert descriptors(server) >= LOWERED + 100 > baseline + 100
            assert closed_by_server(held) == 0
            # A new client is served at once, long before the idle sockets time out.
            started = time.monotonic()
            assert health(server) is HealthStatus.SERVING
            assert time.monotonic() - started < 3
            waited = wait_until_reaped(server, baseline + 10)
            assert HANDSHAKE_TIMEOUT_S - 3 < waited + 0.5 < HANDSHAKE_TIMEOUT_S + 10
            assert closed_by_server(held) >= IDLE - 10
        assert health(server) is HealthStatus.SERVING
    output = "".join(server.output)
    assert re.search(rf"open-files limit: soft {hard}, hard {hard}", output), output
    assert "Traceback" not in output


def test_a_hard_limit_as_low_keeps_descriptors_free_and_the_connected_clients_served() -> None:
    limit = LOWERED - 256  # settings.connection_limit(): the descriptors less 256 bound it here
    with serve_process("--log-level", "INFO", open_files=(LOWERED, LOWERED)) as server:
        with KernelClient(server.target, timeout=5, retries=0) as connected:
            assert connected.health() is HealthStatus.SERVING
            baseline = descriptors(server)
            with idle_sockets(server, IDLE) as held:
                # Sockets over the connection limit are closed at once: descriptors stay free.
                assert limit <= descriptors(server) < LOWERED - 100
                assert closed_by_server(held) >= IDLE - limit
                # The client connected before the flood goes on.
                assert connected.health() is HealthStatus.SERVING
                wait_until_reaped(server, baseline + 10)
                assert closed_by_server(held) >= IDLE - 10
                assert health(server) is HealthStatus.SERVING
            assert connected.health() is HealthStatus.SERVING
    output = "".join(server.output)
    assert f"open-files limit: soft {LOWERED}, hard {LOWERED}" in output, output
    assert "Traceback" not in output
    assert "Too many open files" not in output
