"""Clients that open huge streams and stop reading: the server's memory stays within its budget.

``kernelgen serve`` runs as a process of its own so that its resident memory
(RSS, from /proc) is measured, not estimated. Four clients each ask for a
614 MB kernel (more than ten times the server's 48 MiB in-flight budget),
take two messages and stall; a fifth is refused (RESOURCE_EXHAUSTED,
memory-full); the server's RSS stays within the budget of its idle size; once
the send timeout passes the stalled streams are given up, and the memory and
the budget come back.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from kernelgen_wire.metadata import REASON_TRAILER
from kernelgen_wire.rpc import method_path
from kernelgen_wire.v1 import kernelgen_pb2 as pb

from support import serve_process

MiB = 1 << 20
BUDGET = 48 * MiB
#: long-1d [300000]: 599,999 points x 256 x 4 bytes = 614 MB, over ten budgets.
HUGE = pb.GenerateKernelRequest(model="long-1d", seq_lens=[300000]).SerializeToString()


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def stream(channel: grpc.Channel) -> Any:
    path = method_path("StreamKernel")
    return channel.unary_stream(path, request_serializer=None, response_deserializer=None)


def test_stalled_readers_hold_no_more_than_the_budget() -> None:
    args = ["--max-inflight-bytes", str(BUDGET), "--stream-tile-bytes", str(4 * MiB)]
    args += ["--stream-send-timeout-s", "4", "--cache-bytes", str(64 * MiB)]
    with serve_process(*args) as proc:
        pid = proc.proc.pid
        channels = [grpc.insecure_channel(proc.target) for _ in range(5)]
        try:
            # Warm: one small stream read to its end, so the baseline includes gRPC's own buffers.
            warm = pb.GenerateKernelRequest(model="long-1d", seq_lens=[20000]).SerializeToString()
            assert sum(1 for _ in stream(channels[0])(warm, timeout=60)) > 1
            baseline = rss(pid)

            stalled = []
            for channel in channels[:4]:
                call = stream(channel)(HUGE, timeout=120)
                next(call), next(call)  # the header and one chunk, then nothing more
                stalled.append(call)

            with pytest.raises(grpc.RpcError) as refused:
                next(stream(channels[4])(HUGE, timeout=30))
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
            reason = dict(refused.value.trailing_metadata() or ())[REASON_TRAILER]  # type: ignore[attr-defined]
            assert reason == "memory-full"

            peak = baseline
            deadline = time.monotonic() + 2.5
            while time.monotonic() < deadline:
                peak = max(peak, rss(pid))
                time.sleep(0.05)
            # The budget, plus what gRPC buffers per stalled stream and allocator slack.
            assert peak - baseline <= BUDGET + 64 * MiB, f"RSS grew {(peak - baseline) / MiB:.0f} MiB"

            # Past the send timeout the streams are given up: their readers learn it...
            time.sleep(3.0)
            for call in stalled:
                with pytest.raises(grpc.RpcError) as ended:
                    for _ in call:
                        pass
                assert ended.value.code() in (  # type: ignore[attr-defined]
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    grpc.StatusCode.CANCELLED,
                )
            # ...and the budget is whole again: a huge stream is accepted and read to its end.
            chunks = sum(1 for _ in stream(channels[4])(HUGE, timeout=300))
            assert chunks > 500
            assert rss(pid) - baseline <= BUDGET + 64 * MiB
        finally:
            for channel in channels:
                channel.close()
