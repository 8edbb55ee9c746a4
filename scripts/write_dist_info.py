"""Write kernelgen's package metadata (version and entry points) into a folder on sys.path.

    python scripts/write_dist_info.py SITE

For running kernelgen from its source tree without installing it (``src/`` on
PYTHONPATH), as the GPU check does on a machine without network: the
``kernelgen`` command and the load tester find the server's subcommands and its
reference model through entry points (``kernelgen.commands``,
``kernelgen.reference``), which only package metadata provides. The entry
points are read from pyproject.toml, so they are always the installed ones.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write(site: Path) -> Path:
    """Write ``kernelgen-<version>.dist-info`` into ``site``; returns its path."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    name, version = project["name"], project["version"]
    groups = {"console_scripts": project.get("scripts", {}), **project.get("entry-points", {})}
    folder = site / f"{name}-{version}.dist-info"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = []
    for group, entries in groups.items():
        lines.append(f"[{group}]")
        lines += [f"{key} = {value}" for key, value in entries.items()]
        lines.append("")
    (folder / "entry_points.txt").write_text("\n".join(lines))
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("site", type=Path, help="a folder that will be on sys.path (PYTHONPATH)")
    print(write(parser.parse_args().site))
    return 0


if __name__ == "__main__":
    sys.exit(main())
