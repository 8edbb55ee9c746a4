"""A trained network from checkpoint to client, as a user runs it: the ``kernelgen`` console script
imports a Lightning checkpoint with ``--all``, ``kernelgen serve`` serves the group, and the README's
group example runs as written against it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from networks import save, stack
from support import ServeProcess, serve_process

REPO = Path(__file__).resolve().parents[2]
MEMBERS = 6


def kernelgen(*argv: str, target: str | None = None) -> subprocess.CompletedProcess[str]:
    """The installed ``kernelgen`` console script."""
    env = {**os.environ, **({"KERNELGEN_TARGET": target} if target else {})}
    script = str(Path(sys.executable).with_name("kernelgen"))
    return subprocess.run([script, *argv], capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``vision-net``: a trained stack of 2-D generators conditioned on 384 values, imported by the CLI."""
    work = tmp_path_factory.mktemp("run")
    checkpoint = save(stack(depth=MEMBERS, seed=41, cond_dim=384, L_cache=29), "ckpt", work, root="model")
    base = work / "base.json"
    base.write_text(json.dumps({"omega_0": 10.0, "L_cache": 29}))
    root = tmp_path_factory.mktemp("models")
    argv = ["import", str(checkpoint), "--all", "--config", str(base), "--name", "vision-net"]
    argv += ["--repo", str(root)]
    dry = kernelgen(*argv, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    rows = [line for line in dry.stdout.splitlines() if line.startswith("vision-net/")]
    assert [row.split()[1] for row in rows] == [f"model.blocks.{i}.filter.kernel" for i in range(MEMBERS)]
    assert list(root.iterdir()) == []
    done = kernelgen(*argv)
    assert done.returncode == 0, done.stderr
    assert f"imported group 'vision-net' in {root / 'vision-net'}: {MEMBERS} models" in done.stdout
    again = kernelgen(*argv)
    assert again.returncode == 0 and "nothing written" in again.stdout
    return root


@pytest.fixture(scope="module")
def served(repo: Path) -> Iterator[ServeProcess]:
    with serve_process("--model-repo", str(repo)) as process:
        yield process


def readme_python(section: str) -> str:
    """Every ```python block under the README heading ``section``, in order."""
    text = (REPO / "README.md").read_text()
    match = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert match, f"README has no '## {section}' section"
    return "\n".join(re.findall(r"^```python\n(.*?)^```", match.group(1), flags=re.M | re.S))


def test_the_readme_group_example_runs_as_written(served: ServeProcess, tmp_path: Path) -> None:
    script = tmp_path / "readme.py"
    script.write_text(readme_python("Model repository"))
    env: dict[str, Any] = {**os.environ, "KERNELGEN_TARGET": served.target}
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path
    )
    assert done.returncode == 0, done.stdout + done.stderr
    names = [f"vision-net/{i}" for i in range(MEMBERS)]
    assert done.stdout.splitlines() == [
        f"{MEMBERS} True",
        *(f"{name} model.blocks.{i}.filter.kernel 6" for i, name in enumerate(names)),
        *(f"{name} (4, 57, 57, 6)" for name in names),
        "(4, 57, 57, 6)",
    ]


def test_the_console_script_lists_and_checks_the_group(served: ServeProcess, repo: Path) -> None:
    models = kernelgen("models", target=served.target)
    assert models.returncode == 0, models.stderr
    assert re.search(
        rf"^vision-net\s+{MEMBERS}\s+yes\s+vision-net/0 \.\. vision-net/{MEMBERS - 1}\s+"
        rf"model\.blocks\.0\.filter\.kernel \.\. model\.blocks\.{MEMBERS - 1}\.filter\.kernel$",
        models.stdout,
        flags=re.M,
    ), models.stdout
    assert kernelgen("health", "vision-net", target=served.target).stdout.strip() == "vision-net: SERVING"
    inspect = kernelgen("inspect", str(repo))
    assert inspect.returncode == 0, inspect.stderr
    assert f"group vision-net: {MEMBERS} models, imported from network.ckpt" in inspect.stdout
