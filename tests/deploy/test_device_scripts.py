"""The GPU check's scripts: they parse, name real files, and carry what the GPU image lacks.

scripts/device_wheels.sh downloads wheels for the GPU machine (no network there) and
scripts/device_check.sh runs the check there; scripts/device_requirements.py decides, from
pyproject.toml, this environment's package metadata and scripts/device_image.txt, which
packages must travel.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"


@pytest.fixture(scope="module")
def dr() -> ModuleType:
    spec = importlib.util.spec_from_file_location("device_requirements", SCRIPTS / "device_requirements.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["device_wheels.sh", "device_check.sh"])
def test_scripts_parse(name: str) -> None:
    done = subprocess.run(["bash", "-n", str(SCRIPTS / name)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_wheels_cover_every_requirement_the_gpu_image_does_not_meet(dr: ModuleType) -> None:
    def requires(name: str) -> list[Requirement]:
        return dr.requires(name, dr.DEVICE_ENV)

    missing, unused = dr.plan(dr.roots(), dr.carried(), dr.image(), requires)
    assert missing == [], "add these to PACKAGES in scripts/device_wheels.sh"
    assert unused == [], "nothing requires these: drop them from PACKAGES"


def test_the_requirements_followed_are_pyprojects_runtime_ones(dr: ModuleType) -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runtime = [*project["dependencies"], *project["optional-dependencies"]["server"]]
    names = {canonicalize_name(r.name) for r in dr.roots()}
    assert {canonicalize_name(Requirement(r).name) for r in runtime} <= names
    assert "pytest-asyncio" in names  # asyncio_mode = "auto": the async tests need it there


def test_a_shorter_list_is_caught(dr: ModuleType) -> None:
    carried = [n for n in dr.carried() if n not in ("grpcio", "pydantic-core")]
    missing, unused = dr.plan(dr.roots(), carried, dr.image(), lambda name: dr.requires(name, dr.DEVICE_ENV))
    assert {canonicalize_name(Requirement(r).name) for r in missing} == {"grpcio", "pydantic-core"}
    assert unused == []


@pytest.mark.parametrize(
    ("requirement", "have", "met"),
    [
        ("torch>=2.2,<3", "2.11.0", True),  # version read there
        ("torch>=3", "2.11.0", False),
        ("pytest>=8.4", ">=8.4", True),  # assumed minimum
        ("pytest>=9", ">=8.4", False),
        ("grpcio>=1.85.1", None, False),  # present, version not read
        ("grpcio", None, True),
    ],
)
def test_what_the_image_meets(dr: ModuleType, requirement: str, have: str | None, met: bool) -> None:
    req = Requirement(requirement)
    missing, _ = dr.plan([req], [], {canonicalize_name(req.name): have}, lambda name: [])
    assert (missing == []) == met


def test_the_check_names_real_tests_and_benchmarks() -> None:
    text = (SCRIPTS / "device_check.sh").read_text()
    paths = set(re.findall(r"\b((?:tests|benchmarks|scripts)/[\w/]+\.py)\b", text))
    assert "tests/server/test_engine.py" in paths
    assert {p for p in paths if not (REPO / p).is_file()} == set()
    help_text = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_engine.py"), "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--device" in help_text


def test_write_dist_info_gives_a_source_tree_the_installed_entry_points(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / "write_dist_info.py"), str(tmp_path)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert Path(done.stdout.strip()).parent == tmp_path
    # -S: no site-packages, so only the written metadata can answer.
    probe = (
        "import json, sys; sys.path.insert(0, sys.argv[1]);"
        "from importlib.metadata import entry_points as e;"
        "print(json.dumps({g: {p.name: p.value for p in e(group=g)}"
        " for g in ('console_scripts', 'kernelgen.commands', 'kernelgen.reference')}))"
    )
    found = subprocess.run(
        [sys.executable, "-S", "-c", probe, str(tmp_path)], capture_output=True, text=True, check=True
    )
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    import json

    assert json.loads(found.stdout) == {
        "console_scripts": project["scripts"],
        "kernelgen.commands": project["entry-points"]["kernelgen.commands"],
        "kernelgen.reference": project["entry-points"]["kernelgen.reference"],
    }


def test_the_check_runs_kernelgen_from_src_with_its_metadata() -> None:
    text = (SCRIPTS / "device_check.sh").read_text()
    assert 'scripts/write_dist_info.py "$SITE"' in text
    assert "$ROOT/src" in text
