"""Which Python packages the GPU check needs beyond the GPU machine's own, and whether it has them.

    python scripts/device_requirements.py plan               # here: do the carried wheels suffice?
    python scripts/device_requirements.py check --site DIR   # there: is every requirement met?

The requirements start from pyproject.toml: the base dependencies, the ``server`` extra and
the test plugins the check's pytest runs need (pytest-asyncio). ``plan`` follows them through
this environment's installed metadata (the versions scripts/device_wheels.sh pins) and says
which are neither in device_wheels.sh's PACKAGES nor met by scripts/device_image.txt; ``check``
follows them through whatever the running interpreter imports (on the GPU machine: the wheels
installed into ``--site`` ahead of the image's packages) and prints each with the version found.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import re
import sys
import tomllib
from collections.abc import Callable, Iterable
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
WHEELS_SCRIPT = ROOT / "scripts" / "device_wheels.sh"
IMAGE = ROOT / "scripts" / "device_image.txt"
#: dev requirements that the check's test runs need besides pytest itself.
TEST_PLUGINS = ("pytest-asyncio",)
#: The tests' oracle, installed without its dependencies (its metadata names training packages).
ORACLE = ROOT / "tests" / "oracle-requirements.txt"
#: the marker environment of the GPU machine's python3.
DEVICE_ENV = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "implementation_name": "cpython",
    "extra": "",
}


def roots(pyproject: Path = ROOT / "pyproject.toml") -> list[Requirement]:
    project = tomllib.loads(pyproject.read_text())["project"]
    extras = project["optional-dependencies"]
    found = [Requirement(r) for r in [*project["dependencies"], *extras["server"]]]
    found += [r for r in map(Requirement, extras["dev"]) if canonicalize_name(r.name) in TEST_PLUGINS]
    return found + oracle()


def oracle(path: Path = ORACLE) -> list[Requirement]:
    """The pinned oracle packages (``tests/oracle-requirements.txt``)."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [Requirement(line) for line in lines if line]


def carried(script: Path = WHEELS_SCRIPT) -> list[str]:
    """The names in device_wheels.sh's ``PACKAGES=( ... )`` array."""
    match = re.search(r"^PACKAGES=\((.*?)^\)", script.read_text(), flags=re.M | re.S)
    if not match:
        raise ValueError(f"{script} has no PACKAGES=( ... ) array")
    lines = (line.split("#", 1)[0] for line in match.group(1).splitlines())
    return [canonicalize_name(word) for line in lines for word in line.split()]


def image(path: Path = IMAGE) -> dict[str, str | None]:
    """Package -> version read there ("2.11.0"), assumed minimum (">=8.4") or None (not read)."""
    found: dict[str, str | None] = {}
    for line in path.read_text().splitlines():
        words = line.split("#", 1)[0].split()
        if words:
            found[canonicalize_name(words[0])] = words[1] if len(words) > 1 else None
    return found


def requires(name: str, env: dict[str, str] | None = None) -> list[Requirement]:
    """The requirements of an installed distribution that apply in ``env`` without extras (none for
    the oracle's packages, installed without their dependencies)."""
    if canonicalize_name(name) in {canonicalize_name(r.name) for r in oracle()}:
        return []
    reqs = [Requirement(r) for r in metadata.requires(name) or ()]
    return [r for r in reqs if r.marker is None or r.marker.evaluate({"extra": "", **(env or {})})]


def image_meets(req: Requirement, have: str | None) -> bool:
    if have is None:
        return not req.specifier
    version = have.removeprefix(">=")
    return req.specifier.contains(Version(version), prereleases=True)


def plan(
    start: Iterable[Requirement],
    wheels: Iterable[str],
    have: dict[str, str | None],
    requires_of: Callable[[str], list[Requirement]],
) -> tuple[list[str], list[str]]:
    """(requirements neither carried nor met by the image, carried names nothing requires).

    Carried packages' own requirements are followed; the image's packages are its own business.
    """
    wheels = set(wheels)
    missing: list[str] = []
    reached: set[str] = set()
    todo = list(start)
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in wheels:
            if name not in reached:
                reached.add(name)
                todo += requires_of(name)
        elif name not in have or not image_meets(req, have[name]):
            missing.append(str(req))
    return sorted(set(missing)), sorted(wheels - reached)


def check(site: Path | None) -> int:
    """Print each requirement with what the running interpreter has; 1 if any is unmet."""
    unmet = 0
    seen: set[tuple[str, str]] = set()
    todo = roots()
    while todo:
        req = todo.pop(0)
        name = canonicalize_name(req.name)
        if (name, str(req.specifier)) in seen:
            continue
        seen.add((name, str(req.specifier)))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            print(f"MISSING   {req}")
            unmet += 1
            continue
        where = Path(str(dist.locate_file(""))).resolve()
        ok = req.specifier.contains(dist.version, prereleases=True)
        unmet += not ok
        print(f"{'ok' if ok else 'TOO OLD':9} {req}: {dist.version} ({where})")
        if site is not None and where == site.resolve():
            todo += requires(name)
    print(f"{unmet} unmet requirement(s)" if unmet else "all requirements met")
    return 1 if unmet else 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("plan", help="check device_wheels.sh's list against the image's packages")
    check_parser = sub.add_parser("check", help="check what the running interpreter imports")
    check_parser.add_argument("--site", type=Path, help="where the wheels were installed (followed)")
    args = parser.parse_args()
    if args.command == "check":
        return check(args.site)
    missing, unused = plan(roots(), carried(), image(), lambda name: requires(name, DEVICE_ENV))
    for req in missing:
        print(f"not carried and not met by the GPU image: {req}", file=sys.stderr)
    for name in unused:
        print(f"carried but required by nothing: {name}", file=sys.stderr)
    return 1 if missing or unused else 0


if __name__ == "__main__":
    sys.exit(main())
