"""Triton's own client (tritonclient[grpc]: sync, asyncio and its shared-memory utilities) against
`kernelgen serve` in another process: what a Triton user gets by changing the address."""

from __future__ import annotations

import asyncio
import queue
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from kernelgen_client import KernelClient

from support import ServeProcess, serve_process

pytestmark = pytest.mark.slow
ROWS = np.random.default_rng(11).standard_normal((4, 384), dtype=np.float32)


@pytest.fixture(scope="module")
def server() -> Iterator[ServeProcess]:
    with serve_process(
        "--shared-memory", "--max-message-bytes", "2MiB", "--stream-chunk-bytes", "1MiB"
    ) as proc:
        yield proc
        assert proc.terminate() == 0


@pytest.fixture(scope="module")
def triton(server: ServeProcess) -> Iterator[Any]:
    client = grpcclient.InferenceServerClient(server.target)
    yield client
    client.close()


@pytest.fixture(scope="module")
def native(server: ServeProcess) -> Iterator[KernelClient]:
    with KernelClient(server.target, timeout=60) as client:
        yield client


def inputs(seq_lens: list[int], rows: np.ndarray | None) -> list[Any]:
    seq = grpcclient.InferInput("seq_lens", [len(seq_lens)], "INT64")
    seq.set_data_from_numpy(np.asarray(seq_lens, dtype=np.int64))
    if rows is None:
        return [seq]
    cond = grpcclient.InferInput("conditioning", list(rows.shape), "FP32")
    cond.set_data_from_numpy(rows)
    return [seq, cond]


def dtype_parameter(dtype: str) -> dict[str, Any]:
    return {"dtype": dtype}


def test_server_and_model_metadata_agree_with_the_config(triton: Any) -> None:
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready("hyena-2d") and not triton.is_model_ready("no-such-model")
    metadata = triton.get_server_metadata()
    assert metadata.name == "kernelgen"
    assert {"model_configuration", "statistics", "system_shared_memory"} <= set(metadata.extensions)
    for name in ("hyena-2d", "long-1d", "volume-3d"):
        model = triton.get_model_metadata(name)
        config = triton.get_model_config(name).config
        assert [t.name for t in model.inputs] == [t.name for t in config.input]
        assert [t.name for t in model.outputs] == [t.name for t in config.output]
        batch = 1 if config.max_batch_size > 0 else 0
        for meta, conf in zip(
            list(model.inputs) + list(model.outputs), list(config.input) + list(config.output), strict=True
        ):
            assert list(meta.shape)[batch:] == list(conf.dims)
    hyena = triton.get_model_config("hyena-2d").config
    assert hyena.max_batch_size == 64 and list(hyena.dynamic_batching.preferred_batch_size) == [64]
    assert triton.get_model_config("long-1d").config.max_batch_size == 0
    index = triton.get_model_repository_index()
    assert sorted(m.name for m in index.models) == ["hyena-2d", "long-1d", "volume-3d"]


@pytest.mark.parametrize("dtype", ["FP32", "FP16", "BF16"])
@pytest.mark.parametrize(
    ("model", "seq_lens", "rows"), [("hyena-2d", [7, 5], ROWS[:3]), ("long-1d", [500], None)]
)
def test_infer_equals_the_native_api(
    triton: Any, native: KernelClient, dtype: str, model: str, seq_lens: list[int], rows: np.ndarray | None
) -> None:
    result = triton.infer(model, inputs(seq_lens, rows), parameters=dtype_parameter(dtype))
    got = result.as_numpy("kernel")
    name = {"FP32": "float32", "FP16": "float16", "BF16": "bfloat16"}[dtype]
    want = native.generate(model, seq_lens, rows, dtype=name, with_report=True)
    assert got.shape == want.kernel.shape
    assert got.dtype.itemsize == (4 if dtype == "FP32" else 2)
    assert got.tobytes() == bytes(want.raw)  # the same bits, bfloat16 included
    assert result.get_output("kernel").datatype == dtype


def test_factors_output(triton: Any, native: KernelClient) -> None:
    result = triton.infer(
        "hyena-2d", inputs([6, 6], ROWS[:2]), outputs=[grpcclient.InferRequestedOutput("factors")]
    )
    factors = result.as_numpy("factors")
    want = native.generate("hyena-2d", [6, 6], ROWS[:2], representation="factored")
    np.testing.assert_array_equal(factors, want.factors)
    head_hash = result.get_output("factors").parameters["head_hash"].string_param
    assert head_hash == native.get_model("hyena-2d").head_hash


def test_asyncio_client_concurrent_calls_are_batched(server: ServeProcess, native: KernelClient) -> None:
    async def run() -> list[Any]:
        client = aioclient.InferenceServerClient(server.target)
        try:
            calls = [
                client.infer("hyena-2d", _aio_inputs([9, 9], ROWS[i : i + 1]), request_id=str(i))
                for i in range(4)
            ]
            return list(await asyncio.gather(*calls))
        finally:
            await client.close()

    results = asyncio.run(run())
    for i, result in enumerate(results):
        assert result.get_response().id == str(i)
        np.testing.assert_array_equal(
            result.as_numpy("kernel"), native.generate("hyena-2d", [9, 9], ROWS[i : i + 1])
        )


def _aio_inputs(seq_lens: list[int], rows: np.ndarray) -> list[Any]:
    seq = aioclient.InferInput("seq_lens", [len(seq_lens)], "INT64")
    seq.set_data_from_numpy(np.asarray(seq_lens, dtype=np.int64))
    cond = aioclient.InferInput("conditioning", list(rows.shape), "FP32")
    cond.set_data_from_numpy(rows)
    return [seq, cond]


def test_stream_infer(triton: Any, native: KernelClient) -> None:
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    triton.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for i in range(3):
            triton.async_stream_infer("hyena-2d", inputs([5, 5], ROWS[i : i + 1]), request_id=f"s{i}")
        triton.async_stream_infer("hyena-2d", inputs([0, 5], ROWS[:1]), request_id="bad")
        got = [answers.get(timeout=60) for _ in range(4)]
    finally:
        triton.stop_stream()
    errors = [error for result, error in got if error is not None]
    assert len(errors) == 1 and "seq_lens must all be >= 1" in str(errors[0])
    results = {result.get_response().id: result for result, error in got if error is None}
    for i in range(3):
        want = native.generate("hyena-2d", [5, 5], ROWS[i : i + 1])
        np.testing.assert_array_equal(results[f"s{i}"].as_numpy("kernel"), want)


def test_statistics_count_what_was_sent(triton: Any) -> None:
    def stats() -> Any:
        return triton.get_inference_statistics("volume-3d").model_stats[0]

    before = stats()
    width = int(triton.get_model_config("volume-3d").config.input[1].dims[0])  # cond_dim
    rows = np.random.default_rng(3).standard_normal((2, width), dtype=np.float32)
    for _ in range(3):
        triton.infer("volume-3d", inputs([3, 3, 3], rows))
    with pytest.raises(InferenceServerException):
        triton.infer("volume-3d", inputs([3, 3], rows))
    after = stats()
    assert after.inference_stats.success.count - before.inference_stats.success.count == 3
    assert after.inference_stats.fail.count - before.inference_stats.fail.count == 1
    assert after.inference_count - before.inference_count == 6  # 3 requests of 2 rows
    assert after.inference_stats.success.ns > before.inference_stats.success.ns
    assert after.last_inference >= before.last_inference and after.last_inference > 0
    assert sum(b.compute_infer.count for b in after.batch_stats) == after.execution_count


def test_shared_memory_output_and_input(triton: Any, native: KernelClient) -> None:
    rows = ROWS[:2]
    out_bytes = 2 * 15 * 15 * 384 * 4
    out_handle = shm.create_shared_memory_region("kernel_out", "/kg_test_kernel_out", out_bytes)
    in_handle = shm.create_shared_memory_region("cond_in", "/kg_test_cond_in", rows.nbytes)
    try:
        shm.set_shared_memory_region(in_handle, [rows])
        triton.register_system_shared_memory("kernel_out", "/kg_test_kernel_out", out_bytes)
        triton.register_system_shared_memory("cond_in", "/kg_test_cond_in", rows.nbytes)
        seq = grpcclient.InferInput("seq_lens", [2], "INT64")
        seq.set_data_from_numpy(np.array([8, 8], dtype=np.int64))
        cond = grpcclient.InferInput("conditioning", [2, 384], "FP32")
        cond.set_shared_memory("cond_in", rows.nbytes)
        output = grpcclient.InferRequestedOutput("kernel")
        output.set_shared_memory("kernel_out", out_bytes)
        result = triton.infer("hyena-2d", [seq, cond], outputs=[output])
        assert not result.get_response().raw_output_contents  # no kernel bytes on the socket
        got = shm.get_contents_as_numpy(out_handle, np.float32, [2, 15, 15, 384])
        np.testing.assert_array_equal(got, native.generate("hyena-2d", [8, 8], rows))
        status = triton.get_system_shared_memory_status()
        assert {r.name for r in status.regions.values()} == {"kernel_out", "cond_in"}
        small = grpcclient.InferRequestedOutput("kernel")
        small.set_shared_memory("kernel_out", 1024)
        with pytest.raises(InferenceServerException) as caught:
            triton.infer("hyena-2d", [seq, cond], outputs=[small])
        assert "INVALID_ARGUMENT" in status_of(caught.value) and "gives 1024" in str(caught.value)
    finally:
        triton.unregister_system_shared_memory()  # every region, as perf_analyzer does at teardown
        assert not triton.get_system_shared_memory_status().regions
        shm.destroy_shared_memory_region(out_handle)
        shm.destroy_shared_memory_region(in_handle)


def status_of(error: InferenceServerException) -> str:
    return str(error.status())


@pytest.mark.parametrize(
    ("call", "code", "match"),
    [
        (lambda t: t.infer("no-such-model", inputs([5], None)), "NOT_FOUND", "no-such-model"),
        (
            lambda t: t.infer("hyena-2d", inputs([5], ROWS[:1])),
            "INVALID_ARGUMENT",
            "seq_lens needs 2 entries",
        ),
        (
            lambda t: t.infer("hyena-2d", inputs([5, 5], ROWS[:1, :100])),
            "INVALID_ARGUMENT",
            "width 384, got 100",
        ),
        (lambda t: t.infer("long-1d", inputs([40000], None)), "RESOURCE_EXHAUSTED", "shared-memory region"),
        (lambda t: t.get_model_metadata("no-such-model"), "NOT_FOUND", "no-such-model"),
        (
            lambda t: t.register_cuda_shared_memory("g", b"\0" * 64, 0, 64),
            "UNIMPLEMENTED",
            "CUDA shared memory is not supported",
        ),
        (lambda t: t.unregister_system_shared_memory("never-registered"), "NOT_FOUND", "never-registered"),
    ],
)
def test_error_statuses(triton: Any, call: Any, code: str, match: str) -> None:
    with pytest.raises(InferenceServerException) as caught:
        call(triton)
    assert status_of(caught.value) == f"StatusCode.{code}", caught.value
    assert match in str(caught.value)


def test_the_readme_example_runs_as_written(server: ServeProcess, tmp_path: Path) -> None:
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = re.search(r"^## The Open Inference Protocol.*?\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert section, "README has no Open Inference Protocol section"
    [block] = re.findall(r"^```python\n(.*?)^```", section.group(1), flags=re.M | re.S)
    script = tmp_path / "readme.py"
    script.write_text(
        block.replace("127.0.0.1:50051", server.target) + "\nprint(kernel.shape, kernel.dtype)\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "(2, 29, 29, 384) bfloat16"


def test_bearer_token_guards_all_but_health(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("s3cret\n")
    with serve_process("--auth-token-file", str(tokens)) as proc:
        anonymous = grpcclient.InferenceServerClient(proc.target)
        assert anonymous.is_server_live() and anonymous.is_server_ready()
        assert anonymous.is_model_ready("hyena-2d")
        with pytest.raises(InferenceServerException) as caught:
            anonymous.get_model_metadata("hyena-2d")
        assert status_of(caught.value) == "StatusCode.UNAUTHENTICATED"
        with pytest.raises(InferenceServerException) as caught:
            anonymous.infer("long-1d", inputs([20], None))
        assert status_of(caught.value) == "StatusCode.UNAUTHENTICATED"
        headers = {"authorization": "Bearer s3cret"}
        result = anonymous.infer("long-1d", inputs([20], None), headers=headers)
        assert result.as_numpy("kernel").shape == (1, 39, 256)
        with pytest.raises(InferenceServerException):
            anonymous.get_inference_statistics("long-1d", headers={"authorization": "Bearer wrong"})
        anonymous.close()
        assert proc.terminate() == 0
