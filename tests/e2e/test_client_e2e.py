"""The client against ``kernelgen serve`` processes: the console script, a > 64 MiB stream
with its client-side memory measured, a retry across a server restart, and the README."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kernelgen_client import KernelClient, RetryPolicy

from support import ServeProcess, free_port, serve_process

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def served() -> Iterator[ServeProcess]:
    with serve_process("--shared-memory") as process:  # the README's shared-memory example needs it
        yield process


def kernelgen(*argv: str, target: str) -> subprocess.CompletedProcess[str]:
    """The installed ``kernelgen`` console script, pointed at ``target`` by the environment."""
    env = {**os.environ, "KERNELGEN_TARGET": target}
    # The script installed next to this interpreter: the environment under test, on PATH or not.
    script = str(Path(sys.executable).with_name("kernelgen"))
    return subprocess.run([script, *argv], capture_output=True, text=True, env=env, timeout=60)


def test_console_script(served: ServeProcess, tmp_path: Path) -> None:
    health = kernelgen("health", target=served.target)
    assert (health.returncode, health.stdout.strip()) == (0, "SERVING")
    models = kernelgen("models", target=served.target)
    assert models.returncode == 0
    assert [line.split()[0] for line in models.stdout.splitlines()[1:]] == [
        "hyena-2d",
        "long-1d",
        "volume-3d",
    ]
    out = tmp_path / "kernel.safetensors"
    generate = kernelgen(
        "generate", "hyena-2d", "--seq-lens", "29,29", "--out", str(out), target=served.target
    )
    assert generate.returncode == 0, generate.stderr
    assert generate.stdout.startswith("hyena-2d: kernel [1, 57, 57, 384] float32, 4.99 MB")
    assert out.stat().st_size > 57 * 57 * 384 * 4
    flops = kernelgen("flops", "hyena-2d", "--seq-lens", "29,29", target=served.target)
    assert flops.returncode == 0
    assert "FLOPs" in flops.stdout
    unknown = kernelgen("generate", "nope", "--seq-lens", "3", target=served.target)
    assert unknown.returncode == 4
    assert "unknown model 'nope'" in unknown.stderr


def measured(call: Any) -> tuple[Any, int]:
    """``call()`` and the peak of the Python and numpy memory it allocated."""
    tracemalloc.start()
    try:
        result = call()
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, peak


def test_a_streamed_kernel_over_64_mib_costs_about_one_copy(served: ServeProcess) -> None:
    import torch  # imported before measuring: its import allocates too

    expected_bytes = 79_999 * 256 * 4  # long-1d, seq_lens [40000]: 81.9 MB
    with KernelClient(served.target, timeout=120) as client:
        client.get_model("long-1d")  # the model lookup is not part of the measurement
        result, peak = measured(lambda: client.generate("long-1d", [40000], with_report=True))
        tensor, torch_peak = measured(lambda: client.generate("long-1d", [40000], as_torch=True))
    assert result.streamed
    assert result.kernel.shape == (1, 79_999, 256)
    assert result.kernel.nbytes == expected_bytes
    # One preallocated buffer plus a chunk or two in flight; no concatenation, no second copy,
    # and the torch tensor views that same buffer.
    for name, value in (("numpy", peak), ("torch", torch_peak)):
        assert value < 1.5 * expected_bytes, (
            f"{name}: peak {value / 1e6:.1f} MB for {expected_bytes / 1e6:.1f} MB"
        )
    assert torch.equal(tensor, torch.from_numpy(result.kernel))
    # The same numbers as the model computes locally.
    from kernelgen_server.repository.store import ModelRepository, embedded_repository

    module = ModelRepository.load(embedded_repository()).ready["long-1d"].module
    with torch.no_grad():
        expected, _grid = module([40000])
    scale = float(expected.abs().max())
    assert float(np.abs(result.kernel - expected.numpy()).max()) <= 1e-4 * scale


def test_calls_ride_out_a_server_restart() -> None:
    port = free_port()
    policy = RetryPolicy(wait_for_ready=True)  # wait for a connection instead of failing fast
    outcomes: list[tuple[float, float, str]] = []  # (start, end, "ok" or the error)
    stop = threading.Event()

    def caller(client: KernelClient) -> None:
        while not stop.is_set():
            start = time.monotonic()
            try:
                client.generate("hyena-2d", [9, 9], np.ones((1, 384), np.float32))
                outcome = "ok"
            except Exception as exc:  # recorded, asserted on below
                outcome = repr(exc)
            outcomes.append((start, time.monotonic(), outcome))
            time.sleep(0.05)

    with serve_process("--port", str(port), "--grace-s", "0") as first:
        client = KernelClient(f"127.0.0.1:{port}", timeout=60, retries=policy)
        thread = threading.Thread(target=caller, args=(client,), daemon=True)
        thread.start()
        while not any(o[2] == "ok" for o in outcomes):
            time.sleep(0.05)
        first.proc.kill()  # a crash: no goodbye to the client
        first.proc.wait(timeout=10)
        down = time.monotonic()
    try:
        time.sleep(0.5)  # calls made now wait for a connection
        with serve_process("--port", str(port)) as second:
            up = time.monotonic()
            assert second.port == port
            while not any(start > up for start, _end, o in outcomes if o == "ok"):
                time.sleep(0.05)
            stop.set()  # before this server goes: a call made after it would wait out its deadline
            thread.join(timeout=60)
    finally:
        stop.set()
        client.close()
    failures = [o for o in outcomes if o[2] != "ok"]
    assert not failures, (failures, "".join(first.output[-30:]), "".join(second.output[-30:]))
    # Some call was in flight while no server existed (no server runs during the 0.5 s after
    # the crash) and still succeeded, on the new server: gRPC retried it after UNAVAILABLE and
    # waited for the reconnection instead of failing.
    outage = down + 0.25
    assert any(start < outage < end for start, end, _o in outcomes), (down, up, outcomes)


def readme_python(section: str) -> str:
    """Every ```python block under the README heading ``section``, in order."""
    text = (REPO / "README.md").read_text()
    match = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert match, f"README has no '## {section}' section"
    blocks = re.findall(r"^```python\n(.*?)^```", match.group(1), flags=re.M | re.S)
    assert blocks, "the section has no python block"
    return "\n".join(blocks)


def test_the_readme_python_section_runs_as_written(served: ServeProcess, tmp_path: Path) -> None:
    script = tmp_path / "readme.py"
    script.write_text(readme_python("Use it from Python"))
    env: dict[str, Any] = {**os.environ, "KERNELGEN_TARGET": served.target}
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[:3] == ["hyena-2d True 384", "long-1d True 256", "volume-3d True 32"]
    assert lines[3].startswith("(4, 57, 57, 384) 4 ")
    assert lines[4].startswith(f"{79_999 * 256 * 4} ")
    assert lines[5] == "NOT_FOUND unknown model 'no-such-model'"
    assert lines[6] == "16 (1, 57, 57, 384)"
