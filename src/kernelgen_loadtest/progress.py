"""The live display while a load test runs, on stderr (stdout stays for the table).

On a terminal with rich installed: a progress bar per step with live counters
and the current rate. Otherwise (a pipe, CI, no rich): one line when a step
starts and one when it ends. ``--quiet``: nothing.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any, Protocol

from kernelgen_loadtest.processes import Counts, Tick
from kernelgen_loadtest.runner import StepPlan
from kernelgen_loadtest.stats import StepResult

__all__ = ["Display", "make_display", "step_line"]


class Display(Protocol):
    def start_step(self, number: int, total: int, plan: StepPlan) -> Tick: ...

    def end_step(self, result: StepResult) -> None: ...

    def message(self, text: str) -> None: ...

    def close(self) -> None: ...


def _plan_label(plan: StepPlan) -> str:
    return f"concurrency {plan.level:g}" if plan.mode == "closed" else f"rate {plan.level:g}/s"


def step_line(result: StepResult) -> str:
    """One line summing up a finished step."""
    lat = result.latency_ms
    errors = result.error_count + result.dropped
    line = (
        f"{result.label}: {result.requests_per_s:.1f} req/s, {result.kernels_per_s:.1f} kernels/s,"
        f" {result.mb_per_s:.1f} MB/s; p50 {lat.p50:.2f} ms, p99 {lat.p99:.2f} ms;"
        f" {result.ok} ok, {errors} errors"
    )
    if result.client.bottleneck:
        line += f" [client-bound: {result.client.bottleneck}]"
    return line


class _Quiet:
    def start_step(self, number: int, total: int, plan: StepPlan) -> Tick:
        return lambda counts: None

    def end_step(self, result: StepResult) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


class _Lines:
    """A line per step start and end, for logs."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out

    def start_step(self, number: int, total: int, plan: StepPlan) -> Tick:
        length = f"{plan.duration_s:g} s" if plan.duration_s is not None else f"{plan.requests} requests"
        self.message(f"step {number}/{total}: {_plan_label(plan)}, {plan.warmup_s:g} s warm-up, {length}")
        return lambda counts: None

    def end_step(self, result: StepResult) -> None:
        self.message("  " + step_line(result))

    def message(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def close(self) -> None:
        pass


class _Rich:
    """rich progress bars: time (or requests) done, counters and the rate of the last second."""

    def __init__(self, console: Any) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = console
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(bar_width=24),
            TimeElapsedColumn(),
            TextColumn("{task.fields[stats]}"),
            console=console,
            refresh_per_second=4,
            transient=True,
        )
        self.progress.start()

    def start_step(self, number: int, total: int, plan: StepPlan) -> Tick:
        by_time = plan.duration_s is not None
        extent = plan.warmup_s + plan.duration_s if plan.duration_s is not None else float(plan.requests or 1)
        task = self.progress.add_task(f"{number}/{total} {_plan_label(plan)}", total=extent, stats="warm-up")
        started = time.monotonic()
        history: list[tuple[float, int]] = []

        def tick(counts: Counts) -> None:
            sent, ok, errors, dropped, inflight = counts
            now = time.monotonic()
            history.append((now, ok))
            while len(history) > 2 and now - history[0][0] > 1.0:
                history.pop(0)
            (t0, ok0) = history[0]
            rate = (ok - ok0) / (now - t0) if now > t0 else 0.0
            warming = now - started < plan.warmup_s
            stats = (
                "warm-up"
                if warming and sent == 0
                else f"sent {sent}  ok {ok}  errors {errors + dropped}  out {inflight}  {rate:.0f} req/s"
            )
            done = min(now - started, extent) if by_time else float(sent)
            self.progress.update(task, completed=done, stats=stats)

        return tick

    def end_step(self, result: StepResult) -> None:
        for task in list(self.progress.task_ids):
            self.progress.remove_task(task)
        self.console.print(step_line(result), highlight=False, markup=False)

    def message(self, text: str) -> None:
        self.console.print(text, highlight=False, markup=False)

    def close(self) -> None:
        self.progress.stop()


def make_display(quiet: bool = False, out: IO[str] | None = None) -> Display:
    if quiet:
        return _Quiet()
    stream = out or sys.stderr
    try:
        from rich.console import Console
    except ImportError:
        return _Lines(stream)
    console = Console(file=stream)
    return _Rich(console) if console.is_terminal else _Lines(stream)
