"""The server under hostile load: every bad byte a clean status, bounded memory, no head-of-line blocking.

One test (or more) per way a hostile or careless client was seen to hurt the
server: undecodable bytes (fuzzed), unknown enum values, huge model names,
hostile configs, streams that outgrow memory, small requests behind large
ones, idle and excess connections, and ordinary cancellations.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernelgen_server.core.device_queue import BULK, INTERACTIVE, DeviceQueue
from kernelgen_server.core.inflight import InflightBudget
from kernelgen_server.errors import KernelTooLarge, MemoryFull
from kernelgen_server.model.config import ConfigError, ModelConfig
from kernelgen_server.repository.store import ModelRepository
from kernelgen_server.transport.native_codec import stream_messages
from kernelgen_wire.metadata import REASON_TRAILER
from kernelgen_wire.rpc import method_path
from kernelgen_wire.v1 import kernelgen_pb2 as pb

from support import kernel_service, run_server, threaded_server

RAW = {"request_serializer": None, "response_deserializer": None}
#: Every method and a valid request of it, the seeds of the mutated ones.
SEEDS: dict[str, bytes] = {
    "GenerateKernel": pb.GenerateKernelRequest(
        model="hyena-2d",
        seq_lens=[3, 3],
        conditioning=pb.Tensor(shape=[1, 384], dtype=pb.DTYPE_FLOAT32, data=bytes(384 * 4)),
    ).SerializeToString(),
    "StreamKernel": pb.GenerateKernelRequest(model="long-1d", seq_lens=[300]).SerializeToString(),
    "FlopCount": pb.FlopCountRequest(model="volume-3d", seq_lens=[2, 2, 2]).SerializeToString(),
    "ListModels": pb.ListModelsRequest().SerializeToString(),
    "GetModel": pb.GetModelRequest(model="hyena-2d").SerializeToString(),
    "GetOutputHead": pb.GetOutputHeadRequest(model="long-1d").SerializeToString(),
}
#: What a bad or odd request may get; never UNKNOWN or INTERNAL.
EXPECTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def status_of(channel: grpc.Channel, method: str, data: bytes, timeout: float = 20.0) -> grpc.StatusCode:
    """The status a raw call gets; a stream is read to its first message, then let go."""
    path = method_path(method)
    try:
        if method == "StreamKernel":
            call = channel.unary_stream(path, **RAW)(data, timeout=timeout)
            next(iter(call), None)
            call.cancel()
            return call.code() if call.code() != grpc.StatusCode.CANCELLED else grpc.StatusCode.OK
        channel.unary_unary(path, **RAW)(data, timeout=timeout)
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


@pytest.fixture(scope="module")
def threaded() -> Iterator[Any]:
    with threaded_server() as running:
        yield running


@pytest.fixture(scope="module")
def channel(threaded: Any) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{threaded.port}") as open_channel:
        yield open_channel


def mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    """Apply (kind, position, byte) edits: 0 flips a byte, 1 inserts one, 2 cuts the tail."""
    out = bytearray(data)
    for kind, position, value in edits:
        if not out:
            out.append(value)
            continue
        at = position % len(out)
        if kind == 0:
            out[at] ^= value or 1
        elif kind == 1:
            out.insert(at, value)
        else:
            del out[at:]
    return bytes(out)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    method=st.sampled_from(sorted(SEEDS)),
    data=st.one_of(
        st.binary(max_size=64),
        st.lists(st.tuples(st.integers(0, 2), st.integers(0, 4096), st.integers(0, 255)), max_size=4),
    ),
)
def test_fuzzed_bytes_get_only_the_expected_statuses(channel: grpc.Channel, method: str, data: Any) -> None:
    request = data if isinstance(data, bytes) else mutate(SEEDS[method], data)
    assert status_of(channel, method, request) in EXPECTED


def test_the_server_is_healthy_after_the_fuzzing(channel: grpc.Channel, threaded: Any) -> None:
    for method, seed in SEEDS.items():
        assert status_of(channel, method, seed) == grpc.StatusCode.OK, method
    registry = threaded.service.metrics.registry
    codes = {
        sample.labels["code"]
        for metric in registry.collect()
        if metric.name == "kernelgen_requests"
        for sample in metric.samples
    }
    assert not codes & {"INTERNAL", "UNKNOWN"}
    assert threaded.service.budget.used == 0  # every reservation came back


async def test_undecodable_bytes_are_invalid_counted_and_logged_once_without_a_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with run_server() as server, grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await channel.unary_unary(method_path("GenerateKernel"), **RAW)(b"\xff\xff\xff\xff")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid kernelgen.v1.GenerateKernelRequest" in (err.value.details() or "")
        assert len(err.value.details() or "") < 200
        trailers = dict(err.value.trailing_metadata() or ())
        assert trailers[REASON_TRAILER] == "invalid-argument"
        records = [r for r in caplog.records if r.name.startswith("kernelgen")]
        assert len(records) == 1 and records[0].levelno == logging.WARNING and records[0].exc_info is None
        labels = {"model": "", "method": "GenerateKernel", "code": "INVALID_ARGUMENT"}
        assert server.service.metrics.registry.get_sample_value("kernelgen_requests_total", labels) == 1


async def test_undecodable_bytes_are_refused_after_authentication(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("secret\n")
    async with run_server(auth_token_file=str(tokens)) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            call = channel.unary_unary(method_path("GenerateKernel"), **RAW)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call(b"\xff\xff")
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED  # not decoded before auth
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call(b"\xff\xff", metadata=(("authorization", "Bearer secret"),))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("dtype", [99, -5, 3])
@pytest.mark.parametrize("method", ["GenerateKernel", "StreamKernel"])
def test_unknown_enum_values_are_invalid(channel: grpc.Channel, method: str, dtype: int) -> None:
    cond = pb.Tensor(shape=[1, 384], data=bytes(384 * 4))
    cond.dtype = dtype  # type: ignore[assignment]
    requests = [
        pb.GenerateKernelRequest(model="hyena-2d", seq_lens=[3, 3], conditioning=cond),
        pb.GenerateKernelRequest(model="hyena-2d", seq_lens=[3, 3], dtype=dtype + 10),  # type: ignore[arg-type]
        pb.GenerateKernelRequest(model="hyena-2d", seq_lens=[3, 3], representation=dtype + 10),  # type: ignore[arg-type]
    ]
    for request in requests:
        assert status_of(channel, method, request.SerializeToString()) == grpc.StatusCode.INVALID_ARGUMENT


def test_an_oversized_model_name_is_invalid_and_cut_short(
    channel: grpc.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    name = "x" * 1_600_000
    for method, request in (
        ("GenerateKernel", pb.GenerateKernelRequest(model=name, seq_lens=[3])),
        ("GetModel", pb.GetModelRequest(model=name)),
        ("FlopCount", pb.FlopCountRequest(model=name, seq_lens=[3])),
    ):
        caplog.clear()
        with pytest.raises(grpc.RpcError) as err:
            channel.unary_unary(method_path(method), **RAW)(request.SerializeToString(), timeout=20)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        assert "1600000 characters" in err.value.details()  # type: ignore[attr-defined]
        assert len(err.value.details()) < 300  # type: ignore[attr-defined]
        assert len(caplog.text) < 2000  # logged once, cut short


# -- configs ---------------------------------------------------------------------------------------

EMBEDDED = Path(__file__).resolve().parents[2] / "src" / "kernelgen_server" / "models"
HYENA = json.loads((EMBEDDED / "hyena-2d" / "config.json").read_text())


@pytest.mark.parametrize(
    ("key", "value"),
    [("num_layers", 20000), ("data_dim", 300000), ("data_dim", 100), ("mlp_hidden_dim", 10**9),
     ("L_cache", [5] * 100_000), ("L_cache", 10**15), ("film", {"cond_dim": 10**8})],
)  # fmt: skip
def test_a_hostile_config_is_refused_at_once_with_a_short_message(key: str, value: Any) -> None:
    started = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_dict({**HYENA, key: value}, "models/x/config.json")
    assert time.perf_counter() - started < 2.0  # nothing was built (seconds before the bounds)
    message = str(err.value)
    assert message.startswith("models/x/config.json:") and key in message
    assert len(message) < 400


def test_listing_never_fails_because_of_one_model(tmp_path: Path) -> None:
    for name in ("huge-a", "huge-b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({**HYENA, "num_layers": 40000}))
    long_reason = tmp_path / "weird"
    long_reason.mkdir()
    (long_reason / "config.json").write_text(json.dumps({**HYENA, "junk" * 5000: 1}))
    repository = ModelRepository.load(tmp_path)
    assert len(repository.failed) == 3
    from kernelgen_server.transport.model_info import MAX_REASON_CHARS, model_info

    infos = model_info(repository)
    assert all(not info.ready and len(info.reason) <= MAX_REASON_CHARS + 20 for info in infos)
    assert sum(info.ByteSize() for info in infos) < 8 * (MAX_REASON_CHARS + 200)


# -- memory and fairness -----------------------------------------------------------------------------


def test_the_in_flight_budget_refuses_instead_of_growing() -> None:
    seen: list[int] = []
    budget = InflightBudget(100, observe=seen.append)
    first = budget.reserve(60)
    with pytest.raises(MemoryFull) as full:
        budget.reserve(50)
    assert full.value.retry_pushback_ms and full.value.retry_pushback_ms > 0
    with pytest.raises(KernelTooLarge):
        budget.reserve(101)  # could never fit: not retryable
    first.release()
    first.release()  # once only
    assert budget.used == 0
    budget.reserve(100).release()
    assert seen == [60, 0, 100, 0]


async def test_interactive_work_runs_before_queued_bulk_slices() -> None:
    queue = DeviceQueue("test-device")
    order: list[str] = []
    gate = threading.Event()
    try:
        blocker = queue.submit(gate.wait, BULK)
        bulk = [queue.submit(lambda i=i: order.append(f"tile{i}"), BULK) for i in range(3)]
        small = [queue.submit(lambda i=i: order.append(f"small{i}"), INTERACTIVE) for i in range(2)]
        gate.set()
        await asyncio.gather(blocker, *bulk, *small)
        assert order == ["small0", "small1", "tile0", "tile1", "tile2"]
        gate.clear()
        blocker = queue.submit(gate.wait, BULK)
        skipped = queue.submit(lambda: order.append("never"), BULK)
        skipped.cancel()  # its caller went away before it started: it never runs
        await asyncio.sleep(0.01)  # the cancellation reaches the queue on the loop's next turn
        gate.set()
        await blocker
    finally:
        queue.shutdown()
    assert "never" not in order


async def test_small_requests_are_answered_while_a_large_kernel_streams(embedded_models: Any) -> None:
    """A tiled stream read slowly does not hold back small conditioned requests (no head-of-line)."""
    service = kernel_service(embedded_models, stream_tile_bytes=1 << 20, cache_bytes=16 << 20)
    rows = np.random.default_rng(0).standard_normal((8, 384)).astype(np.float32)
    try:
        stream = await service.open_stream("long-1d", [60000], None, pb.DTYPE_FLOAT32, False)
        messages = stream_messages(stream, 1 << 20)
        await anext(messages)  # the header: the first tile is computed
        answered = []
        for row in rows:  # one small request per tile the stream takes
            await anext(messages)
            small = await asyncio.wait_for(
                service.generate("hyena-2d", [5, 5], row[None], pb.DTYPE_FLOAT32, False), timeout=30
            )
            answered.append(small)
        assert len(answered) == 8
        # The stream is still far from done: small requests did not wait for it.
        remaining = [m async for m in messages]
        assert len(remaining) > 100
        stream.close()
        assert service.budget.used == sum(r.reservation.nbytes for r in answered if r.reservation)
    finally:
        await service.close()


async def test_a_tiled_stream_holds_two_tiles_and_equals_the_whole_kernel(embedded_models: Any) -> None:
    service = kernel_service(embedded_models, stream_tile_bytes=1 << 20, cache_bytes=16 << 20)
    try:
        plan = service.plan("hyena-2d", [60, 60], np.ones((2, 384), np.float32), pb.DTYPE_FLOAT32, True)
        assert service.tiled(plan)
        stream = await service.open_stream(
            "hyena-2d", [60, 60], np.ones((2, 384), np.float32), pb.DTYPE_FLOAT32, True
        )
        assert stream.reservation is not None
        assert stream.reservation.nbytes == 2 * (1 << 20) + 2 * int(service.settings.stream_chunk_bytes)
        messages = [pb.KernelChunk.FromString(m) async for m in stream_messages(stream, 256 << 10)]
        stream.close()
        header = messages[0].header
        payload = bytearray(header.kernel_bytes + header.grid_bytes)
        for m in messages[1:]:
            payload[m.offset : m.offset + len(m.data)] = m.data
        kernel = np.frombuffer(payload[: header.kernel_bytes], "<f4").reshape(tuple(header.kernel_shape))
        whole = await service.generate(
            "hyena-2d", [60, 60], np.ones((2, 384), np.float32), pb.DTYPE_FLOAT32, True
        )
        want = np.frombuffer(whole.kernel.payload.data, "<f4").reshape(whole.kernel.payload.shape)
        assert np.abs(kernel - want).max() <= 1e-5 * np.abs(want).max()
        grid = np.frombuffer(payload[header.kernel_bytes :], "<f4")
        assert grid.tobytes() == bytes(whole.grid.data)  # coordinates gathered bit for bit
        assert service.budget.used == whole.reservation.nbytes
    finally:
        await service.close()


# -- connections and cancellations ---------------------------------------------------------------------


async def test_idle_connections_are_closed() -> None:
    async with run_server(max_connection_idle_s=0.5) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            await channel.unary_unary(method_path("ListModels"), **RAW)(b"")
            assert channel.get_state() == grpc.ChannelConnectivity.READY
            for _ in range(50):
                await asyncio.sleep(0.1)
                if channel.get_state() != grpc.ChannelConnectivity.READY:
                    break
            assert channel.get_state() == grpc.ChannelConnectivity.IDLE  # the server closed it
            await channel.unary_unary(method_path("ListModels"), **RAW)(b"")  # and it reconnects


async def test_connections_beyond_the_limit_are_refused_until_some_close() -> None:
    async with run_server(max_connections=3) as server:
        held = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(3)]
        await asyncio.sleep(0.3)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await channel.unary_unary(method_path("ListModels"), **RAW)(b"", timeout=2)
                assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        finally:
            for sock in held:
                sock.close()
        # Room again once the server has seen them go (a moment: it polls their sockets).
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            call = channel.unary_unary(method_path("ListModels"), **RAW)
            await call(b"", timeout=10, wait_for_ready=True)


async def test_client_cancellations_are_ordinary(caplog: pytest.LogCaptureFixture) -> None:
    async with run_server(stream_tile_bytes=1 << 20) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stream = channel.unary_stream(method_path("StreamKernel"), **RAW)
            caplog.clear()
            with caplog.at_level(logging.DEBUG):
                for i in range(40):
                    request = pb.GenerateKernelRequest(model="long-1d", seq_lens=[20000 + 7 * i])
                    call = stream(request.SerializeToString())
                    async for _ in call:
                        call.cancel()  # after the first message, mid-stream
                        break
                await asyncio.sleep(0.5)
        errors = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
        assert errors == []
        registry = server.service.metrics.registry
        labels = {"model": "long-1d", "method": "StreamKernel", "code": "CANCELLED"}
        assert registry.get_sample_value("kernelgen_requests_total", labels) == 40
        assert server.service.budget.used == 0


@pytest.mark.parametrize("protocol", ["kernelgen.v1", "inference"])
async def test_a_sent_response_is_freed_when_its_call_ends_without_the_collector(protocol: str) -> None:
    """A call's done callback must not hold its response: gRPC's call contexts can wait for
    the garbage collector, and with them every kernel they reached (hundreds of MB swinging
    under load, measured). With the collector off, 24 sequential 1.29 MB responses may not
    leave more than a few of them allocated."""
    import gc
    import tracemalloc

    from kernelgen_wire.oip import grpc_service_pb2 as oip

    conditioning = np.ones((1, 384), dtype=np.float32)
    if protocol == "kernelgen.v1":
        path = method_path("GenerateKernel")
        request = pb.GenerateKernelRequest(
            model="hyena-2d",
            seq_lens=[15, 15],
            conditioning=pb.Tensor(shape=[1, 384], dtype=pb.DTYPE_FLOAT32, data=conditioning.tobytes()),
        ).SerializeToString()
    else:
        path = "/inference.GRPCInferenceService/ModelInfer"
        request = oip.ModelInferRequest(
            model_name="hyena-2d",
            inputs=[
                oip.ModelInferRequest.InferInputTensor(name="seq_lens", datatype="INT64", shape=[2]),
                oip.ModelInferRequest.InferInputTensor(name="conditioning", datatype="FP32", shape=[1, 384]),
            ],
            raw_input_contents=[np.array([15, 15], dtype=np.int64).tobytes(), conditioning.tobytes()],
        ).SerializeToString()
    kernel_bytes = 29 * 29 * 384 * 4
    async with run_server() as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            call = channel.unary_unary(path, **RAW)
            assert len(await call(request)) > kernel_bytes  # warm: model, caches, buffers
            gc.collect()
            gc.disable()
            tracemalloc.start()
            try:
                for _ in range(24):
                    assert len(await call(request)) > kernel_bytes
                await asyncio.sleep(0.2)
                held, _peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
                gc.enable()
        assert held < 6 * kernel_bytes, f"{held / kernel_bytes:.1f} responses' bytes still allocated"
        assert server.service.budget.used == 0
