"""Where steps run: in this process (``LocalDriver``) or fanned out over processes (``PoolDriver``).

One asyncio client process tops out at about one core of Python; ``--workers N``
runs N such processes, each with its own channel and its share of the step
(users, rate, requests), all starting together. They send back their raw
``Samples``, which merge exactly (percentiles are computed on the union, never
averaged). Live counters travel through shared memory, read by the display.

Client processes are spawned, not forked: a forked gRPC runtime is not safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import signal
import time
import traceback
from collections.abc import Callable, Mapping
from multiprocessing.connection import Connection, wait
from typing import Any, Protocol, cast

from kernelgen_loadtest.runner import Progress, StepPlan, StepRunner
from kernelgen_loadtest.stats import Samples
from kernelgen_loadtest.workload import ResolvedWorkload

__all__ = ["Driver", "LocalDriver", "PoolDriver", "Tick", "open_driver"]

#: Counters as the display reads them: sent, ok, errors, dropped, in flight.
Counts = tuple[int, int, int, int, int]
Tick = Callable[[Counts], None]
TICK_S = 0.25
_FIELDS = 5
#: Seconds between handing out a step and its start, so every client process starts together.
_START_DELAY_S = 0.1


class Driver(Protocol):
    processes: int

    def run_step(self, plan: StepPlan, tick: Tick) -> Samples: ...

    def close(self) -> None: ...


async def _client(kwargs: Mapping[str, Any]) -> Any:
    from kernelgen_client import AsyncKernelClient, RetryPolicy, tune_malloc

    # Batched responses arrive together: with glibc's defaults each would start on fresh
    # pages, and this process, not the server, would set the pace.
    tune_malloc()

    options = dict(kwargs)
    attempts = int(options.pop("retries", 1))
    if options.pop("protocol", "native") == "oip":
        from kernelgen_loadtest.oip import OipClient

        return OipClient(**options)
    # By default no retries: the tester counts every failure as the server answered it.
    retries = RetryPolicy(max_attempts=attempts) if attempts > 1 else None
    return AsyncKernelClient(**options, retries=retries)


class LocalDriver:
    """Steps on one event loop and one client in this process."""

    processes = 1

    def __init__(self, client_kwargs: Mapping[str, Any], resolved: ResolvedWorkload) -> None:
        self._loop = asyncio.Runner()
        self._client = self._loop.run(_client(client_kwargs))
        self._runner = StepRunner(self._client, resolved)

    def run_step(self, plan: StepPlan, tick: Tick) -> Samples:
        return self._loop.run(self._run(plan, tick))

    async def _run(self, plan: StepPlan, tick: Tick) -> Samples:
        progress = Progress()
        task = asyncio.create_task(self._runner.run(plan, progress))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=TICK_S)
                tick(progress.snapshot())
                if done:
                    return task.result()
        finally:
            task.cancel()

    def close(self) -> None:
        try:
            self._loop.run(self._client.close())
        finally:
            self._loop.close()


class PoolDriver:
    """Steps split over ``processes`` spawned client processes."""

    def __init__(self, processes: int, client_kwargs: Mapping[str, Any], resolved: ResolvedWorkload) -> None:
        context = multiprocessing.get_context("spawn")
        self.processes = processes
        #: A step is out with the processes: closing then stops them at once (Ctrl-C).
        self._busy = False
        self._counters = context.Array("q", processes * _FIELDS, lock=False)
        self._conns: list[Connection] = []
        self._procs: list[Any] = []
        try:
            for index in range(processes):
                parent, child = context.Pipe()
                proc = context.Process(
                    target=_process_main,
                    args=(index, child, dict(client_kwargs), resolved, self._counters),
                    name=f"kernelgen-loadtest-{index}",
                    daemon=True,
                )
                proc.start()
                child.close()
                self._conns.append(parent)
                self._procs.append(proc)
            for index in range(processes):
                self._receive(index, timeout=120.0)  # ("ready",)
        except BaseException:
            self.close()
            raise

    def _receive(self, index: int, timeout: float) -> Any:
        conn, proc = self._conns[index], self._procs[index]
        deadline = time.monotonic() + timeout
        while not conn.poll(0.1):
            if not proc.is_alive():
                raise RuntimeError(f"load test process {index} exited with code {proc.exitcode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"load test process {index} did not answer within {timeout:g} s")
        message = conn.recv()
        if message[0] == "error":
            raise RuntimeError(f"load test process {index} failed:\n{message[1]}")
        return message

    def run_step(self, plan: StepPlan, tick: Tick) -> Samples:
        start_at = time.time() + _START_DELAY_S
        self._busy = True
        pending: dict[Connection, int] = {}  # connection -> process index
        for index, conn in enumerate(self._conns):
            share = plan.share(index, self.processes)
            if share is not None:  # a process with no user or request sits this step out
                self._counters[index * _FIELDS : (index + 1) * _FIELDS] = [0] * _FIELDS
                conn.send(("step", share, start_at))
                pending[conn] = index
        merged = Samples()
        while pending:
            for ready in wait(list(pending), timeout=TICK_S):
                index = pending.pop(cast(Connection, ready))
                merged.merge(self._receive(index, timeout=0.0)[1])
            for index in pending.values():
                if not self._procs[index].is_alive():
                    raise RuntimeError(
                        f"load test process {index} exited with code {self._procs[index].exitcode}"
                    )
            tick(self._counts())
        tick(self._counts())
        self._busy = False
        return merged

    def _counts(self) -> Counts:
        c = self._counters
        s, o, e, d, i = (sum(c[w * _FIELDS + k] for w in range(self.processes)) for k in range(_FIELDS))
        return s, o, e, d, i

    def close(self) -> None:
        if self._busy:  # interrupted mid-step: the processes would only finish a step nobody reads
            for proc in self._procs:
                proc.terminate()
        for conn in self._conns:
            with contextlib.suppress(OSError, ValueError):  # the process may be gone already
                conn.send(None)
        for proc in self._procs:
            proc.join(timeout=10.0)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5.0)
        for conn in self._conns:
            conn.close()


def open_driver(processes: int, client_kwargs: Mapping[str, Any], resolved: ResolvedWorkload) -> Driver:
    if processes <= 1:
        return LocalDriver(client_kwargs, resolved)
    return PoolDriver(processes, client_kwargs, resolved)


# --- inside a client process -----------------------------------------------------------------------
def _process_main(
    index: int, conn: Connection, client_kwargs: dict[str, Any], resolved: ResolvedWorkload, counters: Any
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops us
    try:
        with asyncio.Runner() as loop:
            client = loop.run(_client(client_kwargs))
            runner = StepRunner(client, resolved, process=index)
            conn.send(("ready",))
            while (message := conn.recv()) is not None:
                _, plan, start_at = message
                samples = loop.run(_process_step(runner, plan, start_at, counters, index))
                conn.send(("done", samples))
            loop.run(client.close())
    except (EOFError, BrokenPipeError):
        pass  # the parent went away
    except BaseException:
        conn.send(("error", traceback.format_exc()))


async def _process_step(
    runner: StepRunner, plan: StepPlan, start_at: float, counters: Any, index: int
) -> Samples:
    delay = start_at - time.time()
    if delay > 0:
        await asyncio.sleep(delay)
    progress = Progress()
    task = asyncio.create_task(runner.run(plan, progress))
    base = index * _FIELDS
    while True:
        done, _ = await asyncio.wait({task}, timeout=TICK_S)
        counters[base : base + _FIELDS] = list(progress.snapshot())
        if done:
            return task.result()
