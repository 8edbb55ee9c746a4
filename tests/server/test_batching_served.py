"""Dynamic batching through the service: batched results equal unbatched ones."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import numpy as np
import torch

from kernelgen_wire.v1 import kernelgen_pb2 as pb
from kernelgen_wire.v1 import kernelgen_pb2_grpc as pb_grpc

from support import generate, run_server


def request(
    cond: np.ndarray, lens: tuple[int, ...], dtype: int = pb.DTYPE_FLOAT32
) -> pb.GenerateKernelRequest:
    tensor = pb.Tensor(shape=cond.shape, dtype=pb.DTYPE_FLOAT32, data=cond.astype("<f4").tobytes())
    return pb.GenerateKernelRequest(model="hyena-2d", seq_lens=lens, conditioning=tensor, dtype=dtype)


async def test_64_concurrent_mixed_requests_equal_their_unbatched_reference() -> None:
    rng = np.random.default_rng(7)
    shapes = [(15, 15), (9, 12)]
    conds = [rng.standard_normal((int(rng.integers(1, 4)), 384)).astype(np.float32) for _ in range(64)]
    lens = [shapes[i % 2] for i in range(64)]
    async with run_server(max_batch_size=32, max_queue_delay_ms=20) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.KernelGeneratorStub(channel)
            results = await asyncio.gather(
                *(generate(stub, request(c, s)) for c, s in zip(conds, lens, strict=True))
            )
        engine = server.service._engines["hyena-2d"]
        module = server.repository.ready["hyena-2d"].module
        replies = [reply for reply, _ in results]
        reports = [report for _, report in results]
        for cond, shape, reply in zip(conds, lens, replies, strict=True):
            kernel = np.frombuffer(reply.kernel.data, "<f4").reshape(tuple(reply.kernel.shape))
            assert kernel.shape == (cond.shape[0], 2 * shape[0] - 1, 2 * shape[1] - 1, 384)
            alone = engine.conditioned(shape, [torch.from_numpy(cond)], torch.float32).numpy()
            if engine.batched:  # batched GEMMs (the CUDA default): equal to float32 rounding
                assert np.abs(kernel - alone).max() <= 1e-5 * np.abs(alone).max()
            else:  # the same request computed alone by the same engine: bitwise equal
                np.testing.assert_array_equal(kernel, alone)
            with torch.no_grad():
                want = module(shape, torch.from_numpy(cond))[0].numpy()
            assert np.abs(kernel - want).max() <= 1e-5 * np.abs(want).max()
    sizes = [r.batch_requests for r in reports]
    assert max(sizes) > 1, sizes
    assert all(r.batch_size >= k.kernel.shape[0] for r, k in zip(reports, replies, strict=True))
    assert all(r.batch_size <= 32 or r.batch_requests == 1 for r in reports)
    registry = server.service.metrics.registry
    batches = registry.get_sample_value("kernelgen_batches_total", {"model": "hyena-2d"})
    assert batches is not None
    assert batches < 64  # fewer batches than requests: they were grouped


async def test_batching_off_runs_each_request_alone() -> None:
    rng = np.random.default_rng(3)
    async with run_server(max_batch_size=1, max_queue_delay_ms=20) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.KernelGeneratorStub(channel)
            conds = [rng.standard_normal((1, 384)).astype(np.float32) for _ in range(12)]
            results = await asyncio.gather(*(generate(stub, request(c, (6, 6))) for c in conds))
    assert {(r.batch_size, r.batch_requests) for _, r in results} == {(1, 1)}


async def test_dtypes_are_separate_buckets(server: Any) -> None:
    rng = np.random.default_rng(5)
    cond = rng.standard_normal((2, 384)).astype(np.float32)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.KernelGeneratorStub(channel)
        f32, f16 = await asyncio.gather(
            stub.GenerateKernel(request(cond, (5, 5))),
            stub.GenerateKernel(request(cond, (5, 5), pb.DTYPE_FLOAT16)),
        )
    full = np.frombuffer(f32.kernel.data, "<f4")
    half = np.frombuffer(f16.kernel.data, "<f2")
    np.testing.assert_array_equal(half, full.astype(np.float16))


async def test_batched_gemm_mode_stays_within_float32_rounding() -> None:
    rng = np.random.default_rng(11)
    conds = [rng.standard_normal((int(rng.integers(1, 4)), 384)).astype(np.float32) for _ in range(12)]
    async with run_server(batched_gemm="true", max_batch_size=16) as server:
        assert server.service._engines["hyena-2d"].batched
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.KernelGeneratorStub(channel)
            results = await asyncio.gather(*(generate(stub, request(c, (7, 9))) for c in conds))
        module = server.repository.ready["hyena-2d"].module
    for cond, (reply, _) in zip(conds, results, strict=True):
        kernel = np.frombuffer(reply.kernel.data, "<f4").reshape(tuple(reply.kernel.shape))
        with torch.no_grad():
            want = module((7, 9), torch.from_numpy(cond))[0].numpy()
        assert np.abs(kernel - want).max() <= 1e-5 * np.abs(want).max()
