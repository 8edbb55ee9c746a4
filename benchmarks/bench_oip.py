"""The Open Inference Protocol and shared memory against kernelgen's native path, in one run.

    python benchmarks/bench_oip.py             # 3 interleaved rounds of 5 s per step
    python benchmarks/bench_oip.py --quick     # a smoke run: 1 round of 2 s

One ``kernelgen serve --shared-memory`` (CPU, batching on, its defaults) and one
client process (malloc tuned) that drives, in turn, the same closed loop
through three clients:

- ``oip``: Triton's asyncio client (``tritonclient.grpc.aio``) against the
  server's Open Inference Protocol, raw output contents;
- ``native``: ``AsyncKernelClient`` against kernelgen.v1 on the same port;
- ``shm``: ``AsyncKernelClient(shared_memory=True)``: the server writes each
  kernel into a region the client owns, and the client gets a view of it.

Workload: hyena-2d, one FiLM row per request, seq_lens 15,15 (a 29x29 kernel: 1.29 MB float32
kernel), concurrency 1, 8, 32, 64. Ratios (oip / native, shm / native) are
taken per round, the median reported with its range; rounds rotate which
client goes first.

Then the 82 MB long-1d kernel ([40000], a cached kernel) one call at a time,
through shared memory and through the socket (streamed), against a plain
``numpy.copyto`` of the same bytes between two buffers whose pages are
already mapped: the bound of moving those bytes once in this process.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
from harness import (
    ClientProcess,
    ServerProcess,
    benchmark_main,
    closed_loop,
    int_list,
    kernelgen_server,
    machine,
    markdown_table,
    reply,
)

BENCH = Path(__file__).resolve()
CLIENTS = ("oip", "native", "shm")
HYENA = {"model": "hyena-2d", "seq_lens": [15, 15]}
LONG = {"model": "long-1d", "seq_lens": [40000]}


# --- the client process ---------------------------------------------------------------------------
async def client_loop(target: str) -> None:
    """Answer the benchmark's steps, one JSON command per line on stdin, until ``quit``."""
    import json

    import tritonclient.grpc.aio as triton

    from kernelgen_client import AsyncKernelClient, tune_malloc

    tune_malloc()
    loop = asyncio.get_running_loop()
    clients = {
        "oip": triton.InferenceServerClient(target),
        "native": AsyncKernelClient(target, timeout=120),
        "shm": AsyncKernelClient(target, timeout=120, shared_memory=True),
    }
    try:
        await clients["native"].wait_ready(timeout=30)
        reply({"ready": True})
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            command = json.loads(line)
            if command["op"] == "quit":
                break
            if command["op"] == "memcpy":
                reply(memcpy(command["nbytes"], command["seconds"]))
            else:
                reply(await client_step(clients[command["via"]], command))
    finally:
        await clients["oip"].close()
        await clients["native"].close()
        await clients["shm"].close()


def memcpy(nbytes: int, seconds: float) -> dict[str, Any]:
    """Copies/s of ``nbytes`` between two buffers whose pages are mapped already."""
    source = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    target = np.ones(nbytes, dtype=np.uint8)
    np.copyto(target, source)
    copies, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        np.copyto(target, source)
        copies += 1
    return {"per_s": copies / elapsed}


async def client_step(client: Any, command: dict[str, Any]) -> dict[str, Any]:
    """One closed-loop step through one client; every kernel ends as a float32 array in this process."""
    rows = np.random.default_rng(0).standard_normal((256, 384), dtype=np.float32)
    sent = iter(range(1 << 62))
    oip = command["via"] == "oip"
    conditioned = command["model"] == "hyena-2d"

    async def call() -> tuple[int, Any]:
        cond = rows[next(sent) % len(rows)][None, :] if conditioned else None
        if oip:
            kernel = await infer_oip(client, command["model"], command["seq_lens"], cond)
            report = None
        else:
            result = await client.generate(command["model"], command["seq_lens"], cond, with_report=True)
            kernel, report = result.kernel, result.report.batch_size
        assert kernel.dtype == np.float32
        assert kernel.ndim == len(command["seq_lens"]) + 2
        return kernel.nbytes, report

    cpu = time.process_time()
    step = await closed_loop(call, command["concurrency"], command["seconds"], command["warmup"])
    return {
        "latencies": step.latencies,
        "errors": step.errors,
        "calls": step.calls,
        "batch_sizes": [r for r in step.reports if r is not None],
        "cpu_s": time.process_time() - cpu,
    }


async def infer_oip(client: Any, model: str, seq_lens: list[int], rows: np.ndarray | None) -> np.ndarray:
    import tritonclient.grpc.aio as triton

    seq = triton.InferInput("seq_lens", [len(seq_lens)], "INT64")
    seq.set_data_from_numpy(np.asarray(seq_lens, dtype=np.int64))
    inputs = [seq]
    if rows is not None:
        cond = triton.InferInput("conditioning", list(rows.shape), "FP32")
        cond.set_data_from_numpy(rows)
        inputs.append(cond)
    result = await client.infer(model, inputs)
    kernel: np.ndarray = result.as_numpy("kernel")
    return kernel


# --- the benchmark --------------------------------------------------------------------------------
def run_step(server: ServerProcess, client: ClientProcess, **command: Any) -> dict[str, Any]:
    before = server.cpu_seconds()
    answer = client.ask(op="step", **command)
    answer["server_cpu_s"] = server.cpu_seconds() - before
    if answer["errors"] or not answer["latencies"]:
        raise RuntimeError(f"step {command} failed: {answer['errors']} errors, {len(answer['latencies'])} ok")
    return answer


def summarize(runs: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    rates = [len(r["latencies"]) / seconds for r in runs]
    latencies = sorted(x for r in runs for x in r["latencies"])
    calls = sum(r["calls"] for r in runs)
    batches = [b for r in runs for b in r["batch_sizes"]]

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q / 100 * len(latencies)))] * 1000

    return {
        "kernels_per_s": statistics.median(rates),
        "p50_ms": pct(50),
        "p99_ms": pct(99),
        "server_cpu_ms": 1000 * sum(r["server_cpu_s"] for r in runs) / calls,
        "client_cpu_ms": 1000 * sum(r["cpu_s"] for r in runs) / calls,
        "mean_batch": statistics.mean(batches) if batches else None,
        "rates": rates,
    }


def ratio(runs: dict[str, list[dict[str, Any]]], top: str, bottom: str, seconds: float) -> dict[str, Any]:
    values = [len(a["latencies"]) / len(b["latencies"]) for a, b in zip(runs[top], runs[bottom], strict=True)]
    return {"median": statistics.median(values), "range": [min(values), max(values)]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    levels = args.concurrency
    runs: dict[int, dict[str, list[dict[str, Any]]]] = {level: {c: [] for c in CLIENTS} for level in levels}
    long_runs: dict[str, list[dict[str, Any]]] = {"shm": [], "native": []}
    memcpy_rates: list[float] = []
    load_before = os.getloadavg()
    with ExitStack() as stack:
        server = stack.enter_context(kernelgen_server("--device", "cpu", "--shared-memory"))
        client = ClientProcess([sys.executable, str(BENCH), "client", server.target])
        stack.callback(client.close)
        for round_index in range(args.rounds):
            order = CLIENTS[round_index % 3 :] + CLIENTS[: round_index % 3]
            for level in levels:
                for name in order:
                    answer = run_step(
                        server, client, via=name, **HYENA, concurrency=level,
                        seconds=args.seconds, warmup=args.warmup,
                    )  # fmt: skip
                    runs[level][name].append(answer)
                    print(
                        f"round {round_index + 1} c={level} {name}: "
                        f"{len(answer['latencies']) / args.seconds:.1f} kernels/s",
                        file=sys.stderr,
                    )
            for name in ("shm", "native") if round_index % 2 == 0 else ("native", "shm"):
                answer = run_step(
                    server,
                    client,
                    via=name,
                    **LONG,
                    concurrency=1,
                    seconds=args.seconds,
                    warmup=args.warmup,
                )
                long_runs[name].append(answer)
            nbytes = 79999 * 256 * 4
            memcpy_rates.append(client.ask(op="memcpy", nbytes=nbytes, seconds=args.seconds)["per_s"])
            print(f"round {round_index + 1} long-1d done", file=sys.stderr)
    load_after = os.getloadavg()
    rows = []
    for level in levels:
        by_client = {name: summarize(runs[level][name], args.seconds) for name in CLIENTS}
        rows.append(
            {
                "concurrency": level,
                **by_client,
                "oip_over_native": ratio(runs[level], "oip", "native", args.seconds),
                "shm_over_native": ratio(runs[level], "shm", "native", args.seconds),
            }
        )
    nbytes = 79999 * 256 * 4
    long = {name: summarize(long_runs[name], args.seconds) for name in long_runs}
    shm_over_memcpy = [
        len(r["latencies"]) / args.seconds / m for r, m in zip(long_runs["shm"], memcpy_rates, strict=True)
    ]
    return {
        "machine": machine(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "seconds": args.seconds,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "hyena": rows,
        "long": {
            "nbytes": nbytes,
            "shm": long["shm"],
            "native": long["native"],
            "memcpy_per_s": statistics.median(memcpy_rates),
            "memcpy_GB_per_s": statistics.median(memcpy_rates) * nbytes / 1e9,
            "shm_over_memcpy": statistics.median(shm_over_memcpy),
            "shm_over_memcpy_range": [min(shm_over_memcpy), max(shm_over_memcpy)],
        },
    }


def _ratio_text(value: dict[str, Any]) -> str:
    return f"{value['median']:.2f} ({value['range'][0]:.2f}-{value['range'][1]:.2f})"


def report(result: dict[str, Any]) -> str:
    m = result["machine"]
    rows = result["hyena"]
    at32 = next((r for r in rows if r["concurrency"] == 32), rows[-1])
    long = result["long"]
    worst_oip = min(r["oip_over_native"]["median"] for r in rows)
    table = markdown_table(
        [
            {
                "concurrency": r["concurrency"],
                "native kernels/s": f"{r['native']['kernels_per_s']:.0f}",
                "OIP (tritonclient)": f"{r['oip']['kernels_per_s']:.0f}",
                "shared memory": f"{r['shm']['kernels_per_s']:.0f}",
                "OIP / native (rounds)": _ratio_text(r["oip_over_native"]),
                "shm / native (rounds)": _ratio_text(r["shm_over_native"]),
                "p99 ms native / OIP / shm": (
                    f"{r['native']['p99_ms']:.1f} / {r['oip']['p99_ms']:.1f} / {r['shm']['p99_ms']:.1f}"
                ),
                "server CPU ms/kernel native / OIP / shm": (
                    f"{r['native']['server_cpu_ms']:.2f} / {r['oip']['server_cpu_ms']:.2f} / "
                    f"{r['shm']['server_cpu_ms']:.2f}"
                ),
                "client CPU ms/kernel native / OIP / shm": (
                    f"{r['native']['client_cpu_ms']:.2f} / {r['oip']['client_cpu_ms']:.2f} / "
                    f"{r['shm']['client_cpu_ms']:.2f}"
                ),
            }
            for r in rows
        ]
    )
    shm_rate, native_rate = long["shm"]["kernels_per_s"], long["native"]["kernels_per_s"]
    gb = long["nbytes"] / 1e9
    long_table = markdown_table(
        [
            {"path": "shared memory", "kernels/s": f"{shm_rate:.1f}", "GB/s": f"{shm_rate * gb:.2f}",
             "p50 ms": f"{long['shm']['p50_ms']:.1f}"},
            {"path": "socket (streamed)", "kernels/s": f"{native_rate:.1f}",
             "GB/s": f"{native_rate * gb:.2f}", "p50 ms": f"{long['native']['p50_ms']:.1f}"},
            {"path": "numpy.copyto, mapped buffers", "kernels/s": f"{long['memcpy_per_s']:.1f}",
             "GB/s": f"{long['memcpy_GB_per_s']:.2f}", "p50 ms": f"{1000 / long['memcpy_per_s']:.1f}"},
        ]
    )  # fmt: skip
    targets = markdown_table(
        [
            {
                "target": "OIP within 0.9x of native (every concurrency)",
                "measured": f"{worst_oip:.2f}x at worst",
                "met": "yes" if worst_oip >= 0.9 else "no",
            },
            {
                "target": "shared memory >= 2x the socket path at concurrency 32",
                "measured": f"{at32['shm_over_native']['median']:.2f}x",
                "met": "yes" if at32["shm_over_native"]["median"] >= 2 else "no",
            },
            {
                "target": "82 MB kernel through shared memory >= 0.5x memcpy",
                "measured": f"{long['shm_over_memcpy']:.2f}x",
                "met": "yes" if long["shm_over_memcpy"] >= 0.5 else "no",
            },
        ]
    )
    lines = [
        "# The Open Inference Protocol and shared memory",
        f"{m['date']}, {m['platform']}, {m['cpus']} CPUs shared by client, server and other work, torch "
        f"{m['torch']}; load average {result['load_average_before'][0]:.2f} before, "
        f"{result['load_average_after'][0]:.2f} after. {result['rounds']} interleaved round(s) of "
        f"{result['seconds']:g} s per step ({result['warmup']:g} s warm-up), one client process for all "
        "three clients, one `kernelgen serve --shared-memory`.",
        "## hyena-2d, one FiLM row per request, seq_lens 15,15 (a 29x29 kernel, 1.29 MB float32)",
        table,
        "## long-1d [40000]: 82 MB, a cached kernel, one call at a time",
        long_table,
        f"Shared memory / memcpy per round: {long['shm_over_memcpy']:.2f} "
        f"({long['shm_over_memcpy_range'][0]:.2f}-{long['shm_over_memcpy_range'][1]:.2f}).",
        "## Targets",
        targets,
    ]
    return "\n\n".join(lines) + "\n"


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--concurrency", type=int_list, default="1,8,32,64", help="hyena-2d closed-loop levels"
    )


def main() -> None:
    roles = {"client": lambda argv: asyncio.run(client_loop(argv[0]))}
    benchmark_main(run, report, doc=__doc__, output="oip", arguments=arguments, roles=roles)


if __name__ == "__main__":
    main()
