"""The benchmark suite: every benchmark, one command, one results page.

    python benchmarks/run_all.py            # or: make bench   (about 27 minutes)
    python benchmarks/run_all.py --quick    # a smoke run (about 5 minutes)

Runs on this machine, one after another:

1. ``bench_service.py``: cache hit/miss, unary vs streamed transport, served vs in-process;
2. ``bench_batching.py``: dynamic batching on/off against a bare gRPC echo;
3. ``bench_engine.py``: the inference engine against the reference forward, in-process;
4. ``bench_workers.py``: ``kernelgen serve --workers 2`` against one server process;
5. ``bench_triton.py``: kernelgen against Triton Inference Server (PyTriton, in an environment of
   its own that the benchmark makes; skipped with the reason where it cannot) on the same model
   and load;
6. ``bench_factored.py``: dense against factored kernels, both delivered as dense arrays;
7. ``bench_hostile.py``: small requests while large kernels stream, tiled against whole;
8. ``bench_oip.py``: Triton's client on the Open Inference Protocol and kernels through shared
   memory against the native client;
9. ``bench_envoy.py``: the latency and CPU Envoy adds in front of a replica, and the cache hit
   rates of three replicas behind Envoy's hash on the cache key, behind round robin, and of one;
10. ``bench_network.py``: a whole network's inference forward (the reference package's
   ``CKConvND`` layers) with its own kernels against served ones (``kernelgen_client.torch``:
   dense and factored, with and without prefetch, and cached unconditioned kernels);
11. ``bench_masks.py``: what a mask and a causal crop cost, served and in the engine;
12. a ``kernelgen loadtest`` concurrency sweep of the 2D FiLM model (hyena-2d, seq_lens
   15,15: a 29x29 kernel, out_dim 384, one conditioning row per request, float32)
   against ``kernelgen serve`` with batching on, with batching off, and against
   ``echo_kernelgen.py`` (a kernelgen-speaking server that computes nothing: the
   ceiling of the client process and the transport under the same load).

Writes into benchmarks/results/: each benchmark's own JSON/markdown, the sweep's
``loadtest_<server>.json``/``.csv``, ``loadtest_sweep.png`` and ``README.md`` (the
combined tables with the machine they came from). Every ratio compares figures
of the same run; absolute numbers are context only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench_masks import ratio_text
from bench_triton import side_by_side_table
from harness import RESULTS, ROOT, Rounds, free_port, kernelgen_server, markdown_table, process

from kernelgen_loadtest.outputs import plot

SERVERS = {
    "batching_on": ("batching on", ["--max-batch-size", "64", "--max-queue-delay-ms", "0"]),
    "batching_off": ("batching off", ["--max-batch-size", "1"]),
    "echo": ("bare echo (client ceiling)", []),
}
WORKLOAD = ["hyena-2d", "--seq-lens", "15,15", "--rows", "1", "--dtype", "float32"]
BENCH = Path(__file__).resolve().parent


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine() -> dict[str, Any]:
    import torch

    return {
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "load_average_before": round(os.getloadavg()[0], 2),
    }


def run(command: list[str]) -> int:
    print(f"\n$ {' '.join(command)}", flush=True)
    started = time.monotonic()
    code = subprocess.run(command, cwd=ROOT, check=False).returncode
    print(f"(exit {code}, {time.monotonic() - started:.0f} s)", flush=True)
    return code


@contextmanager
def echo_kernelgen() -> Iterator[str]:
    port = free_port()
    with process([sys.executable, str(BENCH / "echo_kernelgen.py"), "--port", str(port)], r"listening on"):
        yield f"127.0.0.1:{port}"


def sweep(name: str, target: str, args: argparse.Namespace) -> dict[str, Any]:
    """One ``kernelgen loadtest`` run; its JSON document (errors are recorded, not fatal)."""
    out = RESULTS / f"loadtest_{name}"
    command = [sys.executable, "-m", "kernelgen_client.cli", "loadtest", *WORKLOAD, "--target", target]
    command += [
        "--concurrency",
        args.concurrency,
        "--duration",
        str(args.seconds),
        "--warmup",
        str(args.warmup),
    ]
    command += ["--workers", str(args.workers), "--max-error-rate", "1", "--timeout", "60"]
    command += ["--json", f"{out}.json", "--csv", f"{out}.csv", "--plot", f"{out}.png"]
    run(command)
    document: dict[str, Any] = json.loads(Path(f"{out}.json").read_text())
    return document


def load(name: str) -> dict[str, Any] | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


# --- the results page ------------------------------------------------------------------------------
def _f(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def sweep_table(runs: dict[str, dict[str, Any]]) -> str:
    by_level: dict[float, dict[str, dict[str, Any]]] = {}
    for name, document in runs.items():
        for step in document["steps"]:
            by_level.setdefault(step["level"], {})[name] = step
    rows = []
    for level in sorted(by_level):
        steps = by_level[level]
        on, off, echo = (steps.get(k) for k in ("batching_on", "batching_off", "echo"))
        row: dict[str, Any] = {"concurrency": f"{level:g}"}
        for key, step in (("on", on), ("off", off), ("echo", echo)):
            row[f"{key} req/s"] = _f(step and step["requests_per_s"])
            row[f"{key} p50 ms"] = _f(step and step["latency_ms"]["p50"])
            row[f"{key} p99 ms"] = _f(step and step["latency_ms"]["p99"])
        row["on mean batch rows"] = _f(on and on["server"]["mean_batch_rows"])
        if on and off and off["requests_per_s"]:
            row["on / off"] = f"{on['requests_per_s'] / off['requests_per_s']:.2f}"
        if on and echo and echo["requests_per_s"]:
            row["on / echo"] = f"{on['requests_per_s'] / echo['requests_per_s']:.2f}"
        bound = [k for k, s in (("on", on), ("off", off), ("echo", echo)) if s and s["client"]["bottleneck"]]
        row["client-bound"] = ", ".join(bound) or "no"
        errors = sum(s["error_count"] + s["dropped"] for s in steps.values())
        row["errors"] = str(errors)
        rows.append(row)
    return markdown_table(rows)


def ratio_rows(section: dict[str, Any] | None, source: str, measured: str) -> list[dict[str, Any]]:
    if not section:
        return []

    def value(v: float | dict[str, float]) -> str:
        # A ratio measured over rounds is its median, with the rounds' range beside it.
        if isinstance(v, dict):
            return f"{v['median']:.2f} ({v['min']:.2f}-{v['max']:.2f})"
        return f"{v:.2f}"

    rows = [
        {"source": source, "figure": k, "value": value(v), "measured": measured}
        for k, v in section.get("ratios", {}).items()
    ]
    rows += [
        {"source": source, "figure": f"target: {k}", "value": "met" if v else "NOT met", "measured": measured}
        for k, v in section.get("targets", {}).items()
    ]
    return rows


def engine_rows(engine: dict[str, Any] | None) -> str:
    if not engine:
        return "(not run)"
    rows = [
        {
            "batch": r["batch"],
            "reference kernels/s": f"{r['reference_kernels_per_s']:.0f}",
            "engine kernels/s": f"{r['engine_rows_kernels_per_s']:.0f}",
            "engine / reference": f"{r['engine_rows_ratio']:.2f}",
        }
        for r in engine["results"]
    ]
    return markdown_table(rows)


def triton_section(triton: dict[str, Any] | None) -> str:
    if not triton:
        return "(not run)"
    m, batcher = triton["machine"], triton["triton_batcher"]
    text = (
        f"`bench_triton.py`, {m['date']} (load average {m['load_average_before']} before, "
        f"{m['load_average_after']} after): {triton['model']} at seq_lens {triton['seq_lens']}, one FiLM "
        f"row per request, float32, {triton['rounds']} interleaved round(s) of "
        f"{triton['seconds_per_step']:g} s per step; `kernelgen serve` and Triton through PyTriton "
        f"(dynamic batcher: max batch {batcher['max_batch_size']}, {batcher['max_queue_delay_us']} us "
        "delay, the callable computing with the repository's reference model), each driven by the same "
        "closed loop from a client process of its own, malloc tuned on both sides; kernelgen also "
        "through tritonclient on its Open Inference Protocol."
    )
    if triton["triton_skipped"]:
        text += f" Triton was skipped: {triton['triton_skipped']}"
    return text + "\n\n" + side_by_side_table(triton) + "\n\nDetails, CPU per kernel: [triton.md](triton.md)."


def page(
    info: dict[str, Any], runs: dict[str, dict[str, Any]], args: argparse.Namespace, wall_s: float
) -> str:
    service, batching, engine = load("service.json"), load("batching.json"), load("engine.json")
    workers = load("workers.json")
    service_ratios = {}
    if service:
        cache, transport = service["cache"], service["transport_16MB"]
        service_ratios = {
            "ratios": {
                "cache hit p50 / bare echo p50 (1.29 MB)": cache["hit_over_echo_p50"],
                "streamed / raw socket GB/s (16.8 MB)": transport["stream_over_socket"],
                "streamed / unary GB/s (16.8 MB)": transport["stream_over_unary"],
            },
            "targets": service["targets"],
        }
    ratios = ratio_rows(service_ratios, "bench_service", service["machine"]["date"] if service else "")
    ratios += ratio_rows(batching, "bench_batching", batching["machine"]["date"] if batching else "")
    ratios += ratio_rows(workers, "bench_workers", workers["machine"]["date"] if workers else "")
    client_bound = sorted(
        {s["level"] for d in runs.values() for s in d["steps"] if s["client"]["bottleneck"]}
    )
    parts = [
        "# Benchmark results",
        f"Produced by `python benchmarks/run_all.py{' --quick' if args.quick else ''}` (`make bench`) on "
        f"{info['date']}, in {wall_s / 60:.0f} minutes."
        + (
            f" This run measured only `--only {args.only}`; the other figures come from earlier runs "
            "of this suite (each ratio row gives its date)."
            if args.only != ALL_PARTS
            else ""
        ),
        f"**Machine:** {info['cpus']} x {info['cpu']} ({info['platform']}), Python {info['python']}, "
        f"torch {info['torch']}, CUDA: {info['cuda'] or 'none'}. Load average before: "
        f"{info['load_average_before']}, after: {info['load_average_after']}.",
        "Client and server run on this same machine, which is shared with other work: absolute figures "
        "are noisy, so compare figures of one run (each table's rows were measured minutes apart), "
        "not runs.",
        "## Load-test sweep: the 2D FiLM model",
        f"`kernelgen loadtest {' '.join(WORKLOAD)} --concurrency {args.concurrency} --duration "
        f"{args.seconds:g} --warmup {args.warmup:g}` against `kernelgen serve` with batching on "
        "(`--max-batch-size 64 --max-queue-delay-ms 0`), batching off (`--max-batch-size 1`), and "
        "`benchmarks/echo_kernelgen.py` (speaks kernelgen, computes nothing: the ceiling of one client "
        "process and the transport). seq_lens 15,15 (a 29x29 kernel), out_dim 384, 1.29 MB per kernel, "
        "one conditioning row per request, closed loop.",
        "![latency and throughput against concurrency](loadtest_sweep.png)",
        sweep_table(runs),
        '"client-bound": the load tester itself was the limit at that step (a client process near one '
        "core, see `kernelgen loadtest` docs)"
        + (f"; here at concurrency {', '.join(f'{v:g}' for v in client_bound)}." if client_bound else "."),
        "## Ratios and targets of the service, batching and workers benchmarks",
        markdown_table(ratios) if ratios else "(not run)",
        "Details: [service.md](service.md), [batching.md](batching.md), [workers.md](workers.md).",
        "## In-process engine vs reference forward (no transport, one torch thread)",
        engine_rows(engine),
        "## kernelgen against Triton Inference Server",
        triton_section(load("triton.json")),
        "## Dense against factored kernels",
        factored_section(load("factored.json")),
        "## Small requests while large kernels stream",
        hostile_section(load("hostile.json")),
        "## The Open Inference Protocol and shared memory",
        oip_section(load("oip.json")),
        "## Behind Envoy: added latency and CPU, cache affinity",
        envoy_section(load("envoy.json")),
        "## A network's forward, local and served",
        network_section(load("network.json")),
        "## Masks and the causal crop",
        masks_section(load("masks.json")),
    ]
    return "\n\n".join(parts) + "\n"


def oip_section(oip: dict[str, Any] | None) -> str:
    if not oip:
        return "(not run)"
    rows = [
        {
            "concurrency": r["concurrency"],
            "native kernels/s": f"{r['native']['kernels_per_s']:.0f}",
            "OIP (tritonclient) / native": f"{r['oip_over_native']['median']:.2f}",
            "shared memory / native": f"{r['shm_over_native']['median']:.2f}",
        }
        for r in oip["hyena"]
    ]
    long = oip["long"]
    return (
        f"`bench_oip.py`, {oip['machine']['date']}, hyena-2d seq_lens 15,15, one FiLM row per request.\n\n"
        + markdown_table(rows)
        + f"\n\nThe 82 MB long-1d kernel through shared memory: {long['shm_over_memcpy']:.2f}x a plain "
        f"copy of its bytes. Details: [oip.md](oip.md)."
    )


def envoy_section(envoy: dict[str, Any] | None) -> str:
    if not envoy:
        return "(not run)"
    from bench_envoy import affinity_table, overhead_table

    return (
        f"`bench_envoy.py`, {envoy['machine']['date']}: one replica direct and through Envoy, medians "
        "of interleaved rounds.\n\n"
        + overhead_table(envoy["overhead"])
        + "\n\nThree replicas, each caching half of the key space:\n\n"
        + affinity_table(envoy["affinity"])
        + "\n\nDetails: [envoy.md](envoy.md)."
    )


def network_section(network: dict[str, Any] | None) -> str:
    if not network:
        return "(not run)"
    steps, settings = network["steps"], network["settings"]
    rows = [
        {
            "step": name,
            "/ local": f"{r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f})",
            "calls/forward": f"{statistics.median(s['calls_per_forward'] for s in steps[name]):.2f}",
        }
        for name, r in ((k.split(" / ")[0], v) for k, v in network["ratios"].items())
    ]
    return (
        f"`bench_network.py`, {network['machine']['date']}: {settings['depth']} CKConvND layers, "
        f"{settings['channels']} channels, length {settings['length']}, a batch of {settings['batch']} "
        f"with one FiLM row each, on {settings['device']}; forwards/s over the local forward's in the "
        "same round (the unconditioned step over the local unconditioned one).\n\n"
        + markdown_table(rows)
        + "\n\nDetails, bytes and the share spent fetching: [network.md](network.md)."
    )


def masks_section(masks: dict[str, Any] | None) -> str:
    if not masks:
        return "(not run)"
    served = masks["served"]
    rows = [
        {"served": r["contender"], "kernels/s": f"{r['kernels_per_s']:.1f}", "/ unmasked": ratio_text(r)}
        for r in served["rows"]
    ]
    return (
        f"`bench_masks.py`, {masks['machine']['date']}: {served['step']}; the cost of a kernel over the "
        "unmasked one's in the same round (median, range).\n\n"
        + markdown_table(rows)
        + f"\n\nTarget <= {masks['target']}x: {'met' if masks['met'] else 'not met'} "
        f"({masks['worst_masked_cost_ratio']:.3f}x). The engine alone, and the causal crop: "
        "[masks.md](masks.md)."
    )


def factored_section(factored: dict[str, Any] | None) -> str:
    if not factored:
        return "(not run)"
    rows = [
        {
            "workload": name,
            "concurrency": r["concurrency"],
            "dense kernels/s": f"{r['dense']['kernels_per_s']:.1f}",
            "factored kernels/s": f"{r['factored']['kernels_per_s']:.1f}",
            "factored / dense": f"{r['ratio']:.2f}",
            "wire bytes, factored / dense": f"{r['wire_ratio']:.3f}",
        }
        for name, workload in factored["workloads"].items()
        for r in workload
    ]
    return (
        f"`bench_factored.py`, {factored['machine']['date']}: both delivered to the caller as dense "
        "arrays (the client materialises factored ones).\n\n"
        + markdown_table(rows)
        + "\n\nDetails, CPU and latency: [factored.md](factored.md)."
    )


def hostile_section(hostile: dict[str, Any] | None) -> str:
    if not hostile:
        return "(not run)"
    rows = [
        {
            "server": name,
            "small p99 idle ms": f"{s['idle_p99_ms']:.1f}",
            "small p99 under streams ms": f"{s['loaded_p99_ms']:.1f}",
            "under / idle": f"{s['p99_ratio']:.1f}",
            "server peak RSS MB": f"{s['peak_rss_loaded_MB']:.0f}",
        }
        for name, s in hostile["servers"].items()
    ]
    return (
        f"`bench_hostile.py`, {hostile['machine']['date']}.\n\n"
        + markdown_table(rows)
        + "\n\nDetails: [hostile.md](hostile.md)."
    )


ALL_PARTS = "service,batching,engine,workers,triton,factored,hostile,oip,envoy,network,masks,sweep"
#: Seconds per sweep step (the benchmarks take at most 2-3 of them), warm-up per sweep step.
SUITE_ROUNDS = Rounds(seconds=5.0, warmup=1.0, rounds=None, quick_seconds=1.0, quick_warmup=1.0)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    SUITE_ROUNDS.add_arguments(parser)
    parser.add_argument("--concurrency", default=None, help="sweep levels (1,4,16,64; quick: 1,16)")
    parser.add_argument("--workers", type=int, default=1, help="load-test client processes (1)")
    parser.add_argument("--only", default=ALL_PARTS, help="comma-separated parts to run (all)")
    args = parser.parse_args()
    SUITE_ROUNDS.settle(args)
    args.concurrency = args.concurrency or ("1,16" if args.quick else "1,4,16,64")
    parts = set(args.only.split(","))
    RESULTS.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    info = machine()
    seconds = str(min(args.seconds, 3.0))
    if "service" in parts:
        run([sys.executable, str(BENCH / "bench_service.py"), "--seconds", seconds])
    if "batching" in parts:
        levels, rounds = ("1,32", "1") if args.quick else ("1,8,32,64", "3")
        batching = [
            sys.executable,
            str(BENCH / "bench_batching.py"),
            "--concurrency",
            levels,
            "--rounds",
            rounds,
        ]
        run([*batching, "--seconds", str(min(args.seconds, 2.0))])
    if "engine" in parts:
        repeats = "3" if args.quick else "7"
        # One torch thread: what the server computes with on a 2-core machine (CPUs - 1); two
        # threads on a shared 2-core machine measure the contention, not the engine.
        engine = [sys.executable, str(BENCH / "bench_engine.py"), "--json", str(RESULTS / "engine.json")]
        run([*engine, "--repeats", repeats, "--threads", "1"])
    if "workers" in parts:
        levels, rounds = ("32", "1") if args.quick else ("8,32,64", "3")
        workers = [sys.executable, str(BENCH / "bench_workers.py"), "--concurrency", levels]
        run([*workers, "--rounds", rounds, "--seconds", str(min(args.seconds, 2.0))])
    if "triton" in parts:
        run([sys.executable, str(BENCH / "bench_triton.py"), *(["--quick"] if args.quick else [])])
    if "factored" in parts:
        run([sys.executable, str(BENCH / "bench_factored.py"), *(["--quick"] if args.quick else [])])
    if "hostile" in parts:
        run([sys.executable, str(BENCH / "bench_hostile.py"), *(["--quick"] if args.quick else [])])
    if "oip" in parts:
        run([sys.executable, str(BENCH / "bench_oip.py"), *(["--quick"] if args.quick else [])])
    if "envoy" in parts:
        run([sys.executable, str(BENCH / "bench_envoy.py"), *(["--quick"] if args.quick else [])])
    if "network" in parts:
        run([sys.executable, str(BENCH / "bench_network.py"), *(["--quick"] if args.quick else [])])
    if "masks" in parts:
        run([sys.executable, str(BENCH / "bench_masks.py"), *(["--quick"] if args.quick else [])])
    runs: dict[str, dict[str, Any]] = {}
    if "sweep" in parts:
        for name, (_label, flags) in SERVERS.items():
            if name == "echo":
                with echo_kernelgen() as target:
                    runs[name] = sweep(name, target, args)
            else:
                with kernelgen_server(*flags) as server:
                    runs[name] = sweep(name, server.target, args)
    else:  # the page still shows the latest sweep
        runs = {name: d for name in SERVERS if (d := load(f"loadtest_{name}.json"))}
    if runs:
        series = [(SERVERS[name][0], document["steps"]) for name, document in runs.items()]
        title = "hyena-2d seq_lens 15,15, one FiLM row, float32, closed loop"
        plot(series, RESULTS / "loadtest_sweep.png", title=title)
    info["load_average_after"] = round(os.getloadavg()[0], 2)
    text = page(info, runs, args, time.monotonic() - started)
    (RESULTS / "README.md").write_text(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
