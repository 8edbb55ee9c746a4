"""Serving benchmark (issue 4): dynamic batching of FiLM-conditioned requests.

    python benchmarks/bench_batching.py [--seconds 3] [--concurrency 1,8,32,64]

The embedded 2D FiLM model (hyena-2d: 29x29 grid, out_dim 384, one conditioning
row per request), closed loop at each concurrency, batching on vs off, float32
and float16 output; the in-process engine at the same batch sizes; and a bare
gRPC echo of the same response size at the same concurrency (the transport
ceiling). Each served request's time is split into queue and compute (from
the server's report), encode (measured in-process) and transport (the rest).
Writes benchmarks/results/batching.json and batching.md.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

import grpc
import numpy as np
from harness import (
    GENERATE,
    Step,
    closed_loop,
    echo_server,
    kernelgen_server,
    machine,
    markdown_table,
    median_rate,
    raw,
    write_results,
)

from kernelgen_client._proto.kernelgen.v1 import kernelgen_pb2 as pb

REPORT_KEY = "kernelgen-report-bin"
SEQ_LENS = (15, 15)
POINTS = 29 * 29
OUT_DIM = 384


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


async def served(target: str, dtype: int, concurrency: int, seconds: float) -> Step:
    bodies = requests(dtype)
    counter = iter(range(1 << 60))
    async with grpc.aio.insecure_channel(target) as channel:
        method = channel.unary_unary(GENERATE, request_serializer=raw, response_deserializer=raw)

        async def call() -> tuple[int, Any]:
            rpc = method(bodies[next(counter) % len(bodies)])
            data = await rpc
            trailers = dict(await rpc.trailing_metadata() or ())
            return len(data), pb.ServerReport.FromString(trailers[REPORT_KEY])

        return await closed_loop(call, concurrency, seconds)


async def echo(target: str, concurrency: int, seconds: float) -> Step:
    async with grpc.aio.insecure_channel(target) as channel:
        method = channel.unary_unary("/bench.Echo/Unary", request_serializer=raw, response_deserializer=raw)

        async def call() -> tuple[int, Any]:
            return len(await method(b"")), None

        return await closed_loop(call, concurrency, seconds)


def engine_rates(batch_sizes: list[int], seconds: float) -> dict[int, float]:
    import torch

    from kernelgen_server.engine import KernelEngine
    from kernelgen_server.repository import ModelRepository, embedded_repository

    torch.set_num_threads(1)  # as the server runs it on this machine (one core left for gRPC)
    engine = KernelEngine(ModelRepository.load(embedded_repository()).ready["hyena-2d"].module)
    rates = {}
    for batch in batch_sizes:
        conds = [torch.randn(1, 384) for _ in range(batch)]
        rates[batch] = batch * median_rate(
            lambda c=conds: engine.conditioned(SEQ_LENS, c, torch.float32), seconds
        )
    return rates


def encode_ms(dtype: Any) -> float:
    import torch

    from kernelgen_server.codec import to_payload
    from kernelgen_server.wire import encode_kernel

    tensor = torch.randn(1, 29, 29, OUT_DIM).to(dtype)
    return 1000.0 / median_rate(lambda: encode_kernel(to_payload(tensor)), 0.5)


def breakdown(step: Step, encode: float) -> dict[str, Any]:
    reports = [r for r in step.reports if r is not None]
    latency = statistics.mean(step.latencies) * 1000
    queue = statistics.mean(r.queue_ms for r in reports)
    compute = statistics.mean(r.compute_ms for r in reports)
    return {
        **step.summary(),
        "mean_batch_rows": round(statistics.mean(r.batch_size for r in reports), 1),
        "queue_ms": round(queue, 2),
        "compute_ms": round(compute, 2),
        "encode_ms": round(encode, 2),
        "transport_ms": round(max(0.0, latency - queue - compute - encode), 2),
    }


async def run(seconds: float, levels: list[int]) -> dict[str, Any]:
    import torch

    result: dict[str, Any] = {"machine": machine(), "seconds_per_step": seconds, "steps": []}
    encodes = {pb.DTYPE_FLOAT32: encode_ms(torch.float32), pb.DTYPE_FLOAT16: encode_ms(torch.float16)}
    for batching, flags in (
        ("on", ["--max-batch-size", "64", "--max-queue-delay-ms", "0"]),
        ("off", ["--max-batch-size", "1"]),
    ):
        with kernelgen_server(*flags) as target:
            for dtype_name, dtype in (("float32", pb.DTYPE_FLOAT32), ("float16", pb.DTYPE_FLOAT16)):
                for level in levels:
                    step = await served(target, dtype, level, seconds)
                    row = {"batching": batching, "dtype": dtype_name, **breakdown(step, encodes[dtype])}
                    result["steps"].append(row)
                    print(row, flush=True)
    size = len(
        pb.GenerateKernelResponse(
            kernel=pb.Tensor(shape=[1, 29, 29, 384], dtype=1, data=bytes(POINTS * OUT_DIM * 4))
        ).SerializeToString()
    )
    result["echo"] = []
    with echo_server(size) as target:
        for level in levels:
            step = await echo(target, level, seconds)
            result["echo"].append(step.summary())
            print("echo", step.summary(), flush=True)
    result["engine_kernels_per_s"] = engine_rates(levels, seconds)

    def rate(batching: str, dtype: str, level: int) -> float:
        return next(
            s["per_s"]
            for s in result["steps"]
            if s["batching"] == batching and s["dtype"] == dtype and s["concurrency"] == level
        )

    echo_rate = {e["concurrency"]: e["per_s"] for e in result["echo"]}
    ref = 32 if 32 in levels else levels[-1]
    result["ratios"] = {
        f"batching on / off, float32, concurrency {ref}": rate("on", "float32", ref)
        / rate("off", "float32", ref),
        f"served (on, float32) / bare echo, concurrency {ref}": rate("on", "float32", ref) / echo_rate[ref],
        f"served (on, float16) / bare echo, concurrency {ref}": rate("on", "float16", ref) / echo_rate[ref],
    }
    result["targets"] = {
        "batching on >= 1.5x off at concurrency 32": result["ratios"][
            f"batching on / off, float32, concurrency {ref}"
        ]
        >= 1.5,
        "served >= 0.8x bare echo at concurrency 32": result["ratios"][
            f"served (on, float32) / bare echo, concurrency {ref}"
        ]
        >= 0.8,
    }
    return result


def report(result: dict[str, Any]) -> str:
    m = result["machine"]
    engine = [{"batch": b, "kernels_per_s": round(r, 1)} for b, r in result["engine_kernels_per_s"].items()]
    parts = [
        "# Batching benchmark",
        f"Machine: {m['platform']}, {m['cpus']} CPUs, torch {m['torch']}, CUDA: {m['cuda']}; {m['date']}. "
        f"{result['seconds_per_step']} s per step, client and server on the same machine.",
        "Workload: hyena-2d, seq_lens 15x15 (29x29 grid, out_dim 384, 1.29 MB float32), one FiLM row per "
        "request, closed loop. Times are means per request; compute is the whole batch's device time.",
        "## Served",
        markdown_table(result["steps"]),
        "## Bare gRPC echo of the same response size (transport ceiling)",
        markdown_table(result["echo"]),
        "## In-process engine (no transport)",
        markdown_table(engine),
        "## Ratios (same run)",
        markdown_table([{"ratio": k, "value": round(v, 2)} for k, v in result["ratios"].items()]),
        "## Targets",
        markdown_table([{"target": k, "met": v} for k, v in result["targets"].items()]),
    ]
    return "\n\n".join(parts) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per step")
    parser.add_argument("--concurrency", default="1,8,32,64", help="comma-separated closed-loop levels")
    args = parser.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    started = time.time()
    result = asyncio.run(run(args.seconds, levels))
    write_results("batching", result, report(result))
    print(f"({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
