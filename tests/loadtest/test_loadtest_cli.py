"""``kernelgen loadtest`` arguments: parsing, the workload they make, and the steps they plan."""

from __future__ import annotations

from pathlib import Path

import pytest

from kernelgen_client.cli import build_parser
from kernelgen_loadtest.session import Session
from kernelgen_loadtest.workload import ModelMix, RowRange, WorkloadError

REPO = Path(__file__).resolve().parents[2]


def session(*argv: str) -> Session:
    return Session(build_parser().parse_args(["loadtest", *argv]))


def test_models_positional_or_by_flag_with_weights() -> None:
    workload = session("hyena-2d:3", "--model", "volume-3d", "-m", "long-1d:0.5").workload()
    assert workload.models == (ModelMix("hyena-2d", 3.0), ModelMix("volume-3d"), ModelMix("long-1d", 0.5))
    late = session("--concurrency", "2", "--model", "hyena-2d").workload()
    assert late.models == (ModelMix("hyena-2d"),)
    with pytest.raises(WorkloadError, match="name one or more models"):
        session("--concurrency", "2").workload()


def test_flags_win_over_the_workload_file(tmp_path: Path) -> None:
    path = tmp_path / "w.json"
    path.write_text('{"models": ["a", "b"], "rows": "1-4", "dtype": "float16", "seed": 9}')
    workload = session("--workload", str(path), "--rows", "2", "--seq-lens", "15,15").workload()
    assert [m.name for m in workload.models] == ["a", "b"]
    assert (workload.rows, workload.dtype, workload.seed) == (RowRange(2, 2), "float16", 9)
    assert workload.seq_lens == ((15, 15),)
    assert session("--workload", str(path), "c").workload().models == (ModelMix("c"),)


def test_plans_of_a_sweep() -> None:
    closed = session("m", "--concurrency", "1,4,16", "--duration", "3", "--warmup", "0.5").plans()
    assert [(p.mode, p.level, p.duration_s, p.warmup_s, p.index) for p in closed] == [
        ("closed", 1, 3, 0.5, 0),
        ("closed", 4, 3, 0.5, 1),
        ("closed", 16, 3, 0.5, 2),
    ]
    opened = session("m", "--rate", "50,100", "--requests", "200", "--distribution", "constant").plans()
    assert [(p.mode, p.level, p.requests, p.duration_s, p.distribution) for p in opened] == [
        ("open", 50, 200, None, "constant"),
        ("open", 100, 200, None, "constant"),
    ]
    (default,) = session("m").plans()
    assert (default.mode, default.level, default.duration_s, default.warmup_s) == ("closed", 1, 10, 2)
    (checked,) = session("m", "--check-correctness").plans()
    assert checked.keep == 16


@pytest.mark.parametrize(
    "argv",
    [
        ["--concurrency", "0"],
        ["--concurrency", "2.5"],
        ["--rate", "-5"],
        ["--rate", "10", "--concurrency", "1"],
        ["--duration", "5", "--requests", "10"],
        ["--unconditioned", "1.5"],
        ["--max-error-rate", "2"],
        ["--workers", "0"],
        ["--dtype", "float64"],
    ],
)
def test_bad_arguments_are_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["loadtest", "m", *argv])
    assert info.value.code == 2
    assert "kernelgen loadtest" in capsys.readouterr().err


def test_the_compose_load_test_command_parses() -> None:
    import yaml

    compose = REPO / "docker" / "compose.yaml"
    service = yaml.safe_load(compose.read_text())["services"]["loadtest"]
    assert service["entrypoint"] == ["kernelgen"]
    args = build_parser().parse_args(service["command"])
    assert Session(args).workload().models == (ModelMix("hyena-2d"),)
