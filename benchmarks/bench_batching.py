"""Serving benchmark: dynamic batching of FiLM-conditioned requests.

    python benchmarks/bench_batching.py [--seconds 2] [--rounds 3] [--concurrency 1,8,32,64]
                                        [--device auto]

The embedded 2D FiLM model (hyena-2d: seq_lens 15,15, a 29x29 kernel, out_dim 384, one conditioning
row per request), closed loop at each concurrency, batching on vs off, float32
and float16 output; the in-process engine at the same batch sizes; and a bare
gRPC echo of the same response size at the same concurrency (the transport
ceiling). All servers stay up and the measurements interleave in rounds; each
ratio is the median over the rounds of that round's ratio.

Each served request's time is split into queue and compute (from the server's
report), encode (measured in-process) and transport (the rest), and each
step records the CPU time the server and the client spent per call, which
shows what bounds the rate when both share one machine.
Writes benchmarks/results/batching.json and batching.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import statistics
import time
from collections.abc import AsyncIterator, Awaitable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from harness import (
    GENERATE,
    Rounds,
    ServerProcess,
    Step,
    benchmark_main,
    closed_loop,
    echo_server,
    int_list,
    kernelgen_server,
    load_generator,
    machine,
    markdown_table,
    median_rate,
    merge,
    raw,
)

from kernelgen_wire.metadata import REPORT_TRAILER
from kernelgen_wire.v1 import kernelgen_pb2 as pb

SEQ_LENS = (15, 15)
POINTS = 29 * 29
OUT_DIM = 384
WARMUP = 0.5  # seconds of each step not measured
BATCHING = {
    "on": ["--max-batch-size", "64", "--max-queue-delay-ms", "0"],
    "off": ["--max-batch-size", "1"],
}
DTYPES = {"float32": pb.DTYPE_FLOAT32, "float16": pb.DTYPE_FLOAT16}


def requests(dtype: int, count: int = 256) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        cond = rng.standard_normal((1, 384)).astype("<f4")
        tensor = pb.Tensor(shape=[1, 384], dtype=pb.DTYPE_FLOAT32, data=cond.tobytes())
        message = pb.GenerateKernelRequest(
            model="hyena-2d", seq_lens=SEQ_LENS, conditioning=tensor, dtype=dtype
        )
        out.append(message.SerializeToString())
    return out


@contextlib.asynccontextmanager
async def unary_methods(target: str, path: str, connections: int) -> AsyncIterator[list[Any]]:
    """``connections`` channels to ``target``, each on a TCP connection of its own, as raw methods.

    A server of several worker processes is spread over by connection (SO_REUSEPORT),
    so a client that wants them all needs several connections.
    """
    options = [("grpc.use_local_subchannel_pool", 1)] if connections > 1 else []
    async with contextlib.AsyncExitStack() as stack:
        channels = [
            await stack.enter_async_context(grpc.aio.insecure_channel(target, options=options))
            for _ in range(connections)
        ]
        yield [c.unary_unary(path, request_serializer=raw, response_deserializer=raw) for c in channels]


async def served(target: str, dtype: int, concurrency: int, seconds: float, connections: int = 1) -> Step:
    bodies = requests(dtype)
    counter = iter(range(1 << 60))
    async with unary_methods(target, GENERATE, connections) as methods:

        async def call() -> tuple[int, Any]:
            n = next(counter)
            rpc = methods[n % len(methods)](bodies[n % len(bodies)])
            data = await rpc
            trailers = dict(await rpc.trailing_metadata() or ())
            return len(data), pb.ServerReport.FromString(trailers[REPORT_TRAILER])

        return await closed_loop(call, concurrency, seconds, WARMUP)


async def echo(target: str, concurrency: int, seconds: float, connections: int = 1) -> Step:
    counter = iter(range(1 << 60))
    async with unary_methods(target, "/bench.Echo/Unary", connections) as methods:

        async def call() -> tuple[int, Any]:
            return len(await methods[next(counter) % len(methods)](b"")), None

        return await closed_loop(call, concurrency, seconds, WARMUP)


def engine_rates(batch_sizes: list[int], seconds: float, device: str) -> dict[int, float]:
    import torch

    from kernelgen_server.engine.kernel_engine import KernelEngine
    from kernelgen_server.repository.store import ModelRepository, embedded_repository

    torch.set_num_threads(1)  # as the server runs it on this machine (one core left for gRPC)
    module = ModelRepository.load(embedded_repository()).ready["hyena-2d"].module
    engine = KernelEngine(module, device)
    rates = {}
    for batch in batch_sizes:
        conds = [torch.randn(1, 384) for _ in range(batch)]
        rates[batch] = batch * median_rate(
            lambda c=conds: engine.conditioned(SEQ_LENS, c, torch.float32), seconds
        )
    return rates


async def _core_loop(service: Any, concurrency: int, seconds: float) -> tuple[float, float]:
    """Kernels/s and CPU microseconds per call of ``service.generate`` in a closed loop."""
    rng = np.random.default_rng(0)
    conds = [rng.standard_normal((1, OUT_DIM)).astype(np.float32) for _ in range(64)]
    calls = 0

    async def caller(i: int, stop: float) -> None:
        nonlocal calls
        while time.perf_counter() < stop:
            await service.generate("hyena-2d", SEQ_LENS, conds[i % len(conds)], pb.DTYPE_FLOAT32, False)
            calls += 1

    await asyncio.gather(*(caller(i, time.perf_counter() + WARMUP) for i in range(concurrency)))
    calls, start, cpu = 0, time.perf_counter(), time.process_time()
    await asyncio.gather(*(caller(i, start + seconds) for i in range(concurrency)))
    return calls / (time.perf_counter() - start), (time.process_time() - cpu) / max(calls, 1) * 1e6


def core_rates(levels: list[int], seconds: float, device: str) -> list[dict[str, Any]]:
    """The service core without gRPC: ``KernelService.generate`` in a closed loop, batching
    on and off, as the server runs it (its malloc tuning, its torch threads).

    What batching gains once no transport shares the machine: the bound of on / off.
    Run in a process of its own (the malloc tuning is process-wide).
    """
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(_core_rates, levels, seconds, device).result()


def _core_rates(levels: list[int], seconds: float, device: str) -> list[dict[str, Any]]:
    from kernelgen_server.core.service import KernelService
    from kernelgen_server.repository.store import ModelRepository, embedded_repository
    from kernelgen_server.settings import load_settings
    from kernelgen_wire.malloc import tune_malloc

    tune_malloc()
    repository = ModelRepository.load(embedded_repository())
    rows = []

    async def measure_all() -> None:
        for name, flags in BATCHING.items():
            settings = {"metrics_port": 0, "device": device, "max_batch_size": int(flags[1])}
            service = KernelService(repository, load_settings(settings))
            for level in levels:
                rate, cpu_us = await _core_loop(service, level, seconds)
                rows.append(
                    {
                        "batching": name,
                        "concurrency": level,
                        "per_s": round(rate, 1),
                        "cpu_us_per_call": round(cpu_us),
                    }
                )
            await service.close()

    asyncio.run(measure_all())
    return rows


def encode_ms(dtype: Any) -> float:
    import torch

    from kernelgen_server.core.payloads import to_payload
    from kernelgen_wire.kernel_messages import encode_kernel

    tensor = torch.randn(1, 29, 29, OUT_DIM).to(dtype)
    return 1000.0 / median_rate(lambda: encode_kernel(to_payload(tensor)), 0.5)


@dataclass
class Measured:
    """One closed-loop step and the CPU that the server and this client spent on it."""

    step: Step
    server_cpu_s: float
    client_cpu_s: float
    wall_s: float


async def measure(server: ServerProcess, step_run: Awaitable[tuple[Step, float]]) -> Measured:
    """Await ``step_run`` (a closed loop against ``server`` and its client CPU) and account it."""
    server_cpu, start = server.cpu_seconds(), time.perf_counter()
    step, client_cpu = await step_run
    return Measured(step, server.cpu_seconds() - server_cpu, client_cpu, time.perf_counter() - start)


async def load(
    kind: str, target: str, dtype: int, concurrency: int, seconds: float, connections: int = 1
) -> tuple[Step, float]:
    """One closed-loop step (``kind`` "served" or "echo") and the CPU this process spent on it."""
    load_generator()
    cpu = time.process_time()
    if kind == "echo":
        step = await echo(target, concurrency, seconds, connections)
    else:
        step = await served(target, dtype, concurrency, seconds, connections)
    return step, time.process_time() - cpu


def _load_in_process(*args: Any) -> tuple[Step, float]:
    """``load`` in a client process of its own."""
    step, cpu = asyncio.run(load(*args))
    # Reports travel serialized: generated message classes do not pickle.
    step.reports = [None if r is None else r.SerializeToString() for r in step.reports]
    return step, cpu


class Clients:
    """The load generator: ``processes`` client processes share each step's concurrency.

    One process (the default) runs the steps in this one. On a machine with
    cores to spare (a GPU host), several keep the client from being the limit.
    Each process opens ``connections`` connections.
    """

    def __init__(self, processes: int, connections: int = 1) -> None:
        self.processes = processes
        self.connections = connections
        self._pool = None
        if processes > 1:  # spawn: a forked gRPC process is not safe
            context = multiprocessing.get_context("spawn")
            self._pool = ProcessPoolExecutor(processes, mp_context=context)

    async def step(
        self, kind: str, target: str, dtype: int, concurrency: int, seconds: float
    ) -> tuple[Step, float]:
        if self._pool is None:
            return await load(kind, target, dtype, concurrency, seconds, self.connections)
        p = self.processes
        shares = [n for i in range(p) if (n := concurrency // p + (i < concurrency % p))]
        loop = asyncio.get_running_loop()
        parts = await asyncio.gather(
            *(
                loop.run_in_executor(
                    self._pool, _load_in_process, kind, target, dtype, n, seconds, self.connections
                )
                for n in shares
            )
        )
        for part, _ in parts:
            part.reports = [None if r is None else pb.ServerReport.FromString(r) for r in part.reports]
        # The processes ran side by side: one step of ``seconds`` with all their samples.
        step = merge([part for part, _ in parts], seconds=seconds)
        step.concurrency = concurrency
        return step, sum(cpu for _, cpu in parts)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()

    def __enter__(self) -> Clients:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def summarize(rounds: list[Measured], encode: float | None) -> dict[str, Any]:
    """One row over all rounds: the median round's rate, pooled latencies, CPU per call."""
    step = merge([m.step for m in rounds])
    rates = [m.step.rate for m in rounds]
    calls = max(1, step.calls)
    server_cpu = sum(m.server_cpu_s for m in rounds)
    wall = sum(m.wall_s for m in rounds)
    client_cpu = sum(m.client_cpu_s for m in rounds)
    row = {
        **step.summary(),
        "per_s": round(statistics.median(rates), 1),
        "per_s_range": f"{min(rates):.0f}-{max(rates):.0f}",
        "server_cpu_ms": round(server_cpu / calls * 1000, 3),
        "client_cpu_ms": round(client_cpu / calls * 1000, 3),
        # Cores each process kept busy: near 1.0 for one whose Python threads share one GIL
        # and do little outside it, the bound of that process.
        "server_cores": round(server_cpu / wall, 2),
        "client_cores": round(client_cpu / wall, 2),
    }
    reports = [r for r in step.reports if r is not None]
    if encode is None or not reports:
        return row
    latency = statistics.mean(step.latencies) * 1000
    queue = statistics.mean(r.queue_ms for r in reports)
    compute = statistics.mean(r.compute_ms for r in reports)
    return {
        **row,
        "mean_batch_rows": round(statistics.mean(r.batch_size for r in reports), 1),
        "queue_ms": round(queue, 2),
        "compute_ms": round(compute, 2),
        "encode_ms": round(encode, 2),
        "transport_ms": round(max(0.0, latency - queue - compute - encode), 2),
    }


def response_size(dtype: int) -> int:
    itemsize = 4 if dtype == pb.DTYPE_FLOAT32 else 2
    kernel = pb.Tensor(shape=[1, 29, 29, OUT_DIM], dtype=dtype, data=bytes(POINTS * OUT_DIM * itemsize))  # type: ignore[arg-type]
    return len(pb.GenerateKernelResponse(kernel=kernel).SerializeToString())


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def per_round(a: list[Measured], b: list[Measured]) -> dict[str, float]:
    """The spread of ``a``'s rate over ``b``'s, taken round by round (same rounds, same order)."""
    return spread([x.step.rate / y.step.rate for x, y in zip(a, b, strict=True)])


def ratio_rows(ratios: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    return [
        {"ratio": k, "median": round(v["median"], 2), "min": round(v["min"], 2), "max": round(v["max"], 2)}
        for k, v in ratios.items()
    ]


def header(seconds: float, rounds: int, device: str, clients: Clients) -> dict[str, Any]:
    """What a result of interleaved rounds opens with: the machine and how it was measured."""
    return {
        "machine": machine(),
        "seconds_per_step": seconds,
        "rounds": rounds,
        "device": device,
        "client_processes": clients.processes,
        "connections_per_process": clients.connections,
    }


async def run(
    seconds: float, levels: list[int], rounds: int, device: str, clients: Clients
) -> dict[str, Any]:
    import torch

    result = header(seconds, rounds, device, clients)
    encodes = {
        d: encode_ms(t) for d, t in ((pb.DTYPE_FLOAT32, torch.float32), (pb.DTYPE_FLOAT16, torch.float16))
    }
    served_runs: dict[tuple[str, str, int], list[Measured]] = {}
    echo_runs: dict[tuple[str, int], list[Measured]] = {}
    device_flags = ["--device", device]
    # Every server is up for the whole run and the measurements interleave: each round
    # visits every (level, dtype) and, there, batching on, off and the echo back to back,
    # in an order that rotates per round. Machine noise then lands on all of them alike.
    with (
        kernelgen_server(*BATCHING["on"], *device_flags) as on,
        kernelgen_server(*BATCHING["off"], *device_flags) as off,
        echo_server(response_size(pb.DTYPE_FLOAT32)) as echo32,
        echo_server(response_size(pb.DTYPE_FLOAT16)) as echo16,
    ):
        servers = {"on": on, "off": off}
        echoes = {"float32": echo32, "float16": echo16}
        for r in range(rounds):
            for level in levels:
                for dtype_name, dtype in DTYPES.items():
                    order = ["on", "off", "echo"]
                    order = order[r % 3 :] + order[: r % 3]
                    for name in order:
                        if name == "echo":
                            server = echoes[dtype_name]
                            run_step = clients.step("echo", server.target, 0, level, seconds)
                            measured = await measure(server, run_step)
                            echo_runs.setdefault((dtype_name, level), []).append(measured)
                        else:
                            server = servers[name]
                            run_step = clients.step("served", server.target, dtype, level, seconds)
                            measured = await measure(server, run_step)
                            served_runs.setdefault((name, dtype_name, level), []).append(measured)
                        print(
                            f"round {r + 1}/{rounds} {name} {dtype_name} c{level}: "
                            f"{measured.step.rate:.0f}/s",
                            flush=True,
                        )
    result["steps"] = [
        {"batching": name, "dtype": dtype_name, **summarize(runs, encodes[DTYPES[dtype_name]])}
        for (name, dtype_name, _level), runs in sorted(
            served_runs.items(), key=lambda kv: (kv[0][0] != "on", kv[0][1], kv[0][2])
        )
    ]
    result["echo"] = [
        {"dtype": dtype_name, **summarize(runs, None)}
        for (dtype_name, _level), runs in sorted(echo_runs.items())
    ]
    result["engine_kernels_per_s"] = engine_rates(levels, seconds, device)
    result["core"] = core_rates(levels, seconds, device)

    ref = 32 if 32 in levels else levels[-1]
    result["ratios"] = {
        f"batching on / off, float32, concurrency {ref}": per_round(
            served_runs["on", "float32", ref], served_runs["off", "float32", ref]
        ),
        f"served (on, float32) / bare echo, concurrency {ref}": per_round(
            served_runs["on", "float32", ref], echo_runs["float32", ref]
        ),
        f"served (off, float32) / bare echo, concurrency {ref}": per_round(
            served_runs["off", "float32", ref], echo_runs["float32", ref]
        ),
        f"served (on, float16) / bare echo of the float16 size, concurrency {ref}": per_round(
            served_runs["on", "float16", ref], echo_runs["float16", ref]
        ),
    }
    core = {(row["batching"], row["concurrency"]): row["per_s"] for row in result["core"]}
    result["ratios"][f"in-process core (no gRPC), batching on / off, concurrency {ref}"] = spread(
        [core["on", ref] / core["off", ref]]
    )
    on_off, on_echo = (result["ratios"][k]["median"] for k in list(result["ratios"])[:2])
    result["targets"] = {
        "batching on >= 1.5x off at concurrency 32": on_off >= 1.5,
        "served >= 0.8x bare echo at concurrency 32": on_echo >= 0.8,
    }
    return result


def report(result: dict[str, Any]) -> str:
    m = result["machine"]
    engine = [{"batch": b, "kernels_per_s": round(r, 1)} for b, r in result["engine_kernels_per_s"].items()]
    parts = [
        "# Batching benchmark",
        f"Machine: {m['platform']}, {m['cpus']} CPUs, torch {m['torch']}, CUDA: {m['cuda']}; {m['date']}. "
        f"Server device: {result['device']}. {result['rounds']} interleaved rounds of "
        f"{result['seconds_per_step']} s per step; client ({result['client_processes']} process(es)) "
        "and server on the same machine.",
        "Workload: hyena-2d, seq_lens 15,15 (a 29x29 kernel, out_dim 384, 1.29 MB float32), one FiLM row per "
        "request, closed loop. `per_s` is the median round's rate (`per_s_range` the slowest and fastest); "
        "latencies pool all rounds. Times are means per request; compute is the whole batch's device time. "
        "`server_cpu_ms` and `client_cpu_ms` are the CPU time each process spent per call, all threads; "
        "`server_cores` and `client_cores` the cores each kept busy. A Python process whose threads hold "
        "the GIL for most of their work tops out near one core: where one of them is there, that process "
        "bounds the rate, and only less CPU per call in it raises it.",
        "## Served",
        markdown_table(result["steps"]),
        "## Bare gRPC echo of the same response size (transport ceiling)",
        markdown_table(result["echo"]),
        "## In-process engine (no transport)",
        markdown_table(engine),
        "## In-process service core (no gRPC)",
        "`KernelService.generate` in a closed loop in a process of its own, as the server runs it (malloc "
        "tuned, its torch threads), float32, one round: what batching gains once no transport shares the "
        "machine.",
        markdown_table(result["core"]),
        "## Ratios (per round, same run)",
        markdown_table(ratio_rows(result["ratios"])),
        "## Targets (median ratios)",
        markdown_table([{"target": k, "met": v} for k, v in result["targets"].items()]),
    ]
    return "\n\n".join(parts) + "\n"


#: Steps of 2 s, 3 interleaved rounds; ``--quick``: one round of 1 s steps.
BATCHING_ROUNDS = Rounds(seconds=2.0, warmup=None, rounds=3, quick_seconds=1.0)


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--concurrency", type=int_list, default="1,8,32,64", help="comma-separated closed-loop levels"
    )
    parser.add_argument(
        "--device", default="auto", help="the servers' and the engine's device (auto, cpu, cuda)"
    )
    parser.add_argument(
        "--client-processes", type=int, default=1, help="client processes sharing each step's concurrency"
    )


def run_from_args(args: argparse.Namespace) -> dict[str, Any]:
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    with Clients(max(1, args.client_processes)) as clients:
        return asyncio.run(run(args.seconds, args.concurrency, args.rounds, device, clients))


def main() -> None:
    benchmark_main(
        run_from_args, report, doc=__doc__, output="batching", rounds=BATCHING_ROUNDS, arguments=arguments
    )


if __name__ == "__main__":
    main()
