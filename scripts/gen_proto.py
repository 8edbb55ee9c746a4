"""Generate the Python protobuf and gRPC modules from proto/ into the client package.

python scripts/gen_proto.py          # regenerate
python scripts/gen_proto.py --check  # fail when the committed modules are stale
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "proto"
OUT = ROOT / "client" / "kernelgen_client" / "_proto"
PACKAGE_DIR = Path("kernelgen") / "v1"


def generate(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))
    include = str(Path(protoc.__file__).parent / "_proto")
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            *protos,
        ]
    )
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")
    # protoc writes absolute imports rooted at proto/; the modules live inside
    # kernelgen_client, so make the cross-module imports relative.
    for path in (out / PACKAGE_DIR).glob("*.py"):
        text = path.read_text()
        fixed = text.replace("from kernelgen.v1 import ", "from . import ")
        path.write_text(fixed)
    for folder in (out, out / "kernelgen", out / PACKAGE_DIR):
        (folder / "__init__.py").write_text(
            '"""Generated from proto/ by scripts/gen_proto.py; do not edit."""\n'
        )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--check", action="store_true", help="compare with the committed modules instead of writing"
    )
    args = parser.parse_args()
    if not args.check:
        generate(OUT)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        stale = [
            str(p.relative_to(fresh))
            for p in sorted(fresh.rglob("*.py*"))
            if not (OUT / p.relative_to(fresh)).exists()
            or not filecmp.cmp(p, OUT / p.relative_to(fresh), shallow=False)
        ]
    if stale:
        print("generated protobuf modules are stale; run python scripts/gen_proto.py:", *stale, sep="\n  ")
        return 1
    print("generated protobuf modules are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
