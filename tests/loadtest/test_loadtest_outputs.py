"""Load-test outputs: the table (rich and plain), CSV, JSON and the PNG plot."""

from __future__ import annotations

import builtins
import csv
import dataclasses
import io
import json
from pathlib import Path
from typing import Any

import pytest

from kernelgen_loadtest.outputs import CSV_COLUMNS, plot, render_table, write_csv, write_json
from kernelgen_loadtest.stats import Gates, Samples, summarise


def step(
    level: float, ok: int, errors: int = 0, mode: str = "closed", slo: float | None = None
) -> dict[str, Any]:
    s = Samples(window_s=2.0, cpu_util=[0.4])
    s.latencies_s = [0.001 * (i + 1) * level for i in range(ok)]
    for _ in range(errors):
        s.error("UNAVAILABLE", "connection refused")
    s.sent = s.scheduled = ok + errors
    s.kernels, s.bytes = ok, ok * 1_290_000
    s.batch_rows, s.batch_requests = [1, 2, 2], [1, 2, 2]
    s.queue_ms, s.compute_ms = [0.5] * 3, [1.0] * 3
    result = summarise(s, mode, level)  # type: ignore[arg-type]
    result = dataclasses.replace(result, failures=Gates(slo_p99_ms=slo).failures(result))
    return result.to_dict()


STEPS = [step(1, 100), step(4, 80, errors=2), step(16, 60, slo=1.0)]


def test_csv_has_one_flat_row_per_step(tmp_path: Path) -> None:
    path = tmp_path / "out.csv"
    write_csv(path, STEPS)
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(CSV_COLUMNS)
    assert [float(r["level"]) for r in rows] == [1, 4, 16]
    assert rows[1]["errors_by_code"] == "UNAVAILABLE=2" and rows[1]["passed"] == "False"
    assert rows[2]["failures"].startswith("p99 ") and rows[0]["batch_histogram"] == "1:1;2:2"
    assert all(int(r["sent"]) == int(r["ok"]) + int(r["error_count"]) for r in rows)


def test_json_is_strict(tmp_path: Path) -> None:
    path = tmp_path / "out.json"
    empty = step(1, 0)
    write_json(path, {"steps": [*STEPS, empty]})
    loaded = json.loads(path.read_text())
    assert loaded["steps"][3]["latency_ms"]["p50"] is None
    with pytest.raises(ValueError, match="JSON compliant"):
        write_json(path, {"bad": float("nan")})


def test_rich_table_and_notes() -> None:
    out = io.StringIO()
    render_table(STEPS, out, color=False)
    text = out.getvalue()
    assert "Load and latency (ms)" in text and "Server (per-response reports) and client" in text
    for label in ("c=1", "c=4", "c=16"):
        assert label in text
    assert "FAIL" in text and "pass" in text
    assert "c=4: 2 x UNAVAILABLE: connection refused" in text
    assert "c=16: FAILED: p99" in text
    assert "batch rows per request: 1: 1, 2: 2" in text


def test_plain_table_without_rich(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_rich(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("rich"):
            raise ImportError("no rich here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_rich)
    out = io.StringIO()
    render_table(STEPS, out)
    lines = out.getvalue().splitlines()
    assert lines[0].split()[:4] == ["step", "sent", "ok", "errors"]
    assert lines[1].split()[:4] == ["c=1", "100", "100", "0"]
    assert "c=4: 2 x UNAVAILABLE: connection refused" in lines


def test_plot_writes_a_png(tmp_path: Path) -> None:
    from matplotlib.image import imread

    path = tmp_path / "sweep.png"
    open_steps = [step(10, 50, mode="open"), step(100, 50, mode="open")]
    plot([("on", STEPS), ("off", STEPS[:2])], path, title="sweep")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = imread(path).shape
    assert width > height > 300
    plot([("rates", open_steps)], tmp_path / "rates.png")
    assert (tmp_path / "rates.png").stat().st_size > 10_000


def _latency_lines(fig: Any) -> list[Any]:
    latency_ax = fig.axes[0]
    return [line for line in latency_ax.get_lines() if line.get_label().split()[-1] in ("p50", "p90", "p99")]


@pytest.mark.parametrize("steps", [STEPS[:1], STEPS], ids=["one step", "three steps"])
def test_plot_is_readable_with_one_step_or_many(steps: list[dict[str, Any]]) -> None:
    from matplotlib.ticker import LogLocator

    from kernelgen_loadtest.outputs import figure

    fig = figure([("run", steps)], title="sweep")
    latency_ax, rate_ax = fig.axes
    # Each percentile has its own marker, not only its own line style: one step's dots stay apart.
    lines = _latency_lines(fig)
    assert sorted(line.get_label() for line in lines) == ["run p50", "run p90", "run p99"]
    assert len({line.get_marker() for line in lines}) == 3
    # Both axes say what they measure and in which unit.
    assert latency_ax.get_ylabel().startswith("latency (ms")
    assert rate_ax.get_ylabel() == "throughput (per second)"
    assert latency_ax.get_xlabel() == rate_ax.get_xlabel() == "concurrency (requests in flight)"
    # The log axis starts and ends on a labelled tick beyond every value: none below the lowest label.
    values = [y for line in lines for y in line.get_ydata()]
    low, high = latency_ax.get_ylim()
    fig.canvas.draw()  # settles the ticks
    labelled = [
        t.get_position()[1]
        for t in latency_ax.get_yticklabels()
        if t.get_text() and low <= t.get_position()[1] <= high
    ]
    assert isinstance(latency_ax.yaxis.get_major_locator(), LogLocator)
    assert min(labelled) == pytest.approx(low) and low <= min(values)
    assert max(labelled) == pytest.approx(high) and high >= max(values)
    assert len(labelled) >= 3
    # Every step's level is on a labelled tick of the x axis, and one step sits inside the axis.
    levels = [s["level"] for s in steps]
    assert [t.get_text() for t in latency_ax.get_xticklabels()] == [f"{v:g}" for v in levels]
    left, right = latency_ax.get_xlim()
    assert left < min(levels) and max(levels) < right
    # Few steps: each point carries its value, so a single dot is read without the axis.
    texts = {t.get_text() for t in latency_ax.texts}
    if len(steps) < 4:
        assert f"{steps[0]['latency_ms']['p50']:.3g}" in texts
