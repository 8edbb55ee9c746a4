"""Build kernelgen's container images with podman (or docker), on machines that cannot pull.

    python3 scripts/container_image.py build            # docker/Dockerfile.cpu -> kernelgen:0.1.0-cpu
    python3 scripts/container_image.py build --dockerfile docker/Dockerfile --tag kernelgen:gpu-standin \\
        --build-arg TORCH_CUDA=cpu                      # the GPU Dockerfile on a stand-in base
    python3 scripts/container_image.py engine           # only make a container engine usable

Each command prints one JSON object on stdout (progress goes to stderr). What it does, in order:

1. Engine: docker when its daemon answers, else podman. Where podman is missing
   and this is a root shell with apt-get, it installs podman, runc and
   catatonit (the pause process of pods).
2. Base image: the Dockerfile's default (``python:3.12-slim-bookworm``) when it
   is here; else ``localhost/kernelgen-python:bookworm`` when an earlier run made
   it; else the default, pulled; else that local one, made now: a minimal Debian
   bookworm root filesystem with python3 (3.11) and venv support, made by
   mmdebstrap from this machine's apt sources and imported. ``--base IMAGE``
   picks one explicitly.
3. The engine's first container: where podman cannot start one because the
   host's hard limits are lower than its default ulimits or because crun
   refuses the host's cgroup layout, a drop-in
   (/etc/containers/containers.conf.d/50-kernelgen.conf) sets the ulimits to
   the host's hard limits and the runtime to runc, and it tries again.
4. torch: the Dockerfile's default index (download.pytorch.org) with a public
   base; with the local base, the CPU wheel for that base's Python is fetched
   by this machine's pip (its own indexes and find-links) into a PEP 503 index
   under ~/.cache/kernelgen/container/, mounted into the build at /mnt/wheels.
   ``--torch-index-url`` picks one explicitly.
5. The build, unless an image of that tag carries the same input key (label
   ``io.kernelgen.build-key``: a hash of the Dockerfile, the files the build
   context sends after .dockerignore, the build arguments, the base image's id
   and the torch wheels): warm runs cost a hash and an inspect.

Exit codes: 0 done; 1 failed; 3 no container engine can run here (the reason on stderr).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import html
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kernelgen" / "container"
DEFAULT_DOCKERFILE = "docker/Dockerfile.cpu"
DEFAULT_TAG = "localhost/kernelgen:0.1.0-cpu"
KEY_LABEL = "io.kernelgen.build-key"
LOCAL_BASE = "localhost/kernelgen-python:bookworm"
WHEELS_MOUNT = "/mnt/wheels"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
DROP_IN = Path("/etc/containers/containers.conf.d/50-kernelgen.conf")
# The local base: Debian's minimal variant, Python with venv support (and `python`, as the
# python images have), CA certificates; no documentation, manual pages or translations.
BASE_SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "python-is-python3", "ca-certificates")
BASE_OPTIONS = (
    "--variant=minbase",
    "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
    "--dpkgopt=path-exclude=/usr/share/man/*",
    "--dpkgopt=path-exclude=/usr/share/doc/*",
    "--dpkgopt=path-include=/usr/share/doc/*/copyright",
    "--dpkgopt=path-exclude=/usr/share/locale/*",
    "--dpkgopt=path-exclude=/usr/share/info/*",
    "--aptopt=APT::Install-Recommends false",
    # As Debian's own images: no package caches left behind by `apt-get update` in a layer.
    '--aptopt=Dir::Cache::pkgcache ""',
    '--aptopt=Dir::Cache::srcpkgcache ""',
)
BASE_CHANGES = ("ENV LANG=C.UTF-8", 'CMD ["python3"]')
ENGINE_PACKAGES = ("podman", "runc", "catatonit")
# Extras some commands need, by what they are for: the executable or file that shows each is
# there, and the Debian package that brings it.
TOOLS = {
    # `podman kube play` starts each pod's infra container from a pause image that it builds
    # locally around catatonit.
    "kube": [("catatonit", "catatonit")],
    # podman-compose, and name resolution between the containers of a compose network (CNI).
    "compose": [
        ("podman-compose", "podman-compose"),
        ("/usr/lib/cni/dnsname", "golang-github-containernetworking-plugin-dnsname"),
    ],
}


class NoEngine(Exception):
    """No container engine can run here; the message says why."""


def log(message: str) -> None:
    print(f"container_image: {message}", file=sys.stderr, flush=True)


def run(
    argv: Sequence[str], *, check: bool = True, capture: bool = True, timeout: float | None = None, **kw: Any
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        list(argv),
        text=True,
        stdout=subprocess.PIPE if capture else sys.stderr,
        stderr=subprocess.PIPE if capture else None,
        timeout=timeout,
        check=False,
        **kw,
    )
    if check and result.returncode != 0:
        detail = (result.stderr or "").strip() if capture else ""
        raise RuntimeError(f"{' '.join(argv)} exited with {result.returncode}: {detail}")
    return result


# --------------------------------------------------------------------------- the engine


def apt_install(packages: Sequence[str]) -> None:
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise NoEngine(
            f"{', '.join(packages)} missing, and this is not a root shell with apt-get to install them"
        )
    log(f"installing {' '.join(packages)} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update", "-q"], env=env, timeout=600)
    run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages], env=env, timeout=900)


def docker_works() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return run(["docker", "info"], check=False, timeout=20).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def choose_engine(requested: str) -> str:
    """docker with a daemon that answers, else podman (installed here where missing)."""
    if requested == "docker" or (requested == "auto" and docker_works()):
        if not docker_works():
            raise NoEngine("docker was asked for, but `docker info` fails: no daemon to talk to")
        return "docker"
    if shutil.which("podman") is None:
        apt_install(ENGINE_PACKAGES)
    return "podman"


def ensure_tools(engine: str, wanted: Sequence[str]) -> None:
    if engine != "podman":
        return
    missing = []
    for tool in wanted:
        for thing, package in TOOLS[tool]:
            if not (Path(thing).exists() if thing.startswith("/") else shutil.which(thing)):
                missing.append(package)
    if missing:
        apt_install(missing)


@contextmanager
def locked() -> Iterator[None]:
    """One process at a time installs, configures, makes the base or fetches wheels."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def drop_in_text() -> str:
    lines = [
        "# Written by kernelgen's scripts/container_image.py: podman's defaults could not start a",
        "# container here. Container ulimits may not exceed the host's hard limits (nproc: nor",
        "# pid_max), and crun refuses a host that mixes cgroup v1 and v2 where runc does not.",
        "[containers]",
    ]
    ulimits = []
    # A kernel may refuse an nproc limit above pid_max even under a higher hard limit.
    for name, limit, cap in (
        ("nofile", resource.RLIMIT_NOFILE, Path("/proc/sys/fs/nr_open")),
        ("nproc", resource.RLIMIT_NPROC, Path("/proc/sys/kernel/pid_max")),
    ):
        values = [resource.getrlimit(limit)[1]]
        if cap.exists():
            values.append(int(cap.read_text()))
        hard = (
            min(v for v in values if v != resource.RLIM_INFINITY)
            if any(v != resource.RLIM_INFINITY for v in values)
            else None
        )
        if hard is not None:
            ulimits.append(f'"{name}={hard}:{hard}"')
    lines.append(f"default_ulimits = [{', '.join(ulimits)}]")
    lines += ["", "[engine]", 'runtime = "runc"', ""]
    return "\n".join(lines)


def ensure_runs(engine: str, image: str) -> None:
    """Start one container of ``image``; on podman, configure it once if its defaults cannot."""
    probe = [engine, "run", "--rm", "--network", "none", image, "true"]
    first = run(probe, check=False, timeout=120)
    if first.returncode == 0:
        return
    if engine != "podman" or os.geteuid() != 0:
        raise NoEngine(f"{engine} cannot start a container: {first.stderr.strip()}")
    wanted = drop_in_text()
    if DROP_IN.exists() and DROP_IN.read_text() == wanted:
        raise NoEngine(f"podman cannot start a container, even with {DROP_IN}: {first.stderr.strip()}")
    log(f"podman could not start a container ({first.stderr.strip()}); writing {DROP_IN}")
    if shutil.which("runc") is None:
        apt_install(["runc"])
    DROP_IN.parent.mkdir(parents=True, exist_ok=True)
    DROP_IN.write_text(wanted)
    second = run(probe, check=False, timeout=120)
    if second.returncode != 0:
        raise NoEngine(f"podman cannot start a container, even with {DROP_IN}: {second.stderr.strip()}")


# --------------------------------------------------------------------------- images


def inspect(engine: str, image: str) -> dict[str, Any] | None:
    result = run([engine, "image", "inspect", image], check=False)
    if result.returncode != 0:
        return None
    found = json.loads(result.stdout or "[]")
    return found[0] if found else None


def labels(info: dict[str, Any]) -> dict[str, str]:
    return dict(info.get("Labels") or info.get("Config", {}).get("Labels") or {})


def host_sources() -> str:
    """This machine's apt sources when they are Debian bookworm's, else Debian's own mirror."""
    for path in (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")):
        if path.is_file() and re.search(rf"\b{BASE_SUITE}\b", path.read_text()):
            return str(path)
    return "http://deb.debian.org/debian"


def base_recipe(sources: str) -> str:
    text = Path(sources).read_text() if Path(sources).is_file() else sources
    recipe = [BASE_SUITE, *BASE_PACKAGES, *BASE_OPTIONS, *BASE_CHANGES, text]
    return hashlib.sha256("\n".join(recipe).encode()).hexdigest()[:16]


def local_base_ready(engine: str) -> bool:
    """Whether localhost/kernelgen-python:bookworm exists, made from the current recipe."""
    info = inspect(engine, LOCAL_BASE)
    return bool(info and labels(info).get("io.kernelgen.base-recipe") == base_recipe(host_sources()))


def ensure_local_base(engine: str) -> str:
    """localhost/kernelgen-python:bookworm, made here with mmdebstrap unless already made from this recipe."""
    if local_base_ready(engine):
        return LOCAL_BASE
    sources = host_sources()
    recipe = base_recipe(sources)
    if shutil.which("mmdebstrap") is None:
        apt_install(["mmdebstrap"])
    if engine != "podman":
        raise RuntimeError("the local base image is imported with podman; pass --base with docker")
    log(f"making {LOCAL_BASE} with mmdebstrap ({BASE_SUITE}: {' '.join(BASE_PACKAGES)}) from {sources}")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kernelgen-base-") as tmp:
        tarball = Path(tmp) / "rootfs.tar"
        run(
            [
                "mmdebstrap",
                *BASE_OPTIONS,
                f"--include={','.join(BASE_PACKAGES)}",
                BASE_SUITE,
                str(tarball),
                sources,
            ],
            timeout=900,
        )
        changes = [
            arg
            for change in (*BASE_CHANGES, f"LABEL io.kernelgen.base-recipe={recipe}")
            for arg in ("--change", change)
        ]
        run([engine, "import", *changes, str(tarball), LOCAL_BASE], timeout=300)
    log(f"made {LOCAL_BASE} in {time.monotonic() - started:.0f} s")
    return LOCAL_BASE


def pullable(engine: str, image: str) -> bool:
    if inspect(engine, image) is not None:
        return True
    log(f"pulling {image}")
    try:
        result = run([engine, "pull", image], check=False, timeout=600)
    except subprocess.TimeoutExpired:
        return False
    if result.returncode != 0:
        log(
            f"cannot pull {image}: {result.stderr.strip().splitlines()[-1] if result.stderr.strip() else '?'}"
        )
    return result.returncode == 0


def base_python(engine: str, image: str) -> str:
    """The base image's Python as pip's --python-version wants it, e.g. 3.11."""
    out = run(
        [
            engine,
            "run",
            "--rm",
            "--network",
            "none",
            image,
            "python3",
            "-c",
            "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')",
        ],
        timeout=120,
    )
    return out.stdout.strip()


# --------------------------------------------------------------------------- torch wheels


def torch_index(python: str, torch: str) -> Path:
    """A PEP 503 index of ``torch`` and its requirements for CPython ``python`` on manylinux x86_64,
    fetched by this machine's pip. Returns the folder that holds the wheels and simple/."""
    folder = CACHE / f"wheels-cp{python.replace('.', '')}-{re.sub(r'[^A-Za-z0-9.]+', '-', torch)}"
    simple = folder / "simple"
    if not (simple / "index.html").exists():
        folder.mkdir(parents=True, exist_ok=True)
        log(f"fetching {torch} for Python {python} with this machine's pip into {folder}")
        run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--only-binary=:all:",
                "--python-version",
                python,
                "--implementation",
                "cp",
                "--platform",
                "manylinux_2_28_x86_64",
                "--dest",
                str(folder),
                torch,
            ],
            timeout=1800,
        )
        projects: dict[str, list[str]] = {}
        for wheel in sorted(folder.glob("*.whl")):
            project = re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()
            projects.setdefault(project, []).append(wheel.name)
        for project, wheels in projects.items():
            (simple / project).mkdir(parents=True, exist_ok=True)
            links = "".join(f'<a href="../../{html.escape(w)}">{html.escape(w)}</a>\n' for w in wheels)
            (simple / project / "index.html").write_text(
                f"<!DOCTYPE html>\n<html><body>\n{links}</body></html>\n"
            )
        listing = "".join(f'<a href="{p}/">{p}</a>\n' for p in sorted(projects))
        (simple / "index.html").write_text(f"<!DOCTYPE html>\n<html><body>\n{listing}</body></html>\n")
    return folder


# --------------------------------------------------------------------------- the build context


def translate(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus **) as a regular expression."""
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif c == "*":
            out, i = out + "[^/]*", i + 1
        elif c == "?":
            out, i = out + "[^/]", i + 1
        elif c == "[":
            end = pattern.index("]", i + 1)
            body = pattern[i + 1 : end].replace("\\", "\\\\")
            out, i = out + "[" + ("^" + body[1:] if body.startswith("^") else body) + "]", end + 1
        else:
            out, i = out + re.escape(c), i + 1
    return re.compile(out)


@dataclass
class DockerIgnore:
    rules: list[tuple[bool, re.Pattern[str], str]] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> DockerIgnore:
        ignore = cls()
        if path.exists():
            for line in path.read_text().splitlines():
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                negated = line.startswith("!")
                pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
                literal = re.split(r"[*?\[]", pattern, maxsplit=1)[0]
                ignore.rules.append((negated, translate(pattern), literal))
        return ignore

    def excluded(self, path: str) -> bool:
        """Docker's rule: the last pattern that matches the path or one of its parents wins."""
        parts = path.split("/")
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        result = False
        for negated, regex, _ in self.rules:
            if any(regex.fullmatch(p) for p in prefixes):
                result = not negated
        return result

    def may_include_below(self, directory: str) -> bool:
        """Whether a negated pattern could bring back something under an excluded directory."""
        for negated, _, literal in self.rules:
            if negated and (
                not literal or literal.startswith(directory + "/") or directory.startswith(literal)
            ):
                return True
        return False


def context_files(root: Path) -> Iterator[Path]:
    """The files the build context sends (relative paths), as .dockerignore selects them."""
    ignore = DockerIgnore.load(root / ".dockerignore")
    for here, dirs, files in os.walk(root):
        rel = Path(here).relative_to(root)
        keep = []
        for d in sorted(dirs):
            path = (rel / d).as_posix()
            if not ignore.excluded(path) or ignore.may_include_below(path):
                keep.append(d)
        dirs[:] = keep
        for f in sorted(files):
            path = rel / f
            if not ignore.excluded(path.as_posix()):
                yield path


def build_key(dockerfile: Path, build_args: dict[str, str], target: str | None, extra: Sequence[str]) -> str:
    digest = hashlib.sha256()

    def add(*items: str | bytes) -> None:
        for item in items:
            data = item.encode() if isinstance(item, str) else item
            digest.update(len(data).to_bytes(8, "little") + data)

    add(Path(__file__).read_bytes(), dockerfile.read_bytes(), target or "", *extra)
    for key in sorted(build_args):
        add(key, build_args[key])
    for path in context_files(REPO):
        add(path.as_posix(), (REPO / path).read_bytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------- commands


def parse_build_args(items: Sequence[str]) -> dict[str, str]:
    args = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--build-arg wants KEY=VALUE, not {item!r}")
        args[key] = value
    return args


def dockerfile_default(dockerfile: Path, name: str) -> str | None:
    match = re.search(rf"^ARG {name}=(\S+)", dockerfile.read_text(), re.MULTILINE)
    return match.group(1) if match else None


def prepare(
    engine_choice: str, dockerfile: Path, base: str | None, tools: Sequence[str]
) -> tuple[str, str, bool]:
    """The engine, the base image for ``dockerfile``, and whether that base is the local one."""
    engine = choose_engine(engine_choice)
    ensure_tools(engine, tools)
    if base:
        if not pullable(engine, base):
            raise RuntimeError(f"base image {base} is neither here nor pullable")
        local = False
    else:
        # The Dockerfile's own base where it is here; else the local one where it was made
        # before (no pull attempt on every run); else a pull; else the local one, made now.
        wanted = dockerfile_default(dockerfile, base_arg(dockerfile))
        if wanted and inspect(engine, wanted) is not None:
            base, local = wanted, False
        elif local_base_ready(engine):
            base, local = LOCAL_BASE, True
        elif wanted and pullable(engine, wanted):
            base, local = wanted, False
        else:
            base, local = ensure_local_base(engine), True
    ensure_runs(engine, base)
    return engine, base, local


def base_arg(dockerfile: Path) -> str:
    """The build argument that names a Dockerfile's base image."""
    return "CUDA_IMAGE" if dockerfile_default(dockerfile, "CUDA_IMAGE") else "PYTHON_IMAGE"


def cmd_engine(args: argparse.Namespace) -> dict[str, Any]:
    with locked():
        engine, base, local = prepare(args.engine, REPO / DEFAULT_DOCKERFILE, args.base, args.with_tools)
    return {"engine": engine, "base": base, "local_base": local}


def cmd_build(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    dockerfile = REPO / args.dockerfile
    build_args = parse_build_args(args.build_arg)
    volumes: list[str] = []
    wheels: list[str] = []
    index_url = args.torch_index_url
    with locked():
        engine, base, local = prepare(args.engine, dockerfile, args.base, args.with_tools)
        if index_url is None and local:
            version = dockerfile_default(dockerfile, "TORCH_VERSION")
            if version is None:
                raise RuntimeError(f"{args.dockerfile} has no ARG TORCH_VERSION=...")
            variant = build_args.get("TORCH_CUDA", "cpu")
            folder = torch_index(base_python(engine, base), f"torch=={version}+{variant}")
            wheels = sorted(p.name for p in folder.glob("*.whl"))
            volumes += ["--volume", f"{folder}:{WHEELS_MOUNT}:ro"]
            index_url = f"file://{WHEELS_MOUNT}/simple"
    build_args.setdefault(base_arg(dockerfile), base)
    if index_url is not None:
        build_args["TORCH_INDEX_URL"] = index_url
    if local and HOST_CA_BUNDLE.is_file():
        # HTTPS from inside the build (pip, to PyPI) trusts what this machine trusts.
        volumes += ["--volume", f"{HOST_CA_BUNDLE}:{HOST_CA_BUNDLE}:ro"]
    if volumes and engine != "podman":
        raise RuntimeError("build-time volumes (local torch wheels) need podman; pass --torch-index-url")
    base_info = inspect(engine, base)
    assert base_info is not None
    key = build_key(dockerfile, build_args, args.target, [base_info["Id"], *wheels])

    existing = inspect(engine, args.tag)
    built = args.force or not (existing and labels(existing).get(KEY_LABEL) == key)
    if built:
        argv = [
            engine,
            "build",
            "--file",
            str(dockerfile),
            "--tag",
            args.tag,
            "--label",
            f"{KEY_LABEL}={key}",
        ]
        if engine == "podman":
            # HEALTHCHECK and SHELL belong to the docker image format; podman's default, OCI, drops them.
            argv += ["--format", "docker", *volumes]
        if args.target:
            argv += ["--target", args.target]
        for name, value in sorted(build_args.items()):
            argv += ["--build-arg", f"{name}={value}"]
        argv.append(str(REPO))
        log(" ".join(argv))
        build_started = time.monotonic()
        result = run(argv, check=False, capture=False, timeout=3600)
        if result.returncode != 0:
            raise RuntimeError(f"{engine} build exited with {result.returncode}")
        log(f"built {args.tag} in {time.monotonic() - build_started:.0f} s")
    info = inspect(engine, args.tag)
    assert info is not None
    if existing and existing["Id"] != info["Id"]:
        # The image this tag named before: its layers go unless another tag or a container holds it.
        run([engine, "rmi", existing["Id"]], check=False)
    size = int(info.get("Size") or 0)
    log(f"{args.tag}: {size / 1e6:.0f} MB ({'built' if built else 'inputs unchanged, not rebuilt'})")
    return {
        "engine": engine,
        "tag": args.tag,
        "id": info["Id"],
        "size": size,
        "base": base,
        "base_size": int(base_info.get("Size") or 0),
        "local_base": local,
        "torch_index_url": build_args.get("TORCH_INDEX_URL")
        or dockerfile_default(dockerfile, "TORCH_INDEX_URL"),
        "built": built,
        "key": key,
        "seconds": round(time.monotonic() - started, 1),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--engine",
        choices=["auto", "podman", "docker"],
        default=os.environ.get("CONTAINER_ENGINE", "auto"),
        help="auto (default, or $CONTAINER_ENGINE): docker where its daemon answers, else podman",
    )
    common.add_argument(
        "--base", help="base image of every stage (default: the Dockerfile's, else the local one)"
    )
    common.add_argument(
        "--with",
        dest="with_tools",
        action="append",
        default=[],
        choices=sorted(TOOLS),
        help="also make sure of what `podman kube play` (kube) or podman-compose (compose) needs",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("engine", parents=[common], help="make a container engine usable; print it and the base")
    build = sub.add_parser(
        "build", parents=[common], help="build an image unless one of the same inputs exists"
    )
    build.add_argument("--dockerfile", default=DEFAULT_DOCKERFILE, help=f"default: {DEFAULT_DOCKERFILE}")
    build.add_argument("--tag", default=DEFAULT_TAG, help=f"default: {DEFAULT_TAG}")
    build.add_argument("--target", help="build only up to this stage")
    build.add_argument("--torch-index-url", help="where torch comes from (default: see above)")
    build.add_argument("--build-arg", action="append", default=[], metavar="KEY=VALUE")
    build.add_argument("--force", action="store_true", help="build even when the inputs are unchanged")
    args = parser.parse_args(argv)
    try:
        result = cmd_engine(args) if args.command == "engine" else cmd_build(args)
    except NoEngine as exc:
        print(f"container_image: no container engine can run here: {exc}", file=sys.stderr)
        return 3
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"container_image: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
