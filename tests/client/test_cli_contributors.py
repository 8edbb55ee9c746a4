"""The ``kernelgen`` command is assembled through entry points, and says which extra is missing.

The client never imports the server: the server's subcommands and the load
tester's reference model arrive through the ``kernelgen.commands`` and
``kernelgen.reference`` entry-point groups. A client-only install is
simulated in a subprocess whose imports of the server extra's packages fail.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import textwrap
import tomllib
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

import pytest

import kernelgen_client.cli as cli

REPO = Path(__file__).resolve().parents[2]
ALL_COMMANDS = [
    "generate", "generate-group", "flops", "models", "health",
    "loadtest", "serve", "init", "import", "inspect",
]  # fmt: skip

#: Run ``kernelgen ARGS`` where the server extra's packages cannot be imported.
CLIENT_ONLY = textwrap.dedent(
    """
    import importlib.abc, sys
    EXTRA = {"torch", "pydantic", "pydantic_settings", "safetensors", "grpc_health",
             "grpc_reflection", "prometheus_client"}

    class ClientOnly(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in EXTRA:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, ClientOnly())
    from kernelgen_client.cli import main
    code = main(sys.argv[1:])
    assert not {"torch", "kernelgen_server.model.siren"} & set(sys.modules), "the server was imported"
    sys.exit(code)
    """
)


def kernelgen(*args: str, client_only: bool = False) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", CLIENT_ONLY, *args] if client_only else [
        sys.executable, "-m", "kernelgen_client.cli", *args
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def listed(help_text: str) -> list[str]:
    """The subcommands a ``--help`` lists (their lines are indented by four spaces exactly)."""
    return [line.split()[0] for line in help_text.splitlines() if line.startswith("    ") and line[4] != " "]


def test_help_lists_every_subcommand_with_the_server_extra() -> None:
    done = kernelgen("--help")
    assert done.returncode == 0, done.stderr
    assert listed(done.stdout) == ALL_COMMANDS
    assert "needs kernelgen[server]" not in done.stdout


def test_the_installed_entry_points_are_pyprojects() -> None:
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]
    for group in (cli.COMMAND_GROUP, "kernelgen.reference"):
        installed = {e.name: e.value for e in entry_points(group=group)}
        assert installed == declared[group]


def test_a_client_only_install_names_the_extra_for_server_commands() -> None:
    help_done = kernelgen("--help", client_only=True)
    assert help_done.returncode == 0, help_done.stderr
    assert listed(help_done.stdout) == ALL_COMMANDS
    assert " ".join(help_done.stdout.split()).count("(needs kernelgen[server])") == 4
    # Both installs describe each server command alike: the stand-in says what the command says.
    full, client_only = (" ".join(done.stdout.split()) for done in (kernelgen("--help"), help_done))
    for name, (extra, help_text) in cli.EXTRA_COMMANDS.items():
        assert f" {name} {help_text} " in full, name
        assert f" {name} {help_text} (needs kernelgen[{extra}])" in client_only, name
    done = kernelgen("serve", "--port", "0", client_only=True)
    assert done.returncode == 2
    expected = "kernelgen serve: this command needs the server extra: pip install 'kernelgen[server]'"
    assert expected in done.stderr


def test_a_client_only_install_refuses_a_correctness_check_before_any_request() -> None:
    done = kernelgen(
        "loadtest", "hyena-2d", "--seq-lens", "3,3", "--check-correctness", "--target", "127.0.0.1:1",
        client_only=True,
    )  # fmt: skip
    assert done.returncode == 2
    assert "pip install 'kernelgen[server]'" in done.stderr
    assert "reference model" in done.stderr


def test_client_commands_run_in_a_client_only_install() -> None:
    done = kernelgen("health", "--target", "127.0.0.1:1", "--timeout", "1", client_only=True)
    assert done.returncode == 3  # unreachable, said as such: the command itself ran
    assert "cannot reach a kernelgen server" in done.stderr


def test_a_contributor_that_fails_to_load_gets_stand_ins(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail() -> Any:
        raise ImportError("the server extra is not installed (missing: torch)")

    broken = EntryPoint(name="server", value="kernelgen_server.ops.cli:register", group=cli.COMMAND_GROUP)
    monkeypatch.setattr(EntryPoint, "load", lambda self: fail() if self is broken else None)
    monkeypatch.setattr(cli, "entry_points", lambda group: [broken])
    parser = cli.build_parser()
    args = parser.parse_args(["serve"])
    assert args.handler(argparse.Namespace(command="serve")) == 2


def test_a_contributor_adds_its_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    def register(sub: Any) -> None:
        sub.add_parser("hello").set_defaults(handler=lambda args: 7)

    class Contributor:
        name = "extra"

        def load(self) -> Any:
            return register

    monkeypatch.setattr(cli, "entry_points", lambda group: [Contributor()])
    assert cli.main(["hello"]) == 7
    # Its commands stand beside the client's; the extras' commands it lacks get stand-ins.
    assert set(cli.build_parser()._subparsers._group_actions[0].choices) >= {"hello", "generate", "serve"}  # type: ignore[union-attr]
