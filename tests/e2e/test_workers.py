"""``kernelgen serve --workers 2``: two real server processes behind one port.

Connections spread over the workers and every kernel equals the model's; the
supervisor's /metrics sums both workers; the client and the load tester reach
both over several connections; a killed worker is restarted while the other
keeps serving; SIGTERM drains both and exits 0.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from kernelgen_client import KernelClient
from kernelgen_client.cli import main as cli_main
from kernelgen_server.repository.store import ModelRepository
from kernelgen_wire.metadata import REPORT_TRAILER
from kernelgen_wire.v1 import kernelgen_pb2 as pb
from kernelgen_wire.v1 import kernelgen_pb2_grpc as pb_grpc

from support import ServeProcess, assert_same_kernel, free_port, serve_process

pytestmark = pytest.mark.slow

LENS = (6, 5)


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


def call(target: str, cond: np.ndarray) -> tuple[np.ndarray, pb.ServerReport]:
    """One conditioned call on a connection of its own (no subchannel shared across channels)."""
    with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        stub = pb_grpc.KernelGeneratorStub(channel)
        tensor = pb.Tensor(shape=list(cond.shape), dtype=pb.DTYPE_FLOAT32, data=cond.tobytes())
        reply, rpc = stub.GenerateKernel.with_call(
            pb.GenerateKernelRequest(model="hyena-2d", seq_lens=LENS, conditioning=tensor), timeout=30
        )
    report = pb.ServerReport.FromString(dict(rpc.trailing_metadata())[REPORT_TRAILER])
    kernel = np.frombuffer(reply.kernel.data, "<f4").reshape(tuple(reply.kernel.shape))
    return kernel, report


def wait_until(condition: Callable[[], bool], timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[ServeProcess, int]]:
    port = free_port()
    with serve_process("--workers", "2", "--metrics-port", str(port), "--max-queue-delay-ms", "0") as proc:
        yield proc, port


def test_two_workers_share_the_port_and_serve_the_models_kernels(
    served: tuple[ServeProcess, int], embedded_models: ModelRepository
) -> None:
    proc, metrics_port = served
    assert "(2 workers)" in "".join(proc.output)
    module = embedded_models.ready["hyena-2d"].module
    rng = np.random.default_rng(3)
    seen: set[int] = set()
    calls = 0
    # Linux hashes each new connection to one of the two listeners: 40 connections all
    # landing on one worker has probability 2^-39.
    while calls < 40 and (calls < 8 or len(seen) < 2):
        cond = rng.standard_normal((2, 384)).astype("<f4")
        kernel, report = call(proc.target, cond)
        with torch.no_grad():
            want, _ = module(LENS, torch.from_numpy(cond))
        assert_same_kernel(kernel, want.numpy(), bitwise=False)
        seen.add(report.worker)
        calls += 1
    assert seen == {0, 1}

    values = metrics(metrics_port)
    ok = (("code", "OK"), ("method", "GenerateKernel"), ("model", "hyena-2d"))
    assert values[("kernelgen_requests_total", ok)] == calls  # both workers' counts, summed
    assert values[("kernelgen_workers", ())] == 2
    assert values[("kernelgen_model_ready", (("model", "hyena-2d"),))] == 1
    assert values[("kernelgen_inflight_requests", ())] == 0


def test_a_client_reaches_every_worker_only_over_several_connections(
    served: tuple[ServeProcess, int],
) -> None:
    proc, _ = served
    rows = np.random.default_rng(5).standard_normal((1, 384)).astype(np.float32)
    with KernelClient(proc.target, timeout=30) as one:
        seen = {one.generate("hyena-2d", LENS, rows, with_report=True).report.worker for _ in range(12)}
    assert len(seen) == 1  # one channel, one connection, one worker
    with KernelClient(proc.target, timeout=30, connections=32) as many:
        many.wait_ready(30)
        seen = {many.generate("hyena-2d", LENS, rows, with_report=True).report.worker for _ in range(32)}
    assert seen == {0, 1}  # all 32 connections on one worker: probability 2^-31


def test_loadtest_connections_spread_over_the_workers(
    served: tuple[ServeProcess, int], tmp_path: Path
) -> None:
    proc, _ = served
    out = tmp_path / "workers.json"
    argv = ["loadtest", "hyena-2d", "--seq-lens", "6,5", "--target", proc.target, "--concurrency", "8"]
    argv += ["--requests", "64", "--warmup", "0.2", "--connections", "32", "--quiet", "--json", str(out)]
    assert cli_main(argv) == 0
    document = json.loads(out.read_text())
    assert document["settings"]["connections"] == 32
    by_worker = document["steps"][0]["server"]["responses_by_worker"]
    assert set(by_worker) == {"0", "1"}
    assert sum(by_worker.values()) == document["steps"][0]["ok"]


def test_a_killed_worker_is_restarted_and_the_other_keeps_serving(served: tuple[ServeProcess, int]) -> None:
    proc, metrics_port = served
    before = children(proc.proc.pid)
    assert len(before) == 2
    os.kill(before[0], 9)
    # Reaped by the supervisor: all its threads are gone, and with them its listening socket
    # (a connection that reached it before that is reset, as on any killed server).
    wait_until(lambda: before[0] not in children(proc.proc.pid))
    cond = np.random.default_rng(4).standard_normal((1, 384)).astype("<f4")
    kernel, _ = call(proc.target, cond)  # served by the survivor meanwhile
    assert kernel.shape == (1, 11, 9, 384)
    wait_until(lambda: metrics(metrics_port).get(("kernelgen_worker_restarts_total", ())) == 1)
    wait_until(lambda: len(children(proc.proc.pid)) == 2)
    after = children(proc.proc.pid)
    assert before[1] in after
    assert before[0] not in after
    wait_until(lambda: metrics(metrics_port)[("kernelgen_workers", ())] == 2)
    seen = {call(proc.target, cond)[1].worker for _ in range(40)}
    assert seen == {0, 1}  # the restarted worker took its index back


def test_sigterm_drains_every_worker_and_exits_zero(served: tuple[ServeProcess, int]) -> None:
    proc, metrics_port = served
    wait_until(lambda: metrics(metrics_port)[("kernelgen_workers", ())] == 2)
    workers = children(proc.proc.pid)
    assert proc.terminate() == 0
    for pid in workers:
        assert not os.path.exists(f"/proc/{pid}") or _is_zombie(pid)
    output = "".join(proc.output)
    assert "[worker 0]: stopped" in output
    assert "[worker 1]: stopped" in output


def _is_zombie(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "Z"
