"""The images' start command, run on the host.

Without a container engine, this proves the next best thing about each
Dockerfile (tests/deploy/test_container_images.py runs the images themselves):
its ENTRYPOINT + CMD, run with exactly its ENV (nothing inherited
from the test's environment) and its WORKDIR, starts a server that its own
HEALTHCHECK command line reports healthy, and that its STOPSIGNAL stops
cleanly within KERNELGEN_GRACE_S. The image's paths are mapped onto the host:
/opt/kernelgen (the virtual environment the build stage creates) is this
interpreter's environment, /models is a copy of what the Dockerfile copies
there, the user's home is a temporary folder; ports become free ones, and
the GPU image runs on the CPU where no GPU is present.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import ModuleType

import pytest

from support import free_port

REPO = Path(__file__).resolve().parents[2]


def load_deploy_helpers() -> ModuleType:
    """The Dockerfile parser of tests/deploy/test_deploy.py."""
    name = "_kernelgen_deploy_helpers"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "tests" / "deploy" / "test_deploy.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


deploy = load_deploy_helpers()


def seconds(duration: str) -> float:
    """A Dockerfile duration such as 10s, 1m30s or 500ms."""
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    total, number = 0.0, ""
    i = 0
    while i < len(duration):
        if duration[i].isdigit() or duration[i] == ".":
            number += duration[i]
            i += 1
            continue
        unit = "ms" if duration.startswith("ms", i) else duration[i]
        total += float(number) * units[unit]
        number, i = "", i + len(unit)
    return total


def localise(value: str, mapping: dict[str, str]) -> str:
    """Replace image paths by host paths in a value or a colon-separated path list."""
    parts = []
    for part in value.split(":"):
        for image_path, host_path in mapping.items():
            if part == image_path or part.startswith(image_path + "/"):
                part = host_path + part[len(image_path) :]
                break
        parts.append(part)
    return ":".join(parts)


def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["cpu", "gpu"])
def test_entrypoint_runs_on_host(kind: str, tmp_path: Path) -> None:
    dockerfile = deploy.parse_dockerfile(deploy.DOCKERFILES[kind])
    build, final = dockerfile.stages[0], dockerfile.final
    argv = final.one("ENTRYPOINT").exec_form() + final.one("CMD").exec_form()
    image_env: dict[str, str] = dockerfile.env()

    # Where the image's files come from, and their stand-ins here.
    venv = next(d for f, _, d in dockerfile.copies(final) if f.get("from") == build.name)
    [(models_sources, models_dir)] = [(s, d) for f, s, d in dockerfile.copies(final) if "from" not in f]
    workdir = final.one("WORKDIR").args
    models = tmp_path / "models"
    for source in models_sources:
        shutil.copytree(REPO / source, models, dirs_exist_ok=True)
    home = tmp_path / "home"
    home.mkdir()
    mapping = {venv.rstrip("/"): sys.prefix, models_dir.rstrip("/"): str(models), workdir: str(home)}

    grpc_port, metrics_port = free_port(), free_port()
    env = {"HOME": str(home)}  # what the USER's passwd entry gives inside the image
    for key, value in image_env.items():
        env[key] = localise(deploy.expand(value, {"PATH": os.environ["PATH"]}), mapping)
    env["KERNELGEN_PORT"], env["KERNELGEN_METRICS_PORT"] = str(grpc_port), str(metrics_port)
    if env["KERNELGEN_DEVICE"].startswith("cuda") and not cuda_available():
        env["KERNELGEN_DEVICE"] = "cpu"
    assert env["KERNELGEN_MODEL_REPO"] == str(models)

    executable = shutil.which(argv[0], path=env["PATH"])
    assert executable == str(Path(sys.prefix) / "bin" / argv[0]), "the start command comes from the venv"

    options, health = dockerfile.healthcheck()
    proc = subprocess.Popen(
        [executable, *argv[1:]],
        env=env,
        cwd=home,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        output.extend(proc.stdout)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        # As the container runtime would: probe within the start period plus retries.
        deadline = (
            time.monotonic()
            + seconds(options["start-period"])
            + int(options["retries"]) * seconds(options["interval"])
        )
        while True:
            assert proc.poll() is None, f"server exited with {proc.returncode}:\n" + "".join(output)
            check = subprocess.run(
                health, env=env, cwd=home, capture_output=True, text=True, timeout=seconds(options["timeout"])
            )
            if check.returncode == 0:
                break
            assert "invalid choice" not in check.stderr, f"HEALTHCHECK command does not exist: {check.stderr}"
            assert time.monotonic() < deadline, (
                f"HEALTHCHECK never passed: {check.stdout}{check.stderr}\n" + "".join(output)
            )
            time.sleep(0.5)

        for model in sorted(p.name for p in models.iterdir()):
            one = subprocess.run(
                [executable, "health", model, "--target", f"127.0.0.1:{grpc_port}"],
                env=env,
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert one.returncode == 0, f"{model}: {one.stdout}{one.stderr}"
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
            assert b"kernelgen_inflight_requests" in response.read()

        stop = signal.Signals[final.one("STOPSIGNAL").args]
        grace = float(env["KERNELGEN_GRACE_S"])
        started = time.monotonic()
        proc.send_signal(stop)
        code = proc.wait(timeout=grace + 5)
        assert code == 0, "".join(output)
        assert time.monotonic() - started <= grace + 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        reader.join(timeout=5)
