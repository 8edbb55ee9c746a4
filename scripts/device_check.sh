#!/usr/bin/env bash
# The GPU check: run on a machine with an NVIDIA GPU, from a copy of the repository whose .whl/
# holds the wheels of scripts/device_wheels.sh (the machine has no network; kernelgen is not
# pip-installed there: src/ goes on PYTHONPATH).
#
#   bash scripts/device_check.sh
#
# Steps, each under its own time budget, each run whatever the others did:
#   install   the wheels into $SITE (ahead of the image's packages on PYTHONPATH)
#   a         tests/server/test_engine.py and the served models' CUDA test (every generator,
#             masked, causal: tests/server/test_served_engine.py); the CUDA tests must run, not skip
#   b         the integration tests of the served path (in-process servers, device "auto")
#   c         benchmarks/bench_engine.py, short, on the GPU
#   d         benchmarks/bench_batching.py --seconds 1 --rounds 1, servers on the GPU, 4 client processes
#   e         benchmarks/bench_workers.py: serve --workers 4 against 1 on the GPU
#   f         benchmarks/bench_network.py --quick: a network's forward on the GPU, local against
#             served (its table goes to bench.log; last: it gets what time is left)
# Writes at most 8 files into $OUT (default reports/device): summary.txt (each step's exit
# code and time, and whether the CUDA tests ran), env.txt (nvidia-smi, versions, the
# requirement check), tests.log, bench.log, engine_<device>.json, batching_<device>.{json,md},
# workers_<device>.md.
# Exit status: 0 only when every step passed and the CUDA tests ran (REQUIRE_CUDA=0: skipped
# CUDA tests on a machine without CUDA are not a failure, for a dry run on a CPU machine).
#
# Settings (environment): PYTHON (python3), WHEELS (.whl), SITE (/tmp/site), OUT,
# REQUIRE_CUDA (1), CHECK_BUDGET_S (360: all steps together stop by then).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/site}
OUT=${OUT:-reports/device}
REQUIRE_CUDA=${REQUIRE_CUDA:-1}
BUDGET_S=${CHECK_BUDGET_S:-360}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
SUMMARY=$OUT/summary.txt
TESTS_LOG=$OUT/tests.log
BENCH_LOG=$OUT/bench.log
: >"$SUMMARY"
: >"$TESTS_LOG"
: >"$BENCH_LOG"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
FAILED=()
NOTES=()

note() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME BUDGET_S LOG COMMAND...: run COMMAND under timeout, output appended to LOG.
# The budget is cut to what is left of CHECK_BUDGET_S; sets RC.
step() {
    local name=$1 budget=$2 log=$3
    shift 3
    local left=$((BUDGET_S - SECONDS))
    [ "$budget" -gt "$left" ] && budget=$left
    local started=$SECONDS
    if [ "$budget" -lt 5 ]; then
        RC=125
        echo "=== $name: not run, the check's ${BUDGET_S} s are spent" >>"$log"
    else
        echo "=== $name (budget ${budget} s): $*" >>"$log"
        timeout -k 10 "$budget" "$@" >>"$log" 2>&1
        RC=$?
    fi
    local took=$((SECONDS - started)) what="exit $RC"
    [ "$RC" -eq 124 ] || [ "$RC" -eq 137 ] && what="TIMED OUT after ${budget} s (exit $RC)"
    [ "$RC" -eq 125 ] && what="NOT RUN (no time left)"
    echo "=== $name: $what, ${took} s" >>"$log"
    printf '%-34s %-30s %4d s\n' "$name" "$what" "$took" | tee -a "$SUMMARY"
    [ "$RC" -eq 0 ] || FAILED+=("$name")
}

# junit_summary XML: counts, and the CUDA tests' outcomes (a test is a CUDA test when its
# name says cuda or it was skipped for want of CUDA). Prints "cuda_skipped=N" last.
junit_summary() {
    "$PY" - "$1" <<'EOF'
import sys
import xml.etree.ElementTree as ET

try:
    cases = list(ET.parse(sys.argv[1]).getroot().iter("testcase"))
except (OSError, ET.ParseError) as exc:
    print(f"  no junit report ({exc})")
    print("cuda_skipped=-1")
    raise SystemExit
counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
cuda = {"passed": [], "failed": [], "skipped": []}
for case in cases:
    outcome = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
    outcome = {"failure": "failed"}.get(outcome, outcome)
    counts[outcome] += 1
    reason = " ".join(c.get("message", "") for c in case if c.tag == "skipped")
    if "cuda" in case.get("name", "").lower() or "cuda" in reason.lower():
        cuda["failed" if outcome in ("failed", "error") else outcome].append(case.get("name"))
print("  " + ", ".join(f"{n} {k}" for k, n in counts.items() if n))
failed = [case.get("classname", "") + "::" + case.get("name", "") for case in cases
          if any(c.tag in ("failure", "error") for c in case)]
for name in failed[:20]:
    print(f"  FAILED {name}")
if any(cuda.values()):
    print("  CUDA tests: " + "; ".join(f"{k}: {', '.join(v)}" for k, v in cuda.items() if v))
else:
    print("  CUDA tests: none found")
print(f"cuda_skipped={len(cuda['skipped'])}")
EOF
}

note "kernelgen GPU check, $(date -u "+%Y-%m-%d %H:%M:%S UTC"), ${HOSTNAME:-?}, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"

# -- install ------------------------------------------------------------------------------------
shopt -s nullglob
wheels=("$WHEELS"/*.whl)
if [ ${#wheels[@]} -eq 0 ]; then
    note "no wheels in $WHEELS: run 'bash scripts/device_wheels.sh' where PyPI is reachable and carry .whl"
fi
step "install ${#wheels[@]} wheels" 120 "$TESTS_LOG" \
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "${wheels[@]}"
# kernelgen runs from src/; its entry points (the server's subcommands, the load tester's
# reference model) need package metadata, written next to the wheels.
"$PY" scripts/write_dist_info.py "$SITE" >>"$TESTS_LOG" 2>&1 || note "write_dist_info.py failed"
export PYTHONPATH="$SITE:$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"

# -- environment --------------------------------------------------------------------------------
{
    echo "## date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "## uname: $(uname -a)"
    echo "## PYTHONPATH=$PYTHONPATH"
    echo "## nvidia-smi"
    nvidia-smi 2>&1 || echo "nvidia-smi failed or is not installed"
    echo "## python"
    "$PY" - <<'EOF' 2>&1
import importlib
import importlib.metadata as md
import platform
import sys

print("python", platform.python_version(), sys.executable)
for name in ("torch", "numpy", "grpc", "google.protobuf", "pydantic", "pydantic_settings", "grpc_health",
             "prometheus_client", "safetensors", "pytest", "pytest_asyncio", "kernelgen_wire",
             "kernelgen_client", "kernelgen_server"):
    try:
        module = importlib.import_module(name)
    except Exception as exc:  # recorded, not fatal: the steps below will say what it breaks
        print(f"{name}: IMPORT FAILED: {exc!r}")
        continue
    version = getattr(module, "__version__", "")
    print(f"{name} {version} ({getattr(module, '__file__', '?')})")
try:
    import torch

    print("torch.version.cuda", torch.version.cuda)
    print("torch.cuda.is_available()", torch.cuda.is_available())
    if torch.cuda.is_available():
        print("device", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0),
              "count", torch.cuda.device_count())
    from kernelgen_server.core.service import resolve_device

    print('kernelgen resolve_device("auto") ->', resolve_device("auto"))
except Exception as exc:
    print(f"torch/CUDA probe failed: {exc!r}")
EOF
    echo "## requirements (scripts/device_requirements.py check)"
    "$PY" scripts/device_requirements.py check --site "$SITE" 2>&1
    echo "## exit $?"
} >"$OUT/env.txt"
grep -q "^## exit 0" "$OUT/env.txt" && req="all met" || req="UNMET: see env.txt"
probe='import torch; ok = torch.cuda.is_available(); print(int(ok), torch.cuda.get_device_name(0) if ok else "")'
read -r CUDA GPU < <("$PY" -c "$probe" 2>/dev/null || echo 0)
note "requirements: $req"
if [ "$CUDA" = 1 ]; then
    DEVICE=cuda
    note "CUDA: available, $GPU"
else
    DEVICE=cpu
    note "CUDA: NOT AVAILABLE: nothing below runs on a GPU; benchmarks run on the CPU"
    [ "$REQUIRE_CUDA" = 1 ] && FAILED+=("no CUDA")
fi

# -- a: engine unit tests, the CUDA ones included ----------------------------------------------
step "a test_engine.py" 150 "$TESTS_LOG" \
    "$PY" -m pytest tests/server/test_engine.py \
    tests/server/test_served_engine.py::test_cuda_serves_what_cpu_serves -v -p no:cacheprovider \
    --timeout 120 --junitxml "$WORK/engine.xml"
junit_summary "$WORK/engine.xml" >"$WORK/engine.txt"
grep -v '^cuda_skipped=' "$WORK/engine.txt" | tee -a "$SUMMARY"
skipped=$(sed -n 's/^cuda_skipped=//p' "$WORK/engine.txt")
if grep -q "CUDA tests: none found" "$WORK/engine.txt"; then
    note "  CUDA TESTS NOT FOUND in the report"
    FAILED+=("CUDA tests not found")
elif [ "${skipped:-0}" != 0 ]; then
    if [ "$CUDA" = 1 ]; then
        note "  CUDA TESTS SKIPPED although CUDA is available"
        FAILED+=("CUDA tests skipped")
    else
        note "  CUDA tests SKIPPED: no CUDA device here, so they checked nothing"
    fi
fi

# -- b: the served path on the default device ("auto": CUDA there) ------------------------------
# With the core's own tests of pipelined batches and cache slicing (also device "auto").
# Not test_security.py (needs cryptography, which the GPU image lacks; device-independent).
step "b integration tests" 180 "$TESTS_LOG" \
    "$PY" -m pytest -v -p no:cacheprovider --timeout 120 --junitxml "$WORK/service.xml" \
    tests/server/test_batching_served.py tests/server/test_service_rpc.py \
    tests/server/test_status_codes.py tests/server/test_lifecycle.py \
    tests/client/test_sync_client.py tests/client/test_async_client.py \
    tests/client/test_client_errors_served.py tests/client/test_client_cli_commands.py \
    tests/loadtest/test_loadtest_served.py tests/e2e/test_workers.py \
    tests/server/test_service_pipeline.py tests/server/test_cache_slicing.py \
    tests/server/test_factored_kernels.py tests/client/test_factored_client.py \
    tests/client/test_remote_kernels.py
junit_summary "$WORK/service.xml" | grep -v '^cuda_skipped=\|CUDA tests: none found' | tee -a "$SUMMARY"

# -- c: in-process engine vs reference forward --------------------------------------------------
step "c bench_engine.py ($DEVICE)" 90 "$BENCH_LOG" \
    "$PY" benchmarks/bench_engine.py --device "$DEVICE" --batches 1 8 32 64 --repeats 5 \
    --min-time 0.2 --json "$OUT/engine_$DEVICE.json"

# -- d: the batching benchmark ------------------------------------------------------------------
# Results under their own name (results/batching_<device>.*), so the CPU results stay as they
# are; four client processes, so that on a many-core host the client is not the limit.
name=batching_$DEVICE
step "d bench_batching.py ($DEVICE)" 150 "$BENCH_LOG" \
    "$PY" benchmarks/bench_batching.py --seconds 1 --rounds 1 --concurrency 1,8,32,64 \
    --device "$DEVICE" --client-processes 4 --output "$name"
for ext in json md; do
    if [ -f "benchmarks/results/$name.$ext" ]; then
        mv "benchmarks/results/$name.$ext" "$OUT/$name.$ext"
    else
        note "  bench_batching wrote no benchmarks/results/$name.$ext"
    fi
done

# -- e: worker processes on a many-core GPU host -------------------------------------------------
# Four workers against one, sharing the GPU; the client in 4 processes of 8 connections each.
# Only the markdown comes back (it holds every table): the file limit.
name=workers_$DEVICE
step "e bench_workers.py ($DEVICE)" 90 "$BENCH_LOG" \
    "$PY" benchmarks/bench_workers.py --workers 1,4 --seconds 1 --rounds 1 --concurrency 32,64 \
    --device "$DEVICE" --client-processes 4 --connections 8 --output "$name"
if [ -f "benchmarks/results/$name.md" ]; then
    mv "benchmarks/results/$name.md" "$OUT/$name.md"
    rm -f "benchmarks/results/$name.json"
else
    note "  bench_workers wrote no benchmarks/results/$name.md"
fi

# -- f: a whole network's forward, local against served, on the GPU ------------------------------
# Its markdown is printed into bench.log; its files are not kept (the file limit).
name=network_$DEVICE
step "f bench_network.py ($DEVICE)" 90 "$BENCH_LOG" \
    "$PY" benchmarks/bench_network.py --quick --device "$DEVICE" --output "$name"
rm -f "benchmarks/results/$name.json" "benchmarks/results/$name.md"

# -- verdict ------------------------------------------------------------------------------------
files=$(find "$OUT" -type f | wc -l)
[ "$files" -le 8 ] || note "$OUT holds $files files: only 8 come back from the device machine"
if [ ${#FAILED[@]} -eq 0 ]; then
    note "RESULT: OK (${SECONDS} s)"
    status=0
else
    note "RESULT: FAILED: $(IFS=';'; echo "${FAILED[*]}") (${SECONDS} s)"
    status=1
fi
echo "---- $OUT/summary.txt above; logs: $(cd "$OUT" && ls | tr '\n' ' ')"
exit "$status"
