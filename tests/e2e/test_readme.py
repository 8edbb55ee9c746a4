"""README.md's code blocks, run as written against what the README itself builds.

Every code block of README.md (fenced, or indented by four spaces) is known here by its section and
its place in it, and is run, checked, or listed in ``NOT_RUN`` with the reason it is not. A block
this test does not know fails it: an example is run from the day it is written.

The workspace is what a new user has after following the README from the repository's root:
``examples/example_checkpoint.py`` writes the example checkpoint and its configs, the shell blocks
build ``models/`` from it, and the Python blocks call ``kernelgen serve`` on the embedded models
(``make serve``; with ``--shared-memory``, which its section asks for) or on ``models/`` (the group
example; the PyTorch examples, which import the example network from ``examples/``). The servers
listen on free ports, named to the examples by ``KERNELGEN_TARGET``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from support import ServeProcess, serve_process

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
#: A block runs at most this long (the longest, the first client example, takes a few seconds).
BLOCK_TIMEOUT_S = 120


@dataclass(frozen=True)
class Block:
    section: str  # the heading above it
    index: int  # 1 for the section's first block
    line: int  # where it starts in README.md
    text: str  # dedented, without the fences

    @property
    def key(self) -> tuple[str, int]:
        return self.section, self.index


def code_blocks(markdown: str) -> list[Block]:
    """Every fenced block, and every block indented four spaces past its context after a blank line."""
    blocks: list[Block] = []
    counts: dict[str, int] = {}
    section = ""
    lines = markdown.splitlines()
    i = 0

    def add(start: int, body: list[str]) -> None:
        counts[section] = counts.get(section, 0) + 1
        indent = min(len(b) - len(b.lstrip()) for b in body if b.strip())
        text = "\n".join(b[indent:] for b in body).strip("\n") + "\n"
        blocks.append(Block(section, counts[section], start + 1, text))

    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            section = line.lstrip("#").strip()
        elif line.lstrip().startswith("```"):
            fence = line[: len(line) - len(line.lstrip())]
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            add(i, [b[len(fence) :] for b in lines[i + 1 : end]])
            i = end
        elif line.startswith("    ") and i > 0 and not lines[i - 1].strip():
            end = i
            while end < len(lines) and (lines[end].startswith("    ") or not lines[end].strip()):
                end += 1
            add(i, lines[i:end])
            i = end - 1
        i += 1
    return blocks


# --- what each block is, and how it is run -------------------------------------------------------------
EMBEDDED, REPOSITORY = "the embedded models", "models/"


@dataclass(frozen=True)
class Python:
    """Run as a Python script in the workspace, against the server of ``serves`` (None: no server)."""

    serves: str | None
    #: Lines its output must hold (what the example's comments promise).
    prints: tuple[str, ...] = ()


@dataclass(frozen=True)
class Shell:
    """Run with bash in the workspace, every command as written (stopping at the first failure)."""


@dataclass(frozen=True)
class Check:
    """Not a command: checked for what it claims (``how`` says what)."""

    how: str


@dataclass(frozen=True)
class NotRun:
    why: str


PLAN: dict[tuple[str, int], Python | Shell | Check | NotRun] = {
    ("Set up on a fresh machine", 1): NotRun(
        "`make serve` serves until stopped on port 50051, which another server here may hold; this test "
        "runs what it runs (`kernelgen serve` on the embedded models) on a free port instead"
    ),
    ("Set up on a fresh machine", 2): NotRun("`make test` is the suite that runs this test"),
    ("Use it from Python", 1): Python(EMBEDDED, prints=("hyena-2d True 384", "NOT_FOUND unknown model")),
    ("Use it from Python", 2): Python(EMBEDDED, prints=("16 (1, 57, 57, 384)",)),
    ("Shared memory on the server's host", 1): Python(EMBEDDED),
    ("Dense or factored kernels", 1): Python(EMBEDDED),
    ("The Open Inference Protocol (Triton and KServe clients)", 1): Python(EMBEDDED),
    ("Model repository", 1): Shell(),
    ("A whole network: `import --all` and groups", 1): Shell(),
    ("A whole network: `import --all` and groups", 2): Check("the base.json the example wrote"),
    ("A whole network: `import --all` and groups", 3): Check("every path listed exists in the workspace"),
    ("Moving a trained network in: `export` or `import --all`", 1): Python(
        None, prints=("models/vision-net-live",)
    ),
    ("Moving a trained network in: `export` or `import --all`", 2): Check("a valid base config"),
    ("Fetching a network's kernels together", 1): Python(
        REPOSITORY, prints=("6 True", "vision-net/5 (4, 57, 57, 256)", "(4, 57, 57, 256)")
    ),
    ("Served kernels inside a PyTorch model", 1): Python(
        REPOSITORY, prints=("vision-net/5\n6 1 12\nSIRENKernelND\nTrue True\n",)
    ),
    ("Served kernels inside a PyTorch model", 2): Python(
        REPOSITORY,
        prints=(
            "layer 'blocks.0.filter': kernels are served for inference and carry no gradient; ",
            "layer 'blocks.2.filter' (member 'vision-net/2'): the layer's weights are not the ones the "
            "member was made from",
        ),
    ),
    ("Benchmarks", 1): Check(
        "each command parses (not run: 48 s and 96 s of load; tests/loadtest runs the load tester)"
    ),
    ("Benchmarks", 2): NotRun("`make bench` runs every benchmark for several minutes"),
    ("Development", 1): Check("every path listed exists in the repository"),
    ("GPU check", 1): NotRun("fetches wheels from PyPI, which a test must not need"),
    ("GPU check", 2): NotRun("the GPU check's dry run takes about 2 minutes, on wheels fetched from PyPI"),
}


def test_the_plan_names_every_block_and_the_set_up_commands_are_unchanged() -> None:
    blocks = code_blocks(README.read_text())
    assert [b.key for b in blocks] == list(PLAN), "README.md's code blocks changed: update PLAN"
    assert [b.text for b in blocks[:2]] == ["make serve\n", "make test\n"]


# --- the run -----------------------------------------------------------------------------------------
def _run(argv: list[str], cwd: Path, env: dict[str, str], what: str) -> str:
    done = subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S, check=False
    )
    assert done.returncode == 0, f"{what} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr, f"{what}:\n{done.stderr}"
    return done.stdout


class Workspace:
    """The folder a README reader works in, and the servers their examples call, started on demand."""

    def __init__(self, folder: Path, stack: ExitStack) -> None:
        self.folder = folder
        self._stack = stack
        self._servers: dict[str, ServeProcess] = {}
        # The README's commands run from the repository's root: its examples/ is there.
        (folder / "examples").symlink_to(ROOT / "examples", target_is_directory=True)
        bin_dir = str(Path(sys.executable).parent)  # python and kernelgen, as `make setup` installs them
        self.env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.env.pop("KERNELGEN_TARGET", None)

    def server(self, serves: str) -> ServeProcess:
        if serves not in self._servers:
            args = (
                ["--shared-memory"] if serves == EMBEDDED else ["--model-repo", str(self.folder / "models")]
            )
            self._servers[serves] = self._stack.enter_context(serve_process(*args, "--log-level", "WARNING"))
        return self._servers[serves]

    def python(self, block: Block, plan: Python) -> None:
        script = self.folder / f"readme_line_{block.line}.py"
        script.write_text(block.text)
        env = dict(self.env)
        if plan.serves is not None:
            env["KERNELGEN_TARGET"] = self.server(plan.serves).target
        out = _run([sys.executable, script.name], self.folder, env, f"README.md:{block.line}")
        for expected in plan.prints:
            assert expected in out, f"README.md:{block.line} printed no {expected!r}:\n{out}"

    def stop(self) -> None:
        """SIGTERM every server started; each must drain and exit 0."""
        for server in self._servers.values():
            assert server.terminate() == 0, "".join(server.output)

    def shell(self, block: Block) -> None:
        _run(["bash", "-euo", "pipefail", "-c", block.text], self.folder, self.env, f"README.md:{block.line}")


def _listed_paths(text: str) -> list[str]:
    """The first word of each line of a path listing (``models/vision-net/1/...``: the folder)."""
    return [line.split()[0].removesuffix("...") for line in text.splitlines() if line.strip()]


def _commands(text: str) -> Iterator[list[str]]:
    for command in text.replace("\\\n", " ").splitlines():
        if command.strip():
            yield shlex.split(command)


def _check(block: Block, workspace: Workspace) -> None:
    key = block.key
    if key == ("A whole network: `import --all` and groups", 2):
        # The per-generator override example is the example network's base config: the import used it.
        assert json.loads(block.text) == json.loads((workspace.folder / "base.json").read_text())
        config = json.loads((workspace.folder / "models/vision-net/5/config.json").read_text())
        assert config["L_cache"] == [64, 32]  # the override, applied to its generator
    elif key == ("A whole network: `import --all` and groups", 3):
        for path in _listed_paths(block.text):
            assert (workspace.folder / path).exists(), f"README.md:{block.line} lists {path}, not written"
    elif key == ("Moving a trained network in: `export` or `import --all`", 2):
        from kernelgen_server.repository.import_plan import ImportBase

        base = workspace.folder / "readme_base.json"
        base.write_text(block.text)
        parsed = ImportBase.from_file(base)
        assert parsed.values["mask"]["type"] == "GaussianModulationND" and len(parsed.overrides) == 1
        # The live module's export is the import of its checkpoint: the same members, byte for byte.
        for member in range(6):
            for name in ("config.json", "model.safetensors"):
                live = workspace.folder / "models" / "vision-net-live" / str(member) / name
                imported = workspace.folder / "models" / "vision-net" / str(member) / name
                assert live.read_bytes() == imported.read_bytes(), live
    elif key == ("Development", 1):
        for path in _listed_paths(block.text):
            for found in [path] if "{" not in path else _braces(path):
                assert (ROOT / found).exists(), f"README.md:{block.line} lists {found}, which is not there"
    elif key == ("Benchmarks", 1):
        from kernelgen_client.cli import build_parser

        parser = build_parser()
        for argv in _commands(block.text):
            assert argv[:2] == ["kernelgen", "loadtest"], argv
            args = parser.parse_args(argv[1:])
            assert args.command == "loadtest"
    else:
        raise AssertionError(f"no check for {key}")


def _braces(path: str) -> list[str]:
    """``tests/{wire,client}/``: ``tests/wire/``, ``tests/client/``."""
    match = re.fullmatch(r"(.*)\{(.*)\}(.*)", path)
    assert match, path
    return [f"{match[1]}{part}{match[3]}" for part in match[2].split(",")]


def test_every_readme_block_runs_as_written(tmp_path: Path) -> None:
    with ExitStack() as stack:
        workspace = Workspace(tmp_path, stack)
        for block in code_blocks(README.read_text()):
            plan = PLAN[block.key]
            if isinstance(plan, Python):
                workspace.python(block, plan)
            elif isinstance(plan, Shell):
                workspace.shell(block)
            elif isinstance(plan, Check):
                _check(block, workspace)
            else:
                assert plan.why
        workspace.stop()


# --- one vocabulary: seq_lens (what is asked) and the kernel's shape (2*s-1 points per axis) ----------
def test_the_factored_sizes_are_those_of_the_code_beside_them() -> None:
    from kernelgen_server.model.config import ModelConfig
    from kernelgen_server.repository.store import embedded_repository
    from kernelgen_wire.sizes import kernel_spatial

    (block,) = [b for b in code_blocks(README.read_text()) if b.section == "Dense or factored kernels"]
    assert 'client.generate("hyena-2d", [29, 29], rows, representation="factored")' in block.text
    config = ModelConfig.from_file(embedded_repository() / "hyena-2d" / "config.json")
    points = 1
    for n in kernel_spatial([29, 29]):
        points *= n
    hidden, dense = points * config.mlp_hidden_dim * 4, points * config.out_dim * 4  # float32, one row
    prose = " ".join(README.read_text().split())
    assert (
        f"at seq_lens 29,29, a 57x57 kernel, {hidden / 1e3:.0f} kB instead of {dense / 1e6:.2f} MB" in prose
    )


def test_no_text_calls_a_kernel_shape_a_grid_of_seq_lens() -> None:
    # "29x29" is a kernel's shape (seq_lens 15,15); seq_lens are written 15,15.
    texts = [README, ROOT / "docs" / "architecture.md", *sorted((ROOT / "benchmarks").rglob("*.py"))]
    texts += sorted((ROOT / "benchmarks" / "results").glob("*.md"))
    pattern = re.compile(r"\b\d+x\d+(?:x\d+)? grid\b|seq_lens \[?\d+x\d+|hyena-2d \d+x\d+")
    found = [f"{p.relative_to(ROOT)}: {m[0]}" for p in texts for m in pattern.finditer(p.read_text())]
    assert found == []
