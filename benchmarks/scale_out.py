"""Scale-out check: three replicas behind one round-robin target, one killed and restarted.

    python benchmarks/scale_out.py [--duration 30] [--concurrency 16]

Starts ``kernelgen serve`` on 127.0.0.1, 127.0.0.2 and 127.0.0.3 (same port),
runs ``kernelgen loadtest`` against all three as one client target, SIGKILLs
the second replica a quarter of the way in and restarts it at three eighths. Reports
requests sent, succeeded and failed by status code, sampled correctness, the
calls each replica served, and the throughput of three replicas against one
under the same load. On a 2-core machine the replicas share the same cores as
the client, so the throughput ratio measures overhead, not speed-up.
Writes benchmarks/results/scale_out.json and scale_out.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from harness import serve_command, start_process, write_results

HOSTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")


def _free_port() -> int:
    """A port free on every replica address (checked by binding each)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((HOSTS[0], 0))
            port = int(probe.getsockname()[1])
        try:
            for host in HOSTS[1:]:
                with socket.socket() as other:
                    other.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no port free on all replica addresses")


class Replica:
    """One ``kernelgen serve`` process on a fixed address, restartable."""

    def __init__(self, host: str, port: int, metrics_port: int) -> None:
        self.host, self.port, self.metrics_port = host, port, metrics_port
        self.proc: subprocess.Popen[str] | None = None

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 60.0) -> None:
        command = serve_command(self.host, self.port, metrics_port=self.metrics_port)
        self.proc = start_process(command, r"listening on", timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(timeout=60)

    def served(self) -> int:
        """GenerateKernel calls this process answered OK (since its last start)."""
        url = f"http://{self.host}:{self.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        total = 0.0
        for labels, value in re.findall(r"^kernelgen_requests_total\{([^}]*)\} (\S+)$", text, re.MULTILINE):
            fields = dict(re.findall(r'(\w+)="([^"]*)"', labels))
            if fields.get("code") == "OK" and fields.get("method") in ("GenerateKernel", "StreamKernel"):
                total += float(value)
        return int(total)


def _loadtest(target: str, duration: float, concurrency: int, out: Path, check: int) -> subprocess.Popen[str]:
    workload = ["hyena-2d", "--seq-lens", "15,15", "--rows", "1-2", "--unconditioned", "0.2"]
    load = ["--concurrency", str(concurrency), "--duration", str(duration)]
    load += ["--warmup", "1", "--timeout", "10"]
    checks = ["--check-correctness", str(check)] if check else []
    command = [sys.executable, "-m", "kernelgen_client.cli", "loadtest", "--target", target,
               *workload, *load, *checks, "--json", str(out), "--quiet"]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _step(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    steps = data["steps"] if isinstance(data, dict) else data
    step: dict[str, Any] = steps[0]
    return step


def scale_out(duration: float = 30.0, concurrency: int = 16, check: int = 64) -> dict[str, Any]:
    """Run the scenario; returns the figures (see the module docstring)."""
    port = _free_port()
    replicas = [Replica(host, port, _free_port()) for host in HOSTS]
    target = ",".join(r.target for r in replicas)
    events: list[str] = []
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        for replica in replicas:
            replica.start()
            stack.callback(replica.stop)
        out = Path(tmp) / "three.json"
        started = time.monotonic()
        load = _loadtest(target, duration, concurrency, out, check)
        time.sleep(1.0 + duration / 4)  # warm-up, then a quarter of the run
        replicas[1].kill()
        events.append(f"{time.monotonic() - started:.1f} s: SIGKILL {replicas[1].target}")
        time.sleep(max(0.0, 1.0 + 3 * duration / 8 - (time.monotonic() - started)))
        replicas[1].start()
        events.append(f"{time.monotonic() - started:.1f} s: restarted {replicas[1].target}")
        log, _ = load.communicate(timeout=duration + 120)
        if not out.exists():
            raise RuntimeError(f"the load test wrote no result:\n{log}")
        three = _step(out)
        served = {r.target: r.served() for r in replicas}
        exit_codes = {r.target: r.stop() for r in replicas}
        stack.pop_all()

        single = Replica(HOSTS[0], _free_port(), _free_port())
        single.start()
        try:
            one_out = Path(tmp) / "one.json"
            one = _loadtest(single.target, duration, concurrency, one_out, 0)
            one_log, _ = one.communicate(timeout=duration + 120)
            if not one_out.exists():
                raise RuntimeError(f"the single-replica load test wrote no result:\n{one_log}")
            one_step = _step(one_out)
        finally:
            single.stop()

    errors: dict[str, int] = three["errors"]
    correctness = three.get("correctness") or {}
    return {
        "duration_s": duration,
        "concurrency": concurrency,
        "events": events,
        "sent": three["sent"],
        "ok": three["ok"],
        "errors_by_code": errors,
        "counts_add_up": three["sent"] == three["ok"] + sum(errors.values()),
        "only_unavailable_errors": set(errors) <= {"UNAVAILABLE"},
        "correctness": correctness,
        "served_by_replica_since_last_start": served,
        "replica_exit_codes_on_sigterm": exit_codes,
        "three_replicas_per_s": three["requests_per_s"],
        "one_replica_per_s": one_step["requests_per_s"],
        "three_over_one": three["requests_per_s"] / one_step["requests_per_s"],
        "loadtest_log_tail": log.splitlines()[-5:],
    }


def report(result: dict[str, Any], machine: str) -> str:
    rows = [
        ("requests sent", result["sent"]),
        ("succeeded", result["ok"]),
        ("failed, by status code", result["errors_by_code"] or "none"),
        ("sent = succeeded + failed", result["counts_add_up"]),
        (
            "failures only UNAVAILABLE (the killed replica's calls in flight)",
            result["only_unavailable_errors"],
        ),
        (
            "sampled responses recomputed in-process / mismatches",
            f"{result['correctness'].get('checked', 0)} / {result['correctness'].get('mismatches', 'n/a')}",
        ),
        (
            "OK calls per replica (the restarted one counts since its restart)",
            result["served_by_replica_since_last_start"],
        ),
        ("exit codes on SIGTERM at the end", result["replica_exit_codes_on_sigterm"]),
        ("requests/s, 3 replicas", f"{result['three_replicas_per_s']:.1f}"),
        ("requests/s, 1 replica, same load", f"{result['one_replica_per_s']:.1f}"),
        ("3 replicas / 1", f"{result['three_over_one']:.2f}"),
    ]
    table = "\n".join(["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]])
    parts = [
        "# Scale-out: three replicas, one killed and restarted",
        f"Machine: {machine}. Load: `kernelgen loadtest` on hyena-2d (15x15, 1-2 FiLM rows, 20 % "
        f"unconditioned), closed loop at concurrency {result['concurrency']} "
        f"for {result['duration_s']:.0f} s, round robin over 127.0.0.1-3. Calls are not retried by "
        "the load tester: every failure is counted.",
        "Events: " + "; ".join(result["events"]) + ".",
        table,
        "On this 2-core machine the replicas and the client share the same two cores, so 3 vs 1 says "
        "nothing about adding devices: it measures the cost (or, when one replica's event-loop thread "
        "is the limit, the gain) of spreading the same CPU over more processes.",
    ]
    return "\n\n".join(parts) + "\n"


def main() -> None:
    import platform

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=30.0, help="measured seconds of the load test")
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    result = scale_out(args.duration, args.concurrency)
    machine = f"{platform.platform()}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M %Z')}"
    write_results("scale_out", {"machine": machine, **result}, report(result, machine))


if __name__ == "__main__":
    main()
