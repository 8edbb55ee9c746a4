"""The ``kernelgen-cache-key`` header: on every unconditioned call, equal exactly when the cache key
is, and never on a conditioned call (which a proxy balances by load instead)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import numpy as np
import pytest

from kernelgen_client import AsyncKernelClient
from kernelgen_client._generate import prepare, prepare_group
from kernelgen_client.results import ModelInfo
from kernelgen_wire.metadata import CACHE_KEY_HEADER, cache_key
from kernelgen_wire.v1 import kernelgen_pb2 as pb

from support import run_server


def info(content_hash: str = "c0ffee") -> ModelInfo:
    return ModelInfo.from_pb(pb.ModelInfo(name="m", content_hash=content_hash, ready=True))


def call(conditioning: Any = None, **kwargs: Any) -> Any:
    options: dict[str, Any] = dict(
        dtype="float32", return_grid=False, as_torch=False, copy=False, with_report=False, stream=None
    )
    options.update(kwargs)
    return prepare("m", [15, 15], conditioning, **options)


def test_the_value_names_weights_grid_dtype_and_representation() -> None:
    assert cache_key("c0ffee", [15, 15], "float32", "dense") == "c0ffee/15x15/float32/dense"
    assert call().affinity(info()) == ((CACHE_KEY_HEADER, "c0ffee/15x15/float32/dense"),)
    assert call(dtype="bfloat16").affinity(info()) == ((CACHE_KEY_HEADER, "c0ffee/15x15/bfloat16/dense"),)
    factored = call(representation="factored").affinity(info())
    assert factored == ((CACHE_KEY_HEADER, "c0ffee/15x15/float32/factored"),)
    # Different weights under the same name are a different key.
    assert call().affinity(info("beef")) != call().affinity(info())


def test_conditioned_calls_and_unknown_models_carry_none() -> None:
    assert call(np.zeros((1, 4), np.float32)).affinity(info()) == ()
    assert call().affinity(None) == ()
    assert call().affinity(info("")) == ()


def test_unconditioned_calls_look_the_model_up_even_when_streaming_is_forced() -> None:
    assert call(stream=True).needs_info
    assert not call(np.zeros((1, 4), np.float32), stream=True).needs_info


def test_a_group_call_is_keyed_by_the_group_name() -> None:
    options: dict[str, Any] = dict(dtype="float16", as_torch=False, copy=False, with_report=False)
    group = prepare_group("net", [9], None, **options)
    assert group.affinity() == ((CACHE_KEY_HEADER, "group:net/9/float16/dense"),)
    assert prepare_group("net", [9], np.zeros((2, 4), np.float32), **options).affinity() == ()


class Recorder(grpc.aio.ServerInterceptor):
    """Every call's method and the value of the cache-key header (None when absent)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None]] = []

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        headers = dict(details.invocation_metadata or ())
        self.seen.append((details.method.rsplit("/", 1)[-1], headers.get(CACHE_KEY_HEADER)))
        return await continuation(details)


@pytest.fixture
async def recorded(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[Any, Recorder]]:
    """A served server whose calls are recorded (its grpc.aio.server gets one more interceptor)."""
    recorder = Recorder()
    build = grpc.aio.server

    def server(*args: Any, interceptors: Any = (), **kwargs: Any) -> Any:
        return build(*args, interceptors=[recorder, *interceptors], **kwargs)

    monkeypatch.setattr(grpc.aio, "server", server)
    async with run_server() as running:
        yield running, recorder


async def test_the_server_receives_the_header_on_unconditioned_calls_only(
    recorded: tuple[Any, Recorder],
) -> None:
    server, recorder = recorded
    async with AsyncKernelClient(f"127.0.0.1:{server.port}", timeout=30) as client:
        content_hash = (await client.get_model("hyena-2d")).content_hash
        long_hash = (await client.get_model("long-1d")).content_hash
        recorder.seen.clear()
        await client.generate("hyena-2d", [7, 7])
        await client.generate("hyena-2d", [7, 7], dtype="bfloat16", representation="factored")
        await client.generate("hyena-2d", [7, 7], np.ones((2, 384), np.float32))
        await client.generate("long-1d", [2000])  # 4 MB: streamed
    kernels = [(method, key) for method, key in recorder.seen if method in ("GenerateKernel", "StreamKernel")]
    assert kernels == [
        ("GenerateKernel", cache_key(content_hash, [7, 7], "float32", "dense")),
        ("GenerateKernel", cache_key(content_hash, [7, 7], "bfloat16", "factored")),
        ("GenerateKernel", None),
        ("StreamKernel", cache_key(long_hash, [2000], "float32", "dense")),
    ]
