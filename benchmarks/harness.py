"""Shared pieces of the benchmarks: servers as processes, closed-loop load, statistics.

Every benchmark measures its baseline in the same run on the same machine and
reports ratios; absolute numbers are only context.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
#: Prefix of a client process's answers on its stdout (``ClientProcess``); other lines are ignored.
REPLY = "@@"


def __getattr__(name: str) -> str:
    """``GENERATE`` and ``STREAM``: the method paths, read from the contract when first asked.

    Lazily, because some benchmark processes run where kernelgen's wire package
    cannot be imported (a peer's environment with another protobuf runtime).
    """
    if name in ("GENERATE", "STREAM"):
        from kernelgen_wire.rpc import method_path

        return method_path({"GENERATE": "GenerateKernel", "STREAM": "StreamKernel"}[name])
    raise AttributeError(f"module 'harness' has no attribute {name!r}")


def raw(data: bytes) -> bytes:
    """Pass-through (de)serializer: benchmarks time the transport, not protobuf."""
    return data


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import torch

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def load_generator() -> None:
    """Make this process a load generator that keeps up: glibc malloc tuned as the server's.

    Batched responses arrive together; with glibc's defaults every one of them starts on
    fresh pages, and the client, not the server under test, would set the pace (measured:
    0.9-1.4 ms of client CPU per 1.29 MB kernel instead of 0.5). Idempotent.
    """
    from kernelgen_wire.malloc import tune_malloc

    tune_malloc()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_process(command: list[str], ready: str, timeout: float = 90.0) -> subprocess.Popen[str]:
    """Start ``command``; return once it prints a line matching ``ready``.

    Raises RuntimeError, with what it printed, if it exits or ``timeout`` passes first.
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if re.search(ready, line):
            return proc
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"{command[:4]} not ready in {timeout:g} s:\n{''.join(lines)}")
    proc.wait()
    raise RuntimeError(f"{command[:4]} exited:\n{''.join(lines)}")


@contextmanager
def process(command: list[str], ready: str, timeout: float = 90.0) -> Iterator[subprocess.Popen[str]]:
    """Run ``command`` until a line matching ``ready`` appears; SIGTERM it on exit."""
    proc = start_process(command, ready, timeout)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def serve_command(host: str, port: int, *args: str, metrics_port: int = 0) -> list[str]:
    """``kernelgen serve`` on ``host:port`` with warnings-only logs (metrics off by default)."""
    return [
        sys.executable,
        "-m",
        "kernelgen_client.cli",
        "serve",
        "--host",
        host,
        "--port",
        str(port),
        "--metrics-port",
        str(metrics_port),
        "--log-level",
        "WARNING",
        *args,
    ]


@dataclass(frozen=True)
class ServerProcess:
    """A server under test: where to call it, and how much CPU it has used."""

    target: str
    pid: int

    def cpu_seconds(self) -> float:
        """User + system CPU time so far of all its threads and those of its running children
        (the workers of ``serve --workers N``); Linux ``/proc``, NaN elsewhere."""
        try:
            return sum(cpu_seconds(pid) for pid in process_tree(self.pid))
        except OSError:
            return float("nan")


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants, from /proc."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except OSError:
        children = []
    return [pid, *(p for child in children for p in process_tree(child))]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # Fields 14 and 15 of proc(5), utime and stime, in clock ticks.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def reply(message: dict[str, Any]) -> None:
    """A client process's answer to ``ClientProcess.ask``: one line on stdout."""
    import json

    print(REPLY + json.dumps(message), flush=True)


class ClientProcess:
    """A long-lived load-generating process that takes JSON commands on stdin.

    The process answers each command with one ``reply`` line; anything else it
    prints is kept only to explain a failure. Its CPU is its own, apart from the
    server's and the benchmark's.
    """

    def __init__(self, command: list[str], env: dict[str, str] | None = None, timeout: float = 120.0) -> None:
        self.proc = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
        )
        self.info = self._read(timeout).get("info", {})

    def _read(self, timeout: float) -> dict[str, Any]:
        import json

        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        seen = []
        for line in self.proc.stdout:
            if line.startswith(REPLY):
                answer: dict[str, Any] = json.loads(line[len(REPLY) :])
                return answer
            seen.append(line)
            if time.monotonic() > deadline:
                break
        self.proc.kill()
        raise RuntimeError("client process failed:\n" + "".join(seen[-30:]))

    def ask(self, timeout: float = 300.0, **command: Any) -> dict[str, Any]:
        import json

        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return self._read(timeout)

    def close(self) -> None:
        import contextlib
        import json

        with contextlib.suppress(OSError, ValueError):
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@contextmanager
def kernelgen_server(*args: str) -> Iterator[ServerProcess]:
    """``kernelgen serve`` on a free loopback port."""
    port = free_port()
    with process(serve_command("127.0.0.1", port, *args), r"listening on") as proc:
        yield ServerProcess(f"127.0.0.1:{port}", proc.pid)


@contextmanager
def echo_server(nbytes: int, chunk: int = 1 << 20) -> Iterator[ServerProcess]:
    """The bare gRPC echo baseline: returns ``nbytes`` per call, unary or in chunks."""
    port = free_port()
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "echo_server.py"),
        "--port",
        str(port),
        "--bytes",
        str(nbytes),
        "--chunk",
        str(chunk),
    ]
    with process(command, r"echo listening") as proc:
        yield ServerProcess(f"127.0.0.1:{port}", proc.pid)


@dataclass
class Step:
    """One closed-loop measurement."""

    concurrency: int
    seconds: float
    latencies: list[float] = field(default_factory=list)
    reports: list[Any] = field(default_factory=list)
    errors: int = 0
    nbytes: int = 0
    calls: int = 0  # every call that completed, warm-up and stragglers included (for CPU per call)

    @property
    def count(self) -> int:
        return len(self.latencies)

    @property
    def rate(self) -> float:
        return self.count / self.seconds

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]

    def summary(self) -> dict[str, Any]:
        return {
            "concurrency": self.concurrency,
            "requests": self.count,
            "errors": self.errors,
            "per_s": round(self.rate, 1),
            "MB_per_s": round(self.nbytes / self.seconds / 1e6, 1),
            "p50_ms": round(self.percentile(50) * 1000, 2),
            "p99_ms": round(self.percentile(99) * 1000, 2),
        }


async def closed_loop(
    call: Callable[[], Awaitable[tuple[int, Any]]], concurrency: int, seconds: float, warmup: float = 0.5
) -> Step:
    """Keep ``concurrency`` calls in flight for ``seconds``; ``call`` returns (bytes, report)."""
    step = Step(concurrency, seconds)
    stop_warmup = time.perf_counter() + warmup
    end = stop_warmup + seconds

    async def worker() -> None:
        while True:
            start = time.perf_counter()
            if start >= end:
                return
            try:
                nbytes, report = await call()
            except Exception:
                step.errors += 1
                continue
            done = time.perf_counter()
            step.calls += 1
            if start >= stop_warmup and done <= end:
                step.latencies.append(done - start)
                step.reports.append(report)
                step.nbytes += nbytes

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return step


def merge(steps: list[Step], seconds: float | None = None) -> Step:
    """One step of all the steps' samples (for rates and pooled percentiles).

    ``seconds``: the time they cover; by default their sum (steps run one after
    another), else e.g. one step's length for steps run side by side.
    """
    covered = sum(s.seconds for s in steps) if seconds is None else seconds
    out = Step(steps[0].concurrency, covered)
    for step in steps:
        out.latencies += step.latencies
        out.reports += step.reports
        out.nbytes += step.nbytes
        out.errors += step.errors
        out.calls += step.calls
    return out


def median_rate(fn: Callable[[], object], min_time: float = 1.0, repeats: int = 3) -> float:
    """Calls/s of a synchronous ``fn``: median of ``repeats`` runs of at least ``min_time``."""
    fn()
    rates = []
    for _ in range(repeats):
        calls, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < min_time:
            fn()
            calls += 1
        rates.append(calls / elapsed)
    return statistics.median(rates)


def _number(kind: type[float] | type[int], low: float, inclusive: bool) -> Callable[[str], Any]:
    """An argparse type: a ``kind`` of at least ``low`` (above it unless ``inclusive``), or a clear error."""

    def parse(text: str) -> float | int:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value < low or (value == low and not inclusive):
            raise argparse.ArgumentTypeError(f"{text} must be {'at least' if inclusive else 'above'} {low:g}")
        return value

    return parse


def int_list(text: str) -> list[int]:
    """An argparse type: comma-separated ints (``"1,8,32"``)."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


@dataclass(frozen=True)
class Rounds:
    """How long a benchmark measures: its defaults, and those of ``--quick`` (a smoke run).

    ``warmup`` or ``rounds`` None: the benchmark has no such knob (and no flag for it).
    """

    seconds: float = 5.0
    warmup: float | None = 1.0
    rounds: int | None = 3
    quick_seconds: float = 2.0
    quick_warmup: float = 0.5

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """``--quick``, ``--seconds`` and, where the benchmark has them, ``--warmup`` and ``--rounds``.

        A value given is used as given, 0 included where it means something (no
        warm-up); one that means nothing (0 measured seconds, 0 rounds) is refused.
        ``settle`` fills in those not given.
        """
        rounds = "1 round" if self.rounds is not None else "steps"
        parser.add_argument(
            "--quick", action="store_true", help=f"a smoke run: {rounds} of {self.quick_seconds:g} s per step"
        )
        parser.add_argument(
            "--seconds",
            type=_number(float, 0, inclusive=False),
            default=None,
            help=f"measured seconds per step ({self.seconds:g})",
        )
        if self.warmup is not None:
            parser.add_argument(
                "--warmup",
                type=_number(float, 0, inclusive=True),
                default=None,
                help=f"warm-up seconds per step ({self.warmup:g})",
            )
        if self.rounds is not None:
            parser.add_argument(
                "--rounds",
                type=_number(int, 1, inclusive=True),
                default=None,
                help=f"interleaved rounds ({self.rounds})",
            )

    def settle(self, args: argparse.Namespace) -> None:
        """Each one not given on the command line takes its (quick) default."""
        if args.seconds is None:
            args.seconds = self.quick_seconds if args.quick else self.seconds
        if self.warmup is not None and args.warmup is None:
            args.warmup = self.quick_warmup if args.quick else self.warmup
        if self.rounds is not None and args.rounds is None:
            args.rounds = 1 if args.quick else self.rounds


def benchmark_main(
    run: Callable[[argparse.Namespace], dict[str, Any]],
    report: Callable[[dict[str, Any]], str],
    *,
    doc: str | None,
    output: str,
    rounds: Rounds | None = None,
    arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    roles: dict[str, Callable[[list[str]], None]] | None = None,
) -> None:
    """A benchmark script's ``main()``: its options, one ``run``, the results written.

    ``python bench_x.py ROLE ARGS...`` runs ``roles[ROLE](ARGS)`` instead (the
    script as one of its own client or server processes). Otherwise the options
    are ``rounds``' (``Rounds()`` by default), those ``arguments`` adds, and
    ``--output`` (``results/<output>.json`` and ``.md``); the wall time goes to stderr.
    """
    if roles and len(sys.argv) > 1 and sys.argv[1] in roles:
        roles[sys.argv[1]](sys.argv[2:])
        return
    rounds = rounds or Rounds()
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    rounds.add_arguments(parser)
    if arguments is not None:
        arguments(parser)
    parser.add_argument("--output", default=output, help=f"results/<output>.json and .md ({output})")
    args = parser.parse_args()
    rounds.settle(args)
    started = time.time()
    result = run(args)
    write_results(args.output, result, report(result))
    print(f"({time.time() - started:.0f} s)", file=sys.stderr)


def write_results(name: str, result: dict[str, Any], text: str) -> None:
    """``results/<name>.json`` and ``results/<name>.md``, and the markdown on stdout."""
    import json

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(text)
    print(text)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)
