"""The load test's outputs: the final table, JSON, CSV and a PNG plot.

The JSON document is the source of truth (every field of every step); CSV is
one flat row per step; the table and the plot read the same step dictionaries,
so ``plot`` also draws several runs' JSON side by side (the benchmark suite does).
rich and matplotlib are imported when used; without rich the table is plain text.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = [
    "CSV_COLUMNS", "csv_row", "figure", "missing_plotting", "plot", "render_table", "write_csv", "write_json"
]  # fmt: skip

Step = Mapping[str, Any]

CSV_COLUMNS = (
    "mode", "level", "window_s", "scheduled", "sent", "ok", "error_count", "dropped", "error_rate",
    "send_rate", "requests_per_s", "kernels_per_s", "mb_per_s",
    "p50_ms", "p90_ms", "p95_ms", "p99_ms", "max_ms", "mean_ms",
    "mean_batch_rows", "mean_queue_ms", "mean_compute_ms", "cache_hit_rate",
    "client_cpu", "late", "client_bottleneck", "errors_by_code", "batch_histogram",
    "checked", "mismatches", "passed", "failures",
)  # fmt: skip


def _num(value: Any) -> float:
    return math.nan if value is None else float(value)


def _ms(value: Any) -> str:
    v = _num(value)
    return "-" if math.isnan(v) else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def _rate(value: Any) -> str:
    v = _num(value)
    return "-" if math.isnan(v) else f"{v:.1f}"


def _share(value: Any) -> str:
    v = _num(value)
    return "-" if math.isnan(v) else f"{v:.0%}"


def _level(step: Step) -> str:
    level = _num(step["level"])
    return f"c={level:g}" if step["mode"] == "closed" else f"{level:g}/s"


def _codes(step: Step) -> str:
    parts = [f"{code}={n}" for code, n in step["errors"].items()]
    if step["dropped"]:
        parts.append(f"dropped={step['dropped']}")
    return ";".join(parts)


def csv_row(step: Step) -> dict[str, Any]:
    latency, server, client = step["latency_ms"], step["server"], step["client"]
    check = step.get("correctness") or {}
    return {
        **{k: step[k] for k in ("mode", "level", "window_s", "scheduled", "sent", "ok", "error_count")},
        **{k: step[k] for k in ("dropped", "error_rate", "send_rate", "requests_per_s", "kernels_per_s")},
        "mb_per_s": step["mb_per_s"],
        **{f"{q}_ms": latency[q] for q in ("p50", "p90", "p95", "p99", "max", "mean")},
        "mean_batch_rows": server["mean_batch_rows"],
        "mean_queue_ms": server["mean_queue_ms"],
        "mean_compute_ms": server["mean_compute_ms"],
        "cache_hit_rate": server["cache_hit_rate"],
        "client_cpu": client["max_cpu_util"],
        "late": client["late"],
        "client_bottleneck": client["bottleneck"],
        "errors_by_code": _codes(step),
        "batch_histogram": ";".join(f"{k}:{v}" for k, v in server["batch_histogram"].items()),
        "checked": check.get("checked", ""),
        "mismatches": check.get("mismatches", ""),
        "passed": step["passed"],
        "failures": "; ".join(step["failures"]),
    }


def write_csv(path: Path, steps: Sequence[Step]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for step in steps:
            writer.writerow(csv_row(step))


def write_json(path: Path, document: Mapping[str, Any]) -> None:
    # allow_nan=False: the document is strict JSON (NaN was turned into null before).
    path.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n", encoding="utf-8")


# --- table -------------------------------------------------------------------------------------------
_MAIN = ("step", "sent", "ok", "errors", "req/s", "kernels/s", "MB/s", "p50", "p90", "p95", "p99", "max")
_SIDE = ("step", "batch rows", "queue ms", "compute ms", "cache hits", "client cpu", "late", "verdict")


def _main_row(step: Step) -> list[str]:
    lat = step["latency_ms"]
    errors = step["error_count"] + step["dropped"]
    return [
        _level(step), str(step["sent"]), str(step["ok"]), str(errors),
        _rate(step["requests_per_s"]), _rate(step["kernels_per_s"]), _rate(step["mb_per_s"]),
        *(_ms(lat[q]) for q in ("p50", "p90", "p95", "p99", "max")),
    ]  # fmt: skip


def _side_row(step: Step) -> list[str]:
    server, client = step["server"], step["client"]
    return [
        _level(step),
        _rate(server["mean_batch_rows"]),
        _ms(server["mean_queue_ms"]),
        _ms(server["mean_compute_ms"]),
        _share(server["cache_hit_rate"]),
        f"{client['max_cpu_util']:.2f}",
        str(client["late"]) if step["mode"] == "open" else "-",
        "pass" if step["passed"] else "FAIL",
    ]


def _notes(steps: Sequence[Step]) -> list[str]:
    notes = []
    for step in steps:
        where = _level(step)
        for code, message in step["error_examples"].items():
            notes.append(f"{where}: {step['errors'][code]} x {code}: {message}")
        if step["dropped"]:
            notes.append(
                f"{where}: {step['dropped']} sends dropped at --max-inflight (the server fell behind)"
            )
        if step["client"]["bottleneck"]:
            notes.append(f"{where}: client-bound: {step['client']['bottleneck']}")
        hist = step["server"]["batch_histogram"]
        if hist:
            notes.append(
                f"{where}: batch rows per request: " + ", ".join(f"{k}: {v}" for k, v in hist.items())
            )
        check = step.get("correctness")
        if check:
            notes.append(
                f"{where}: correctness: {check['checked']} checked, {check['mismatches']} mismatched,"
                f" {check['skipped']} skipped" + "".join(f"; {n}" for n in check["notes"])
            )
        notes.extend(f"{where}: FAILED: {failure}" for failure in step["failures"])
    return notes


def render_table(steps: Sequence[Step], out: IO[str], color: bool | None = None) -> None:
    """Two tables (load and latency in ms; server and client), then notes; rich when installed."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        _plain(steps, out)
        return
    console = Console(file=out, force_terminal=color, width=max(120, Console(file=out).width))
    for title, columns, row in (
        ("Load and latency (ms)", _MAIN, _main_row),
        ("Server (per-response reports) and client", _SIDE, _side_row),
    ):
        table = Table(title=title, title_justify="left")
        for i, name in enumerate(columns):
            table.add_column(name, justify="left" if i == 0 else "right", no_wrap=True)
        for step in steps:
            cells = row(step)
            table.add_row(*cells, style=None if step["passed"] else "red")
        console.print(table)
    for note in _notes(steps):
        console.print(note, highlight=False, markup=False, soft_wrap=True)


def _plain(steps: Sequence[Step], out: IO[str]) -> None:
    for columns, row in ((_MAIN, _main_row), (_SIDE, _side_row)):
        rows = [list(columns), *(row(s) for s in steps)]
        widths = [max(len(r[i]) for r in rows) for i in range(len(columns))]
        for r in rows:
            cells = [c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))]
            out.write("  ".join(cells))
            out.write("\n")
        out.write("\n")
    for note in _notes(steps):
        out.write(note + "\n")


# --- plot --------------------------------------------------------------------------------------------
def missing_plotting() -> str | None:
    """Why ``--plot`` cannot work here, or ``None``."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "--plot needs matplotlib: pip install 'kernelgen[loadtest]'"
    return None


#: Each percentile's line style, marker and value label's offset (points): told apart by the marker
#: too, so one step's dots are readable, and labelled on different sides, so equal values stay legible.
_PERCENTILES = {"p50": ("-", "o", (7, -7)), "p90": ("--", "s", (-7, 0)), "p99": (":", "^", (7, 7))}
#: Below this many steps each point is labelled with its value.
_LABELLED_STEPS = 4


def _nice(value: float, up: bool) -> float:
    """The nearest of ..., 1, 2, 5, 10, 20, ... at or below (``up``: at or above) ``value`` > 0."""
    exponent = math.floor(math.log10(value))
    candidates = [m * 10.0**e for e in (exponent - 1, exponent, exponent + 1) for m in (1.0, 2.0, 5.0)]
    if up:
        return min(c for c in candidates if c >= value * (1 - 1e-9))
    return max(c for c in candidates if c <= value * (1 + 1e-9))


def _label_points(
    ax: Any, x: Sequence[float], y: Sequence[float], color: str, offset: tuple[int, int] = (7, 0)
) -> None:
    """Each finite point's value beside it, ``offset`` points away (left of it if ``offset[0] < 0``)."""
    for xi, yi in zip(x, y, strict=True):
        if math.isfinite(yi):
            ax.annotate(
                f"{yi:.3g}", (xi, yi), xytext=offset, textcoords="offset points", va="center",
                ha="left" if offset[0] >= 0 else "right", fontsize="small", color=color,
                bbox={"boxstyle": "round,pad=0.1", "facecolor": "white", "edgecolor": "none", "alpha": 0.8},
            )  # fmt: skip


def figure(series: Sequence[tuple[str, Sequence[Step]]], title: str = "") -> Any:
    """The plot's matplotlib ``Figure``: latency percentiles (log scale, its bounds on labelled ticks)
    and throughput against concurrency or rate, one colour per series, one marker per percentile."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    steps = [s for _, run in series for s in run]
    closed = all(s["mode"] == "closed" for s in steps)
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    latency_ax, rate_ax = fig.subplots(1, 2)
    latencies: list[float] = []
    few = len({_num(s["level"]) for s in steps}) < _LABELLED_STEPS
    for n, (label, run) in enumerate(series):
        color = f"C{n}"
        x = [_num(s["level"]) for s in run]
        # One run: three percentiles; several: p50 and p99 keep the figure readable.
        quantiles = ("p50", "p90", "p99") if len(series) == 1 else ("p50", "p99")
        for q in quantiles:
            style, marker, offset = _PERCENTILES[q]
            y = [_num(s["latency_ms"][q]) for s in run]
            latencies += [v for v in y if math.isfinite(v) and v > 0]
            latency_ax.plot(x, y, style, marker=marker, markersize=7, color=color, label=f"{label} {q}")
            if few:
                _label_points(latency_ax, x, y, color, offset)
        rates = [_num(s["requests_per_s"]) for s in run]
        rate_ax.plot(x, rates, "-", marker="o", markersize=7, color=color, label=f"{label} requests/s")
        if few:
            _label_points(rate_ax, x, rates, color)
        if any(_num(s["kernels_per_s"]) > 1.01 * _num(s["requests_per_s"]) for s in run):
            y = [_num(s["kernels_per_s"]) for s in run]
            rate_ax.plot(x, y, "--", marker="s", markersize=7, color=color, label=f"{label} kernels/s")
            if few:
                _label_points(rate_ax, x, y, color, (-7, 0))
    levels = sorted({_num(s["level"]) for s in steps})
    for ax in (latency_ax, rate_ax):
        ax.set_xlabel("concurrency (requests in flight)" if closed else "target rate (requests/s)")
        if levels and levels[0] > 0 and levels[-1] / levels[0] >= 4:
            ax.set_xscale("log", base=2 if closed else 10)
        ax.set_xticks(levels, [f"{v:g}" for v in levels])
        if few:  # room beside the first and last points for their value labels
            ax.margins(x=0.12)
        if len(levels) == 1:  # one step: its point in the middle, room for its value labels
            ax.set_xlim(levels[0] - max(abs(levels[0]) / 2, 1.0), levels[0] + max(abs(levels[0]) / 2, 1.0))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    latency_ax.set_ylabel("latency (ms, log scale)")
    latency_ax.set_yscale("log")
    subs: tuple[float, ...] = (1.0, 2.0, 5.0)
    if latencies:
        # Both ends on a labelled 1-2-5 tick beyond every value (none sits on an edge or below the
        # lowest label); a range within one decade gets labels at 3 and 7 too.
        low, high = _nice(min(latencies) * 0.9, up=False), _nice(max(latencies) * 1.1, up=True)
        latency_ax.set_ylim(low, high)
        if high / low <= 10:
            subs = (1.0, 2.0, 3.0, 5.0, 7.0)
    latency_ax.yaxis.set_major_locator(LogLocator(base=10, subs=subs))
    latency_ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _pos: f"{value:g}"))
    latency_ax.yaxis.set_minor_formatter(NullFormatter())
    latency_ax.set_title("latency percentiles")
    rate_ax.set_ylabel("throughput (per second)")
    rate_ax.set_ylim(0, rate_ax.get_ylim()[1] * 1.1)  # from 0, with room above the highest label
    rate_ax.set_title("throughput")
    if title:
        fig.suptitle(title)
    return fig


def plot(series: Sequence[tuple[str, Sequence[Step]]], path: Path, title: str = "") -> None:
    """Write ``figure(series, title)`` as a PNG to ``path``."""
    figure(series, title).savefig(path, dpi=110)
