"""CI's verdict on pytest's junit reports: every skip printed, only CUDA-only tests may skip.

    python3 scripts/ci_report.py reports/junit.xml reports/junit-protobuf-high.xml

Prints each failed and each skipped test (with its reason), then one closing line
``CI: N passed, N failed, N skipped``. Exits non-zero when a report is missing or
unreadable, when a report ran no test, when any test failed or errored, or when
any test skipped for a reason other than ``CUDA_SKIP_REASON``: the one skip the
suite allows, given by tests/conftest.py to the tests marked ``cuda`` where torch
sees no CUDA device. An expected failure (xfail) is reported as a skip and so
fails too. Standard library only: it runs before, and without, the project's venv.
"""

from __future__ import annotations

import argparse
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

#: The skip reason of the tests marked ``cuda`` (tests/conftest.py gives it); the only allowed skip.
CUDA_SKIP_REASON = "CUDA-only: torch sees no CUDA device here"


@dataclass(frozen=True)
class Case:
    """One test case of a report: its id, outcome and, for a skip or failure, the reason."""

    report: str
    id: str
    outcome: str  # "passed", "failed" (a failure or an error) or "skipped"
    reason: str = ""

    @property
    def allowed_skip(self) -> bool:
        return self.outcome == "skipped" and self.reason == CUDA_SKIP_REASON


@dataclass(frozen=True)
class Verdict:
    cases: tuple[Case, ...]
    problems: tuple[str, ...]  # why CI fails; empty when it passes

    def count(self, outcome: str) -> int:
        return sum(case.outcome == outcome for case in self.cases)


def read_cases(path: Path) -> list[Case]:
    """The test cases of one junit report (raises OSError or ET.ParseError)."""
    cases = []
    for element in ET.parse(path).getroot().iter("testcase"):
        classname, name = element.get("classname", ""), element.get("name", "")
        case_id = f"{classname}::{name}" if classname else name
        outcome, reason = "passed", ""
        for child in element:
            if child.tag in ("failure", "error"):
                outcome, reason = "failed", child.get("message", "") or child.tag
                break
            if child.tag == "skipped":
                outcome, reason = "skipped", child.get("message", "")
                if child.get("type") == "pytest.xfail":
                    reason = f"expected to fail: {reason}"
        cases.append(Case(str(path), case_id, outcome, reason))
    return cases


def judge(paths: Iterable[Path]) -> Verdict:
    cases: list[Case] = []
    problems: list[str] = []
    for path in paths:
        try:
            found = read_cases(path)
        except (OSError, ET.ParseError) as exc:
            problems.append(f"{path}: no readable junit report ({exc})")
            continue
        if not any(case.outcome != "skipped" for case in found):
            problems.append(f"{path}: no test ran")
        cases.extend(found)
    failed = [case for case in cases if case.outcome == "failed"]
    if failed:
        problems.append(f"{len(failed)} test(s) failed")
    refused = [case for case in cases if case.outcome == "skipped" and not case.allowed_skip]
    if refused:
        problems.append(f"{len(refused)} test(s) skipped that are not CUDA-only ({CUDA_SKIP_REASON!r})")
    return Verdict(tuple(cases), tuple(problems))


def render(verdict: Verdict) -> list[str]:
    lines = []
    for case in verdict.cases:
        if case.outcome == "failed":
            lines.append(f"FAILED {case.id} ({case.report}): {case.reason}")
        elif case.outcome == "skipped":
            allowed = "allowed" if case.allowed_skip else "NOT ALLOWED"
            lines.append(f"SKIPPED [{allowed}] {case.id} ({case.report}): {case.reason}")
    lines += [f"CI: {problem}" for problem in verdict.problems]
    passed, failed, skipped = (verdict.count(o) for o in ("passed", "failed", "skipped"))
    lines.append(f"CI: {passed} passed, {failed} failed, {skipped} skipped")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("reports", nargs="+", type=Path, help="junit XML files, each of which must exist")
    verdict = judge(parser.parse_args(argv).reports)
    print("\n".join(render(verdict)))
    return 1 if verdict.problems else 0


if __name__ == "__main__":
    sys.exit(main())
