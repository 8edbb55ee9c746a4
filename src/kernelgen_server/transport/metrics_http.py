"""The ``/metrics`` endpoint: Prometheus text over HTTP, or HTTPS, optionally behind bearer tokens.

Where it listens is the operator's choice (``--metrics-host``); by default a
server with TLS or bearer tokens keeps its metrics on loopback (they name its
models and describe its traffic). When tokens are on, ``/metrics`` wants one
of the same tokens (``Authorization: Bearer <token>``, as Prometheus sends
with ``authorization: credentials_file``); when TLS is on, it is served over
HTTPS with the server's certificate.
"""

from __future__ import annotations

import socketserver
import ssl
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

from kernelgen_server.transport.ports import listen_error
from kernelgen_server.transport.security import bearer_matches

__all__ = ["MetricsEndpoint", "serve_metrics"]

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def _with_tokens(app: WSGIApp, tokens: list[bytes]) -> WSGIApp:
    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        header = environ.get("HTTP_AUTHORIZATION", "").encode("latin-1", "replace")
        if bearer_matches(header, tokens):
            return app(environ, start_response)
        start_response("401 Unauthorized", [("WWW-Authenticate", "Bearer"), ("Content-Type", "text/plain")])
        return [b"a bearer token is needed\n"]

    return guarded


class MetricsEndpoint:
    """A running ``/metrics`` server; ``close`` stops it."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server, self._thread = server, thread
        self.port = int(server.server_port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve_metrics(
    registry: CollectorRegistry,
    host: str,
    port: int,
    *,
    tokens: list[bytes] | None = None,
    tls: tuple[Path, Path] | None = None,
) -> MetricsEndpoint:
    """Serve ``registry`` on ``host:port`` (0 picks a free port) in a daemon thread.

    Raises ``ListenError``, naming ``--metrics-port``, when the address cannot be bound.
    """
    app: WSGIApp = make_wsgi_app(registry)
    if tokens:
        app = _with_tokens(app, tokens)
    try:
        server = make_server(host, port, app, server_class=_Server, handler_class=_QuietHandler)
    except OSError as exc:
        raise listen_error(exc, host, port, setting="metrics_port", host_setting="metrics_host") from None
    if tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(tls[0]), str(tls[1]))
        server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, name="kernelgen-metrics", daemon=True)
    thread.start()
    return MetricsEndpoint(server, thread)
