"""scripts/ci_report.py: CI passes only when tests ran, none failed and only CUDA-only tests skipped.

Checked over sample junit reports, over reports written by a real pytest run, over the
suite's own CUDA tests, and against the reports `make test` writes and .ci/run reads.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import ci_report

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "ci_report.py"
CUDA = ci_report.CUDA_SKIP_REASON


def case(name: str, body: str = "") -> str:
    return f'<testcase classname="tests.x" name="{name}" time="0.1">{body}</testcase>'


def skipped(reason: str, kind: str = "pytest.skip") -> str:
    return f'<skipped type="{kind}" message="{reason}">tests/x.py:1: {reason}</skipped>'


def report(tmp_path: Path, name: str, *cases: str, wrapped: bool = True) -> Path:
    suite = f'<testsuite name="pytest" tests="{len(cases)}">{"".join(cases)}</testsuite>'
    path = tmp_path / name
    path.write_text(f"<testsuites>{suite}</testsuites>" if wrapped else suite)
    return path


def verdict(*paths: Path) -> tuple[int, str]:
    """What `python scripts/ci_report.py PATHS` exits with and prints (no site-packages: stdlib only)."""
    done = subprocess.run(
        [sys.executable, "-S", str(SCRIPT), *map(str, paths)], capture_output=True, text=True, check=False
    )
    assert not done.stderr, done.stderr
    return done.returncode, done.stdout


def test_passes_with_only_cuda_skips_and_prints_them(tmp_path: Path) -> None:
    low = report(tmp_path, "low.xml", case("test_a"), case("test_cuda_matches_cpu", skipped(CUDA)))
    high = report(tmp_path, "high.xml", case("test_b"), wrapped=False)
    code, out = verdict(low, high)
    assert code == 0, out
    assert f"SKIPPED [allowed] tests.x::test_cuda_matches_cpu ({low}): {CUDA}" in out.splitlines()
    assert out.splitlines()[-1] == "CI: 2 passed, 0 failed, 1 skipped"


@pytest.mark.parametrize(
    ("body", "printed"),
    [
        (skipped("no IPv6 on this host"), "no IPv6 on this host"),
        (skipped(CUDA.upper()), CUDA.upper()),  # the reason must be the one constant, exactly
        (skipped("known", "pytest.xfail"), "expected to fail: known"),
    ],
)
def test_any_other_skip_fails(tmp_path: Path, body: str, printed: str) -> None:
    code, out = verdict(report(tmp_path, "r.xml", case("test_a"), case("test_b", body)))
    assert code == 1
    assert f"SKIPPED [NOT ALLOWED] tests.x::test_b ({tmp_path / 'r.xml'}): {printed}" in out
    assert "CI: 1 test(s) skipped that are not CUDA-only" in out
    assert out.splitlines()[-1] == "CI: 1 passed, 0 failed, 1 skipped"


@pytest.mark.parametrize(
    "body", ['<failure message="assert 1 == 2">trace</failure>', '<error message="setup">trace</error>']
)
def test_a_failure_or_error_fails(tmp_path: Path, body: str) -> None:
    code, out = verdict(report(tmp_path, "r.xml", case("test_a"), case("test_b", body)))
    assert code == 1
    assert "FAILED tests.x::test_b" in out and "CI: 1 test(s) failed" in out
    assert out.splitlines()[-1] == "CI: 1 passed, 1 failed, 0 skipped"


@pytest.mark.parametrize(
    "cases",
    [(), (case("test_cuda", skipped(CUDA)),)],
    ids=["empty", "only-skips"],
)
def test_a_report_that_ran_no_test_fails(tmp_path: Path, cases: tuple[str, ...]) -> None:
    ran = report(tmp_path, "ran.xml", case("test_a"))
    idle = report(tmp_path, "idle.xml", *cases)
    code, out = verdict(ran, idle)
    assert code == 1
    assert f"CI: {idle}: no test ran" in out
    assert f"{ran}: no test ran" not in out


def test_a_missing_or_broken_report_fails(tmp_path: Path) -> None:
    ran = report(tmp_path, "ran.xml", case("test_a"))
    broken = tmp_path / "broken.xml"
    broken.write_text("<testsuites><testsuite>")
    code, out = verdict(ran, tmp_path / "missing.xml", broken)
    assert code == 1
    assert f"CI: {tmp_path / 'missing.xml'}: no readable junit report" in out
    assert f"CI: {broken}: no readable junit report" in out
    assert out.splitlines()[-1] == "CI: 1 passed, 0 failed, 0 skipped"


def test_reads_the_reports_of_a_real_pytest_run(tmp_path: Path) -> None:
    (tmp_path / "test_outcomes.py").write_text(
        "import pytest\n"
        "def test_passes(): pass\n"
        "def test_skips(): pytest.skip('inside')\n"
        f"@pytest.mark.skip(reason={CUDA!r})\n"
        "def test_cuda(): pass\n"
        "@pytest.mark.xfail(reason='known')\n"
        "def test_xfails(): assert False\n"
        "def test_fails(): assert 1 == 2\n"
        "@pytest.fixture\n"
        "def broken(): raise RuntimeError('boom')\n"
        "def test_errors(broken): pass\n"
    )
    junit = tmp_path / "junit.xml"
    options = ["-q", "-p", "no:cacheprovider", "-c", "/dev/null", f"--junitxml={junit}"]
    subprocess.run([sys.executable, "-m", "pytest", *options], cwd=tmp_path, capture_output=True, check=False)
    outcomes = {c.id: (c.outcome, c.reason) for c in ci_report.read_cases(junit)}
    assert outcomes == {
        "test_outcomes::test_passes": ("passed", ""),
        "test_outcomes::test_skips": ("skipped", "inside"),
        "test_outcomes::test_cuda": ("skipped", CUDA),
        "test_outcomes::test_xfails": ("skipped", "expected to fail: known"),
        "test_outcomes::test_fails": ("failed", "assert 1 == 2"),
        "test_outcomes::test_errors": ("failed", 'failed on setup with "RuntimeError: boom"'),
    }
    allowed = {c.id for c in ci_report.read_cases(junit) if c.allowed_skip}
    assert allowed == {"test_outcomes::test_cuda"}


def test_the_suites_cuda_tests_pass_or_skip_with_the_one_reason(tmp_path: Path) -> None:
    junit = tmp_path / "junit.xml"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", f"--junitxml={junit}",
         "tests/server/test_engine.py"],
        cwd=REPO, capture_output=True, text=True, check=False,
    )  # fmt: skip
    cases = ci_report.read_cases(junit)
    assert len(cases) >= 3, done.stdout[-3000:]  # the two CUDA tests, one of them for two dtypes
    assert all(c.outcome == "passed" or c.allowed_skip for c in cases), cases


def test_ci_reads_every_report_make_test_writes() -> None:
    written = re.findall(r"--junitxml=(\S+)", (REPO / "Makefile").read_text())
    assert len(written) == 2, written  # the run on the low end of protobuf, and on the high end
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    [line] = [line for line in ci if line.startswith("python3 scripts/ci_report.py")]
    assert line.split("||")[0].split()[2:] == written, line
