"""Scale-out on one host: ``kernelgen serve --workers N`` against one server process.

    python benchmarks/bench_workers.py [--workers 1,2] [--concurrency 8,32,64] [--seconds 2]
                                       [--rounds 3] [--device auto] [--client-processes 2]
                                       [--connections 8]

The batching benchmark's workload (hyena-2d at seq_lens 15,15, a 29x29 kernel, one FiLM row per
request, float32, batching on) against a server of 1, 2, ... worker processes
sharing one port, and the bare gRPC echo of the same response size (one
process) as the transport reference. All servers stay up and the steps
interleave in rounds; each ratio is the median over the rounds of that
round's ratio against one worker.

Linux spreads connections, not calls, over the workers, so the client opens
``--connections`` connections per client process; ``worker_share`` shows how
the calls fell. Server CPU counts the supervisor and its workers together.
Writes benchmarks/results/workers.json and workers.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections import Counter
from typing import Any

from bench_batching import (
    BATCHING,
    BATCHING_ROUNDS,
    Clients,
    Measured,
    encode_ms,
    header,
    measure,
    per_round,
    ratio_rows,
    response_size,
    summarize,
)
from harness import (
    benchmark_main,
    echo_server,
    int_list,
    kernelgen_server,
    markdown_table,
)

from kernelgen_wire.v1 import kernelgen_pb2 as pb


def worker_share(rounds: list[Measured]) -> str:
    """Shares of the calls each worker answered, e.g. ``0.52/0.48``."""
    counts = Counter(r.worker for m in rounds for r in m.step.reports if r is not None)
    total = sum(counts.values()) or 1
    return "/".join(f"{counts[w] / total:.2f}" for w in sorted(counts))


async def run(
    workers: list[int], levels: list[int], seconds: float, rounds: int, device: str, clients: Clients
) -> dict[str, Any]:
    import torch

    result = header(seconds, rounds, device, clients)
    encode = encode_ms(torch.float32)
    served: dict[tuple[int, int], list[Measured]] = {}
    echoes: dict[int, list[Measured]] = {}
    flags = [*BATCHING["on"], "--device", device]
    with contextlib.ExitStack() as stack:
        echo = stack.enter_context(echo_server(response_size(pb.DTYPE_FLOAT32)))
        running = {n: stack.enter_context(kernelgen_server("--workers", str(n), *flags)) for n in workers}
        for r in range(rounds):
            for level in levels:
                names: list[int | str] = [*workers, "echo"]
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    if name == "echo":
                        step = clients.step("echo", echo.target, 0, level, seconds)
                        measured = await measure(echo, step)
                        echoes.setdefault(level, []).append(measured)
                    else:
                        server = running[int(name)]
                        step = clients.step("served", server.target, pb.DTYPE_FLOAT32, level, seconds)
                        measured = await measure(server, step)
                        served.setdefault((int(name), level), []).append(measured)
                    label = "echo" if name == "echo" else f"workers {name}"
                    print(f"round {r + 1}/{rounds} {label} c{level}: {measured.step.rate:.0f}/s", flush=True)
    result["steps"] = [
        {"workers": n, **summarize(runs, encode), "worker_share": worker_share(runs)}
        for (n, _level), runs in sorted(served.items())
    ]
    result["echo"] = [summarize(runs, None) for _level, runs in sorted(echoes.items())]

    base = workers[0]
    ratios: dict[str, dict[str, float]] = {}
    for level in levels:
        for n in workers[1:]:
            ratios[f"workers {n} / workers {base}, concurrency {level}"] = per_round(
                served[n, level], served[base, level]
            )
        for n in workers:
            ratios[f"workers {n} / bare echo, concurrency {level}"] = per_round(
                served[n, level], echoes[level]
            )
    result["ratios"] = ratios
    return result


def report(result: dict[str, Any]) -> str:
    m = result["machine"]
    parts = [
        "# Worker processes benchmark",
        f"Machine: {m['platform']}, {m['cpus']} CPUs, torch {m['torch']}, CUDA: {m['cuda']}; {m['date']}. "
        f"Server device: {result['device']}. {result['rounds']} interleaved rounds of "
        f"{result['seconds_per_step']} s per step; client ({result['client_processes']} process(es), "
        f"{result['connections_per_process']} connections each) and server on the same machine.",
        "Workload: hyena-2d, seq_lens 15,15 (1.29 MB float32), one FiLM row per request, batching on, "
        "closed loop. `workers` is `kernelgen serve --workers N`; `worker_share` the share of calls each "
        "worker answered (Linux spreads connections over them). `server_cpu_ms` and `server_cores` count "
        "the supervisor and its workers together. Other columns as in batching.md.",
        "## Served",
        markdown_table(result["steps"]),
        "## Bare gRPC echo of the same response size (one process)",
        markdown_table(result["echo"]),
        "## Ratios (per round, same run)",
        markdown_table(ratio_rows(result["ratios"])),
    ]
    return "\n\n".join(parts) + "\n"


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workers", type=int_list, default="1,2", help="comma-separated worker counts; the first is the base"
    )
    parser.add_argument(
        "--concurrency", type=int_list, default="8,32,64", help="comma-separated closed-loop levels"
    )
    parser.add_argument("--device", default="auto", help="the servers' --device (auto)")
    parser.add_argument("--client-processes", type=int, default=2, help="processes generating the load")
    parser.add_argument("--connections", type=int, default=8, help="connections per client process")


def run_from_args(args: argparse.Namespace) -> dict[str, Any]:
    with Clients(args.client_processes, args.connections) as clients:
        return asyncio.run(
            run(args.workers, args.concurrency, args.seconds, args.rounds, args.device, clients)
        )


def main() -> None:
    benchmark_main(
        run_from_args, report, doc=__doc__, output="workers", rounds=BATCHING_ROUNDS, arguments=arguments
    )


if __name__ == "__main__":
    main()
