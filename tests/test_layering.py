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

Inside the server, each sub-package is a layer and may import only the layers
below it (``SERVER_LAYERS``); the root holds the foundations every layer may
use (``errors``, ``settings``). The layers below the transports never import
gRPC, an HTTP server, or anything that serves: the serving core counts into
metrics, the transports and the server expose them.
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


#: The server's layers, bottom up: what each sub-package (or root module) may import of the server.
SERVER_LAYERS: dict[str, set[str]] = {
    "errors": set(),
    "settings": set(),
    "model": {"errors"},
    "repository": {"errors", "model"},
    "engine": {"errors", "model"},
    "core": {"errors", "settings", "model", "repository", "engine"},
    "transport": {"errors", "settings", "model", "repository", "core"},
    "ops": {"errors", "settings", "model", "repository", "engine", "core", "transport"},
    "__init__": {"model", "repository"},  # the public names: the model, export
}
#: Third-party modules only the transports (and operations) may import: what serves or speaks gRPC.
TRANSPORT_ONLY = ("grpc", "grpc_health", "grpc_reflection", "http.server", "wsgiref", "socketserver")
#: Layers that may use ``TRANSPORT_ONLY`` modules (``errors`` names gRPC's status codes).
SERVING_LAYERS = {"transport", "ops", "errors"}
#: Test oracles: never imported by src/.
TEST_ONLY = ("nvsubquadratic",)


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


def _layer(root: Path, file: Path) -> str:
    """The server layer a file of ``kernelgen_server`` belongs to: its sub-package, or a root module."""
    parts = file.relative_to(root / "kernelgen_server").parts
    return parts[0] if len(parts) > 1 else parts[0].removesuffix(".py")


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def server_violations(root: Path) -> list[str]:
    """Imports inside ``kernelgen_server`` that break ``SERVER_LAYERS`` or ``TRANSPORT_ONLY``."""
    found = []
    for item in imports(root, "kernelgen_server"):
        where = f"{item.file.relative_to(root)}:{item.line}"
        layer = _layer(root, item.file)
        if layer not in SERVER_LAYERS:
            found.append(f"{where}: {layer} is no layer of the server (add it to SERVER_LAYERS)")
            continue
        top, *rest = item.module.split(".")
        if top == "kernelgen_server":
            names = [item.module.split(".")[1]] if rest else list(item.names)
            for name in names:
                if name != layer and name in SERVER_LAYERS and name not in SERVER_LAYERS[layer]:
                    found.append(f"{where}: the {layer} layer imports {item.module} ({name})")
        elif _within(item.module, TRANSPORT_ONLY) and layer not in SERVING_LAYERS:
            found.append(f"{where}: the {layer} layer imports {item.module}, which only a transport may")
    return found


def test_every_package_is_checked() -> None:
    assert {p.name for p in SRC.iterdir() if (p / "__init__.py").is_file()} == set(ALLOWED)


def test_the_layers_hold() -> None:
    assert violations(SRC) == []


def test_the_server_layers_hold() -> None:
    assert server_violations(SRC) == []


def test_every_server_sub_package_is_a_layer_with_its_rules_documented() -> None:
    server = SRC / "kernelgen_server"
    found = {p.name for p in server.iterdir() if (p / "__init__.py").is_file()}
    found |= {p.stem for p in server.glob("*.py")}
    assert found == set(SERVER_LAYERS)
    for name in found - {"__init__", "errors", "settings"}:
        doc = ast.get_docstring(ast.parse((server / name / "__init__.py").read_text()))
        assert doc and "import" in doc.lower(), (
            f"kernelgen_server.{name} needs a docstring naming its job and imports"
        )


def test_src_never_imports_a_test_oracle() -> None:
    for package in ALLOWED:
        for item in imports(SRC, package):
            assert not _within(item.module, TEST_ONLY), f"{item.file}:{item.line} imports {item.module}"


def _server_tree(tmp_path: Path, file: str, source: str) -> Path:
    for name in ALLOWED:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("")
    for layer in SERVER_LAYERS:
        if layer not in ("__init__", "errors", "settings"):
            (tmp_path / "kernelgen_server" / layer).mkdir()
            (tmp_path / "kernelgen_server" / layer / "__init__.py").write_text("")
    (tmp_path / "kernelgen_server" / file).write_text(textwrap.dedent(source) + "\n")
    return tmp_path


@pytest.mark.parametrize(
    ("file", "source", "message"),
    [
        # The core never imports an endpoint, a servicer or the server.
        (
            "core/metrics.py",
            "from kernelgen_server.transport.metrics_http import serve_metrics",
            "core layer",
        ),
        ("core/service.py", "from kernelgen_server.transport import native_servicer", "core layer"),
        ("core/service.py", "import kernelgen_server.transport.server", "core layer"),
        ("core/cache.py", "from kernelgen_server.ops.supervisor import Supervisor", "core layer"),
        (
            "engine/kernel_engine.py",
            "from kernelgen_server.core.service import KernelService",
            "engine layer",
        ),
        ("model/siren.py", "from kernelgen_server.repository.store import ModelRepository", "model layer"),
        (
            "repository/store.py",
            "from kernelgen_server.engine.kernel_engine import KernelEngine",
            "repository",
        ),
        ("transport/server.py", "from kernelgen_server.ops import supervisor", "transport layer"),
        ("errors.py", "from kernelgen_server.model import SIRENKernelND", "errors layer"),
        # Below the transports, nothing serves or speaks gRPC.
        ("core/batcher.py", "import grpc", "only a transport may"),
        ("core/metrics.py", "from wsgiref.simple_server import make_server", "only a transport may"),
        ("engine/memory.py", "from grpc import aio", "only a transport may"),
        ("tools.py", "import os", "no layer of the server"),
    ],
)
def test_a_broken_server_layer_is_reported(tmp_path: Path, file: str, source: str, message: str) -> None:
    root = _server_tree(tmp_path, file, source)
    found = server_violations(root)
    assert len(found) == 1, found
    assert message in found[0]
    assert found[0].startswith(f"kernelgen_server/{file}:1:")


def test_a_layer_may_import_the_layers_below_it(tmp_path: Path) -> None:
    root = _server_tree(
        tmp_path,
        "transport/server.py",
        """
        import grpc
        from kernelgen_server.core.service import KernelService
        from kernelgen_server.errors import InvalidRequest
        from kernelgen_server.model import SIRENKernelND
        """,
    )
    assert server_violations(root) == []


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
