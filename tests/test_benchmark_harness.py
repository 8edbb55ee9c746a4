"""The benchmarks' shared options (benchmarks/harness.py): durations as given, nonsense refused."""

from __future__ import annotations

import argparse
import sys

import pytest
from harness import Rounds, benchmark_main, int_list


def parse(rounds: Rounds, *argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    rounds.add_arguments(parser)
    args = parser.parse_args(argv)
    rounds.settle(args)
    return args


def test_values_not_given_take_the_defaults_or_the_quick_ones() -> None:
    rounds = Rounds(seconds=5.0, warmup=1.0, rounds=3, quick_seconds=2.0, quick_warmup=0.5)
    args = parse(rounds)
    assert (args.seconds, args.warmup, args.rounds) == (5.0, 1.0, 3)
    quick = parse(rounds, "--quick")
    assert (quick.seconds, quick.warmup, quick.rounds) == (2.0, 0.5, 1)
    given = parse(rounds, "--quick", "--seconds", "0.25", "--rounds", "4")
    assert (given.seconds, given.warmup, given.rounds) == (0.25, 0.5, 4)


def test_zero_means_zero_where_it_means_something() -> None:
    assert parse(Rounds(), "--warmup", "0").warmup == 0.0
    assert parse(Rounds(), "--quick", "--warmup", "0").warmup == 0.0


@pytest.mark.parametrize(
    "argv",
    [("--seconds", "0"), ("--seconds", "-1"), ("--rounds", "0"), ("--warmup", "-1"), ("--seconds", "x")],
)
def test_durations_that_mean_nothing_are_refused(
    argv: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse(Rounds(), *argv)
    assert exit_info.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_a_benchmark_without_warm_up_or_rounds_has_no_such_flags() -> None:
    rounds = Rounds(seconds=3.0, warmup=None, rounds=None, quick_seconds=1.0)
    args = parse(rounds, "--quick")
    assert args.seconds == 1.0 and not hasattr(args, "warmup") and not hasattr(args, "rounds")
    with pytest.raises(SystemExit):
        parse(rounds, "--rounds", "2")


def test_int_list() -> None:
    assert int_list("1,8,32") == [1, 8, 32]
    with pytest.raises(argparse.ArgumentTypeError):
        int_list("1,x")


def test_benchmark_main_runs_a_role_or_the_benchmark(monkeypatch: pytest.MonkeyPatch) -> None:
    import harness

    written: list[tuple[str, dict[str, object], str]] = []
    monkeypatch.setattr(
        harness, "write_results", lambda name, result, text: written.append((name, result, text))
    )
    roles_run: list[list[str]] = []

    def run(args: argparse.Namespace) -> dict[str, object]:
        return {"seconds": args.seconds, "rounds": args.rounds, "levels": args.levels}

    def arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--levels", type=int_list, default="1,2")

    def main(*argv: str) -> None:
        monkeypatch.setattr(sys, "argv", ["bench_x.py", *argv])
        benchmark_main(
            run, lambda r: f"report {r}", doc=None, output="x", arguments=arguments,
            roles={"client": roles_run.append},
        )  # fmt: skip

    main("client", "127.0.0.1:1")
    assert roles_run == [["127.0.0.1:1"]] and not written
    main("--quick", "--output", "y")
    assert written == [("y", {"seconds": 2.0, "rounds": 1, "levels": [1, 2]}, "report " + str(written[0][1]))]
