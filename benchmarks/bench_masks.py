"""What a mask and a causal crop cost to serve: masked against unmasked kernels, in one run.

    python benchmarks/bench_masks.py            # 3 interleaved rounds of 5 s per step
    python benchmarks/bench_masks.py --quick    # a smoke run: 1 round of 2 s

The serving engine (``KernelEngine``, the work behind every GenerateKernel) on
the embedded 2D FiLM model's architecture (hyena-2d: out_dim 384, hidden 32,
3 layers, cond_dim 384) at seq_lens 15,15 (a 29x29 kernel), with the same
weights and no mask, a ``GaussianModulationND`` (log) mask and an
``ExponentialModulationND`` mask, for two paths:

- ``conditioned``: a batch of 8 FiLM rows, as the batcher hands them over;
- ``plain``: the unconditioned kernel computed (a cache miss).

And a 1-D layer (out_dim 256, hidden 32, L_cache 4096) at seq_lens 4096,
symmetric against causal with a Gaussian mask: a causal layer's kernel is
computed on its cropped grid only.

And served: one ``kernelgen serve`` of the three hyena-2d models (a
repository written here), driven by the factored benchmark's client process
(``bench_factored.py client``: closed loop, one FiLM row per request,
concurrency 8, dense float32 kernels), so the cost of serving a kernel is its
compute, encoding and transport together.

Every contender of a step runs in each round, in turn, so load drift hits all;
the cost ratio is masked time / unmasked time per kernel (served: unmasked
kernels/s over masked kernels/s), per round, and the served step's median is
held against the target (at most 1.15x); the engine steps show where the time
goes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from bench_engine import timed_rate
from harness import Rounds, benchmark_main, machine, markdown_table

from kernelgen_server.engine.kernel_engine import KernelEngine
from kernelgen_server.model.config import ModelConfig

TARGET = 1.15
HYENA: dict[str, Any] = {
    "out_dim": 384, "data_dim": 2, "mlp_hidden_dim": 32, "num_layers": 3, "embedding_dim": 32,
    "omega_0": 30.0, "L_cache": 15, "use_bias": True, "film": {"cond_dim": 384, "film_hidden_dim": 64},
}  # fmt: skip
LONG: dict[str, Any] = {
    "out_dim": 256, "data_dim": 1, "mlp_hidden_dim": 32, "num_layers": 3, "embedding_dim": 32,
    "omega_0": 30.0, "L_cache": 4096, "use_bias": True,
}  # fmt: skip
GAUSSIAN = {"type": "GaussianModulationND", "parametrization": "log"}
EXPONENTIAL = {"type": "ExponentialModulationND"}
ROWS = 8
SERVED_CONCURRENCY = 8


def served_config(
    base: dict[str, Any], mask: dict[str, Any] | None = None, causal: bool = False
) -> ModelConfig:
    """``base`` with ``mask`` (its sizes the kernel's) and the causal crop."""
    values = dict(base)
    if mask is not None:
        values["mask"] = {**mask, "data_dim": base["data_dim"], "num_channels": base["out_dim"]}
    if causal:
        values["causal"] = True
    return ModelConfig.from_dict(values)


def engine(base: dict[str, Any], mask: dict[str, Any] | None = None, causal: bool = False) -> KernelEngine:
    """An engine of ``served_config`` (seed 0: the same generator weights for every mask)."""
    return KernelEngine(served_config(base, mask, causal).build(seed=0).eval())


def step(
    name: str, contenders: dict[str, Callable[[], object]], kernels: int, args: argparse.Namespace
) -> dict[str, Any]:
    """Interleaved rounds of every contender; each one's cost relative to the first (the baseline)."""
    for fn in contenders.values():
        warm_until = time.perf_counter() + args.warmup
        while time.perf_counter() < warm_until:
            fn()
    times: dict[str, list[float]] = {label: [] for label in contenders}
    for _ in range(args.rounds):
        for label, fn in contenders.items():
            times[label].append(1.0 / timed_rate(fn, kernels, args.seconds))
    baseline = next(iter(contenders))
    rows = []
    for label, values in times.items():
        ratios = [t / b for t, b in zip(values, times[baseline], strict=True)]
        rows.append(
            {
                "contender": label,
                "ms_per_kernel": statistics.median(values) * 1000.0,
                "cost_ratio": statistics.median(ratios),
                "ratio_range": [min(ratios), max(ratios)],
                "rounds_ms": [t * 1000.0 for t in values],
            }
        )
    return {"step": name, "kernels_per_call": kernels, "baseline": baseline, "rows": rows}


def served_step(args: argparse.Namespace) -> dict[str, Any]:
    """Kernels/s of the three hyena-2d models from one server, interleaved rounds."""
    from bench_factored import CLIENT_ENV, run_step
    from harness import ClientProcess, kernelgen_server

    from kernelgen_server.repository.store import write_model

    masks = {"unmasked": None, "gaussian": GAUSSIAN, "exponential": EXPONENTIAL}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        for name, mask in masks.items():
            config = served_config(HYENA, mask)
            write_model(root, name, config, config.build(seed=0).state_dict())
        rates: dict[str, list[float]] = {name: [] for name in masks}
        with ExitStack() as stack:
            server = stack.enter_context(kernelgen_server("--device", "cpu", "--model-repo", folder))
            script = str(Path(__file__).with_name("bench_factored.py"))
            client = ClientProcess([sys.executable, script, "client", server.target], CLIENT_ENV)
            stack.callback(client.close)
            for _ in range(args.rounds):
                for name in masks:
                    answer = run_step(
                        server, client, model=name, seq_lens=[15, 15], conditioned=True,
                        representation="dense", concurrency=SERVED_CONCURRENCY, seconds=args.seconds,
                        warmup=args.warmup,
                    )  # fmt: skip
                    rates[name].append(len(answer["latencies"]) / args.seconds)
    rows = []
    for name, values in rates.items():
        ratios = [u / r for u, r in zip(rates["unmasked"], values, strict=True)]
        rows.append(
            {
                "contender": name,
                "kernels_per_s": statistics.median(values),
                "cost_ratio": statistics.median(ratios),
                "ratio_range": [min(ratios), max(ratios)],
                "rounds_kernels_per_s": values,
            }
        )
    name = f"hyena-2d served, concurrency {SERVED_CONCURRENCY}, one FiLM row per request"
    return {"step": name, "baseline": "unmasked", "rows": rows}


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    lens = (15, 15)
    rows = [torch.randn(ROWS, HYENA["film"]["cond_dim"])]
    hyena = {
        "unmasked": engine(HYENA),
        "gaussian": engine(HYENA, GAUSSIAN),
        "exponential": engine(HYENA, EXPONENTIAL),
    }
    steps = [
        step(
            "hyena-2d conditioned, 8 rows",
            {k: (lambda e=e: e.conditioned(lens, rows)) for k, e in hyena.items()},
            ROWS,
            args,
        ),
        step(
            "hyena-2d plain (cache miss)",
            {k: (lambda e=e: e.unconditioned(lens)) for k, e in hyena.items()},
            1,
            args,
        ),
    ]
    long_lens = (LONG["L_cache"],)
    long = {
        "symmetric, unmasked": engine(LONG),
        "symmetric, gaussian": engine(LONG, GAUSSIAN),
        "causal, gaussian": engine(LONG, GAUSSIAN, causal=True),
    }
    steps.append(
        step(
            f"1-D seq_lens {long_lens[0]} plain (cache miss)",
            {k: (lambda e=e: e.unconditioned(long_lens)) for k, e in long.items()},
            1,
            args,
        )
    )
    served = served_step(args)
    masked = [row["cost_ratio"] for row in served["rows"] if row["contender"] != served["baseline"]]
    return {
        "benchmark": "masks",
        "machine": machine(),
        "threads": torch.get_num_threads(),
        "seconds": args.seconds,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "served": served,
        "steps": steps,
        "target": TARGET,
        "worst_masked_cost_ratio": max(masked),
        "met": max(masked) <= TARGET,
    }


def ratio_text(row: dict[str, Any]) -> str:
    low, high = row["ratio_range"]
    return f"{row['cost_ratio']:.3f} ({low:.2f}-{high:.2f})"


def report(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# Masks and the causal crop",
        "",
        f"{m['date']}, {m['platform']}, {m['cpus']} CPUs, torch {m['torch']}, "
        f"{result['threads']} threads; {result['rounds']} interleaved round(s) of {result['seconds']:g} s "
        "per contender. The serving engine in-process; cost ratio: time per kernel over the step's "
        "first contender's, per round (median, range).",
        "",
    ]
    served = result["served"]
    lines += [f"## {served['step']}", ""]
    table = [
        {
            "contender": r["contender"],
            "kernels/s": f"{r['kernels_per_s']:.1f}",
            "cost vs unmasked": ratio_text(r),
        }
        for r in served["rows"]
    ]
    lines += [markdown_table(table), ""]
    for s in result["steps"]:
        lines += [f"## Engine: {s['step']}", ""]
        table = [
            {
                "contender": r["contender"],
                "ms / kernel": f"{r['ms_per_kernel']:.3f}",
                f"cost vs {s['baseline']}": ratio_text(r),
            }
            for r in s["rows"]
        ]
        lines += [markdown_table(table), ""]
    worst = result["worst_masked_cost_ratio"]
    lines += [
        "## Target",
        "",
        "| target | measured | met |",
        "|---|---|---|",
        f"| a masked kernel costs <= {result['target']}x the unmasked one to serve (hyena-2d) "
        f"| {worst:.3f}x (worst) | {'yes' if result['met'] else 'no'} |",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    benchmark_main(run, report, doc=__doc__, output="masks", rounds=Rounds())
