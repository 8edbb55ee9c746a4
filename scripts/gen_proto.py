"""Generate the Python protobuf and gRPC modules of proto/ into the contract package.

python scripts/gen_proto.py          # regenerate
python scripts/gen_proto.py --check  # fail when the committed modules are stale

``proto/kernelgen/v1/*.proto`` becomes ``src/kernelgen_wire/v1/*_pb2*.py``, and
``proto/inference/*.proto`` (the Open Inference Protocol) becomes
``src/kernelgen_wire/oip/*_pb2*.py``.

The Open Inference Protocol's modules build their messages in a descriptor
pool of their own (``kernelgen_wire.oip.pool``), not protobuf's default pool:
Triton's client registers the same ``inference.*`` names in the default pool,
and two registrations of one name in one pool fail, so this keeps both usable
in one process.

The pinned grpcio-tools (pyproject.toml) writes code for protobuf 6.31.1, which
runs on every protobuf runtime from then up, so one set of modules serves the
whole supported range.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "proto"
WIRE = ROOT / "src" / "kernelgen_wire"


@dataclass(frozen=True)
class Package:
    """One proto package and the folder of the contract package its modules go to."""

    proto_dir: Path  # relative to proto/
    out: Path
    init_text: str
    own_pool: bool = False


POOL_TEXT = '''"""The Open Inference Protocol's descriptor pool (written by scripts/gen_proto.py).

Not protobuf's default pool: Triton's client registers the same ``inference.*``
names there, and one pool refuses a second registration of a name.
"""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
'''

PACKAGES = (
    Package(
        Path("kernelgen") / "v1",
        WIRE / "v1",
        '"""Messages and stubs of ``kernelgen.v1``, generated from proto/ by scripts/gen_proto.py."""\n',
    ),
    Package(
        Path("inference"),
        WIRE / "oip",
        '"""Messages and stubs of the Open Inference Protocol (``inference``), generated from proto/ by\n'
        "scripts/gen_proto.py; built in a descriptor pool of their own (``pool``).\n\n"
        "Only the server and ``kernelgen loadtest --protocol oip`` import them; the client never does.\n"
        '"""\n',
        own_pool=True,
    ),
)

_DEFAULT_POOL = "_descriptor_pool.Default().AddSerializedFile("
_POOL_IMPORT = "from google.protobuf import descriptor_pool as _descriptor_pool\n"


def _own_pool(text: str, name: str) -> str:
    """Make a generated message module build its descriptors in ``pool.POOL``."""
    if text.count(_DEFAULT_POOL) != 1 or text.count(_POOL_IMPORT) != 1:
        raise SystemExit(f"{name}: unexpected generated code; cannot move it to its own descriptor pool")
    text = text.replace(_POOL_IMPORT, _POOL_IMPORT + "from .pool import POOL as _POOL\n")
    return text.replace(_DEFAULT_POOL, "_POOL.AddSerializedFile(")


def generate(package: Package, out: Path) -> None:
    """Write the generated modules of one proto package (and their ``__init__``) into ``out``."""
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / package.proto_dir).glob("*.proto"))
    include = str(Path(protoc.__file__).parent / "_proto")
    with tempfile.TemporaryDirectory() as tmp:
        rc = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{PROTO_ROOT}",
                f"-I{include}",
                f"--python_out={tmp}",
                f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}",
                *protos,
            ]
        )
        if rc != 0:
            raise SystemExit(f"protoc failed with exit code {rc}")
        out.mkdir(parents=True, exist_ok=True)
        # protoc writes imports rooted at proto/ ("from kernelgen.v1 import ..."); the
        # modules live in one folder of the contract package, so make them relative.
        prefix = "from " + ".".join(package.proto_dir.parts) + " import "
        for path in sorted((Path(tmp) / package.proto_dir).glob("*.py*")):
            text = path.read_text().replace(prefix, "from . import ")
            if package.own_pool and path.name.endswith("_pb2.py"):
                text = _own_pool(text, path.name)
            (out / path.name).write_text(text)
    (out / "__init__.py").write_text(package.init_text)
    if package.own_pool:
        (out / "pool.py").write_text(POOL_TEXT)


def _written(folder: Path) -> set[str]:
    return {p.name for p in folder.glob("*.py*")}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--check", action="store_true", help="compare with the committed modules instead of writing"
    )
    args = parser.parse_args()
    if not args.check:
        for package in PACKAGES:
            for stale in package.out.glob("*_pb2*.py*"):
                stale.unlink()
            generate(package, package.out)
        return 0
    stale: list[str] = []
    for package in PACKAGES:
        with tempfile.TemporaryDirectory() as tmp:
            fresh = Path(tmp) / package.out.name
            generate(package, fresh)
            names = _written(fresh) | _written(package.out)
            stale += sorted(
                str((package.out / name).relative_to(ROOT))
                for name in names
                if not (fresh / name).exists()
                or not (package.out / name).exists()
                or not filecmp.cmp(fresh / name, package.out / name, shallow=False)
            )
            shutil.rmtree(fresh)
    if stale:
        print("generated protobuf modules are stale; run python scripts/gen_proto.py:", *stale, sep="\n  ")
        return 1
    print("generated protobuf modules are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
