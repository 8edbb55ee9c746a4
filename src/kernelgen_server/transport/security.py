"""Transport security: TLS credentials and bearer-token authentication.

Tokens are compared in constant time and never logged. The health service
(and the Open Inference Protocol's ServerLive, ServerReady and ModelReady)
stays open so that load balancers and Kubernetes probes need no token.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

__all__ = ["BearerTokenInterceptor", "bearer_matches", "load_tokens", "server_credentials"]

log = logging.getLogger("kernelgen.security")

# Methods reachable without a token: health checks must work for probes. The Open Inference
# Protocol's three health questions stay open too, as the standard health service does; its
# metadata, inference, statistics and shared-memory methods need a token.
OPEN_SERVICES = (
    "/grpc.health.v1.Health/",
    "/inference.GRPCInferenceService/ServerLive",
    "/inference.GRPCInferenceService/ServerReady",
    "/inference.GRPCInferenceService/ModelReady",
)


def server_credentials(cert: Path, key: Path, client_ca: Path | None) -> grpc.ServerCredentials:
    """TLS credentials; with ``client_ca`` clients must present a certificate it signed (mutual TLS)."""
    root = client_ca.read_bytes() if client_ca is not None else None
    return grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())],
        root_certificates=root,
        require_client_auth=client_ca is not None,
    )


def load_tokens(path: Path) -> list[bytes]:
    """Accepted tokens, one per line; blank lines and ``#`` comments are skipped."""
    tokens = [
        line.strip().encode()
        for line in path.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not tokens:
        raise ValueError(f"auth token file {path} holds no token")
    return tokens


def bearer_matches(header: bytes, tokens: list[bytes]) -> bool:
    """Whether an ``Authorization`` value is ``Bearer <token>`` for one of ``tokens``.

    Compared against every token, in constant time, so timing says nothing about
    which one (or none) matched.
    """
    scheme, _, token = header.partition(b" ")
    if scheme.lower() != b"bearer":
        return False
    matched = False
    for accepted in tokens:
        matched |= hmac.compare_digest(token.strip(), accepted)
    return matched


class BearerTokenInterceptor(aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses calls without ``authorization: Bearer <token>`` for an accepted token."""

    def __init__(self, tokens: list[bytes]) -> None:
        self._tokens = tokens

    def _authorized(self, metadata: tuple[tuple[str, str | bytes], ...]) -> bool:
        for key, value in metadata:
            if key == "authorization":
                return bearer_matches(value.encode() if isinstance(value, str) else value, self._tokens)
        return False

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method  # type: ignore[attr-defined]
        metadata = tuple(handler_call_details.invocation_metadata or ())  # type: ignore[attr-defined]
        handler = await continuation(handler_call_details)
        if handler is None or method.startswith(OPEN_SERVICES) or self._authorized(metadata):
            return handler
        log.warning("refused unauthenticated call to %s", method)
        return _refusal(handler)


_MESSAGE = "missing or invalid bearer token"


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that answers UNAUTHENTICATED."""

    async def unary(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, _MESSAGE)

    async def stream(request: Any, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, _MESSAGE)
        yield  # pragma: no cover - makes this an async generator

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(  # type: ignore[operator]
        stream if handler.response_streaming else unary,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
