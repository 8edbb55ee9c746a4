"""Scale-out check: three replicas, one SIGKILLed and one drained (SIGTERM) under load, both restarted.

    python benchmarks/scale_out.py [--duration 30] [--concurrency 16]

Starts ``kernelgen serve`` on 127.0.0.1, 127.0.0.2 and 127.0.0.3 (same port) and drives them with
``kernelgen loadtest`` in three runs: through Envoy (``scripts/render_envoy.py``: health checks,
retries on another replica, cache-key affinity) with the client's retry policy on, as an
application runs it; through Envoy with the client's retries off, to show what Envoy alone
covers; and through the client's own round robin over the three addresses, retries on. In each run
the second replica is SIGKILLed at a tenth of the run and started again at three twentieths; the
third is sent SIGTERM at two fifths (it drains: NOT_SERVING, new calls refused, calls in flight
answered) and started again once it has exited. Reports, per run: calls sent, answered and failed by
status code, sampled responses recomputed against the reference model, and what proves each
restarted replica back in rotation (the calls it answered since its restart, and Envoy's own
count of calls sent to it since then). Writes benchmarks/results/scale_out.json and scale_out.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from envoy_front import HOSTS, EnvoyFront, Replica, free_port_on
from harness import write_results

#: The load: hyena-2d FiLM rows (batched) and unconditioned grids (cached, keyed), and
#: long-1d's 4 MB kernels, which are streamed: a replica that dies mid-stream cuts the response.
WORKLOAD = ["-m", "hyena-2d:6", "-m", "long-1d:1", "--seq-lens", "15,15", "--seq-lens", "11,11",
            "--seq-lens", "2000", "--rows", "1-2", "--unconditioned", "0.3"]  # fmt: skip
#: The runs: (name, through Envoy, the client's attempts per call).
RUNS = (("envoy", True, 5), ("envoy, client retries off", True, 1), ("client round robin", False, 5))


def _loadtest(target: str, duration: float, concurrency: int, retries: int, out: Path, check: int,
              log: Path) -> subprocess.Popen[bytes]:  # fmt: skip
    command = [sys.executable, "-m", "kernelgen_client.cli", "loadtest", "--target", target, *WORKLOAD,
               "--concurrency", str(concurrency), "--duration", str(duration), "--warmup", "1",
               "--timeout", "30", "--retries", str(retries), "--json", str(out), "--quiet",
               "--max-error-rate", "1"]  # fmt: skip
    if check:
        command += ["--check-correctness", str(check)]
    with log.open("wb") as sink:
        return subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env={**os.environ})


def _sent_to(front: EnvoyFront | None, target: str) -> int:
    """Calls Envoy has sent to ``target`` (all its clusters; 0 without Envoy)."""
    if front is None:
        return 0
    return sum(hosts.get(target, {}).get("rq_total", 0) for hosts in front.hosts().values())


def run(
    name: str,
    through_envoy: bool,
    retries: int,
    logs: Path,
    duration: float = 30.0,
    concurrency: int = 16,
    check: int = 64,
) -> dict[str, Any]:
    """One run of the scenario (see the module docstring); its figures."""
    logs.mkdir(parents=True, exist_ok=True)
    port = free_port_on(HOSTS)
    replicas = [Replica(host, port, logs) for host in HOSTS]
    killed, drained = replicas[1], replicas[2]
    events: list[str] = []
    front: EnvoyFront | None = None
    with ExitStack() as stack:
        for replica in replicas:
            replica.launch()
            stack.callback(replica.kill)
        for replica in replicas:
            replica.wait_ready()
        if through_envoy:
            front = EnvoyFront([r.target for r in replicas], logs)
            stack.callback(front.stop)
            front.start()
            target = front.target
        else:
            target = ",".join(r.target for r in replicas)
        out = logs / "loadtest.json"
        load = _loadtest(target, duration, concurrency, retries, out, check, logs / "loadtest.log")
        started = time.monotonic()

        def at(fraction: float) -> None:
            time.sleep(max(0.0, 1.0 + fraction * duration - (time.monotonic() - started)))

        def event(text: str) -> None:
            events.append(f"{time.monotonic() - started:.1f} s: {text}")

        at(0.10)
        killed.kill()
        event(f"SIGKILL {killed.target}")
        at(0.15)
        killed.launch()  # it starts while the others serve
        event(f"{killed.target} restarting")
        at(0.40)
        drained.drain()
        event(f"SIGTERM {drained.target}")
        drained_exit = drained.wait()
        event(f"{drained.target} drained, exit code {drained_exit}")
        drained.launch()
        event(f"{drained.target} restarting")
        sent_after: dict[str, int] = {}
        for replica in (killed, drained):
            replica.wait_ready()
            event(f"{replica.target} serving again")
            sent_after[replica.target] = _sent_to(front, replica.target)
        back_in = {}
        if front is not None:
            back_in = {
                r.target: round(front.wait_healthy([r.target], timeout=10.0), 2) for r in (killed, drained)
            }
        load.wait(timeout=duration + 120)
        if not out.exists():
            raise RuntimeError(
                f"the load test wrote no result:\n{(logs / 'loadtest.log').read_text()[-3000:]}"
            )
        document = json.loads(out.read_text())
        step: dict[str, Any] = document["steps"][0]
        served = {r.target: r.served() for r in replicas}
        envoy_sent = {t: _sent_to(front, t) - before for t, before in sent_after.items()} if front else {}
        exit_codes = {r.target: r.stop() for r in replicas}
    errors: dict[str, int] = step["errors"]
    correctness = step.get("correctness") or {}
    return {
        "run": name,
        "through_envoy": through_envoy,
        "client_attempts": retries,
        "events": events,
        "sent": step["sent"],
        "ok": step["ok"],
        "failed": sum(errors.values()),
        "errors_by_code": errors,
        "error_examples": step.get("error_examples", {}),
        "counts_add_up": step["sent"] == step["ok"] + sum(errors.values()),
        "requests_per_s": step["requests_per_s"],
        "cache_hit_rate": (step.get("server") or {}).get("cache_hit_rate"),
        "correctness": correctness,
        "drained_exit_code": drained_exit,
        "served_by_replica_since_last_start": served,
        "envoy_calls_to_restarted_since_restart": envoy_sent,
        "envoy_healthy_again_s": back_in,
        "exit_codes_on_sigterm_at_the_end": exit_codes,
    }


def scale_out(duration: float = 30.0, concurrency: int = 16, check: int = 64,
              runs: tuple[tuple[str, bool, int], ...] = RUNS) -> dict[str, Any]:  # fmt: skip
    """Every run of ``runs``, in one temporary folder of logs (kept only on failure)."""
    results = []
    with tempfile.TemporaryDirectory(prefix="kernelgen-scale-out-") as tmp:
        for number, (name, envoy, retries) in enumerate(runs):
            logs = Path(tmp) / f"run{number}"
            try:
                results.append(run(name, envoy, retries, logs, duration, concurrency, check))
            except Exception:
                for path in sorted(logs.glob("*.log")):
                    print(f"--- {path.name}\n{path.read_text(errors='replace')[-2000:]}", file=sys.stderr)
                raise
    return {
        "duration_s": duration,
        "concurrency": concurrency,
        "workload": " ".join(WORKLOAD),
        "runs": results,
    }


def report(result: dict[str, Any], machine: str) -> str:
    names = [r["run"] for r in result["runs"]]
    rows: list[tuple[str, list[Any]]] = [
        ("client attempts per call", [r["client_attempts"] for r in result["runs"]]),
        ("calls sent", [r["sent"] for r in result["runs"]]),
        ("answered", [r["ok"] for r in result["runs"]]),
        ("failed, by status code", [r["errors_by_code"] or "none" for r in result["runs"]]),
        ("sent = answered + failed", [r["counts_add_up"] for r in result["runs"]]),
        (
            "sampled responses recomputed / mismatches",
            [
                f"{r['correctness'].get('checked', 0)} / {r['correctness'].get('mismatches', 'n/a')}"
                for r in result["runs"]
            ],
        ),
        ("calls/s", [f"{r['requests_per_s']:.0f}" for r in result["runs"]]),
        ("drained replica's exit code", [r["drained_exit_code"] for r in result["runs"]]),
        (
            "OK calls per replica since its last start",
            [r["served_by_replica_since_last_start"] for r in result["runs"]],
        ),
        (
            "calls Envoy sent each restarted replica since its restart",
            [r["envoy_calls_to_restarted_since_restart"] or "-" for r in result["runs"]],
        ),
        (
            "seconds until Envoy held each restarted replica healthy",
            [r["envoy_healthy_again_s"] or "-" for r in result["runs"]],
        ),
    ]
    table = "\n".join(
        ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        + [f"| {label} | " + " | ".join(str(v) for v in values) + " |" for label, values in rows]
    )
    events = "\n".join(f"- {r['run']}: " + "; ".join(r["events"]) + "." for r in result["runs"])
    parts = [
        "# Scale-out: three replicas, one SIGKILLed and one drained, both restarted",
        f"Machine: {machine}. Load: `kernelgen loadtest {result['workload']}`, closed loop at "
        f"concurrency {result['concurrency']} for {result['duration_s']:.0f} s, replicas on "
        "127.0.0.1-3. A failure is a call the load tester's client saw fail after its own retries "
        "(none when attempts are 1).",
        "Events:\n\n" + events,
        table,
        "Envoy retries a call on another replica only until its response has started; a call cut "
        "after that (the killed replica was sending it) reaches the client as INTERNAL (Envoy's "
        "reset) or UNAVAILABLE, and only the client can send it again: with its retry policy on it "
        "does, once, from the start. On these 2 shared cores the figures say nothing about speed.",
    ]
    return "\n\n".join(parts) + "\n"


def main() -> None:
    import platform

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=30.0, help="measured seconds of each load test")
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    result = scale_out(args.duration, args.concurrency)
    machine = f"{platform.platform()}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M %Z')}"
    write_results("scale_out", {"machine": machine, **result}, report(result, machine))


if __name__ == "__main__":
    main()
