"""``kernelgen serve`` refusing to start, as an operator sees it: one clear message, the flag to change,
the right exit code, no traceback. Ports in use (gRPC and /metrics, one process and ``--workers``),
repositories with nothing to serve, invalid settings; and the start-up line that names /metrics."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kernelgen_server.repository.store import embedded_repository

from support import free_port, serve_process

#: What must never reach an operator's terminal when the server refuses to start.
NOISE = ("Traceback", "Exception ignored", "was never awaited", "add_port.cc", "Failed to bind")


def serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "kernelgen_client.cli", "serve", "--host", "127.0.0.1", *args]
    environment = {**os.environ, **(env or {})}
    for key in [k for k in environment if k.startswith("KERNELGEN_")]:
        if key not in (env or {}):
            del environment[key]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=environment, check=False)


def refusal(result: subprocess.CompletedProcess[str]) -> str:
    """The one ``kernelgen serve:`` line of a refused start, checked free of tracebacks."""
    for noise in NOISE:
        assert noise not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("kernelgen serve: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture
def taken() -> Iterator[int]:
    """A port something else listens on."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield int(listener.getsockname()[1])


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_grpc_port_in_use_is_named_with_its_flag(taken: int, workers: str) -> None:
    result = serve("--port", str(taken), "--metrics-port", "0", "--workers", workers)
    assert result.returncode == 2
    assert refusal(result) == (
        f"kernelgen serve: cannot listen for gRPC on 127.0.0.1:{taken}: the address is in use; "
        "set --port to another port (0 picks a free one)"
    )


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_metrics_port_in_use_is_named_with_its_flag(taken: int, workers: str) -> None:
    result = serve("--port", "0", "--metrics-port", str(taken), "--workers", workers)
    assert result.returncode == 2
    assert refusal(result) == (
        f"kernelgen serve: cannot listen for /metrics on 127.0.0.1:{taken}: the address is in use; "
        "set --metrics-port to another port (0 turns /metrics off)"
    )


def test_an_empty_repository_is_refused_unless_allowed(tmp_path: Path) -> None:
    (tmp_path / "run.ckpt").write_bytes(b"")
    result = serve("--port", "0", "--metrics-port", "0", "--model-repo", str(tmp_path))
    assert result.returncode == 1
    line = refusal(result)
    assert line.startswith(
        f"kernelgen serve: no model in {tmp_path}: it holds only run.ckpt (a model is a folder"
    )
    assert "kernelgen init or kernelgen import writes one" in line
    assert line.endswith("--allow-empty starts the server with none")

    metrics = free_port()
    args = ("--model-repo", str(tmp_path), "--allow-empty", "--metrics-port", str(metrics))
    with serve_process(*args) as proc:
        with grpc.insecure_channel(proc.target) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert proc.terminate() == 0
    output = "".join(proc.output)
    # The start-up line names where /metrics is, as Prometheus would be told: host, port and path.
    assert f"serving 0 model(s) on 127.0.0.1:{proc.port}" in output
    assert f"metrics on http://127.0.0.1:{metrics}/metrics" in output


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_repository_whose_models_all_fail_lists_each_reason(tmp_path: Path, workers: str) -> None:
    (tmp_path / "typo").mkdir()
    (tmp_path / "typo" / "config.jsn").write_text("{}")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text(
        (embedded_repository() / "long-1d" / "config.json").read_text()
    )
    args = ("--port", "0", "--metrics-port", "0", "--model-repo", str(tmp_path), "--workers", workers)
    result = serve(*args)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    head = (
        f"kernelgen serve: no model of {tmp_path} loads (2 found, each failed); "
        "--allow-empty starts the server with none:"
    )
    assert result.stderr.count(head) == 1, result.stderr  # once, also with several workers
    reasons = result.stderr.split(head, 1)[1].splitlines()[1:3]
    assert reasons[0].startswith("  half: ") and "model.safetensors" in reasons[0], reasons
    assert reasons[1].startswith("  typo: ") and "config.json" in reasons[1], reasons


def test_a_model_folder_given_as_the_repository_points_to_its_parent(tmp_path: Path) -> None:
    model = tmp_path / "long-1d"
    shutil.copytree(embedded_repository() / "long-1d", model)
    result = serve("--port", "0", "--metrics-port", "0", "--model-repo", str(model))
    assert result.returncode == 1
    assert refusal(result) == (
        f"kernelgen serve: {model} is a model folder, not a repository of them: give the folder that "
        f"holds it (--model-repo {tmp_path})"
    )


def test_settings_errors_name_the_flag_and_the_environment_variable() -> None:
    result = serve("--model-repo", "/nonexistent/models")
    assert result.returncode == 2
    assert "  --model-repo / KERNELGEN_MODEL_REPO: /nonexistent/models does not exist" in result.stderr
    result = serve(env={"KERNELGEN_PORT": "http"})
    assert result.returncode == 2
    assert "  --port / KERNELGEN_PORT: Input should be a valid integer" in result.stderr
    assert "got 'http'" in result.stderr
    assert "Traceback" not in result.stderr
