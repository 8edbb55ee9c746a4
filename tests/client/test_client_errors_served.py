"""Every client error class, raised by a real server (or a real refused connection).

Also checks which failures gRPC retries under the client's service config:
UNAVAILABLE and a full queue are retried; an over-size kernel, a bad request
and an unknown model are sent exactly once.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kernelgen_client import (
    AsyncKernelClient,
    Cancelled,
    ConditioningNotSupported,
    ConnectionFailed,
    DeadlineExceeded,
    InternalServerError,
    InvalidRequest,
    KernelServiceError,
    KernelTooLarge,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    RetryPolicy,
    ServerDraining,
    Unauthenticated,
)
from kernelgen_wire.metadata import Reason

from support import run_server


def calls(server: Any, model: str, method: str, code: str) -> float:
    labels = {"model": model, "method": method, "code": code}
    return server.service.metrics.registry.get_sample_value("kernelgen_requests_total", labels) or 0.0


async def counted(server: Any, model: str, method: str, code: str, expected: float) -> float:
    """``calls`` once it reaches ``expected``, or as it is after 2 s: the server counts a call as
    the call's scope closes, which may come just after the client has its status."""
    deadline = time.monotonic() + 2.0
    while (value := calls(server, model, method, code)) < expected and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return value


def client_for(server: Any, **kwargs: Any) -> AsyncKernelClient:
    # Quick backoff keeps retried cases fast; the policy is otherwise the default one.
    kwargs.setdefault("retries", RetryPolicy(initial_backoff=0.01, max_backoff=0.05))
    return AsyncKernelClient(f"127.0.0.1:{server.port}", timeout=20, **kwargs)


async def test_invalid_request_from_the_server_is_not_retried(server: Any) -> None:
    async with client_for(server) as client:
        with pytest.raises(InvalidRequest, match="seq_lens needs 2 entries") as caught:
            await client.generate("hyena-2d", [5])
        assert caught.value.reason == "invalid-argument"
        with pytest.raises(InvalidRequest, match="width 384"):
            await client.generate("hyena-2d", [5, 5], np.zeros((1, 3)))
    assert await counted(server, "hyena-2d", "GenerateKernel", "INVALID_ARGUMENT", 2) == 2


async def test_invalid_request_caught_before_sending(server: Any) -> None:
    async with client_for(server) as client:
        for bad in ({"conditioning": [[np.nan] * 384]}, {"seq_lens": [0, 5]}, {"dtype": "int8"}):
            with pytest.raises(InvalidRequest):
                await client.generate("hyena-2d", **{"seq_lens": [5, 5], **bad})  # type: ignore[arg-type]
    assert calls(server, "hyena-2d", "GenerateKernel", "INVALID_ARGUMENT") == 0


async def test_model_not_found(server: Any) -> None:
    async with client_for(server) as client:
        with pytest.raises(ModelNotFound, match="unknown model 'nope'") as caught:
            await client.generate("nope", [5])
        assert isinstance(caught.value, LookupError)
        with pytest.raises(ModelNotFound):
            await client.flop_count("nope", [5])
    assert await counted(server, "", "GetModel", "NOT_FOUND", 1) == 1  # unknown names are not labels
    assert await counted(server, "", "FlopCount", "NOT_FOUND", 1) == 1


async def test_conditioning_not_supported(server: Any) -> None:
    async with client_for(server) as client:
        with pytest.raises(ConditioningNotSupported, match="no FiLM generator") as caught:
            await client.generate("long-1d", [5], [1.0, 2.0])
    assert caught.value.reason == "no-film"


async def test_model_not_ready(tmp_path: Path, embedded_repo: Path) -> None:
    shutil.copytree(embedded_repo / "long-1d", tmp_path / "good")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    async with run_server(model_repo=str(tmp_path)) as server, client_for(server) as client:
        info = await client.get_model("broken")
        assert not info.ready
        assert info.config is None
        assert "config.json" in info.reason
        with pytest.raises(ModelNotReady, match="not ready"):
            await client.generate("broken", [5])
        assert (await client.generate("good", [5])).shape == (1, 9, 256)


async def test_overloaded_is_retried_as_the_server_allows(
    server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kernelgen_server.errors import QueueFull

    submit = server.service.submitter.submit
    refusals = {"left": 0}

    async def flaky(*args: Any, **kwargs: Any) -> Any:
        if refusals["left"] > 0:
            refusals["left"] -= 1
            raise QueueFull("the batch queue is full (test)")
        return await submit(*args, **kwargs)

    monkeypatch.setattr(server.service.submitter, "submit", flaky)
    rows = np.ones((1, 384), np.float32)
    async with client_for(server, retries=None) as client:
        refusals["left"] = 1
        with pytest.raises(Overloaded, match="queue is full") as caught:
            await client.generate("hyena-2d", [3, 3], rows)
        assert caught.value.retry_pushback_ms is not None
        assert caught.value.retry_pushback_ms > 0
    async with client_for(server) as client:
        refusals["left"] = 2  # two refusals, then the queue has room: the default policy gets through
        assert (await client.generate("hyena-2d", [3, 3], rows)).shape == (1, 5, 5, 384)
    assert await counted(server, "hyena-2d", "GenerateKernel", "RESOURCE_EXHAUSTED", 3) == 3
    assert await counted(server, "hyena-2d", "GenerateKernel", "OK", 1) == 1


async def test_kernel_too_large_is_never_retried(server: Any) -> None:
    async with client_for(server) as client:
        with pytest.raises(
            KernelTooLarge, match=r"over the server's limit of 16777216 points \(set by --max-grid-points\)"
        ) as caught:
            await client.generate("long-1d", [10_000_000], stream=False)
        assert caught.value.retry_pushback_ms == -1
        with pytest.raises(KernelTooLarge):
            await client.generate("long-1d", [10_000_000])  # predicted huge: streamed, refused once
    assert await counted(server, "long-1d", "GenerateKernel", "RESOURCE_EXHAUSTED", 1) == 1
    assert await counted(server, "long-1d", "StreamKernel", "RESOURCE_EXHAUSTED", 1) == 1


async def test_deadline_exceeded(server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = server.service._engines["long-1d"]
    original = engine.unconditioned

    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.5)
        return original(*args, **kwargs)

    monkeypatch.setattr(engine, "unconditioned", slow)
    async with client_for(server) as client:
        with pytest.raises(DeadlineExceeded) as caught:
            await client.generate("long-1d", [123], timeout=0.2)
    assert isinstance(caught.value, TimeoutError)


async def test_cancelled_by_the_server(server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from kernelgen_server import errors as server_errors

    def cancelled(*args: Any, **kwargs: Any) -> Any:
        raise server_errors.Cancelled("the computation was cancelled")

    monkeypatch.setattr(server.service, "flop_count", cancelled)
    async with client_for(server) as client:
        with pytest.raises(Cancelled, match="cancelled") as caught:
            await client.flop_count("long-1d", [5])
    assert caught.value.reason == "cancelled"


async def test_internal_error_is_generic(server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("secret path /srv/models")

    monkeypatch.setattr(server.service, "flop_count", broken)
    async with client_for(server) as client:
        with pytest.raises(InternalServerError) as caught:
            await client.flop_count("long-1d", [5])
    assert "secret" not in caught.value.message


async def test_draining_server_is_unavailable_and_retried(server: Any) -> None:
    server.service.draining = True
    async with client_for(server, retries=RetryPolicy(max_attempts=3, initial_backoff=0.01)) as client:
        with pytest.raises(ServerDraining, match="shutting down") as caught:
            await client.generate("long-1d", [5])
    assert caught.value.reason == "draining"
    assert await counted(server, "long-1d", "GenerateKernel", "UNAVAILABLE", 3) == 3  # UNAVAILABLE is retried


async def test_unauthenticated(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("right\n")
    async with run_server(auth_token_file=str(tokens)) as server:
        async with client_for(server, token="wrong") as client:
            with pytest.raises(Unauthenticated, match="bearer token"):
                await client.list_models()
        async with client_for(server, token="right") as client:
            assert len(await client.list_models()) == 3


async def test_connection_failed() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with AsyncKernelClient(f"127.0.0.1:{port}", timeout=10) as client:
        with pytest.raises(ConnectionFailed, match=f"cannot connect to 127.0.0.1:{port}") as caught:
            await client.list_models()
        with pytest.raises(ConnectionFailed):
            await client.wait_ready(timeout=0.2)
    assert isinstance(caught.value, ConnectionError)
    assert isinstance(caught.value, KernelServiceError)


async def test_wait_for_ready_waits_for_a_late_server() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    policy = RetryPolicy(wait_for_ready=True)
    async with AsyncKernelClient(f"127.0.0.1:{port}", timeout=30, retries=policy) as client:
        pending = asyncio.ensure_future(client.list_models())
        await asyncio.sleep(0.5)  # the call waits for a connection instead of failing
        assert not pending.done()
        async with run_server(port=port):
            assert len(await pending) == 3


def test_both_ends_name_each_reason_alike() -> None:
    """The server's error for a reason has the client's name for it, status for status."""
    from kernelgen_client import errors as client_errors
    from kernelgen_server import errors as server_errors

    def classes(module: Any, base: type) -> list[type]:
        return [
            c for c in vars(module).values() if isinstance(c, type) and issubclass(c, base) and c is not base
        ]

    class Failed:
        def __init__(self, code: Any, reason: str) -> None:
            self._code, self._reason = code, reason

        def code(self) -> Any:
            return self._code

        def details(self) -> str:
            return "failed"

        def trailing_metadata(self) -> Any:
            return (("kernelgen-reason", self._reason),)

    server = {
        c.reason: c for c in classes(server_errors, server_errors.KernelGenError) if "reason" in vars(c)
    }
    assert set(server) == set(Reason) - {Reason.INTERNAL}  # every reason has its one server class
    for reason, cls in server.items():
        client = client_errors.from_rpc_error(Failed(cls.code, reason))  # type: ignore[arg-type]
        assert client.code == cls.code, reason
        # The client folds queue-full and memory-full into Overloaded; the server's are its subclasses.
        names = {c.__name__ for c in cls.__mro__}
        if type(client) is client_errors.KernelServiceError:
            continue  # the client has no class of its own for this status
        assert type(client).__name__ in names, (reason, cls.__name__, type(client).__name__)
