"""``kernelgen serve`` as a real process: start-up, serving, SIGTERM drain, start-up errors."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import numpy as np
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kernelgen_server.repository.store import ModelRepository, embedded_repository
from kernelgen_wire.v1 import kernelgen_pb2 as pb
from kernelgen_wire.v1 import kernelgen_pb2_grpc as pb_grpc

from support import serve_process


def test_serves_the_embedded_models_and_drains_on_sigterm() -> None:
    repository = ModelRepository.load(embedded_repository())
    with serve_process("--max-queue-delay-ms", "20") as proc:
        with grpc.insecure_channel(proc.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            assert (
                health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
            )
            stub = pb_grpc.KernelGeneratorStub(channel)
            for name, lens in {"hyena-2d": (15, 15), "long-1d": (200,), "volume-3d": (4, 8, 8)}.items():
                reply = stub.GenerateKernel(pb.GenerateKernelRequest(model=name, seq_lens=lens))
                kernel = np.frombuffer(reply.kernel.data, "<f4").reshape(tuple(reply.kernel.shape))
                with torch.no_grad():
                    want = repository.ready[name].module(lens)[0].numpy()
                assert np.abs(kernel - want).max() <= 1e-5 * np.abs(want).max()

            # Calls in flight when SIGTERM arrives still complete.
            cond = np.random.default_rng(1).standard_normal((2, 384)).astype("<f4")
            request = pb.GenerateKernelRequest(
                model="hyena-2d",
                seq_lens=[15, 15],
                conditioning=pb.Tensor(shape=[2, 384], dtype=pb.DTYPE_FLOAT32, data=cond.tobytes()),
            )
            futures = [stub.GenerateKernel.future(request) for _ in range(16)]
            threading.Timer(0.02, proc.proc.terminate).start()
            results = [f.result(timeout=30) for f in futures]
            assert all(r.kernel.shape[0] == 2 for r in results)
        assert proc.proc.wait(timeout=30) == 0
    output = "".join(proc.output)
    assert "listening on grpc://127.0.0.1:" in output
    assert "draining" in output
    assert "stopped" in output


def _serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    command = [
        sys.executable,
        "-m",
        "kernelgen_client.cli",
        "serve",
        "--port",
        "0",
        "--metrics-port",
        "0",
        *args,
    ]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})}, check=False
    )


def test_strict_start_fails_on_a_bad_model(tmp_path: Path) -> None:
    shutil.copytree(embedded_repository() / "long-1d", tmp_path / "good")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text('{"out_dim": 4}')
    result = _serve("--model-repo", str(tmp_path), "--strict")
    assert result.returncode == 1
    assert "1 model(s) failed to load: bad" in result.stderr


def test_invalid_settings_exit_2_with_a_message() -> None:
    result = _serve("--device", "tpu")
    assert result.returncode == 2
    assert "device must be auto, cpu, cuda or cuda:N" in result.stderr
    result = _serve(env={"KERNELGEN_MAX_BATCH_SIZE": "many"})
    assert result.returncode == 2
    assert "--max-batch-size / KERNELGEN_MAX_BATCH_SIZE" in result.stderr
