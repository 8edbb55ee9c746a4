"""The package boundaries hold: read every import of src/ with ast and check it against the layers.

    kernelgen_wire       the wire contract: imports no other kernelgen package
    kernelgen_client     the light client: imports the contract only
    kernelgen_loadtest   imports the contract and the client's public modules
    kernelgen_server     imports the contract only; never the client or the load tester

No package imports another's private modules or names (a path or name part
starting with "_"), nor a third-party package's private modules. The server's
contributions to the ``kernelgen`` command and the load tester reach them
through entry points, not imports; the generated protobuf modules are left out.

The Open Inference Protocol's modules (``kernelgen_wire.oip``) are the server's,
and the load tester's inside a function (``--protocol oip`` imports them when
used): the client never imports them, so a process that uses Triton's client
and kernelgen's never loads them by accident.
"""

from __future__ import annotations

import ast
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
GENERATED = (SRC / "kernelgen_wire" / "v1", SRC / "kernelgen_wire" / "oip")
OIP = "kernelgen_wire.oip"

#: What each package may import of the others.
ALLOWED: dict[str, set[str]] = {
    "kernelgen_wire": set(),
    "kernelgen_client": {"kernelgen_wire"},
    "kernelgen_loadtest": {"kernelgen_wire", "kernelgen_client"},
    "kernelgen_server": {"kernelgen_wire"},
}


@dataclass(frozen=True)
class Import:
    file: Path
    line: int
    module: str  # the absolute module imported from
    names: tuple[str, ...]  # the names taken from it (empty for ``import module``)
    top_level: bool = True  # outside any function


def imports(root: Path, package: str) -> Iterator[Import]:
    for path in sorted((root / package).rglob("*.py")):
        if any(folder in path.parents for folder in GENERATED):
            continue
        tree = ast.parse(path.read_text(), str(path))
        nested = {
            id(inner)
            for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            for inner in ast.walk(node)
        }
        for node in ast.walk(tree):
            top = id(node) not in nested
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield Import(path, node.lineno, alias.name, (), top)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                yield Import(path, node.lineno, node.module, tuple(a.name for a in node.names), top)


def _private(parts: list[str]) -> bool:
    return any(part.startswith("_") and not part.startswith("__") for part in parts)


def violations(root: Path) -> list[str]:
    found = []
    for package, allowed in ALLOWED.items():
        for item in imports(root, package):
            where = f"{item.file.relative_to(root)}:{item.line}"
            top, *rest = item.module.split(".")
            oip = item.module == OIP or item.module.startswith(OIP + ".")
            oip |= item.module == "kernelgen_wire" and "oip" in item.names
            if oip and not (
                package == "kernelgen_server" or (package == "kernelgen_loadtest" and not item.top_level)
            ):
                found.append(
                    f"{where}: {package} imports the Open Inference Protocol's modules ({item.module})"
                )
                continue
            if top == package:
                continue  # a package may use its own private parts
            if top in ALLOWED:
                if top not in allowed:
                    found.append(f"{where}: {package} imports {item.module}")
                elif _private(rest) or _private(list(item.names)):
                    found.append(f"{where}: {package} imports a private part of {item.module}")
            elif top != "__future__" and _private(rest):
                found.append(f"{where}: {package} imports the private module {item.module}")
    return found


def test_every_package_is_checked() -> None:
    assert {p.name for p in SRC.iterdir() if (p / "__init__.py").is_file()} == set(ALLOWED)


def test_the_layers_hold() -> None:
    assert violations(SRC) == []


@pytest.mark.parametrize(
    ("package", "source", "message"),
    [
        ("kernelgen_server", "from kernelgen_client import KernelClient", "imports kernelgen_client"),
        ("kernelgen_client", "import kernelgen_server.model.siren", "imports kernelgen_server.model.siren"),
        ("kernelgen_wire", "from kernelgen_client.errors import InvalidRequest", "imports kernelgen_client"),
        ("kernelgen_loadtest", "from kernelgen_client._base import METHODS", "private part"),
        ("kernelgen_loadtest", "from kernelgen_client.commands import _run", "private part"),
        ("kernelgen_server", "from grpc_health.v1._async import HealthServicer", "private module"),
        ("kernelgen_client", "from kernelgen_wire.oip import grpc_service_pb2", "Open Inference Protocol"),
        ("kernelgen_client", "from kernelgen_wire import oip", "Open Inference Protocol"),
        ("kernelgen_loadtest", "from kernelgen_wire.oip import grpc_service_pb2", "Open Inference Protocol"),
    ],
)
def test_a_broken_layer_is_reported(tmp_path: Path, package: str, source: str, message: str) -> None:
    for name in ALLOWED:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("")
    (tmp_path / package / "leak.py").write_text(textwrap.dedent(source) + "\n")
    found = violations(tmp_path)
    assert len(found) == 1
    assert message in found[0]
    assert found[0].startswith(f"{package}/leak.py:1:")


def test_the_load_tester_may_import_the_protocol_lazily(tmp_path: Path) -> None:
    for name in ALLOWED:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("")
    source = "def run():\n    from kernelgen_wire.oip import grpc_service_pb2\n"
    (tmp_path / "kernelgen_loadtest" / "lazy.py").write_text(source)
    (tmp_path / "kernelgen_server" / "eager.py").write_text(
        "from kernelgen_wire.oip import grpc_service_pb2\n"
    )
    assert violations(tmp_path) == []
