#!/usr/bin/env bash
# Download, here (PyPI reachable), the wheels that the GPU machine's python3 lacks or may hold in a
# too-old version, for scripts/device_check.sh to install there (that machine has no network).
#
#   bash scripts/device_wheels.sh [--python-version 3.12] [--dest .whl]
#
# Each package is pinned to the version installed in .venv (what `make test` uses; VENV= to
# choose another), as cp312 manylinux x86_64 wheels (or pure-Python ones). Before downloading,
# scripts/device_requirements.py plan checks that PACKAGES covers every requirement of
# pyproject's base and server dependencies and pytest-asyncio, followed through their own
# requirements, that the GPU image (scripts/device_image.txt) does not meet.
set -euo pipefail
cd "$(dirname "$0")/.."

PYVER=3.12
DEST=.whl
VENV=${VENV:-.venv}
while [ $# -gt 0 ]; do
    case $1 in
        --python-version) PYVER=$2; shift 2 ;;
        --dest) DEST=$2; shift 2 ;;
        -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done

# What the GPU image lacks (pydantic and its kin, the gRPC health/reflection services,
# pytest-asyncio) or holds in a version nobody read there while ours needs a minimum
# (grpcio, protobuf, prometheus-client, typing-extensions: pydantic needs >= 4.16).
PACKAGES=(
    grpcio
    protobuf
    grpcio-health-checking
    grpcio-reflection
    pydantic
    pydantic-core
    pydantic-settings
    annotated-types
    typing-inspection
    python-dotenv
    typing-extensions
    prometheus-client
    pytest-asyncio
    # The tests' oracle and what its modules import (tests/oracle-requirements.txt), for the
    # served network's tests and bench_network.py.
    nvsubquadratic
    einops
    omegaconf
)

PY="$VENV/bin/python"
if [ ! -x "$PY" ]; then
    echo "$PY not found: run 'make setup' (or pass VENV=) first; the pins come from it" >&2
    exit 1
fi
"$PY" scripts/device_requirements.py plan

mkdir -p "$DEST"
rm -f "$DEST"/*.whl  # one version of each: two would stop the install there
for name in "${PACKAGES[@]}"; do
    version=$("$PY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$name")
    python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
        --python-version "$PYVER" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 \
        -d "$DEST" "$name==$version"
done

count=$(find "$DEST" -maxdepth 1 -type f -name '*.whl' | wc -l)
if [ "$count" -ne "${#PACKAGES[@]}" ]; then
    echo "expected ${#PACKAGES[@]} wheels in $DEST, found $count" >&2
    exit 1
fi
ls -1 "$DEST"/*.whl
kib=$(du -sk "$DEST" | cut -f1)
echo "$count wheels, $((kib / 1024)) MiB in $DEST (Python $PYVER)"
if [ "$kib" -gt $((40 * 1024)) ]; then
    echo "over 40 MiB: the working tree that travels to the GPU machine is limited to 64 MiB" >&2
    exit 1
fi
