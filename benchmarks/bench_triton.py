"""Side by side: kernelgen against Triton Inference Server, same model, same load, same run.

    python benchmarks/bench_triton.py [--quick] [--seconds 5] [--rounds 3] [--concurrency 1,8,32,64]
                                      [--model-repo DIR] [--model hyena-2d] [--seq-lens 15,15]
                                      [--no-triton]

One model repository (the embedded one unless ``--model-repo``) is served twice on this machine:

- by ``kernelgen serve --max-batch-size 64`` (its default queue delay, 0 ms);
- by Triton Inference Server through PyTriton: a Python inference callable behind Triton's
  dynamic batcher (max batch 64, 2 ms max queue delay), which computes each batch with the
  repository's reference model (``SIRENKernelND``), grouped by seq_lens. Inputs per request:
  ``conditioning`` FP32 [cond_dim] and ``seq_lens`` INT64 [data_dim], Triton adding the batch
  dimension; output ``kernel`` FP32 [*spatial, out_dim].

Workload: one FiLM row per request, float32 output; by default hyena-2d at seq_lens 15,15, a
29x29 kernel of out_dim 384 (1.29 MB per kernel). Before measuring, one response of each server
is compared with the reference model run in this process.

The load generator is the same for all: ``harness.closed_loop`` (N coroutines, warm-up, fixed
duration, latency percentiles) around a "send one request" coroutine, in a client process of
its own per system with one connection each. Three systems:

- ``kernelgen``: ``kernelgen_client.AsyncKernelClient`` against kernelgen's native API;
- ``kernelgen-oip``: tritonclient's asyncio gRPC client against the same kernelgen server's
  Open Inference Protocol (same port, same process);
- ``triton``: tritonclient's asyncio gRPC client against Triton.

Both servers stay up for the whole run; each round visits every concurrency and, there, every
system back to back, in an order that rotates per round. The CPU time of each server (all its
processes) and of its client process is recorded per served kernel.

glibc malloc is tuned alike in every process of both sides: kernelgen's client calls
``kernelgen_client.tune_malloc`` (``kernelgen serve`` applies it itself); Triton's processes (the
Python process of the callable, ``tritonserver`` and its Python backend stub, and the client)
get the same thresholds through ``GLIBC_TUNABLES``, which reaches the C++ server too.

PyTriton is an optional dependency: the script makes its virtual environment in
``.bench-venvs/triton`` (reused while its requirements are unchanged) from Debian's Python,
``/usr/bin/python3``, because the Python backend stub that PyTriton ships loads
``libpython3.X.so`` from the system library path. That environment holds kernelgen installed
without its dependencies plus only what the model repository needs (torch, safetensors,
pydantic) and tritonclient; it imports no kernelgen client code, so the tritonclient side of
both servers runs exactly as a Triton user's would. Where the environment cannot be made or Triton does not
start, Triton is skipped with the reason, printed and recorded, and kernelgen is still measured.

Writes benchmarks/results/triton.json and triton.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hashlib
import inspect
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from harness import (
    ROOT,
    ClientProcess,
    ServerProcess,
    Step,
    benchmark_main,
    closed_loop,
    cpu_seconds,
    free_port,
    int_list,
    kernelgen_server,
    machine,
    markdown_table,
    process,
    process_tree,
    reply,
)

BENCH = Path(__file__).resolve()
VENV_DIR = ROOT / ".bench-venvs" / "triton"
DEBIAN_PYTHON = "/usr/bin/python3"
# What the Triton environment holds: PyTriton, its client, and what the model repository code
# imports. torch is pinned: unpinned, pip would fetch a CUDA build of several GB.
TRITON_REQUIREMENTS = [
    "nvidia-pytriton",
    "tritonclient[grpc]",
    "numpy",
    "torch==2.13.0",
    "safetensors",
    "pydantic",
]
TRITON_MAX_BATCH = 64
TRITON_QUEUE_DELAY_US = 2000
KERNELGEN_FLAGS = ["--max-batch-size", "64", "--max-queue-delay-ms", "0"]
ROWS = 64  # distinct conditioning rows the clients cycle through


# --- kernelgen: every import of the product is in this block ------------------------------------
def kernelgen_client_api() -> tuple[Any, Callable[..., bool]]:
    """``AsyncKernelClient`` and ``tune_malloc``, from the client package."""
    from kernelgen_client import AsyncKernelClient, tune_malloc

    return AsyncKernelClient, tune_malloc


def reference_model(model_repo: str | None, name: str) -> Any:
    """The repository's ``LoadedModel`` ``name`` (its ``module`` is the reference SIRENKernelND)."""
    from kernelgen_server.repository.store import ModelRepository, embedded_repository

    return ModelRepository.load(model_repo or embedded_repository()).get(name)


# --- end of the kernelgen imports ---------------------------------------------------------------


# --- glibc malloc ---------------------------------------------------------------------------------
def glibc_tunables() -> str:
    """``GLIBC_TUNABLES`` for the thresholds ``tune_malloc`` applies by default.

    For processes that cannot call it: Triton's C++ server, its backend stub, and the
    Python processes of the Triton environment (which cannot import kernelgen's client).
    """
    _, tune_malloc = kernelgen_client_api()
    defaults = inspect.signature(tune_malloc).parameters
    mmap_threshold = defaults["mmap_threshold"].default
    trim_threshold = defaults["trim_threshold"].default
    return f"glibc.malloc.mmap_threshold={mmap_threshold}:glibc.malloc.trim_threshold={trim_threshold}"


# --- the Triton environment -----------------------------------------------------------------------
def _pip(python: Path, *args: str, log: Path) -> None:
    command = [str(python), "-m", "pip", "install", "--disable-pip-version-check", *args]
    with log.open("a") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False).returncode
    if code:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise RuntimeError(f"pip install {' '.join(args)} failed (exit {code}); see {log}:\n{tail}")


def triton_environment(venv: Path, base_python: str) -> Path:
    """The Triton environment's Python, made (or remade) when missing or out of date.

    Raises RuntimeError with the reason when it cannot be made.
    """
    # kernelgen is installed in editable mode from this checkout: a changed pyproject remakes it.
    pyproject = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    stamp_text = json.dumps(
        {
            "python": base_python,
            "requirements": TRITON_REQUIREMENTS,
            "root": str(ROOT),
            "pyproject": pyproject,
        }
    )
    stamp = venv / ".bench-stamp"
    python = venv / "bin" / "python"
    if stamp.exists() and stamp.read_text() == stamp_text and python.exists():
        return python
    if not Path(base_python).exists():
        raise RuntimeError(f"{base_python} not found (PyTriton's backend stub needs the system's Python)")
    print(f"making the Triton environment in {venv} (pip, about a minute) ...", flush=True)
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    made = subprocess.run([base_python, "-m", "venv", str(venv)], capture_output=True, text=True, check=False)
    if made.returncode:
        raise RuntimeError(f"{base_python} -m venv failed: {made.stderr.strip() or made.stdout.strip()}")
    log = venv / "pip.log"
    _pip(python, *TRITON_REQUIREMENTS, log=log)
    # kernelgen itself without its dependencies: the model repository (the only part imported
    # there) needs none of the wire code, and tritonclient keeps its own pins.
    _pip(python, "--no-deps", "-e", str(ROOT), log=log)
    probe = "import pytriton.triton, tritonclient.grpc.aio, kernelgen_server.repository.store"
    checked = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, check=False)
    if checked.returncode:
        raise RuntimeError(f"the Triton environment does not import: {checked.stderr.strip()[-2000:]}")
    stamp.write_text(stamp_text)
    return python


# --- the Triton server (runs in the Triton environment) -------------------------------------------
def serve_triton(args: argparse.Namespace) -> None:
    """PyTriton on ``args.port``, until SIGTERM/SIGINT or until its parent goes."""
    import torch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    torch.set_num_threads(args.threads)
    loaded = reference_model(args.model_repo, args.model)
    module = loaded.module
    config = loaded.config
    if config.film is None:
        raise SystemExit(f"model {args.model} has no FiLM: nothing to condition")

    def infer(requests: list[Any]) -> list[dict[str, np.ndarray]]:
        # One forward per distinct seq_lens in the batch, then each request gets its rows back.
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, request in enumerate(requests):
            lens = request["seq_lens"]
            if len(lens) and not (lens == lens[0]).all():
                raise ValueError("one request's rows must share seq_lens")
            groups.setdefault(tuple(int(n) for n in lens[0]), []).append(i)
        outputs: list[dict[str, np.ndarray]] = [{} for _ in requests]
        for lens, members in groups.items():
            conditioning = np.concatenate([requests[i]["conditioning"] for i in members])
            with torch.inference_mode():
                kernel, _ = module(lens, torch.from_numpy(conditioning))
            kernels = kernel.numpy()
            start = 0
            for i in members:
                rows = len(requests[i]["conditioning"])
                outputs[i] = {"kernel": kernels[start : start + rows]}
                start += rows
        return outputs

    # A handler, not a blocked signal mask: the mask would pass to tritonserver, which then
    # could not be stopped by PyTriton.
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    parent = os.getppid()
    triton_config = TritonConfig(
        grpc_address="127.0.0.1",
        grpc_port=args.port,
        allow_http=False,
        allow_metrics=False,
        log_verbose=0,
    )
    triton = Triton(config=triton_config)
    try:
        triton.bind(
            model_name=args.model,
            infer_func=infer,
            inputs=[
                Tensor(name="conditioning", dtype=np.float32, shape=(config.film.cond_dim,)),
                Tensor(name="seq_lens", dtype=np.int64, shape=(config.data_dim,)),
            ],
            outputs=[
                Tensor(name="kernel", dtype=np.float32, shape=(-1,) * config.data_dim + (config.out_dim,))
            ],
            config=ModelConfig(
                max_batch_size=TRITON_MAX_BATCH,
                batcher=DynamicBatcher(max_queue_delay_microseconds=TRITON_QUEUE_DELAY_US),
            ),
        )
        triton.run()
        print(f"triton serving on 127.0.0.1:{args.port}", flush=True)
        while triton.is_alive() and os.getppid() == parent and not stop.wait(1.0):
            pass
    finally:
        triton.stop()


# --- the clients (each in a process of its own) ---------------------------------------------------
def conditioning_rows(cond_dim: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((ROWS, cond_dim), dtype=np.float32)


Sender = tuple[Callable[[int], Awaitable[np.ndarray]], Callable[[], Awaitable[None]], dict[str, Any]]


async def triton_sender(target: str, model: str, seq_lens: list[int], rows: np.ndarray) -> Sender:
    """A coroutine sending row ``i`` to Triton (tritonclient's asyncio gRPC client), and a closer.

    Triton batches every input: ``conditioning`` FP32 [1, cond_dim] and ``seq_lens`` INT64 [1, data_dim].
    """
    packages = ("nvidia-pytriton", "tritonclient", "grpcio", "protobuf", "numpy")
    lens = np.array([seq_lens], dtype=np.int64)
    return await tritonclient_sender(target, model, rows, lens, seq_lens_first=False, packages=packages)


async def kernelgen_oip_sender(target: str, model: str, seq_lens: list[int], rows: np.ndarray) -> Sender:
    """A coroutine sending row ``i`` to kernelgen's Open Inference Protocol with tritonclient.

    kernelgen's OIP inputs: ``seq_lens`` INT64 [data_dim] and ``conditioning`` FP32
    [rows, cond_dim]; output ``kernel`` FP32 [rows, *spatial, out_dim].
    """
    packages = ("tritonclient", "grpcio", "protobuf", "numpy")
    lens = np.array(seq_lens, dtype=np.int64)
    return await tritonclient_sender(target, model, rows, lens, seq_lens_first=True, packages=packages)


async def tritonclient_sender(
    target: str,
    model: str,
    rows: np.ndarray,
    lens: np.ndarray,
    *,
    seq_lens_first: bool,
    packages: tuple[str, ...],
) -> Sender:
    """tritonclient sending row ``i`` and ``lens`` (``seq_lens``, as shaped) over asyncio, and a closer."""
    from importlib.metadata import version

    from tritonclient.grpc import InferInput, InferRequestedOutput
    from tritonclient.grpc.aio import InferenceServerClient

    client = InferenceServerClient(target)
    metadata = await client.get_server_metadata()
    requested = [InferRequestedOutput("kernel")]

    async def send(i: int) -> np.ndarray:
        conditioning = InferInput("conditioning", [1, rows.shape[1]], "FP32")
        conditioning.set_data_from_numpy(rows[i % len(rows)][None])
        seq = InferInput("seq_lens", list(lens.shape), "INT64")
        seq.set_data_from_numpy(lens)
        inputs = [seq, conditioning] if seq_lens_first else [conditioning, seq]
        result = await client.infer(model, inputs, outputs=requested, client_timeout=60)
        return result.as_numpy("kernel")

    info = {
        "server": f"{metadata.name} {metadata.version}",
        "python": platform.python_version(),
        **{p: version(p) for p in packages},
    }
    return send, client.close, info


async def kernelgen_sender(target: str, model: str, seq_lens: list[int], rows: np.ndarray) -> Sender:
    """A coroutine sending row ``i`` to kernelgen (its AsyncKernelClient), and a closer."""
    from importlib.metadata import version

    async_kernel_client, _ = kernelgen_client_api()
    client = async_kernel_client(target, timeout=60)
    await client.__aenter__()

    async def send(i: int) -> np.ndarray:
        kernel: np.ndarray = await client.generate(model, seq_lens, rows[i % len(rows)])
        return kernel

    async def close() -> None:
        await client.__aexit__(None, None, None)

    info = {"python": platform.python_version()}
    info |= {p: version(p) for p in ("kernelgen", "grpcio", "protobuf", "numpy")}
    return send, close, info


async def client_loop(args: argparse.Namespace) -> None:
    """Answer the benchmark's commands, one JSON line each on stdin, until ``quit``."""
    rows = conditioning_rows(args.cond_dim)
    seq_lens = [int(n) for n in args.seq_lens.split(",")]
    make = {"triton": triton_sender, "kernelgen-oip": kernelgen_oip_sender}.get(args.kind, kernelgen_sender)
    send, close, info = await make(args.target, args.model, seq_lens, rows)
    loop = asyncio.get_running_loop()
    reply({"ready": True, "info": info})
    try:
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            command = json.loads(line)
            if command["op"] == "quit":
                break
            if command["op"] == "kernel":
                np.save(command["path"], await send(command["row"]))
                reply({"saved": command["path"]})
            elif command["op"] == "step":
                reply(await measure_step(send, command))
    finally:
        await close()


async def measure_step(
    send: Callable[[int], Awaitable[np.ndarray]], command: dict[str, Any]
) -> dict[str, Any]:
    """One closed-loop step; its samples and the CPU time this process spent on it."""
    counter = iter(range(1 << 62))
    first_error: list[str] = []

    async def call() -> tuple[int, Any]:
        try:
            kernel = await send(next(counter))
        except Exception as exc:
            if not first_error:
                first_error.append(f"{type(exc).__name__}: {exc}"[:500])
            raise
        return kernel.nbytes, None

    cpu, wall = time.process_time(), time.perf_counter()
    step = await closed_loop(call, command["concurrency"], command["seconds"], command["warmup"])
    return {
        "latencies": step.latencies,
        "errors": step.errors,
        "first_error": first_error[0] if first_error else None,
        "calls": step.calls,
        "nbytes": step.nbytes,
        "cpu_s": time.process_time() - cpu,
        "wall_s": time.perf_counter() - wall,
    }


# --- the benchmark --------------------------------------------------------------------------------
@dataclass
class System:
    """One server under test and its client process."""

    name: str
    server: ServerProcess
    client: ClientProcess
    runs: dict[int, list[dict[str, Any]]] = field(default_factory=dict)


def cpu_by_process(pid: int) -> dict[str, float]:
    """CPU seconds so far of ``pid`` ("main") and its descendants (by command name)."""
    out: dict[str, float] = {}
    for p in process_tree(pid):
        try:
            name = "main" if p == pid else Path(f"/proc/{p}/comm").read_text().strip()
            out[name] = out.get(name, 0.0) + cpu_seconds(p)
        except OSError:
            continue
    return out


def run_step(system: System, idle: list[System], level: int, seconds: float, warmup: float) -> dict[str, Any]:
    """One closed-loop step of ``system``; the CPU of its server, its client and the idle servers."""
    before = cpu_by_process(system.server.pid)
    idle_before = [s.server.cpu_seconds() for s in idle]
    start = time.perf_counter()
    answer = system.client.ask(op="step", concurrency=level, seconds=seconds, warmup=warmup)
    wall = time.perf_counter() - start
    after = cpu_by_process(system.server.pid)
    answer["server_cpu_by_process"] = {k: v - before.get(k, 0.0) for k, v in after.items()}
    answer["server_cpu_s"] = sum(answer["server_cpu_by_process"].values())
    answer["idle_servers_cpu_s"] = sum(
        s.server.cpu_seconds() - b for s, b in zip(idle, idle_before, strict=True)
    )
    answer["step_wall_s"] = wall
    return answer


def summarize(runs: list[dict[str, Any]], seconds: float, level: int) -> dict[str, Any]:
    """One row over all rounds: the median round's rate, pooled percentiles, CPU per kernel."""
    steps = []
    for run in runs:
        step = Step(level, seconds, latencies=run["latencies"], errors=run["errors"], nbytes=run["nbytes"])
        step.calls = run["calls"]
        steps.append(step)
    pooled = sorted(x for s in steps for x in s.latencies)
    rates = [s.rate for s in steps]
    calls = max(1, sum(s.calls for s in steps))
    wall = sum(r["step_wall_s"] for r in runs)
    by_process: dict[str, float] = {}
    for run in runs:
        for name, value in run["server_cpu_by_process"].items():
            by_process[name] = by_process.get(name, 0.0) + value

    def pct(q: float) -> float:
        return pooled[min(len(pooled) - 1, int(q / 100 * len(pooled)))] * 1000 if pooled else float("nan")

    return {
        "concurrency": level,
        "kernels_per_s": round(statistics.median(rates), 1),
        "kernels_per_s_range": f"{min(rates):.0f}-{max(rates):.0f}",
        "kernels_per_s_rounds": [round(r, 1) for r in rates],
        "p50_ms": round(pct(50), 2),
        "p99_ms": round(pct(99), 2),
        "requests": len(pooled),
        "errors": sum(s.errors for s in steps),
        "first_error": next((r["first_error"] for r in runs if r["first_error"]), None),
        "server_cpu_ms_per_kernel": round(sum(r["server_cpu_s"] for r in runs) / calls * 1000, 3),
        "client_cpu_ms_per_kernel": round(sum(r["cpu_s"] for r in runs) / calls * 1000, 3),
        "server_cores": round(sum(r["server_cpu_s"] for r in runs) / wall, 2),
        "client_cores": round(sum(r["cpu_s"] for r in runs) / wall, 2),
        "server_cpu_ms_per_kernel_by_process": {k: round(v / calls * 1000, 3) for k, v in by_process.items()},
        "idle_servers_cores": round(sum(r["idle_servers_cpu_s"] for r in runs) / wall, 3),
    }


def verify(systems: list[System], loaded: Any, seq_lens: list[int], rows: np.ndarray) -> dict[str, Any]:
    """Each server's kernel for row 0 against the reference model computed in this process."""
    import torch

    with torch.inference_mode():
        reference = loaded.module(tuple(seq_lens), torch.from_numpy(rows[:1].copy()))[0].numpy()
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for system in systems:
            path = str(Path(tmp) / f"{system.name}.npy")
            system.client.ask(op="kernel", row=0, path=path)
            kernel = np.load(path).reshape(reference.shape)
            diff = float(np.abs(kernel - reference).max())
            out[system.name] = {
                "shape": list(kernel.shape),
                "max_abs_diff": diff,
                "bitwise_equal": bool(np.array_equal(kernel, reference)),
                "matches": bool(np.allclose(kernel, reference, rtol=1e-5, atol=1e-5)),
            }
    out["reference_max_abs"] = float(np.abs(reference).max())
    out["reference_shape"] = list(reference.shape[1:])
    return out


@contextlib.contextmanager
def triton_server(
    python: Path, args: argparse.Namespace, threads: int, tunables: str
) -> Iterator[ServerProcess]:
    port = free_port()
    command = ["env", f"GLIBC_TUNABLES={tunables}", str(python), str(BENCH), "triton-server"]
    command += ["--port", str(port), "--model", args.model, "--threads", str(threads)]
    if args.model_repo:
        command += ["--model-repo", args.model_repo]
    # Triton's Python backend leaves an empty /tmp/python_env_* folder per start: removed after.
    before = set(Path(tempfile.gettempdir()).glob("python_env_*"))
    try:
        # env(1) execs the Python, so the process started is the server's root process.
        with process(command, r"triton serving on", timeout=300) as proc:
            yield ServerProcess(f"127.0.0.1:{port}", proc.pid)
    finally:
        for left in set(Path(tempfile.gettempdir()).glob("python_env_*")) - before:
            with contextlib.suppress(OSError):
                left.rmdir()  # only if empty


def client_command(
    python: str | Path, kind: str, target: str, args: argparse.Namespace, cond_dim: int
) -> list[str]:
    return [
        str(python), str(BENCH), "client", "--kind", kind, "--target", target, "--model", args.model,
        "--seq-lens", args.seq_lens, "--cond-dim", str(cond_dim),
    ]  # fmt: skip


def run(args: argparse.Namespace) -> dict[str, Any]:
    info = machine()
    info["load_average_before"] = round(os.getloadavg()[0], 2)
    levels: list[int] = args.concurrency
    seq_lens = [int(n) for n in args.seq_lens.split(",")]
    loaded = reference_model(args.model_repo, args.model)
    if loaded.config.film is None:
        raise SystemExit(f"model {args.model} has no FiLM: this benchmark conditions every request")
    cond_dim = loaded.config.film.cond_dim
    rows = conditioning_rows(cond_dim)
    # As ``kernelgen serve`` sizes its torch threads for one worker: a core left for gRPC.
    threads = max(1, (os.cpu_count() or 2) - 1)
    tunables = glibc_tunables()
    result: dict[str, Any] = {
        "machine": info,
        "model": args.model,
        "model_repo": args.model_repo,
        "seq_lens": seq_lens,
        "seconds_per_step": args.seconds,
        "warmup_s": args.warmup,
        "rounds": args.rounds,
        "kernelgen_flags": KERNELGEN_FLAGS,
        "triton_batcher": {"max_batch_size": TRITON_MAX_BATCH, "max_queue_delay_us": TRITON_QUEUE_DELAY_US},
        "torch_threads": threads,
        "malloc": {"kernelgen": "kernelgen_client.tune_malloc", "triton": f"GLIBC_TUNABLES={tunables}"},
    }
    triton_python: Path | None = None
    skipped: str | None = "--no-triton" if args.no_triton else None
    if skipped is None:
        try:
            triton_python = triton_environment(Path(args.venv), args.triton_python)
        except (RuntimeError, OSError) as exc:
            skipped = f"Triton environment: {exc}"
    with contextlib.ExitStack() as stack:
        systems: list[System] = []
        repo_flags = ["--model-repo", args.model_repo] if args.model_repo else []
        server = stack.enter_context(kernelgen_server(*KERNELGEN_FLAGS, "--device", "cpu", *repo_flags))
        client = ClientProcess(client_command(sys.executable, "kernelgen", server.target, args, cond_dim), {})
        stack.callback(client.close)
        systems.append(System("kernelgen", server, client))
        if triton_python is not None:
            command = client_command(triton_python, "kernelgen-oip", server.target, args, cond_dim)
            client = ClientProcess(command, {"GLIBC_TUNABLES": tunables})
            stack.callback(client.close)
            systems.append(System("kernelgen-oip", server, client))
            try:
                server = stack.enter_context(triton_server(triton_python, args, threads, tunables))
                command = client_command(triton_python, "triton", server.target, args, cond_dim)
                client = ClientProcess(command, {"GLIBC_TUNABLES": tunables})
                stack.callback(client.close)
                systems.append(System("triton", server, client))
            except (RuntimeError, OSError) as exc:
                skipped = f"Triton did not start: {str(exc)[-3000:]}"
        if skipped:
            print(f"Triton skipped: {skipped}", flush=True)
        result["triton_skipped"] = skipped
        result["versions"] = {s.name: s.client.info for s in systems}
        result["verification"] = verify(systems, loaded, seq_lens, rows)
        print(f"verification: {json.dumps(result['verification'])}", flush=True)
        for r in range(args.rounds):
            for level in levels:
                order = systems[r % len(systems) :] + systems[: r % len(systems)]
                for system in order:
                    idle = list({id(s.server): s for s in systems if s.server is not system.server}.values())
                    answer = run_step(system, idle, level, args.seconds, args.warmup)
                    system.runs.setdefault(level, []).append(answer)
                    rate = len(answer["latencies"]) / args.seconds
                    print(
                        f"round {r + 1}/{args.rounds} {system.name} c{level}: {rate:.0f} kernels/s",
                        flush=True,
                    )
    result["steps"] = {
        s.name: [summarize(s.runs[level], args.seconds, level) for level in levels] for s in systems
    }
    named = {s.name: s for s in systems}
    if "triton" in named:
        result["ratios"] = ratios(named["kernelgen"], named["triton"], levels, args.seconds)
        result["oip_ratios"] = ratios(named["kernelgen-oip"], named["triton"], levels, args.seconds)
    info["load_average_after"] = round(os.getloadavg()[0], 2)
    return result


def ratios(kernelgen: System, triton: System, levels: list[int], seconds: float) -> list[dict[str, Any]]:
    """kernelgen over Triton per concurrency: throughput round by round, pooled p99."""
    out = []
    for level in levels:
        per_round = [
            len(a["latencies"]) / max(1, len(b["latencies"]))
            for a, b in zip(kernelgen.runs[level], triton.runs[level], strict=True)
        ]
        k = summarize(kernelgen.runs[level], seconds, level)
        t = summarize(triton.runs[level], seconds, level)
        out.append(
            {
                "concurrency": level,
                "throughput_ratio": round(statistics.median(per_round), 2),
                "throughput_ratio_range": f"{min(per_round):.2f}-{max(per_round):.2f}",
                "p99_ratio": round(k["p99_ms"] / t["p99_ms"], 2) if t["p99_ms"] else None,
            }
        )
    return out


def side_by_side_table(result: dict[str, Any]) -> str:
    """The markdown table of kernels/s, p50, p99 and the ratios, per concurrency."""
    steps = result["steps"]
    t_rows = {row["concurrency"]: row for row in steps.get("triton", [])}
    o_rows = {row["concurrency"]: row for row in steps.get("kernelgen-oip", [])}
    r_rows = {row["concurrency"]: row for row in result.get("ratios", [])}
    ro_rows = {row["concurrency"]: row for row in result.get("oip_ratios", [])}

    def ratio(r: dict[str, Any]) -> str:
        return f"{r['throughput_ratio']:.2f} ({r['throughput_ratio_range']})" if r else "-"

    table = []
    for k in steps["kernelgen"]:
        level = k["concurrency"]
        t = t_rows.get(level, {})
        o = o_rows.get(level, {})
        r = r_rows.get(level, {})
        ro = ro_rows.get(level, {})
        table.append(
            {
                "concurrency": level,
                "kernelgen kernels/s": k["kernels_per_s"],
                "p50 / p99 ms": f"{k['p50_ms']} / {k['p99_ms']}",
                "kernelgen OIP (tritonclient) kernels/s": o.get("kernels_per_s", "-"),
                "OIP p50 / p99 ms": f"{o['p50_ms']} / {o['p99_ms']}" if o else "-",
                "Triton kernels/s": t.get("kernels_per_s", "-"),
                "Triton p50 / p99 ms": f"{t['p50_ms']} / {t['p99_ms']}" if t else "-",
                "kernelgen / Triton": ratio(r),
                "p99 kernelgen / Triton": r.get("p99_ratio", "-"),
                "OIP / Triton (both tritonclient)": ratio(ro),
                "p99 OIP / Triton": ro.get("p99_ratio", "-"),
            }
        )
    return markdown_table(table)


def report(result: dict[str, Any]) -> str:
    m = result["machine"]
    steps = result["steps"]
    cpu = []
    for name, rows in steps.items():
        for row in rows:
            cpu.append(
                {
                    "server": name,
                    "concurrency": row["concurrency"],
                    "server CPU ms/kernel": row["server_cpu_ms_per_kernel"],
                    "client CPU ms/kernel": row["client_cpu_ms_per_kernel"],
                    "server cores": row["server_cores"],
                    "client cores": row["client_cores"],
                    "server CPU ms/kernel by process": ", ".join(
                        f"{p} {v:.2f}" for p, v in sorted(row["server_cpu_ms_per_kernel_by_process"].items())
                    ),
                    "kernels/s over rounds": row["kernels_per_s_range"],
                    "other server idle, cores": row["idle_servers_cores"],
                    "errors": row["errors"],
                }
            )
    verification = result["verification"]
    checks = [
        {
            "server": name,
            "kernel shape": "x".join(map(str, v["shape"])),
            "max abs diff": f"{v['max_abs_diff']:.3g}",
            "bitwise equal": v["bitwise_equal"],
            "matches (rtol, atol 1e-5)": v["matches"],
        }
        for name, v in verification.items()
        if isinstance(v, dict)
    ]
    versions = "; ".join(
        f"{name}: " + ", ".join(f"{k} {v}" for k, v in info.items())
        for name, info in result["versions"].items()
    )
    shape = "x".join(map(str, verification["reference_shape"]))
    skipped = result["triton_skipped"]
    repository = f"`{result['model_repo']}`" if result["model_repo"] else "the embedded repository"
    parts = [
        "# kernelgen against Triton Inference Server",
        f"`python benchmarks/bench_triton.py` on {m['date']}: {m['cpus']} CPUs ({m['platform']}), Python "
        f"{m['python']}, torch {m['torch']}, CUDA: {m['cuda'] or 'none'}. Load average before: "
        f"{m['load_average_before']}, after: {m['load_average_after']}. Servers and clients share this "
        "machine, which may be shared with other work: compare figures of one run.",
        f"Workload: {result['model']} from {repository}, seq_lens {result['seq_lens']} (kernel "
        f"{shape}, float32), one FiLM conditioning row per request, closed loop. "
        f"{result['rounds']} interleaved round(s) of {result['seconds_per_step']:g} s per step after "
        f"{result['warmup_s']:g} s of warm-up; kernels/s is the median round's, latencies pool all rounds.",
        f"kernelgen: `kernelgen serve {' '.join(result['kernelgen_flags'])}` driven by "
        "`AsyncKernelClient`. Triton: PyTriton with its dynamic batcher (max batch "
        f"{result['triton_batcher']['max_batch_size']}, {result['triton_batcher']['max_queue_delay_us']} us "
        "max queue delay), the callable computing with the repository's reference model, driven by "
        "`tritonclient.grpc.aio`; kernelgen OIP: the same kernelgen server's Open Inference Protocol "
        "driven by the same `tritonclient.grpc.aio` as Triton. All from one closed loop, one client "
        f"process and one connection each; torch threads {result['torch_threads']} on both servers; "
        f"malloc tuned in every process of both sides ({result['malloc']['triton']} on Triton's).",
        "Triton was **skipped**: " + skipped if skipped else f"Versions: {versions}.",
        "## Throughput and latency",
        "kernelgen / Triton: the median over rounds of each round's ratio of kernels/s (the rounds' "
        "range beside it); p99 kernelgen / Triton: of the pooled p99s.",
        side_by_side_table(result),
        "## CPU per served kernel",
        "Server CPU: all processes of the server, from /proc, over each step including its warm-up, per "
        "completed call; client CPU: the client process, likewise. By process: `main` is `kernelgen "
        "serve`, or for Triton the Python process that runs PyTriton and the callable; `tritonserver` is "
        "Triton's C++ server, `triton_python_b` its Python backend stub, `python3` the stub's helper "
        "processes. The other server, idle during the step, is shown by the cores it used meanwhile.",
        markdown_table(cpu),
        "## Same numbers",
        "One response of each server for the same conditioning row against the reference model run in "
        f"the benchmark's process (largest |value| {verification['reference_max_abs']:.3g}).",
        markdown_table(checks),
    ]
    return "\n\n".join(parts) + "\n"


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--concurrency", type=int_list, default="1,8,32,64", help="closed-loop levels")
    parser.add_argument(
        "--model-repo",
        type=lambda path: str(Path(path).resolve()),
        default=None,
        help="model repository (default: the embedded one)",
    )
    parser.add_argument("--model", default="hyena-2d", help="a FiLM model of the repository")
    parser.add_argument(
        "--seq-lens", default="15,15", help="seq_lens of every request (15,15: a 29x29 kernel)"
    )
    parser.add_argument("--no-triton", action="store_true", help="measure kernelgen only")
    parser.add_argument("--venv", default=str(VENV_DIR), help="the Triton environment's folder")
    parser.add_argument("--triton-python", default=DEBIAN_PYTHON, help="the Python it is made from")


def main() -> None:
    roles = {name: functools.partial(role, name) for name in ("triton-server", "client")}
    benchmark_main(run, report, doc=__doc__, output="triton", arguments=arguments, roles=roles)


def role(name: str, argv: list[str]) -> None:
    """The script's processes other than the benchmark: the Triton server, a client."""
    parser = argparse.ArgumentParser(prog=f"bench_triton.py {name}")
    parser.add_argument("--model", required=True)
    parser.add_argument("--model-repo", default=None)
    if name == "triton-server":
        parser.add_argument("--port", type=int, required=True)
        parser.add_argument("--threads", type=int, default=1)
        serve_triton(parser.parse_args(argv))
        return
    parser.add_argument("--kind", choices=["kernelgen", "kernelgen-oip", "triton"], required=True)
    parser.add_argument("--target", required=True)
    parser.add_argument("--seq-lens", required=True)
    parser.add_argument("--cond-dim", type=int, required=True)
    args = parser.parse_args(argv)
    if args.kind == "kernelgen":
        kernelgen_client_api()[1]()  # tune_malloc; Triton's client has GLIBC_TUNABLES instead
    asyncio.run(client_loop(args))


if __name__ == "__main__":
    main()
