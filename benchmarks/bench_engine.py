"""In-process kernel rate: reference ``SIRENKernelND.forward`` vs ``KernelEngine``.

The embedded-style 2D FiLM model (out_dim 384, hidden 32, 3 layers, embedding 32,
L_cache 15, cond_dim 384, film_hidden_dim 64) at seq_lens 15,15 (a 29x29 kernel),
one conditioning row per request, float32. For each batch size the reference
answers the requests one forward each, holding the kernels until the batch is
answered ("reference"), or freeing each at once, its best case ("ref.drop");
the engine answers them with one ``conditioned`` call, row by row (the
default, "rows") and with batched GEMMs ("batched").

    python benchmarks/bench_engine.py --json benchmarks/results/engine.json
    python benchmarks/bench_engine.py --device cuda --json engine_cuda.json

``--device cuda`` puts the engines and the reference model on the GPU: the
reference runs its unchanged forward with the GPU as the default device (its
coordinate grid is made there) and each kernel is copied to the host, as the
engine delivers its result in host memory. Conditioning rows start in host
memory for both, as they arrive with requests. Nothing is written unless
``--json`` is given, so a GPU run leaves the CPU results alone.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kernelgen_server.engine.kernel_engine import KernelEngine
from kernelgen_server.model.siren import SIRENKernelND

MODEL: dict[str, Any] = dict(
    out_dim=384,
    data_dim=2,
    mlp_hidden_dim=32,
    num_layers=3,
    embedding_dim=32,
    omega_0=30.0,
    L_cache=15,
    use_bias=True,
    film_cfg={"cond_dim": 384, "film_hidden_dim": 64},
)
SEQ_LENS = (15, 15)


def timed_rate(fn: Callable[[], object], kernels: int, min_time: float) -> float:
    """Kernels/s over back-to-back calls of ``fn`` lasting at least ``min_time`` seconds."""
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            return calls * kernels / elapsed


def compare(
    contenders: dict[str, Callable[[], object]], kernels: int, rounds: int, min_time: float
) -> dict[str, list[float]]:
    """Per-round rates; contenders alternate within each round so that load drift hits all."""
    for fn in contenders.values():
        fn()  # warm-up: first-touch allocations, prefix cache, buffer pool, thread pool
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            rates[name].append(timed_rate(fn, kernels, min_time))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--repeats", type=int, default=7, help="rounds per batch size")
    parser.add_argument("--min-time", type=float, default=0.25, help="seconds per timed run")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (cpu)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available")
    # On CUDA the reference's grid is made on the device; on CPU no mode slows its calls.
    on_device = torch.device(device) if device.type != "cpu" else contextlib.nullcontext()

    torch.manual_seed(0)
    model = SIRENKernelND(**MODEL).eval()  # made on the CPU: the same weights on every device
    engines = {"rows": KernelEngine(model, device), "batched": KernelEngine(model, device, batched=True)}
    model.to(device)
    conds = torch.randn(max(args.batches), MODEL["film_cfg"]["cond_dim"])
    load_before = os.getloadavg()
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    print(f"device {device}" + (f" ({device_name})" if device_name else ""))

    results = []
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
        f"load average {load_before[0]:.2f}"
    )
    print(
        "kernels/s: median over rounds; ratio: median per-round engine / reference; "
        "r.drop: engine / reference freeing each kernel at once"
    )
    print(
        f"{'batch':>5} {'reference':>10} {'ref.drop':>9}"
        + "".join(f" {name:>8} {'ratio':>6} {'r.drop':>6}" for name in engines)
    )
    for b in args.batches:
        requests = [conds[i : i + 1] for i in range(b)]

        def reference(requests: list[torch.Tensor] = requests) -> list[torch.Tensor]:
            # One forward per request; the kernels live until the batch is answered,
            # as the engine's one result does.
            with torch.inference_mode(), on_device:
                return [model(SEQ_LENS, c.to(device))[0].cpu() for c in requests]

        def reference_dropped(requests: list[torch.Tensor] = requests) -> None:
            # The reference's best case: each kernel freed at once, its memory reused.
            with torch.inference_mode(), on_device:
                for c in requests:
                    model(SEQ_LENS, c.to(device))[0].cpu()

        contenders: dict[str, Callable[[], object]] = {
            "reference": reference,
            "reference_dropped": reference_dropped,
        }
        for name, engine in engines.items():
            contenders[f"engine_{name}"] = functools.partial(engine.conditioned, SEQ_LENS, requests)
        rates = compare(contenders, b, args.repeats, args.min_time)
        row: dict[str, Any] = {"batch": b, "rounds": rates}
        for name, values in rates.items():
            row[f"{name}_kernels_per_s"] = statistics.median(values)
        for name in engines:
            for ref, suffix in (("reference", ""), ("reference_dropped", "_dropped")):
                row[f"engine_{name}_ratio{suffix}"] = statistics.median(
                    e / r for e, r in zip(rates[f"engine_{name}"], rates[ref], strict=True)
                )
        results.append(row)
        print(
            f"{b:>5} {row['reference_kernels_per_s']:>10.0f} {row['reference_dropped_kernels_per_s']:>9.0f}"
            + "".join(
                f" {row[f'engine_{n}_kernels_per_s']:>8.0f} {row[f'engine_{n}_ratio']:>6.2f}"
                f" {row[f'engine_{n}_ratio_dropped']:>6.2f}"
                for n in engines
            )
        )

    if args.json:
        report = {
            "benchmark": "engine_vs_reference_in_process",
            "model": MODEL,
            "seq_lens": list(SEQ_LENS),
            "dtype": "float32",
            "device": str(device),
            "device_name": device_name,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "machine": platform.platform(),
            "processor": platform.processor(),
            "repeats": args.repeats,
            "min_time_s": args.min_time,
            "load_average_before": load_before[0],
            "load_average_after": os.getloadavg()[0],
            "results": results,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
