"""The Open Inference Protocol served in-process, through kernelgen's own generated stubs:
the same kernels and status codes as kernelgen.v1, hand-written responses equal to protobuf's,
readiness, statistics, streaming and shared memory. Triton's own client is tested in
tests/e2e/test_tritonclient_e2e.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from multiprocessing import shared_memory
from typing import Any

import grpc
import numpy as np
import pytest

from kernelgen_server.transport.oip_servicer import OIP_SERVICE_NAME
from kernelgen_wire.oip import grpc_service_pb2 as oip
from kernelgen_wire.oip import grpc_service_pb2_grpc as oip_grpc
from kernelgen_wire.v1 import kernelgen_pb2 as pb
from kernelgen_wire.v1 import kernelgen_pb2_grpc as pb_grpc

from support import generate, run_server

Code = grpc.StatusCode
ROWS = np.random.default_rng(7).standard_normal((3, 384), dtype=np.float32)


@pytest.fixture
async def served() -> AsyncIterator[tuple[Any, Any, Any]]:
    async with run_server(shared_memory=True, max_message_bytes="2MiB", stream_chunk_bytes="1MiB") as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield server, oip_grpc.GRPCInferenceServiceStub(channel), pb_grpc.KernelGeneratorStub(channel)


def infer_request(
    model: str = "hyena-2d",
    seq_lens: tuple[int, ...] = (5, 5),
    conditioning: np.ndarray | None = ROWS,
    *,
    outputs: list[oip.ModelInferRequest.InferRequestedOutputTensor] | None = None,
    dtype: str | None = None,
    raw: bool = True,
) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name=model, id="req-1", outputs=outputs or [])
    lens = np.asarray(seq_lens, dtype=np.int64)
    seq = request.inputs.add(name="seq_lens", datatype="INT64", shape=[len(seq_lens)])
    if raw:
        request.raw_input_contents.append(lens.tobytes())
    else:
        seq.contents.int64_contents.extend(lens.tolist())
    if conditioning is not None:
        cond = request.inputs.add(name="conditioning", datatype="FP32", shape=list(conditioning.shape))
        if raw:
            request.raw_input_contents.append(conditioning.tobytes())
        else:
            cond.contents.fp32_contents.extend(conditioning.ravel().tolist())
    if dtype is not None:
        request.parameters["dtype"].string_param = dtype
    return request


def output_array(response: oip.ModelInferResponse, index: int = 0) -> np.ndarray:
    tensor = response.outputs[index]
    layout = {"FP32": "<f4", "FP16": "<f2", "BF16": "<u2"}[tensor.datatype]
    return np.frombuffer(response.raw_output_contents[index], dtype=layout).reshape(tuple(tensor.shape))


async def native(stub: Any, **fields: Any) -> np.ndarray:
    reply, _report = await generate(stub, pb.GenerateKernelRequest(**fields))
    tensor = reply.factors if reply.head_hash else reply.kernel
    layout = {pb.DTYPE_FLOAT32: "<f4", pb.DTYPE_FLOAT16: "<f2", pb.DTYPE_BFLOAT16: "<u2"}[tensor.dtype]
    return np.frombuffer(tensor.data, dtype=layout).reshape(tuple(tensor.shape))


def cond_tensor(rows: np.ndarray) -> pb.Tensor:
    return pb.Tensor(shape=rows.shape, dtype=pb.DTYPE_FLOAT32, data=rows.tobytes())


@pytest.mark.parametrize("dtype", ["FP32", "FP16", "BF16"])
async def test_infer_equals_the_native_kernel(served: Any, dtype: str) -> None:
    _server, stub, native_stub = served
    wire = {"FP32": pb.DTYPE_FLOAT32, "FP16": pb.DTYPE_FLOAT16, "BF16": pb.DTYPE_BFLOAT16}[dtype]
    call = stub.ModelInfer(infer_request(dtype=dtype))
    response = await call
    trailers = dict(await call.trailing_metadata() or ())
    report = pb.ServerReport.FromString(trailers["kernelgen-report-bin"])  # as kernelgen.v1's
    assert report.batch_size >= 3 and report.content_hash
    assert response.id == "req-1" and response.model_version == "1"
    assert response.outputs[0].name == "kernel" and response.outputs[0].datatype == dtype
    got = output_array(response)
    want = await native(
        native_stub, model="hyena-2d", seq_lens=[5, 5], conditioning=cond_tensor(ROWS), dtype=wire
    )
    assert got.shape == (3, 9, 9, 384)
    np.testing.assert_array_equal(got, want)


async def test_unconditioned_typed_contents_and_factors(served: Any) -> None:
    _server, stub, native_stub = served
    response = await stub.ModelInfer(infer_request("long-1d", (300,), None, raw=False))
    want = await native(native_stub, model="long-1d", seq_lens=[300])
    np.testing.assert_array_equal(output_array(response), want)
    factors = oip.ModelInferRequest.InferRequestedOutputTensor(name="factors")
    response = await stub.ModelInfer(infer_request(outputs=[factors]))
    head = await native_stub.GetOutputHead(pb.GetOutputHeadRequest(model="hyena-2d"))
    assert response.outputs[0].parameters["head_hash"].string_param == head.head_hash
    want = await native(
        native_stub, model="hyena-2d", seq_lens=[5, 5], conditioning=cond_tensor(ROWS),
        representation=pb.REPRESENTATION_FACTORED,
    )  # fmt: skip
    np.testing.assert_array_equal(output_array(response), want)


async def test_seq_lens_with_a_batch_dimension(served: Any) -> None:
    _server, stub, _native = served
    request = infer_request()
    request.inputs[0].shape[:] = [3, 2]
    request.raw_input_contents[0] = np.array([[5, 5]] * 3, dtype=np.int64).tobytes()
    batched = await stub.ModelInfer(request)
    plain = await stub.ModelInfer(infer_request())
    np.testing.assert_array_equal(output_array(batched), output_array(plain))


async def test_the_hand_written_response_is_what_protobuf_writes(served: Any) -> None:
    _server, _stub, _native = served
    server = served[0]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        raw_call = channel.unary_unary(f"/{OIP_SERVICE_NAME}/ModelInfer",
                                       request_serializer=oip.ModelInferRequest.SerializeToString,
                                       response_deserializer=lambda b: b)  # fmt: skip
        raw = await raw_call(infer_request())
    assert oip.ModelInferResponse.FromString(raw).SerializeToString(deterministic=True) == raw


@pytest.mark.parametrize(
    ("mutate", "code", "match"),
    [
        (lambda r: setattr(r, "model_name", "nope"), Code.NOT_FOUND, "nope"),
        (lambda r: setattr(r, "model_name", ""), Code.INVALID_ARGUMENT, "model name is empty"),
        (lambda r: setattr(r, "model_version", "7"), Code.NOT_FOUND, "no version '7'"),
        (lambda r: r.inputs[0].shape.__setitem__(0, 3), Code.INVALID_ARGUMENT, "needs 24 bytes of INT64"),
        (lambda r: setattr(r.inputs[0], "datatype", "INT32"), Code.INVALID_ARGUMENT, "must be INT64"),
        (lambda r: setattr(r.inputs[1], "datatype", "FP64"), Code.INVALID_ARGUMENT, "must be FP32"),
        (lambda r: setattr(r.inputs[1], "name", "extra"), Code.INVALID_ARGUMENT, "unexpected input 'extra'"),
        (lambda r: r.raw_input_contents.pop(), Code.INVALID_ARGUMENT, "give one for each, or none"),
        (lambda r: r.parameters["dtype"].CopyFrom(oip.InferParameter(string_param="INT8")),
         Code.INVALID_ARGUMENT, "'INT8' is not supported"),
        (lambda r: r.outputs.add(name="logits"), Code.INVALID_ARGUMENT, "unexpected output 'logits'"),
        (lambda r: (r.outputs.add(name="kernel"), r.outputs.add(name="factors")),
         Code.INVALID_ARGUMENT, "ask for one"),
        (lambda r: r.raw_input_contents.__setitem__(0, np.array([0, 5], dtype=np.int64).tobytes()),
         Code.INVALID_ARGUMENT, "seq_lens must all be >= 1"),
        (lambda r: r.raw_input_contents.__setitem__(1, np.full((3, 384), np.nan, np.float32).tobytes()),
         Code.INVALID_ARGUMENT, "NaN or Inf"),
        (lambda r: r.raw_input_contents.__setitem__(0, np.array([200, 200], dtype=np.int64).tobytes()),
         Code.RESOURCE_EXHAUSTED, "shared-memory region (same host), or stream it with kernelgen.v1"),
    ],
)  # fmt: skip
async def test_every_error_status_and_the_server_stays_well(
    served: Any, mutate: Any, code: Code, match: str
) -> None:
    _server, stub, _native = served
    request = infer_request()
    mutate(request)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ModelInfer(request)
    assert caught.value.code() == code, caught.value.details()
    assert match in (caught.value.details() or ""), caught.value.details()
    assert len((await stub.ModelInfer(infer_request())).raw_output_contents[0]) == 3 * 81 * 384 * 4


async def test_conditioning_for_a_model_without_film(served: Any) -> None:
    _server, stub, _native = served
    request = infer_request("long-1d", (30,), None)
    request.inputs.add(name="conditioning", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(bytes(16))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ModelInfer(request)
    assert caught.value.code() == Code.INVALID_ARGUMENT
    assert "unexpected input 'conditioning'" in (caught.value.details() or "")


async def test_stream_answers_each_request_and_errors_in_band(served: Any) -> None:
    _server, stub, native_stub = served
    good = [infer_request(conditioning=ROWS[i : i + 1]) for i in range(3)]
    for i, request in enumerate(good):
        request.id = f"r{i}"
    bad = infer_request(model="nope")
    bad.id = "bad"

    async def requests() -> AsyncIterator[oip.ModelInferRequest]:
        for request in [good[0], bad, good[1], good[2]]:
            yield request

    answers = [message async for message in stub.ModelStreamInfer(requests())]
    assert len(answers) == 4
    errors = [a.error_message for a in answers if a.error_message]
    assert len(errors) == 1 and errors[0].startswith("NOT_FOUND: ") and "nope" in errors[0]
    by_id = {a.infer_response.id: a.infer_response for a in answers if not a.error_message}
    assert sorted(by_id) == ["r0", "r1", "r2"]
    for i in range(3):
        want = await native(
            native_stub, model="hyena-2d", seq_lens=[5, 5], conditioning=cond_tensor(ROWS[i : i + 1])
        )
        np.testing.assert_array_equal(output_array(by_id[f"r{i}"]), want)


async def test_metadata_config_and_index(served: Any) -> None:
    _server, stub, _native = served
    server_meta = await stub.ServerMetadata(oip.ServerMetadataRequest())
    assert server_meta.name == "kernelgen"
    assert (
        "system_shared_memory" in server_meta.extensions and "model_configuration" in server_meta.extensions
    )
    meta = await stub.ModelMetadata(oip.ModelMetadataRequest(name="hyena-2d"))
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("seq_lens", "INT64", [-1, 2]), ("conditioning", "FP32", [-1, 384])
    ]  # fmt: skip
    assert [(t.name, list(t.shape)) for t in meta.outputs] == [
        ("kernel", [-1, -1, -1, 384]),
        ("factors", [-1, -1, -1, 32]),
    ]
    config = (await stub.ModelConfig(oip.ModelConfigRequest(name="hyena-2d"))).config
    assert config.max_batch_size == 64 and list(config.dynamic_batching.preferred_batch_size) == [64]
    assert config.dynamic_batching.default_queue_policy.max_queue_size == 1024
    # The config's tensors are the metadata's without the batch dimension.
    assert [list(t.dims) for t in config.input] == [list(t.shape)[1:] for t in meta.inputs]
    assert [list(t.dims) for t in config.output] == [list(t.shape)[1:] for t in meta.outputs]
    long = (await stub.ModelConfig(oip.ModelConfigRequest(name="long-1d"))).config
    assert long.max_batch_size == 0 and not long.HasField("dynamic_batching")
    index = await stub.RepositoryIndex(oip.RepositoryIndexRequest())
    assert {(m.name, m.state) for m in index.models} == {
        ("hyena-2d", "READY"), ("long-1d", "READY"), ("volume-3d", "READY")
    }  # fmt: skip


async def test_readiness_follows_the_health_service_through_drain() -> None:
    async with run_server() as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = oip_grpc.GRPCInferenceServiceStub(channel)
            assert (await stub.ServerReady(oip.ServerReadyRequest())).ready
            assert (await stub.ModelReady(oip.ModelReadyRequest(name="hyena-2d"))).ready
            assert not (await stub.ModelReady(oip.ModelReadyRequest(name="nope"))).ready
            assert not (await stub.ModelReady(oip.ModelReadyRequest(name="hyena-2d", version="2"))).ready
            await server.health.enter_graceful_shutdown()
            server.service.draining = True
            assert (await stub.ServerLive(oip.ServerLiveRequest())).live
            assert not (await stub.ServerReady(oip.ServerReadyRequest())).ready
            assert not (await stub.ModelReady(oip.ModelReadyRequest(name="hyena-2d"))).ready
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.ModelInfer(infer_request())
            assert caught.value.code() == Code.UNAVAILABLE


async def test_a_model_that_failed_to_load(tmp_path: Any, embedded_repo: Any) -> None:
    import shutil

    shutil.copytree(embedded_repo / "long-1d", tmp_path / "long-1d")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    async with run_server(model_repo=str(tmp_path)) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = oip_grpc.GRPCInferenceServiceStub(channel)
            assert not (await stub.ModelReady(oip.ModelReadyRequest(name="broken"))).ready
            index = await stub.RepositoryIndex(oip.RepositoryIndexRequest())
            broken = next(m for m in index.models if m.name == "broken")
            assert broken.state == "UNAVAILABLE" and broken.reason
            assert [
                m.name for m in (await stub.RepositoryIndex(oip.RepositoryIndexRequest(ready=True))).models
            ] == ["long-1d"]
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.ModelInfer(infer_request("broken", (3,), None))
            assert caught.value.code() == Code.FAILED_PRECONDITION


async def test_statistics_are_the_metrics_numbers(served: Any) -> None:
    server, stub, native_stub = served
    for i in range(3):
        await stub.ModelInfer(infer_request(conditioning=ROWS[: i + 1]))
    await generate(native_stub, pb.GenerateKernelRequest(model="hyena-2d", seq_lens=[4, 4]))  # a cache miss
    await generate(native_stub, pb.GenerateKernelRequest(model="hyena-2d", seq_lens=[4, 4]))  # then a hit
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.ModelInfer(infer_request(seq_lens=(0, 5)))
    stats = (await stub.ModelStatistics(oip.ModelStatisticsRequest(name="hyena-2d"))).model_stats[0]
    infer = stats.inference_stats
    assert infer.success.count == 5 and infer.fail.count == 1
    assert infer.cache_hit.count == 1 and infer.cache_miss.count == 1
    assert stats.inference_count == 1 + 2 + 3 + 1  # rows computed; the hit counts none
    assert infer.queue.count == infer.compute_infer.count == 4
    assert sum(b.compute_infer.count for b in stats.batch_stats) == stats.execution_count
    # The same observations as the Prometheus metrics.
    registry = server.service.metrics.registry

    def sample(name: str, **labels: str) -> float:
        return registry.get_sample_value(name, labels) or 0.0

    ok = sum(
        sample("kernelgen_requests_total", model="hyena-2d", method=m, code="OK")
        for m in ("ModelInfer", "GenerateKernel")
    )
    assert ok == infer.success.count
    latency = sum(
        sample("kernelgen_request_latency_seconds_sum", model="hyena-2d", method=m)
        for m in ("ModelInfer", "GenerateKernel")
    )
    assert abs(latency - (infer.success.ns + infer.fail.ns) / 1e9) < 1e-6
    compute = sample("kernelgen_compute_time_seconds_sum", model="hyena-2d")
    assert abs(compute - sum(b.compute_infer.ns for b in stats.batch_stats) / 1e9) < 1e-6
    assert (
        sample("kernelgen_batches_total", model="hyena-2d") + infer.cache_miss.count == stats.execution_count
    )
    every = await stub.ModelStatistics(oip.ModelStatisticsRequest())
    assert {s.name for s in every.model_stats} == {"hyena-2d", "long-1d", "volume-3d"}
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ModelStatistics(oip.ModelStatisticsRequest(name="nope"))
    assert caught.value.code() == Code.NOT_FOUND


def _shm_params(target: Any, region: str, size: int, offset: int = 0) -> None:
    target.parameters["shared_memory_region"].string_param = region
    target.parameters["shared_memory_byte_size"].int64_param = size
    if offset:
        target.parameters["shared_memory_offset"].int64_param = offset


async def test_shared_memory_input_and_output(served: Any) -> None:
    _server, stub, native_stub = served
    block = shared_memory.SharedMemory(create=True, size=1 << 20)
    try:
        await stub.SystemSharedMemoryRegister(
            oip.SystemSharedMemoryRegisterRequest(name="io", key="/" + block.name, byte_size=1 << 20)
        )
        rows = ROWS[:2]
        np.ndarray(rows.shape, np.float32, buffer=block.buf, offset=64)[:] = rows
        out = oip.ModelInferRequest.InferRequestedOutputTensor(name="kernel")
        kernel_bytes = 2 * 81 * 384 * 4
        _shm_params(out, "io", kernel_bytes, offset=4096)
        request = infer_request(conditioning=None, outputs=[out])
        cond = request.inputs.add(name="conditioning", datatype="FP32", shape=[2, 384])
        _shm_params(cond, "io", rows.nbytes, offset=64)
        response = await stub.ModelInfer(request)
        assert not response.raw_output_contents  # the kernel is in shared memory, not the message
        assert list(response.outputs[0].shape) == [2, 9, 9, 384]
        got = np.ndarray((2, 9, 9, 384), np.float32, buffer=block.buf, offset=4096).copy()
        want = await native(native_stub, model="hyena-2d", seq_lens=[5, 5], conditioning=cond_tensor(rows))
        np.testing.assert_array_equal(got, want)
        # A region too small for the output is refused before any work.
        _shm_params(out, "io", 1000, offset=4096)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ModelInfer(infer_request(outputs=[out]))
        assert caught.value.code() == Code.INVALID_ARGUMENT and "gives 1000" in (caught.value.details() or "")
        status = await stub.SystemSharedMemoryStatus(oip.SystemSharedMemoryStatusRequest())
        assert status.regions["io"].byte_size == 1 << 20
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.SystemSharedMemoryRegister(
                oip.SystemSharedMemoryRegisterRequest(name="io", key="/" + block.name, byte_size=8)
            )
        assert caught.value.code() == Code.ALREADY_EXISTS
        await stub.SystemSharedMemoryUnregister(oip.SystemSharedMemoryUnregisterRequest())
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ModelInfer(infer_request(outputs=[out]))
        assert caught.value.code() == Code.NOT_FOUND and "'io'" in (caught.value.details() or "")
    finally:
        block.close()
        block.unlink()


async def test_shared_memory_is_off_by_default_and_cuda_is_refused(server: Any) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        meta = await stub.ServerMetadata(oip.ServerMetadataRequest())
        assert "system_shared_memory" not in meta.extensions and "cuda_shared_memory" not in meta.extensions
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.SystemSharedMemoryRegister(
                oip.SystemSharedMemoryRegisterRequest(name="a", key="/a", byte_size=8)
            )
        assert caught.value.code() == Code.FAILED_PRECONDITION and "--shared-memory" in (
            caught.value.details() or ""
        )
        # perf_analyzer unregisters every region at teardown, whatever the server offers.
        await stub.SystemSharedMemoryUnregister(oip.SystemSharedMemoryUnregisterRequest())
        await stub.CudaSharedMemoryUnregister(oip.CudaSharedMemoryUnregisterRequest())
        assert not (await stub.CudaSharedMemoryStatus(oip.CudaSharedMemoryStatusRequest())).regions
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.CudaSharedMemoryRegister(oip.CudaSharedMemoryRegisterRequest(name="g", byte_size=8))
        assert caught.value.code() == Code.UNIMPLEMENTED
        assert "CUDA shared memory is not supported" in (caught.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.RepositoryModelUnload(oip.RepositoryModelUnloadRequest(model_name="hyena-2d"))
        assert caught.value.code() == Code.UNIMPLEMENTED
        await stub.RepositoryModelLoad(oip.RepositoryModelLoadRequest(model_name="hyena-2d"))


async def test_native_kernels_into_a_registered_region(served: Any) -> None:
    _server, _stub, native_stub = served
    block = shared_memory.SharedMemory(create=True, size=2 << 20)
    try:
        await native_stub.RegisterSharedMemory(
            pb.RegisterSharedMemoryRequest(name="native", key="/" + block.name, byte_size=2 << 20)
        )
        request = pb.GenerateKernelRequest(
            model="hyena-2d", seq_lens=[5, 5], conditioning=cond_tensor(ROWS), dtype=pb.DTYPE_FLOAT16,
            output_region=pb.SharedMemoryOutput(region="native", offset=128),
        )  # fmt: skip
        reply, report = await generate(native_stub, request)
        nbytes = 3 * 81 * 384 * 2
        assert reply.shared_memory_bytes == nbytes and not reply.kernel.data
        assert list(reply.kernel.shape) == [3, 9, 9, 384] and report.batch_size >= 3
        got = np.ndarray((3, 9, 9, 384), "<f2", buffer=block.buf, offset=128).copy()
        request.ClearField("output_region")
        np.testing.assert_array_equal(got, await native(native_stub, **_fields(request)))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await native_stub.GenerateKernel(
                pb.GenerateKernelRequest(model="long-1d", seq_lens=[40000],
                                         output_region=pb.SharedMemoryOutput(region="native"))
            )  # fmt: skip
        assert caught.value.code() == Code.INVALID_ARGUMENT and "needs 81918976 bytes" in (
            caught.value.details() or ""
        )
        stream = native_stub.StreamKernel(
            pb.GenerateKernelRequest(
                model="long-1d", seq_lens=[3], output_region=pb.SharedMemoryOutput(region="native")
            )
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stream.read()
        assert caught.value.code() == Code.INVALID_ARGUMENT
        await native_stub.UnregisterSharedMemory(pb.UnregisterSharedMemoryRequest(name="native"))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await native_stub.UnregisterSharedMemory(pb.UnregisterSharedMemoryRequest(name="native"))
        assert caught.value.code() == Code.NOT_FOUND
        assert dict(caught.value.trailing_metadata() or ()).get("kernelgen-reason") == "region-not-found"
    finally:
        block.close()
        block.unlink()


def _fields(request: pb.GenerateKernelRequest) -> dict[str, Any]:
    return {field.name: value for field, value in request.ListFields()}


async def test_a_failing_stream_request_harms_no_other(served: Any) -> None:
    _server, stub, _native = served

    async def requests() -> AsyncIterator[oip.ModelInferRequest]:
        for i in range(8):
            request = infer_request(seq_lens=(5, 5) if i % 2 else (0, 5), conditioning=ROWS[:1])
            request.id = str(i)
            yield request
            await asyncio.sleep(0)

    answers = [a async for a in stub.ModelStreamInfer(requests())]
    assert sum(bool(a.error_message) for a in answers) == 4
    assert sorted(a.infer_response.id for a in answers if not a.error_message) == ["1", "3", "5", "7"]


async def test_a_batch_writes_the_protocols_response_in_place(served: Any) -> None:
    """A conditioned kernel's response is written where its batch encodes it (one copy of the
    kernel); a cached kernel stays kernelgen.v1's message."""
    from kernelgen_server.transport.oip_codec import InferEncoded, decode_infer, infer_encoder

    server, _stub, native_stub = served
    service = server.service
    model = service.model("hyena-2d")
    calls: list[int] = []
    call = decode_infer(infer_request(), model)
    encoder = infer_encoder(call)

    def counting(payload: Any, head_hash: str) -> Any:
        calls.append(payload.nbytes)
        return encoder(payload, head_hash)

    result = await service.generate("hyena-2d", [5, 5], ROWS, pb.DTYPE_FLOAT32, False, encoder=counting)
    assert calls == [3 * 81 * 384 * 4] and isinstance(result.kernel, InferEncoded)
    response = oip.ModelInferResponse.FromString(result.kernel.message)
    assert response.id == "req-1" and list(response.outputs[0].shape) == [3, 9, 9, 384]
    want = await native(native_stub, model="hyena-2d", seq_lens=[5, 5], conditioning=cond_tensor(ROWS))
    np.testing.assert_array_equal(output_array(response), want)
    assert result.kernel.payload.data.obj is result.kernel.message  # the payload views the message
    cached = await service.generate("hyena-2d", [5, 5], None, pb.DTYPE_FLOAT32, False, encoder=counting)
    assert len(calls) == 1 and not isinstance(cached.kernel, InferEncoded)
