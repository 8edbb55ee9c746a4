"""One ``kernelgen loadtest`` run: check the setup, sweep the steps, report, and gate.

Order matters for the user: everything that can be refused (missing extras,
a bad workload, an unreachable server, an unknown model) is refused before the
first request is sent; once the sweep starts, finished steps are reported and
written even when a later one is interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
from collections.abc import Sequence
from typing import Any

from kernelgen_client import __version__, commands
from kernelgen_client.errors import ModelNotFound
from kernelgen_client.results import ModelInfo
from kernelgen_loadtest.correctness import Checker, reference_missing
from kernelgen_loadtest.exit_codes import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_PASSED, EXIT_USAGE
from kernelgen_loadtest.outputs import missing_plotting, plot, render_table, write_csv, write_json
from kernelgen_loadtest.processes import open_driver
from kernelgen_loadtest.progress import make_display
from kernelgen_loadtest.runner import StepPlan
from kernelgen_loadtest.stats import Gates, Mode, Samples, StepResult, summarise
from kernelgen_loadtest.workload import (
    ResolvedWorkload,
    Workload,
    WorkloadError,
    load_file,
    resolve,
)
from kernelgen_wire.sizes import kernel_spatial

__all__ = ["Session"]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class Session:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.gates = Gates(max_error_rate=args.max_error_rate, slo_p99_ms=args.slo_p99_ms)

    # --- before the first request ------------------------------------------------------------------
    def _refusal(self) -> str | None:
        args = self.args
        if args.plot is not None:
            problem = missing_plotting()
            if problem:
                return problem
        if args.check_correctness:
            return reference_missing()
        if args.shared_memory and args.connections != 1:
            return "--shared-memory needs --connections 1: a region is known to one server process"
        if args.retries > 1 and args.protocol == "oip":
            return "--retries is for the native protocol: the Open Inference Protocol client does not retry"
        for path in (args.json, args.csv, args.plot):
            if path is not None and not path.parent.is_dir():
                return f"cannot write {path}: folder {path.parent} does not exist"
        return None

    def workload(self) -> Workload:
        """The file's settings (if any) with the flags given on top; ``WorkloadError`` if invalid."""
        args = self.args
        data: dict[str, Any] = load_file(args.workload) if args.workload else {}
        flags = {
            "models": [*args.models, *(args.model_flags or [])] or None,
            "seq_lens": args.seq_lens,
            "rows": args.rows,
            "unconditioned": args.unconditioned,
            "dtype": args.dtype,
            "seed": args.seed,
            "stream": args.stream,
            "representation": args.representation,
        }
        data.update({k: v for k, v in flags.items() if v is not None})
        if not data.get("models"):
            raise WorkloadError(
                "name one or more models (kernelgen loadtest hyena-2d ...) or give --workload"
            )
        return Workload.from_mapping(data, source=str(args.workload) if args.workload else "workload")

    def plans(self) -> list[StepPlan]:
        args = self.args
        mode: Mode = "open" if args.rate else "closed"
        levels = args.rate or args.concurrency or [1.0]
        duration = None if args.requests is not None else (args.duration or 10.0)
        return [
            StepPlan(
                mode=mode,
                level=level,
                duration_s=duration,
                requests=args.requests,
                warmup_s=args.warmup,
                distribution=args.distribution,
                max_inflight=args.max_inflight,
                keep=args.check_correctness,
                index=index,
            )
            for index, level in enumerate(levels)
        ]

    def _models(self, client_kwargs: dict[str, Any], workload: Workload) -> dict[str, ModelInfo]:
        from kernelgen_client import KernelClient

        kwargs = {**client_kwargs, "timeout": min(self.args.timeout, 10.0)}
        with KernelClient(**kwargs, retries=None) as client:
            infos = {info.name: info for info in client.list_models()}
        groups = {info.group for info in infos.values()}
        for mix in workload.models:
            if mix.name not in infos and mix.name not in groups:
                raise ModelNotFound(f"model {mix.name!r} is not on the server")
        return infos

    # --- the run -----------------------------------------------------------------------------------
    def run(self) -> int:
        args = self.args
        refusal = self._refusal()
        if refusal:
            print(f"kernelgen loadtest: {refusal}", file=sys.stderr)
            return EXIT_USAGE
        workload = self.workload()
        plans = self.plans()
        client_kwargs = {**commands.client_kwargs(args), "connections": args.connections}
        resolved = resolve(workload, self._models(client_kwargs, workload))
        client_kwargs.update(protocol=args.protocol, shared_memory=args.shared_memory, retries=args.retries)
        checker = Checker(args.model_repo) if args.check_correctness else None

        display = make_display(args.quiet)
        display.message(f"kernelgen loadtest: {client_kwargs['target']}, {_describe(resolved)}")
        started, results, interrupted = _now(), [], False
        driver = None
        try:
            driver = open_driver(args.workers, client_kwargs, resolved)
            for number, plan in enumerate(plans, 1):
                samples = driver.run_step(plan, display.start_step(number, len(plans), plan))
                results.append(self._result(plan, samples, checker))
                display.end_step(results[-1])
        except KeyboardInterrupt:
            interrupted = True
            display.message("interrupted: reporting the finished steps")
        finally:
            if driver is not None:
                driver.close()
            display.close()
        return self._report(resolved, client_kwargs, results, started, interrupted)

    def _result(self, plan: StepPlan, samples: Samples, checker: Checker | None) -> StepResult:
        result = summarise(samples, plan.mode, plan.level)
        correctness = checker.check(samples.kept[: plan.keep]).to_dict() if checker else None
        return dataclasses.replace(
            result, correctness=correctness, failures=self.gates.failures(result, correctness)
        )

    # --- after the last step -----------------------------------------------------------------------
    def _report(
        self,
        resolved: ResolvedWorkload,
        client_kwargs: dict[str, Any],
        results: list[StepResult],
        started: str,
        interrupted: bool,
    ) -> int:
        args = self.args
        steps = [r.to_dict() for r in results]
        failures = [f"{r.label}: {f}" for r in results for f in r.failures]
        document = {
            "tool": "kernelgen loadtest",
            "version": __version__,
            "started": started,
            "finished": _now(),
            "target": client_kwargs["target"],
            "mode": "open" if args.rate else "closed",
            "workload": resolved.to_dict(),
            "settings": {
                "duration_s": None if args.requests is not None else (args.duration or 10.0),
                "requests": args.requests,
                "warmup_s": args.warmup,
                "distribution": args.distribution if args.rate else None,
                "max_inflight": args.max_inflight,
                "workers": args.workers,
                "connections": args.connections,
                "retries": args.retries,
                "protocol": args.protocol,
                "shared_memory": args.shared_memory,
                "timeout_s": args.timeout,
                "max_error_rate": args.max_error_rate,
                "slo_p99_ms": args.slo_p99_ms,
                "check_correctness": args.check_correctness,
            },
            "client_host": {
                "platform": platform.platform(),
                "python": platform.python_version(),
                "cpus": os.cpu_count(),
            },
            "interrupted": interrupted,
            "passed": not failures and not interrupted and bool(results),
            "failures": failures,
            "client_bound_steps": [r.label for r in results if r.client.bottleneck],
            "steps": steps,
        }
        if not args.quiet and steps:
            render_table(steps, sys.stdout)
        if args.json is not None:
            write_json(args.json, document)
        if args.csv is not None:
            write_csv(args.csv, steps)
        if args.plot is not None and steps:
            label = ", ".join(m.name for m in resolved.workload.models)
            plot([(label, steps)], args.plot, title=f"kernelgen loadtest: {_describe(resolved)}")
        for failure in failures:
            print(f"kernelgen loadtest: FAILED {failure}", file=sys.stderr)
        if interrupted:
            return EXIT_INTERRUPTED
        return EXIT_FAILED if failures else EXIT_PASSED


def _describe(resolved: ResolvedWorkload) -> str:
    w = resolved.workload
    models = "; ".join(
        f"{t.name} {' or '.join(seq_lens_and_shape(s, t.causal) for s in t.seq_lens)}"
        + (f" (group of {len(t.members)})" if t.members else "")
        + ("" if t.cond_dim is not None else " (no FiLM)")
        for t in resolved.targets
    )
    conditioned = f"rows {w.rows}, {1 - w.unconditioned:.0%} conditioned"
    return f"{models}; {conditioned}; {w.dtype}; seed {w.seed}"


def seq_lens_and_shape(seq_lens: Sequence[int], causal: bool = False) -> str:
    """``seq_lens 15,15 (kernel 29x29)``: what was asked, and the kernel's shape it gives."""
    shape = "x".join(map(str, kernel_spatial(seq_lens, causal)))
    return f"seq_lens {','.join(map(str, seq_lens))} (kernel {shape})"
