"""GenerateGroup: a network's kernels in one call, batched as single requests are; errors name the member."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kernelgen_server.errors import QueueFull
from kernelgen_server.repository.store import ModelRepository
from kernelgen_wire.metadata import REASON_TRAILER, RETRY_PUSHBACK_TRAILER
from kernelgen_wire.v1 import kernelgen_pb2 as pb
from kernelgen_wire.v1 import kernelgen_pb2_grpc as pb_grpc

from networks import MIXED_BASE, assert_close, import_group, mixed_network, reference_kernel, stack
from support import kernel_service, run_server

STACK_BASE = {"omega_0": 10.0, "L_cache": 7}


@pytest.fixture(scope="module")
def networks() -> dict[str, Any]:
    return {"stack": stack(depth=3, seed=11), "mixed": mixed_network(seed=12)}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, networks: dict[str, Any]) -> Path:
    """A repository with the groups ``stack`` (3 alike 2-D FiLM generators) and ``mixed``."""
    root = tmp_path_factory.mktemp("repo")
    work = tmp_path_factory.mktemp("checkpoints")
    import_group(networks["stack"], root, "stack", STACK_BASE, work)
    import_group(networks["mixed"], root, "mixed", MIXED_BASE, work)
    return root


def tensor(array: np.ndarray) -> pb.Tensor:
    return pb.Tensor(shape=array.shape, dtype=pb.DTYPE_FLOAT32, data=array.astype("<f4").tobytes())


def group_request(group: str, seq_lens: tuple[int, ...], rows: np.ndarray | None = None, **kw: Any) -> Any:
    request = pb.GenerateGroupRequest(group=group, seq_lens=seq_lens, **kw)
    if rows is not None:
        request.conditioning.CopyFrom(tensor(rows))
    return request


async def fetch(stub: Any, request: Any, **kwargs: Any) -> tuple[list[str], list[tuple[Any, np.ndarray]]]:
    """The members named by the header and each member's (KernelHeader, float32 array)."""
    members: list[str] = []
    headers: dict[int, Any] = {}
    buffers: dict[int, bytearray] = {}
    async for message in stub.GenerateGroup(request, **kwargs):
        if message.HasField("group"):
            assert not members, "a second group header"
            members = list(message.group.members)
        if message.HasField("chunk"):
            chunk = message.chunk
            if chunk.HasField("header"):
                headers[message.member] = chunk.header
                buffers[message.member] = bytearray(chunk.header.kernel_bytes)
            buffers[message.member][chunk.offset : chunk.offset + len(chunk.data)] = chunk.data
    assert sorted(headers) == list(range(len(members)))
    out = []
    for index in range(len(members)):
        header = headers[index]
        dtype = "<f4" if header.kernel_dtype in (0, pb.DTYPE_FLOAT32) else "<f2"
        out.append((header, np.frombuffer(bytes(buffers[index]), dtype).reshape(tuple(header.kernel_shape))))
    return members, out


@pytest.fixture
async def stub(repo: Path) -> AsyncIterator[Any]:
    async with run_server(model_repo=str(repo), max_queue_delay_ms=20) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.KernelGeneratorStub(channel)
            stub.server = server
            yield stub


async def test_a_groups_kernels_equal_each_generators_forward(stub: Any, networks: dict[str, Any]) -> None:
    rows = np.random.default_rng(0).standard_normal((2, 5)).astype(np.float32)
    members, kernels = await fetch(stub, group_request("stack", (4, 9), rows))
    assert members == ["stack/0", "stack/1", "stack/2"]
    server = stub.server
    generators = networks["stack"].generators()
    for name, (header, kernel), generator in zip(members, kernels, generators, strict=True):
        assert kernel.shape == (2, 7, 17, 6)
        assert header.report.content_hash == server.repository.get(name).content_hash
        assert header.representation == pb.REPRESENTATION_DENSE
        want = reference_kernel(generator, (4, 9), torch.from_numpy(rows))
        assert_close(torch.from_numpy(kernel.copy()), want)
    _, plain = await fetch(stub, group_request("stack", (3, 3)))
    for (_, kernel), generator in zip(plain, networks["stack"].generators(), strict=True):
        assert kernel.shape == (1, 5, 5, 6)
        assert_close(torch.from_numpy(kernel.copy()), reference_kernel(generator, (3, 3), None))
    _, again = await fetch(stub, group_request("stack", (3, 3)))
    assert all(header.report.cache_hit for header, _ in again)  # unconditioned members come from the cache


async def test_factored_and_reduced_precision_groups(stub: Any, networks: dict[str, Any]) -> None:
    rows = np.random.default_rng(1).standard_normal((3, 5)).astype(np.float32)
    request = group_request("stack", (5, 5), rows, representation=pb.REPRESENTATION_FACTORED)
    members, kernels = await fetch(stub, request)
    generators = networks["stack"].generators()
    for name, (header, factors), generator in zip(members, kernels, generators, strict=True):
        head = stub.server.repository.get(name).output_head
        assert header.representation == pb.REPRESENTATION_FACTORED
        assert header.head_hash == head.head_hash
        assert factors.shape == (3, 9, 9, 8)  # hidden 8, not out_dim 6
        dense = torch.from_numpy(factors.copy()) @ head.weight_t + head.bias
        assert_close(dense, reference_kernel(generator, (5, 5), torch.from_numpy(rows)))
    _, halves = await fetch(stub, group_request("stack", (5, 5), rows, dtype=pb.DTYPE_FLOAT16))
    assert all(header.kernel_dtype == pb.DTYPE_FLOAT16 for header, _ in halves)
    assert all(kernel.shape == (3, 9, 9, 6) for _, kernel in halves)


async def test_members_batch_with_each_other_calls_and_with_single_requests(repo: Path) -> None:
    rng = np.random.default_rng(2)
    service = kernel_service(ModelRepository.load(repo), max_queue_delay_ms=100, max_batch_size=64)
    try:
        calls = [
            service.generate_group("stack", (4, 4), rng.standard_normal((1, 5)).astype(np.float32), 0)
            for _ in range(4)
        ]
        single = service.generate("stack/1", (4, 4), rng.standard_normal((2, 5)).astype(np.float32), 0, False)
        *groups, alone = await asyncio.gather(*calls, single)
    finally:
        await service.close()
    for result in groups:
        reports = [kernel.report for kernel in result.kernels]
        assert [r.content_hash for r in reports] == [
            service.repository.get(f"stack/{i}").content_hash for i in range(3)
        ]
        assert [r.batch_requests for r in reports] == [4, 5, 4]  # one bucket per member
        assert [r.batch_size for r in reports] == [4, 6, 4]
    assert (alone.report.batch_requests, alone.report.batch_size) == (5, 6)
    batches = service.metrics.registry.get_sample_value("kernelgen_batches_total", {"model": "stack/1"})
    assert batches == 1


async def test_a_failing_member_fails_the_call_naming_it_and_cancels_the_others(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = kernel_service(ModelRepository.load(repo))
    cancelled: list[str] = []

    async def submit(key: Any, item: Any, *, deadline: float | None = None) -> Any:
        if key[0] == "stack/1":
            await asyncio.sleep(0.01)
            raise QueueFull("the batch queue is full (test)")
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(key[0])
            raise
        raise AssertionError("not cancelled")

    monkeypatch.setattr(service.submitter, "submit", submit)
    try:
        with pytest.raises(QueueFull) as caught:
            await service.generate_group("stack", (3, 3), np.ones((1, 5), np.float32), 0)
    finally:
        await service.close()
    assert caught.value.message == "group 'stack', member 'stack/1': the batch queue is full (test)"
    assert caught.value.retry_pushback_ms == 50
    assert sorted(cancelled) == ["stack/0", "stack/2"]


async def status_of(stub: Any, request: Any) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await fetch(stub, request)
    error = caught.value
    trailers = {k: v for k, v in (error.trailing_metadata() or ()) if isinstance(v, str)}
    return error.code(), error.details() or "", trailers


@pytest.mark.parametrize(
    ("request_args", "code", "reason", "message"),
    [
        (
            ("mixed", (5,)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "invalid-argument",
            "group 'mixed', member 'mixed/1': model 'mixed/1' is 2-D: seq_lens needs 2 entries, got 1",
        ),
        (
            ("stack", (3, 3), np.ones((1, 4), np.float32)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "invalid-argument",
            "group 'stack', member 'stack/0': model 'stack/0' takes conditioning of width 5, got 4",
        ),
        (("nothing", (3,)), grpc.StatusCode.NOT_FOUND, "model-not-found", "unknown group 'nothing'"),
        (
            ("stack/0", (3, 3)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "model-not-group",
            "'stack/0' is a model, not a group",
        ),
        (("", (3,)), grpc.StatusCode.INVALID_ARGUMENT, "invalid-argument", "group name is empty"),
    ],
    ids=["axes", "width", "unknown", "a-model", "empty"],
)
async def test_refusals_are_statuses_naming_the_member(
    stub: Any, request_args: tuple[Any, ...], code: grpc.StatusCode, reason: str, message: str
) -> None:
    got, details, trailers = await status_of(stub, group_request(*request_args))
    assert (got, trailers[REASON_TRAILER]) == (code, reason)
    assert message in details


async def test_conditioning_for_a_member_without_film_names_it(tmp_path: Path, repo: Path) -> None:
    from kernelgen_server.errors import ConditioningNotSupported

    for member in ("0", "3"):  # the mixed network's 1-D generators: with FiLM, and without
        shutil.copytree(repo / "mixed" / member, tmp_path / "pair" / member)
    (tmp_path / "pair" / "group.json").write_text('{"members": [{"name": "0"}, {"name": "3"}]}')
    service = kernel_service(ModelRepository.load(tmp_path))
    try:
        assert len((await service.generate_group("pair", (3,), None, 0)).kernels) == 2
        with pytest.raises(ConditioningNotSupported) as caught:
            await service.generate_group("pair", (3,), np.ones((1, 5), np.float32), 0)
    finally:
        await service.close()
    assert caught.value.message == (
        "group 'pair', member 'pair/3': model 'pair/3' has no FiLM generator and takes no conditioning; "
        "omit it"
    )


async def test_a_member_that_failed_to_load_names_it(tmp_path: Path, repo: Path) -> None:
    shutil.copytree(repo / "stack", tmp_path / "stack")
    (tmp_path / "stack" / "2" / "model.safetensors").unlink()
    async with run_server(model_repo=str(tmp_path)) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.KernelGeneratorStub(channel)
            code, details, trailers = await status_of(stub, group_request("stack", (3, 3)))
            assert code == grpc.StatusCode.FAILED_PRECONDITION
            assert trailers[REASON_TRAILER] == "model-not-ready"
            assert details.startswith(
                "group 'stack', member 'stack/2': model 'stack/2' is not ready: it failed to load: "
            )
            assert "model.safetensors" in details  # why it failed, not only that it did
            health = health_pb2_grpc.HealthStub(channel)
            status = await health.Check(health_pb2.HealthCheckRequest(service="stack"))
            assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING


async def test_a_group_over_the_kernel_limit_is_refused_before_any_work(repo: Path) -> None:
    # Each member's kernel (9 * 9 * 6 * 4 = 1944 bytes) fits; the three together do not.
    limits = {"max_kernel_bytes": 4000, "max_message_bytes": 4000, "stream_chunk_bytes": 1024}
    async with run_server(model_repo=str(repo), **limits) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.KernelGeneratorStub(channel)
            code, details, trailers = await status_of(stub, group_request("stack", (5, 5)))
            assert (code, trailers[REASON_TRAILER]) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "too-large")
            assert trailers[RETRY_PUSHBACK_TRAILER] == "-1"
            assert details == (
                "the 3 kernels of group 'stack' together would be 5832 bytes, over the server's limit of "
                "4000 bytes (set by --max-kernel-bytes)"
            )
            _, kernels = await fetch(stub, group_request("stack", (3, 3)))  # 3 x 600 bytes: served
            assert len(kernels) == 3
        registry = server.service.metrics.registry
        served = {"model": "stack/0", "representation": "dense"}
        assert registry.get_sample_value("kernelgen_kernels_served_total", served) == 1
        calls = {"model": "stack", "method": "GenerateGroup"}
        assert registry.get_sample_value("kernelgen_requests_total", {**calls, "code": "OK"}) == 1
        refused = {**calls, "code": "RESOURCE_EXHAUSTED"}
        assert registry.get_sample_value("kernelgen_requests_total", refused) == 1


async def test_a_large_group_streams_in_chunks(repo: Path, networks: dict[str, Any]) -> None:
    async with run_server(model_repo=str(repo), max_message_bytes=65536, stream_chunk_bytes=32768) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.KernelGeneratorStub(channel)
            rows = np.random.default_rng(4).standard_normal((4, 5)).astype(np.float32)
            count = 0
            async for message in stub.GenerateGroup(group_request("stack", (20, 20), rows)):
                count += 1
                assert message.ByteSize() <= 32768 + 64
            _, kernels = await fetch(stub, group_request("stack", (20, 20), rows))
    assert count > 3 * (4 * 39 * 39 * 6 * 4) // 32768
    for (_, kernel), generator in zip(kernels, networks["stack"].generators(), strict=True):
        want = reference_kernel(generator, (20, 20), torch.from_numpy(rows))
        assert_close(torch.from_numpy(kernel.copy()), want)


async def test_models_list_their_group_and_the_group_is_healthy(stub: Any) -> None:
    reply = await stub.ListModels(pb.ListModelsRequest())
    names = [m.name for m in reply.models]
    assert names == [*(f"mixed/{i}" for i in range(4)), *(f"stack/{i}" for i in range(3))]
    member = next(m for m in reply.models if m.name == "mixed/2")
    assert (member.group, member.group_index, member.source) == ("mixed", 2, "blocks.2.filter.kernel")
    info = await stub.GetModel(pb.GetModelRequest(model="stack/1"))
    assert (info.group, info.group_index, info.source) == ("stack", 1, "blocks.1.filter.kernel")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetModel(pb.GetModelRequest(model="stack"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(caught.value.trailing_metadata() or ())[REASON_TRAILER] == "group-not-model"
    details = caught.value.details() or ""
    assert "'stack' is a group of 3 models (stack/0 .. stack/2), not a model" in details
    async with grpc.aio.insecure_channel(f"127.0.0.1:{stub.server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("stack", "mixed", "stack/2"):
            status = await health.Check(health_pb2.HealthCheckRequest(service=name))
            assert status.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_draining_server_refuses_groups(repo: Path) -> None:
    service = kernel_service(ModelRepository.load(repo))
    await service.close()
    from kernelgen_server.errors import ServerDraining

    with pytest.raises(ServerDraining):
        await service.generate_group("stack", (3, 3), None, 0)


async def test_a_group_holds_its_bytes_in_the_in_flight_budget_until_sent(repo: Path) -> None:
    from kernelgen_server.errors import MemoryFull

    service = kernel_service(ModelRepository.load(repo))
    try:
        result = await service.generate_group("stack", (5, 5), np.ones((2, 5), np.float32), 0)
        assert result.reservation is not None
        assert service.budget.used == result.reservation.nbytes == 3 * 2 * 81 * 6 * 4  # the kernels' bytes
        result.release()
        assert service.budget.used == 0
        held = service.budget.reserve(service.budget.limit - 1000)  # the server is nearly full
        with pytest.raises(MemoryFull, match="the 3 kernels of group 'stack' needs 5832 more"):
            await service.generate_group("stack", (5, 5), np.ones((1, 5), np.float32), 0)
        held.release()
        failing = service.generate_group("stack", (5, 5), np.ones((1, 5), np.float32), 0, deadline=0.0)
        with pytest.raises(Exception, match="deadline"):
            await failing
        assert service.budget.used == 0  # a refused or failed group holds nothing
    finally:
        await service.close()


async def test_the_servicer_returns_a_groups_bytes_when_the_call_ends(stub: Any) -> None:
    await fetch(stub, group_request("stack", (4, 4), np.ones((3, 5), np.float32)))
    for _ in range(50):
        if stub.server.service.budget.used == 0:
            break
        await asyncio.sleep(0.01)
    assert stub.server.service.budget.used == 0
