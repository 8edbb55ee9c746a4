"""``kernelgen serve --workers N``: N server processes behind one port.

One server process tops out near one core: its event loop, gRPC's Python layer
and the encoding share one interpreter lock. A host with many cores (every GPU
host) therefore runs several, as Triton runs model instances and Ray Serve
replicas. The supervisor is the process ``kernelgen serve`` starts; it imports
no torch, holds no device and answers no call:

- it reserves the port (refusing one that anything else holds, and resolving
  0 to a free one) and starts N workers, each a whole server (device context,
  batcher, cache) bound to that port with SO_REUSEPORT, so that Linux spreads
  incoming *connections* over them;
- it prints the listening line once every worker reports SERVING, and serves
  the workers' summed metrics on ``--metrics-port`` (prometheus_client's
  multiprocess mode) together with its own (workers serving, restarts);
- a worker that exits while the server runs is restarted under its index;
  more than ``restart_limit`` exits within ``restart_window_s`` stop the
  server instead (a worker that cannot stay up would only loop);
- SIGTERM or SIGINT drains every worker (each finishes its calls within
  ``grace_s``) and the supervisor exits once all have.

Invariants: a worker never outlives its supervisor (it drains when the
supervisor's end of its stdin closes, however the supervisor ended); the
reserved port stays held until the supervisor exits, so a restarted worker
always gets it back.

A worker is ``python -m kernelgen_server.ops.supervisor``: it reads its index and its settings
as one JSON line on stdin, writes ``READY <index>`` to stdout once SERVING (or, when it cannot
start, ``FAILED <index> <exit code> <message as JSON>``, which the supervisor reports once
and exits with), and drains when its stdin, which the supervisor holds open, reaches
end-of-file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from kernelgen_server.settings import ServerSettings
from kernelgen_server.transport.ports import listen_error

__all__ = ["Supervisor", "WorkerExit", "reserve_port", "supervise"]

log = logging.getLogger("kernelgen.supervisor")

READY = "READY"
FAILED = "FAILED"
#: Seconds a draining worker gets beyond ``grace_s`` before it is killed.
_STOP_MARGIN_S = 15.0


class WorkerExit(RuntimeError):
    """A worker exited before it was SERVING, or exited too often to keep restarting.

    ``exit_code`` is what ``kernelgen serve`` exits with: the worker's own for a start-up
    failure it explained (no model, a bad model under ``--strict``), else 1.
    """

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` with SO_REUSEPORT, not listening: it holds the port.

    Refuses a port that any other socket holds, even one of another group of
    SO_REUSEPORT sockets (a second supervisor started by mistake), by binding
    once without SO_REUSEPORT first. Port 0 picks a free port; read it from
    ``getsockname()``. Not listening, the socket is never handed a connection.
    """
    name = host.strip("[]")
    family, kind, proto, _, address = socket.getaddrinfo(
        name, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    if port != 0:
        with socket.socket(family, kind, proto) as probe:
            # As a lone server binds (gRPC sets SO_REUSEADDR): connections of an earlier
            # server still in TIME_WAIT do not count as holding the port.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                raise listen_error(exc, host, port, setting="port", host_setting="host") from None
    sock = socket.socket(family, kind, proto)
    try:
        # SO_REUSEPORT only: the workers (same user, SO_REUSEPORT) may join it, while any
        # socket without SO_REUSEPORT conflicts with it, SO_REUSEADDR or not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise listen_error(exc, host, port, setting="port", host_setting="host") from None
    return sock


def worker_command() -> list[str]:
    return [sys.executable, "-m", "kernelgen_server.ops.supervisor"]


@dataclass
class _Worker:
    index: int
    process: asyncio.subprocess.Process | None = None
    #: Between its READY line and its exit.
    serving: bool = False
    #: Monotonic times of this worker's unexpected exits.
    exits: list[float] = field(default_factory=list)

    @property
    def running(self) -> asyncio.subprocess.Process | None:
        """Its process while that has not exited, else None."""
        return self.process if self.process is not None and self.process.returncode is None else None


class Supervisor:
    """Starts, watches, restarts and drains the worker processes of one server."""

    def __init__(
        self,
        settings: ServerSettings,
        *,
        command: Callable[[], list[str]] = worker_command,
        restart_limit: int = 5,
        restart_window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.port = settings.port
        #: The port of the workers' summed /metrics once served (None: off, or not yet).
        self.metrics_port: int | None = None
        self.restarts = 0
        self._command = command
        self._restart_limit = restart_limit
        self._restart_window_s = restart_window_s
        self._clock = clock
        self._workers = [_Worker(i) for i in range(settings.workers)]
        self._metrics_dir: str | None = None
        self._forwarders: set[asyncio.Future[None]] = set()

    # --- what the metrics collector reads ---------------------------------------------------
    @property
    def live_workers(self) -> int:
        """Workers running, serving or starting."""
        return sum(1 for w in self._workers if w.running)

    @property
    def serving_workers(self) -> int:
        return sum(1 for w in self._workers if w.serving and w.running)

    @property
    def pids(self) -> list[int]:
        """Worker pids by index (0 for one not running)."""
        return [p.pid if (p := w.running) else 0 for w in self._workers]

    # --- life cycle -------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event, on_ready: Callable[[int], None] | None = None) -> int:
        """Serve until ``stop`` is set, then drain; returns the exit code.

        Raises OSError when the port cannot be had and WorkerExit when a worker fails
        to start or keeps exiting. ``on_ready(port)`` runs once every worker is SERVING.
        """
        if not sys.platform.startswith("linux"):
            raise OSError("--workers above 1 needs Linux, whose SO_REUSEPORT spreads connections")
        with contextlib.ExitStack() as resources:
            reservation = resources.enter_context(reserve_port(self.settings.host, self.settings.port))
            self.port = int(reservation.getsockname()[1])
            if self.settings.metrics_port:
                self._metrics_dir = tempfile.mkdtemp(prefix="kernelgen-metrics-")
                resources.callback(shutil.rmtree, self._metrics_dir, ignore_errors=True)
                resources.enter_context(self._serve_metrics())
            try:
                if not await self._start_all(stop):
                    log.info("stopped while the workers were starting")
                    return 0
                log.info("%d workers serving on port %d", len(self._workers), self.port)
                if on_ready is not None:
                    on_ready(self.port)
                await self._watch(stop)
            finally:
                await self._stop_all()
        return 0

    async def _start_all(self, stop: asyncio.Event) -> bool:
        """Start every worker; False if ``stop`` came first (a model warm-up can take minutes).

        The first worker to fail before SERVING fails the start.
        """
        starts = [asyncio.ensure_future(self._start(w)) for w in self._workers]
        stopping = asyncio.ensure_future(stop.wait())
        try:
            pending: set[asyncio.Future[Any]] = set(starts)
            while pending:
                done, waiting = await asyncio.wait({*pending, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if stopping in done:
                    return False
                for task in done:
                    task.result()
                pending = waiting - {stopping}
            return True
        finally:
            stopping.cancel()
            for task in starts:
                task.cancel()

    async def _start(self, worker: _Worker) -> None:
        """Start ``worker`` and wait until it is SERVING; WorkerExit if it exits first."""
        env = dict(os.environ)
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        if self._metrics_dir is not None:
            env["PROMETHEUS_MULTIPROC_DIR"] = self._metrics_dir
        process = await asyncio.create_subprocess_exec(
            *self._command(),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
        )
        worker.process, worker.serving = process, False
        assert process.stdin is not None
        assert process.stdout is not None
        # stdin stays open: the worker drains when it reads end-of-file (this process is gone).
        process.stdin.write(self._handshake(worker.index).encode() + b"\n")
        with contextlib.suppress(ConnectionError):  # it died at once: its exit code says why, below
            await process.stdin.drain()
        log.info("worker %d started (pid %d)", worker.index, process.pid)
        while True:
            line = await process.stdout.readline()
            if not line:
                code = await process.wait()
                raise WorkerExit(f"worker {worker.index} exited with code {code} before serving")
            text = line.decode(errors="replace")
            if text.split() == [READY, str(worker.index)]:
                worker.serving = True
                break
            if text.startswith(f"{FAILED} {worker.index} "):
                _, _, status, message = text.split(" ", 3)
                await process.wait()
                raise WorkerExit(json.loads(message), exit_code=int(status))
            sys.stdout.write(text)  # a worker's own output, passed on
        # Keep reading: a worker that prints must never block on a full pipe.
        forward = asyncio.ensure_future(_forward(process.stdout))
        self._forwarders.add(forward)
        forward.add_done_callback(self._forwarders.discard)

    def _handshake(self, index: int) -> str:
        settings = self.settings.model_copy(
            update={
                "port": self.port,
                "metrics_port": 0,  # the supervisor serves every worker's metrics
                "cpu_threads": self.settings.torch_threads(),
                "config": None,  # already applied: the copy holds every value
            }
        )
        return json.dumps({"index": index, "settings": settings.model_dump(mode="json")})

    async def _watch(self, stop: asyncio.Event) -> None:
        """Until ``stop``: restart each worker that exits; WorkerExit past the restart limit.

        A restart runs beside the watch, so a stop or another exit is seen at once.
        """
        stopping = asyncio.ensure_future(stop.wait())
        exits: dict[asyncio.Future[int], _Worker] = {}
        restarts: dict[asyncio.Future[None], _Worker] = {}

        def watch_exit(worker: _Worker) -> None:
            assert worker.process is not None
            exits[asyncio.ensure_future(worker.process.wait())] = worker

        for worker in self._workers:
            watch_exit(worker)
        try:
            while True:
                waiting: set[asyncio.Future[Any]] = {stopping, *exits, *restarts}
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if stopping in done:
                    return
                for task in done:
                    if task in exits:
                        worker = exits.pop(task)
                        restarts[asyncio.ensure_future(self._restart(worker, task.result()))] = worker
                    else:
                        worker = restarts.pop(task)
                        task.result()  # WorkerExit: it could not be restarted
                        watch_exit(worker)
        finally:
            watches: list[asyncio.Future[Any]] = [stopping, *exits, *restarts]
            for watch in watches:
                watch.cancel()

    async def _restart(self, worker: _Worker, code: int) -> None:
        assert worker.process is not None
        self._mark_dead(worker.process.pid)
        now = self._clock()
        worker.exits = [t for t in worker.exits if now - t < self._restart_window_s] + [now]
        if len(worker.exits) > self._restart_limit:
            raise WorkerExit(
                f"worker {worker.index} exited {len(worker.exits)} times within "
                f"{self._restart_window_s:.0f} s (last code {code}); stopping the server"
            )
        log.warning(
            "worker %d (pid %d) exited with code %d; restarting it", worker.index, worker.process.pid, code
        )
        self.restarts += 1
        await self._start(worker)

    async def _stop_all(self) -> None:
        """SIGTERM every running worker, wait for their drain, then kill what is left."""
        running = [p for w in self._workers if (p := w.running)]
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        if not running:
            return
        waits = [asyncio.ensure_future(p.wait()) for p in running]
        _, late = await asyncio.wait(waits, timeout=self.settings.grace_s + _STOP_MARGIN_S)
        for process in running:
            if process.returncode is None:
                log.error("worker pid %d did not drain in time; killing it", process.pid)
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
        if late:
            await asyncio.wait(late)
        for process in running:
            self._mark_dead(process.pid)

    # --- metrics ------------------------------------------------------------------------------
    def _mark_dead(self, pid: int) -> None:
        """Drop a gone worker's live gauges; its counters stay in the sums."""
        if self._metrics_dir is not None:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid, self._metrics_dir)  # type: ignore[no-untyped-call]

    @contextlib.contextmanager
    def _serve_metrics(self) -> Iterator[None]:
        from prometheus_client import CollectorRegistry, multiprocess

        from kernelgen_server.transport.metrics_http import serve_metrics
        from kernelgen_server.transport.security import load_tokens

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self._metrics_dir)  # type: ignore[no-untyped-call]
        registry.register(_SupervisorCollector(self))
        settings = self.settings
        tokens = load_tokens(settings.auth_token_file) if settings.auth_token_file is not None else None
        tls = (settings.tls_cert, settings.tls_key) if settings.tls_cert and settings.tls_key else None
        endpoint = serve_metrics(
            registry, settings.metrics_address(), settings.metrics_port, tokens=tokens, tls=tls
        )
        self.metrics_port = endpoint.port
        try:
            yield
        finally:
            endpoint.close()


async def supervise(settings: ServerSettings) -> int:
    """``kernelgen serve --workers N``: run a Supervisor until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    supervisor = Supervisor(settings)

    def ready(port: int) -> None:
        print(f"kernelgen: listening on {settings.url(port)} ({settings.workers} workers)", flush=True)
        if supervisor.metrics_port:
            log.info("metrics of every worker on %s", settings.metrics_url(supervisor.metrics_port))

    return await supervisor.run(stop, on_ready=ready)


class _SupervisorCollector:
    """The supervisor's own metrics, read at scrape time (never from multiprocess files)."""

    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self._supervisor
        yield GaugeMetricFamily("kernelgen_workers", "Worker processes serving.", value=s.serving_workers)
        yield CounterMetricFamily(
            "kernelgen_worker_restarts", "Workers restarted after exiting unexpectedly.", value=s.restarts
        )


async def _forward(stream: asyncio.StreamReader) -> None:
    while line := await stream.readline():
        sys.stdout.write(line.decode(errors="replace"))
        sys.stdout.flush()


# --- the worker side ---------------------------------------------------------------------------
async def _watch_supervisor(stop: asyncio.Event) -> None:
    """Set ``stop`` when stdin, the pipe the supervisor holds open, reaches end-of-file."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while await reader.read(4096):
        pass
    if not stop.is_set():
        log.warning("the supervisor is gone; draining")
        stop.set()


async def _worker_main(handshake: dict[str, Any]) -> int:
    from kernelgen_server.transport.server import serve  # torch loads here, in the worker only

    index = int(handshake["index"])
    settings = ServerSettings.model_validate(handshake["settings"])
    stop = asyncio.Event()
    watcher = asyncio.create_task(_watch_supervisor(stop))

    def ready(port: int) -> None:
        print(f"{READY} {index}", flush=True)

    try:
        return await serve(settings, worker=index, reuse_port=True, stop=stop, on_ready=ready)
    finally:
        watcher.cancel()


def main() -> int:
    """Entry point of a worker process (``python -m kernelgen_server.ops.supervisor``)."""
    handshake = json.loads(sys.stdin.readline())
    settings = handshake["settings"]
    logging.basicConfig(
        level=settings.get("log_level", "INFO"),
        format=f"%(asctime)s %(levelname)s %(name)s[worker {handshake['index']}]: %(message)s",
    )
    from kernelgen_server.transport.server import ModelsFailedError

    try:
        return asyncio.run(_worker_main(handshake))
    except (ModelsFailedError, OSError, RuntimeError) as exc:
        # Said once, by the supervisor, which stops the other workers: not N times on stderr.
        print(f"{FAILED} {handshake['index']} 1 {json.dumps(str(exc))}", flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
