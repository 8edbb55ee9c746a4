"""Generate the Python protobuf and gRPC modules of proto/ into the contract package.

python scripts/gen_proto.py          # regenerate
python scripts/gen_proto.py --check  # fail when the committed modules are stale

``proto/kernelgen/v1/*.proto`` becomes ``src/kernelgen_wire/v1/*_pb2*.py``.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "proto"
PACKAGE_DIR = Path("kernelgen") / "v1"
OUT = ROOT / "src" / "kernelgen_wire" / "v1"
INIT_TEXT = '"""Messages and stubs of ``kernelgen.v1``, generated from proto/ by scripts/gen_proto.py."""\n'


def generate(out: Path) -> None:
    """Write the generated modules of ``proto/kernelgen/v1`` (and their ``__init__``) into ``out``."""
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))
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
        for path in sorted((Path(tmp) / PACKAGE_DIR).glob("*.py*")):
            text = path.read_text().replace("from kernelgen.v1 import ", "from . import ")
            (out / path.name).write_text(text)
    (out / "__init__.py").write_text(INIT_TEXT)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--check", action="store_true", help="compare with the committed modules instead of writing"
    )
    args = parser.parse_args()
    if not args.check:
        for stale in OUT.glob("*_pb2*.py*"):
            stale.unlink()
        generate(OUT)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "v1"
        generate(fresh)
        names = {p.name for p in fresh.iterdir()} | {p.name for p in OUT.glob("*.py*")}
        stale = sorted(
            name
            for name in names
            if not (fresh / name).exists()
            or not (OUT / name).exists()
            or not filecmp.cmp(fresh / name, OUT / name, shallow=False)
        )
        shutil.rmtree(fresh)
    if stale:
        print("generated protobuf modules are stale; run python scripts/gen_proto.py:", *stale, sep="\n  ")
        return 1
    print("generated protobuf modules are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
