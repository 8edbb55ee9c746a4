"""Helpers for tests: an in-process server on port 0, `kernelgen serve` as a process, kernel checks."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any


def free_port() -> int:
    """A loopback port free at the time of the call (bound, read, released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@asynccontextmanager
async def run_server(**overrides: Any) -> AsyncIterator[Any]:
    """A started in-process ``Server`` on 127.0.0.1 and a free port; drained on exit."""
    from kernelgen_server.settings import load_settings
    from kernelgen_server.transport.server import create_server

    settings = load_settings({"host": "127.0.0.1", "port": 0, "metrics_port": 0, **overrides})
    server, _port = create_server(settings)
    await server.start()
    try:
        yield server
    finally:
        await server.stop(grace=1.0)


@dataclass
class ServeProcess:
    """A ``kernelgen serve`` child process and the port it printed."""

    proc: subprocess.Popen[str]
    port: int
    host: str
    output: list[str] = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait for the exit code."""
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(timeout=timeout)


#: Runs argv[2:] with the open-files limit set to argv[1] ("soft:hard"): set in the child before
#: it execs, so the server starts with it (a preexec_fn is not safe with the test's threads).
_WITH_OPEN_FILES = (
    "import os, resource, sys; soft, hard = map(int, sys.argv[1].split(':')); "
    "resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)); os.execv(sys.executable, sys.argv[2:])"
)


@contextmanager
def serve_process(
    *args: str,
    host: str = "127.0.0.1",
    env: dict[str, str] | None = None,
    timeout: float = 60.0,
    open_files: tuple[int, int] | None = None,
) -> Iterator[ServeProcess]:
    """Start ``kernelgen serve --host HOST --port 0 ARGS`` and wait until it prints its port.

    ``open_files``: the (soft, hard) open-files limit the process starts with.
    """
    launcher = []
    if open_files is not None:
        launcher = [sys.executable, "-c", _WITH_OPEN_FILES, "{}:{}".format(*open_files)]
    command = [
        *launcher,
        sys.executable,
        "-m",
        "kernelgen_client.cli",
        "serve",
        "--host",
        host,
        "--port",
        "0",
        "--metrics-port",
        "0",
        *args,
    ]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env
    )
    lines: list[str] = []
    found = threading.Event()
    port: list[int] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            match = re.search(r"listening on grpcs?://[^\s]+:(\d+)", line)
            if match and not port:
                port.append(int(match.group(1)))
                found.set()
        found.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not found.wait(0.1):
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError("kernelgen serve did not start:\n" + "".join(lines))
    if not port:
        proc.wait(timeout=10)
        raise RuntimeError(f"kernelgen serve exited with {proc.returncode}:\n" + "".join(lines))
    handle = ServeProcess(proc, port[0], host, lines)
    try:
        yield handle
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


async def generate(stub: Any, request: Any, **kwargs: Any) -> tuple[Any, Any]:
    """A GenerateKernel call through a raw aio stub: (response, ServerReport from the trailer)."""
    from kernelgen_wire.metadata import REPORT_TRAILER
    from kernelgen_wire.v1 import kernelgen_pb2 as pb

    call = stub.GenerateKernel(request, **kwargs)
    reply = await call
    trailers = dict(await call.trailing_metadata() or ())
    return reply, pb.ServerReport.FromString(trailers[REPORT_TRAILER])


def assert_same_kernel(got: Any, want: Any, *, bitwise: bool) -> None:
    """Bitwise equal where the computation is batch-invariant (per-row GEMMs on CPU), else
    equal to float32 rounding: max abs difference <= 1e-5 x max |kernel|."""
    import numpy as np

    got, want = np.asarray(got, dtype=np.float32), np.asarray(want, dtype=np.float32)
    assert got.shape == want.shape
    if bitwise:
        np.testing.assert_array_equal(got, want)
    else:
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def kernel_service(repository: Any, **settings: Any) -> Any:
    """A ``KernelService`` (the core, no gRPC) over ``repository``; metrics port off."""
    from kernelgen_server.core.service import KernelService
    from kernelgen_server.settings import load_settings

    return KernelService(repository, load_settings({"metrics_port": 0, **settings}))


@contextmanager
def threaded_server(**settings: Any) -> Iterator[Any]:
    """``run_server`` on a thread of its own, so a blocking client can call it from a test."""
    loop = asyncio.new_event_loop()
    started: concurrent.futures.Future[tuple[Any, asyncio.Event]] = concurrent.futures.Future()

    async def serve() -> None:
        stop = asyncio.Event()
        async with run_server(**settings) as server:
            started.set_result((server, stop))
            await stop.wait()

    def main() -> None:
        try:
            loop.run_until_complete(serve())
        except BaseException as exc:
            if not started.done():
                started.set_exception(exc)
        finally:
            loop.close()

    thread = threading.Thread(target=main, name="kernelgen-test-server", daemon=True)
    thread.start()
    server, stop = started.result(timeout=60)
    try:
        yield server
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=30)
