"""Configuration and method table shared by ``KernelClient`` and ``AsyncKernelClient``.

The two clients differ only in how they wait for I/O; everything they are
configured with, the RPC paths and (de)serializers, and the per-model info
cache live here.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from kernelgen_client._channel import (
    MetadataLike,
    RetryPolicy,
    TargetLike,
    TLSConfig,
    bearer,
    channel_credentials,
    channel_options,
    coerce_tls,
    default_target,
    merge_metadata,
    resolve_target,
)
from kernelgen_client.results import ModelInfo
from kernelgen_wire.rpc import HEALTH_CHECK_PATH, method_path
from kernelgen_wire.v1 import kernelgen_pb2 as pb

__all__ = [
    "METHODS",
    "STREAMS",
    "Channels",
    "ClientConfig",
    "Method",
    "ModelCache",
    "bind_methods",
    "open_channel",
]


def _raw(data: bytes) -> bytes:
    return data


@dataclass(frozen=True)
class Method:
    """One RPC: its full path and how its messages cross the wire."""

    path: str
    serialize: Callable[[Any], bytes]
    deserialize: Callable[[bytes], Any]


def _service_method(name: str, request: Any, response: Callable[[bytes], Any]) -> Method:
    return Method(method_path(name), request.SerializeToString, response)


#: Kernel responses stay raw bytes: ``kernelgen_wire.kernel_messages`` reads them without
#: copying the payload.
METHODS: dict[str, Method] = {
    "GenerateKernel": _service_method("GenerateKernel", pb.GenerateKernelRequest, _raw),
    "StreamKernel": _service_method("StreamKernel", pb.GenerateKernelRequest, _raw),
    "FlopCount": _service_method("FlopCount", pb.FlopCountRequest, pb.FlopCountResponse.FromString),
    "ListModels": _service_method("ListModels", pb.ListModelsRequest, pb.ListModelsResponse.FromString),
    "GetModel": _service_method("GetModel", pb.GetModelRequest, pb.ModelInfo.FromString),
    "GetOutputHead": _service_method("GetOutputHead", pb.GetOutputHeadRequest, pb.OutputHead.FromString),
    "GenerateGroup": _service_method("GenerateGroup", pb.GenerateGroupRequest, _raw),
    "RegisterSharedMemory": _service_method(
        "RegisterSharedMemory", pb.RegisterSharedMemoryRequest, pb.RegisterSharedMemoryResponse.FromString
    ),
    "UnregisterSharedMemory": _service_method(
        "UnregisterSharedMemory",
        pb.UnregisterSharedMemoryRequest,
        pb.UnregisterSharedMemoryResponse.FromString,
    ),
    "Check": Method(HEALTH_CHECK_PATH, _raw, _raw),
}
#: The methods whose responses are streams.
STREAMS = ("StreamKernel", "GenerateGroup")


@dataclass(frozen=True)
class ClientConfig:
    """A client's resolved settings."""

    target: str
    options: list[tuple[str, Any]]
    credentials: Any  # grpc.ChannelCredentials, or None for plaintext
    metadata: tuple[tuple[str, str], ...]
    timeout: float | None
    retries: RetryPolicy

    @classmethod
    def build(
        cls,
        target: TargetLike | None,
        *,
        timeout: float | None,
        tls: TLSConfig | bool | None,
        token: str | None,
        metadata: MetadataLike | None,
        retries: RetryPolicy | int | None,
        load_balancing: str,
        options: Sequence[tuple[str, Any]],
    ) -> ClientConfig:
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be positive seconds or None, got {timeout!r}")
        policy = RetryPolicy.coerce(retries)
        tls_config = coerce_tls(tls)
        return cls(
            target=resolve_target(default_target() if target is None else target),
            options=channel_options(
                policy,
                load_balancing=load_balancing,
                server_name_override=tls_config.server_name_override if tls_config else None,
                extra=options,
            ),
            credentials=channel_credentials(tls_config) if tls_config else None,
            metadata=merge_metadata(bearer(token), metadata),
            timeout=timeout,
            retries=policy,
        )

    def call_metadata(self, extra: MetadataLike | None) -> tuple[tuple[str, str], ...] | None:
        pairs = merge_metadata(self.metadata, extra)
        return pairs or None

    def call_timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout


def open_channel(config: ClientConfig, api: Any) -> Any:
    """A channel built by ``api``: the ``grpc`` module or ``grpc.aio`` (same constructors)."""
    if config.credentials is None:
        return api.insecure_channel(config.target, options=config.options)
    return api.secure_channel(config.target, config.credentials, options=config.options)


class Channels:
    """A client's ``connections`` channels; each call takes the next one in turn.

    One channel holds one HTTP/2 connection per server address. A server of several
    worker processes (``kernelgen serve --workers N``) is balanced by connection, so a
    client reaches all of its workers only over several channels, each with a
    subchannel pool of its own (gRPC would otherwise share one connection among them).
    """

    def __init__(self, config: ClientConfig, api: Any, connections: int = 1) -> None:
        if connections < 1:
            raise ValueError(f"connections must be at least 1, got {connections!r}")
        if connections > 1:
            config = replace(config, options=[*config.options, ("grpc.use_local_subchannel_pool", 1)])
        self.channels = [open_channel(config, api) for _ in range(connections)]
        # cycle's next() is one C call: safe to share among threads (KernelClient).
        self._turns = itertools.cycle([bind_methods(channel) for channel in self.channels])

    def unary(self, name: str) -> Any:
        """The next channel's callable for the unary method ``name``."""
        return next(self._turns)[0][name]

    def stream(self, name: str = "StreamKernel") -> Any:
        """The next channel's callable for the server-streaming method ``name``."""
        return next(self._turns)[1][name]


def bind_methods(channel: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The channel's callables: unary ones by method name, and streaming ones by method name."""
    unary: dict[str, Any] = {}
    streams: dict[str, Any] = {}
    for name, m in METHODS.items():
        kind = channel.unary_stream if name in STREAMS else channel.unary_unary
        bound = kind(m.path, request_serializer=m.serialize, response_deserializer=m.deserialize)
        (streams if name in STREAMS else unary)[name] = bound
    return unary, streams


class ModelCache:
    """``ModelInfo`` per model name, used only to predict response sizes.

    A stale entry is harmless: it can only choose the other transport, and a
    unary call refused as too large is redone as a stream.
    """

    def __init__(self) -> None:
        self._infos: dict[str, ModelInfo] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> ModelInfo | None:
        with self._lock:
            return self._infos.get(name)

    def put(self, info: ModelInfo) -> None:
        with self._lock:
            self._infos[info.name] = info

    def clear(self) -> None:
        with self._lock:
            self._infos.clear()
