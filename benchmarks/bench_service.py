"""Service benchmark (issue 3): cache, transport and served-vs-in-process ratios.

    python benchmarks/bench_service.py [--seconds 3]

Measures, in one run on one machine:
1. cache-hit vs cache-miss latency for the 2D model's 29x29x384 kernel (1.29 MB),
   and the hit against a bare gRPC echo of the same bytes (target: p50 <= 1.5x);
2. unary vs streaming GB/s for a 16.8 MB kernel, against the bare echo (unary and
   streamed) and a raw loopback TCP socket (target: streaming >= 0.5x the socket);
3. served vs in-process kernels/s (unconditioned cache misses and one-row conditioned).
Writes benchmarks/results/service.json and service.md.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import threading
from typing import Any

import grpc
import numpy as np
from harness import (
    GENERATE,
    STREAM,
    Rounds,
    benchmark_main,
    closed_loop,
    echo_server,
    kernelgen_server,
    load_generator,
    machine,
    markdown_table,
    median_rate,
    merge,
    raw,
)

from kernelgen_wire.v1 import kernelgen_pb2 as pb

BIG = 64 << 20
ROUNDS = 5


def channel(target: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(
        target, options=[("grpc.max_receive_message_length", BIG), ("grpc.max_send_message_length", BIG)]
    )


async def latency_step(target: str, method: str, request: bytes, seconds: float, stream: bool = False) -> Any:
    async with channel(target) as ch:
        if stream:
            call_stream = ch.unary_stream(method, request_serializer=raw, response_deserializer=raw)

            async def call() -> tuple[int, Any]:
                n = 0
                async for chunk in call_stream(request):
                    n += len(chunk)
                return n, None
        else:
            call_unary = ch.unary_unary(method, request_serializer=raw, response_deserializer=raw)

            async def call() -> tuple[int, Any]:
                return len(await call_unary(request)), None

        return await closed_loop(call, 1, seconds)


def raw_socket_gbps(nbytes: int, seconds: float) -> float:
    """Loopback TCP: one sender thread, a receiver reading into one preallocated buffer."""
    payload = bytes(nbytes)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]

    def send() -> None:
        conn, _ = server.accept()
        with conn:
            while conn.recv(1):  # one byte asks for one payload
                conn.sendall(payload)

    threading.Thread(target=send, daemon=True).start()
    buffer = bytearray(nbytes)
    view = memoryview(buffer)
    with socket.create_connection(("127.0.0.1", port)) as client:

        def transfer() -> None:
            client.sendall(b"x")
            got = 0
            while got < nbytes:
                got += client.recv_into(view[got:], nbytes - got)

        rate = median_rate(transfer, min_time=seconds)
    server.close()
    return rate * nbytes / 1e9


def in_process_rates(seconds: float) -> dict[str, float]:
    import torch

    from kernelgen_server.engine.kernel_engine import KernelEngine
    from kernelgen_server.repository.store import ModelRepository, embedded_repository

    torch.set_num_threads(1)  # as the server runs it on this machine (one core left for gRPC)
    model = ModelRepository.load(embedded_repository()).ready["hyena-2d"]
    engine = KernelEngine(model.module)
    cond = [torch.randn(1, 384)]
    return {
        "unconditioned": median_rate(lambda: engine.unconditioned((15, 15), torch.float32), seconds),
        "conditioned": median_rate(lambda: engine.conditioned((15, 15), cond, torch.float32), seconds),
    }


async def run(seconds: float) -> dict[str, Any]:
    kernel_req = pb.GenerateKernelRequest(model="hyena-2d", seq_lens=[15, 15]).SerializeToString()
    cond = np.random.default_rng(0).standard_normal((1, 384)).astype("<f4")
    cond_req = pb.GenerateKernelRequest(
        model="hyena-2d",
        seq_lens=[15, 15],
        conditioning=pb.Tensor(shape=[1, 384], dtype=pb.DTYPE_FLOAT32, data=cond.tobytes()),
    ).SerializeToString()
    big_req = pb.GenerateKernelRequest(model="long-1d", seq_lens=[8192]).SerializeToString()
    kernel_bytes, big_bytes = 29 * 29 * 384 * 4, 16383 * 256 * 4
    out: dict[str, Any] = {"machine": machine()}

    echo_size = len(pb.GenerateKernelResponse(kernel=pb.Tensor(data=bytes(kernel_bytes))).SerializeToString())
    # Hit, miss and echo latencies alternate in short rounds, all three servers up at once,
    # so machine noise lands on all of them alike; the ratios are medians over the rounds.
    hits, misses, echoes = [], [], []
    with (
        kernelgen_server("--max-message-bytes", "32MiB") as server,
        kernelgen_server("--cache-bytes", "0") as no_cache_server,
        echo_server(echo_size) as echo_proc,
    ):
        target, no_cache, echo_target = server.target, no_cache_server.target, echo_proc.target
        for _ in range(ROUNDS):
            hits.append(await latency_step(target, GENERATE, kernel_req, seconds / ROUNDS))
            misses.append(await latency_step(no_cache, GENERATE, kernel_req, seconds / ROUNDS))
            echoes.append(await latency_step(echo_target, "/bench.Echo/Unary", b"", seconds / ROUNDS))
        big_unary = await latency_step(target, GENERATE, big_req, seconds)
        big_stream = await latency_step(target, STREAM, big_req, seconds, stream=True)
        served_cond = await latency_step(target, GENERATE, cond_req, seconds)
    hit, miss, echo = merge(hits), merge(misses), merge(echoes)
    with echo_server(big_bytes) as big_echo:
        t = big_echo.target
        echo_big = await latency_step(t, "/bench.Echo/Unary", b"", seconds)
        echo_big_stream = await latency_step(t, "/bench.Echo/Stream", b"", seconds, stream=True)
    socket_gbps = raw_socket_gbps(big_bytes, seconds)
    local = in_process_rates(seconds)

    def gbps(step: Any) -> float:
        return step.nbytes / step.seconds / 1e9

    out["cache"] = {
        "hit_p50_ms": hit.percentile(50) * 1e3,
        "miss_p50_ms": miss.percentile(50) * 1e3,
        "echo_p50_ms": echo.percentile(50) * 1e3,
        "hit_over_echo_p50": statistics.median(
            h.percentile(50) / e.percentile(50) for h, e in zip(hits, echoes, strict=True)
        ),
        "miss_over_hit_p50": statistics.median(
            m.percentile(50) / h.percentile(50) for m, h in zip(misses, hits, strict=True)
        ),
    }
    out["transport_16MB"] = {
        "unary_GBps": gbps(big_unary),
        "stream_GBps": gbps(big_stream),
        "echo_unary_GBps": gbps(echo_big),
        "echo_stream_GBps": gbps(echo_big_stream),
        "raw_socket_GBps": socket_gbps,
        "stream_over_socket": gbps(big_stream) / socket_gbps,
        "stream_over_unary": gbps(big_stream) / gbps(big_unary),
        "stream_over_echo_stream": gbps(big_stream) / gbps(echo_big_stream),
    }
    out["served_vs_in_process"] = {
        "served_miss_per_s": miss.rate,
        "in_process_unconditioned_per_s": local["unconditioned"],
        "served_miss_over_in_process": miss.rate / local["unconditioned"],
        "served_conditioned_per_s": served_cond.rate,
        "in_process_conditioned_per_s": local["conditioned"],
        "served_conditioned_over_in_process": served_cond.rate / local["conditioned"],
    }
    out["targets"] = {
        "cache hit p50 <= 1.5x echo": out["cache"]["hit_over_echo_p50"] <= 1.5,
        "streaming >= 0.5x raw socket": out["transport_16MB"]["stream_over_socket"] >= 0.5,
    }
    return out


def report(result: dict[str, Any]) -> str:
    def rows(section: str) -> list[dict[str, Any]]:
        return [
            {"metric": k, "value": f"{v:.3f}" if isinstance(v, float) else v}
            for k, v in result[section].items()
        ]

    m = result["machine"]
    parts = [
        "# Service benchmark",
        f"Machine: {m['platform']}, {m['cpus']} CPUs, torch {m['torch']}, CUDA: {m['cuda']}; {m['date']}.",
        "All figures from one run. Cache hit, miss and echo latencies alternate in 5 short rounds with all "
        "three servers up (ratios: median over rounds); the other ratios compare steps seconds apart.",
        "## Cache (2D model, 29x29x384 float32 = 1.29 MB, concurrency 1)",
        markdown_table(rows("cache")),
        "## 16.8 MB kernel, concurrency 1",
        markdown_table(rows("transport_16MB")),
        "## Served vs in-process kernels/s (concurrency 1)",
        markdown_table(rows("served_vs_in_process")),
        "## Targets",
        markdown_table([{"target": k, "met": v} for k, v in result["targets"].items()]),
    ]
    return "\n\n".join(parts) + "\n"


def run_from_args(args: argparse.Namespace) -> dict[str, Any]:
    load_generator()
    return asyncio.run(run(args.seconds))


def main() -> None:
    rounds = Rounds(seconds=3.0, warmup=None, rounds=None, quick_seconds=1.0)
    benchmark_main(run_from_args, report, doc=__doc__, output="service", rounds=rounds)


if __name__ == "__main__":
    main()
