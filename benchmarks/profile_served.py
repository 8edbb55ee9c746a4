"""Where a served kernel's CPU goes: a sampling profile of ``kernelgen serve`` under load.

    python benchmarks/profile_served.py                 # dense, concurrency 32, 12 s of samples
    python benchmarks/profile_served.py --representation factored

Runs ``kernelgen serve`` (CPU, its defaults) under ``kernelgen loadtest``
(hyena-2d, one FiLM row per request, seq_lens 15,15: a 29x29 kernel) and samples the server
with py-spy (``pip install py-spy``), every thread, Python frames only and
without pausing the server (``--nonblocking``): native frames need it paused at
each sample, which slowed it about 3x and skewed every share. A thread whose
innermost frame is ``Thread.run`` runs native code started from Python: gRPC's
poller, counted as transport.
Every sample is put in one bucket by the innermost frame that names it
(``BUCKETS``, first match from the leaf up): the kernel's compute, encoding it
into the response, the batcher, the service core, the servicer, metrics,
gRPC's own work on the event loop, and waiting. The table gives each
bucket's share of the samples and its CPU per served kernel (share x the
server's CPU seconds / kernels served in the sampled window), and is written
to ``benchmarks/results/profile_<representation>.md``; the raw samples go
next to it (``.txt``, py-spy's collapsed stacks).
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import RESULTS, kernelgen_server, machine, markdown_table

#: (bucket, frame-name fragments); a sample's bucket is that of the innermost frame that matches.
BUCKETS: list[tuple[str, tuple[str, ...]]] = [
    ("waiting (idle threads)", ("Condition.wait", "EpollSelector.select", "Queue.get", "_poll_wrapper")),
    ("kernel compute (torch)", ("KernelEngine.", "_Affine.")),
    ("encoding responses (one copy)", ("encode_kernel", "encode_response", "encode_data", "to_payload")),
    ("batcher (queue, futures)", ("DynamicBatcher.", "batcher.py")),
    (
        "device queue and thread hand-offs",
        ("DeviceQueue.", "ServiceThreads.", "call_soon_threadsafe", "_chain_future"),
    ),
    ("metrics", ("metrics.py", "prometheus_client", "MetricWrapperBase", "Histogram.", "Counter.", "Gauge.")),
    (
        "service core (validation, cache)",
        ("KernelService.", "ByteLRUCache.", "InflightBudget.", "tensors.py"),
    ),
    (
        "servicer (decode, status)",
        ("KernelGeneratorServicer.", "rpc_scope", "status.py", "decode_conditioning"),
    ),
    ("gRPC and the event loop (transport)", ("Handle._run", "_run_once", "cygrpc", "grpc")),
]


def bucket_of(stack: list[str]) -> str:
    if stack and stack[-1].startswith("Thread.run "):
        return "gRPC and the event loop (transport)"  # a native thread target: gRPC's poller
    for frame in reversed(stack):
        for name, fragments in BUCKETS:
            if any(fragment in frame for fragment in fragments):
                return name
    return "other"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    import os

    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(args: argparse.Namespace) -> dict[str, object]:
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(pyspy).exists():
        raise SystemExit("py-spy is needed: pip install py-spy")
    out = Path(tempfile.mkdtemp()) / "samples.txt"
    summary = Path(out.parent / "loadtest.json")
    with kernelgen_server("--device", "cpu") as server:
        command = [
            sys.executable,
            "-m",
            "kernelgen_client.cli",
            "loadtest",
            "hyena-2d",
            "--seq-lens",
            "15,15",
            "--concurrency",
            str(args.concurrency),
            "--duration",
            str(args.seconds + 6),
            "--warmup",
            "2",
            "--representation",
            args.representation,
            "--target",
            server.target,
            "--quiet",
            "--json",
            str(summary),
        ]
        load = subprocess.Popen(command)
        time.sleep(4)  # warm-up and the first seconds of load
        before = cpu_seconds(server.pid)
        started = time.perf_counter()
        subprocess.run(
            [pyspy, "record", "--pid", str(server.pid), "--duration", str(args.seconds), "--rate", "250",
             "--format", "raw", "--output", str(out), "--threads", "--nonblocking"],
            check=True, capture_output=True,
        )  # fmt: skip
        server_cpu = cpu_seconds(server.pid) - before
        window = time.perf_counter() - started
        load.wait(timeout=120)
    step = json.loads(summary.read_text())["steps"][0]
    kernels = step["kernels_per_s"] * window
    counts: collections.Counter[str] = collections.Counter()
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack:
            counts[bucket_of(stack.split(";")[1:])] += int(count)
    total = sum(counts.values())
    busy = total - counts["waiting (idle threads)"]
    raw_copy = RESULTS / f"profile_{args.representation}.txt"
    shutil.copyfile(out, raw_copy)
    return {
        "machine": machine(),
        "representation": args.representation,
        "concurrency": args.concurrency,
        "seconds": window,
        "kernels_per_s": step["kernels_per_s"],
        "p99_ms": step["latency_ms"]["p99"],
        "server_cpu_ms_per_kernel": 1000 * server_cpu / kernels,
        "buckets": {
            name: {
                "share_of_busy": counts[name] / busy if name != "waiting (idle threads)" else None,
                "cpu_ms_per_kernel": 1000 * server_cpu * counts[name] / busy / kernels
                if name != "waiting (idle threads)"
                else None,
                "samples": counts[name],
            }
            for name in [b for b, _ in BUCKETS] + ["other"]
        },
    }


def report(result: dict[str, object]) -> str:
    m: dict[str, object] = result["machine"]  # type: ignore[assignment]
    buckets: dict[str, dict[str, object]] = result["buckets"]  # type: ignore[assignment]
    busy = sorted(
        ((name, b) for name, b in buckets.items() if b["share_of_busy"] is not None),
        key=lambda item: -float(item[1]["share_of_busy"]),  # type: ignore[arg-type]
    )
    rows = [
        {
            "where": name,
            "share of busy samples": f"{b['share_of_busy']:.1%}",
            "CPU ms per kernel": f"{b['cpu_ms_per_kernel']:.3f}",
        }
        for name, b in busy
    ]
    return (
        f"# Where a served {result['representation']} kernel's server CPU goes\n\n"
        f"{m['date']}, {m['platform']}, {m['cpus']} CPUs. `kernelgen serve` (CPU, defaults) under "
        f"`kernelgen loadtest` at concurrency {result['concurrency']} "
        "(hyena-2d, one FiLM row, seq_lens 15,15, "
        f"{result['representation']}); py-spy sampled every thread's Python frames, not pausing it, for "
        f"{result['seconds']:.0f} s: {result['kernels_per_s']:.0f} kernels/s, p99 {result['p99_ms']:.0f} ms, "
        f"server CPU {result['server_cpu_ms_per_kernel']:.2f} ms per kernel.\n\n"
        "Each busy sample is counted in the bucket of its innermost recognised frame; a bucket's CPU per "
        "kernel is its share of the busy samples times the server's CPU per kernel.\n\n"
        + markdown_table(rows)
        + f"\n\nRaw samples (py-spy collapsed stacks): [profile_{result['representation']}.txt]"
        f"(profile_{result['representation']}.txt).\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=int, default=12, help="seconds of samples (12)")
    parser.add_argument("--representation", choices=("dense", "factored"), default="dense")
    args = parser.parse_args()
    result = run(args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"profile_{args.representation}"
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    text = report(result)
    (RESULTS / f"{name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
