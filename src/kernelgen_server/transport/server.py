"""Assembles a kernelgen gRPC server and runs its life cycle.

``create_server(settings)`` builds everything and binds the port (0 picks a
free one, so tests can run many servers); ``Server.start()`` warms the
models and turns health SERVING; ``Server.stop()`` drains.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from typing import Any

from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2

from kernelgen_server.core.metrics import Metrics
from kernelgen_server.core.service import KernelService
from kernelgen_server.repository.store import CONFIG_FILE, ModelRepository, embedded_repository
from kernelgen_server.settings import ServerSettings, flag
from kernelgen_server.transport.metrics_http import MetricsEndpoint, serve_metrics
from kernelgen_server.transport.native_shared_memory import SharedMemoryGeneratorServicer
from kernelgen_server.transport.oip_servicer import OIP_SERVICE_NAME, InferenceServicer, reflection_pool
from kernelgen_server.transport.ports import ListenError, check_free
from kernelgen_server.transport.readiness import HealthStates
from kernelgen_server.transport.security import BearerTokenInterceptor, load_tokens, server_credentials
from kernelgen_server.transport.shared_memory import SharedMemoryRegistry
from kernelgen_server.transport.unsent import UnsentResponses
from kernelgen_wire.malloc import tune_malloc
from kernelgen_wire.oip import grpc_service_pb2 as oip_pb
from kernelgen_wire.rpc import HEALTH_SERVICE_NAME, SERVICE_NAME
from kernelgen_wire.v1 import kernelgen_pb2 as pb

__all__ = ["ListenError", "ModelsFailedError", "NoModelError", "Server", "create_server", "serve"]

log = logging.getLogger("kernelgen.server")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Room for the protobuf envelope around the largest payload a message may carry.
_ENVELOPE_BYTES = 64 * 1024
_HANDSHAKE_TIMEOUT_MS = 10_000
#: Calls at once on one connection; more wait for one to finish (HTTP/2 flow, not an error).
_STREAMS_PER_CONNECTION = 1024


class ModelsFailedError(RuntimeError):
    """``--strict`` and at least one model failed to load."""


class NoModelError(ModelsFailedError):
    """No model of the repository loaded, and ``--allow-empty`` was not given."""


class Server:
    """A bound, not yet started server with its core, health and metrics."""

    def __init__(
        self,
        settings: ServerSettings,
        service: KernelService,
        grpc_server: aio.Server,
        health: health_aio.HealthServicer,
        port: int,
        tokens: list[bytes] | None = None,
        shared_memory: SharedMemoryRegistry | None = None,
    ) -> None:
        self.settings = settings
        #: The registered shared-memory regions (None: --shared-memory is off).
        self.shared_memory = shared_memory
        self.service = service
        self.grpc_server = grpc_server
        self.health = health
        self.port = port
        self.metrics_port: int | None = None
        self._tokens = tokens
        self._metrics: MetricsEndpoint | None = None
        self._stopped = asyncio.Event()
        self._unsent = UnsentResponses(service.metrics.unsent_responses)

    @property
    def repository(self) -> ModelRepository:
        return self.service.repository

    async def start(self) -> None:
        """Listen, warm every model, then report SERVING (overall and per ready model)."""
        for name in [*self.repository.names(), *self.repository.groups]:
            await self.health.set(name, NOT_SERVING)
        await self.health.set("", NOT_SERVING)
        self._unsent.install()
        await self.grpc_server.start()
        settings = self.settings
        if settings.metrics_port:
            tls = (settings.tls_cert, settings.tls_key) if settings.tls_cert and settings.tls_key else None
            self._metrics = serve_metrics(
                self.service.metrics.registry,
                settings.metrics_address(),
                settings.metrics_port,
                tokens=self._tokens,
                tls=tls,
            )
            self.metrics_port = self._metrics.port
        if self.settings.warmup:
            await self.service.warmup()
        for name in self.repository.ready:
            await self.health.set(name, SERVING)
            self.service.metrics.models_ready.labels(name).set(1)
        for name in self.repository.failed:
            self.service.metrics.models_ready.labels(name).set(0)
        for name in self.repository.groups:  # a group serves when every member does
            if self.repository.group_ready(name):
                await self.health.set(name, SERVING)
        await self.health.set(SERVICE_NAME, SERVING)
        await self.health.set("", SERVING)
        log.info(
            "kernelgen serving %d model(s) on %s:%d (device %s%s)",
            len(self.repository.ready),
            self.settings.host,
            self.port,
            self.service.device,
            f", metrics on {self.settings.metrics_url(self.metrics_port)}" if self.metrics_port else "",
        )

    async def stop(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING, refuse new calls, finish in-flight ones within ``grace`` seconds."""
        if self._stopped.is_set():
            return
        grace = self.settings.grace_s if grace is None else grace
        log.info("draining (grace %.1f s)", grace)
        self.service.draining = True
        await self.health.enter_graceful_shutdown()
        # grpc refuses new calls at once and waits up to `grace` for those in flight;
        # their batches keep running because the batcher is closed only afterwards.
        await self.grpc_server.stop(grace)
        await self.service.close(drain=True)
        if self._metrics is not None:
            self._metrics.close()
        self._unsent.remove()
        if self.shared_memory is not None:
            await self.shared_memory.close()
        self._stopped.set()
        log.info("stopped")

    async def wait_for_termination(self) -> None:
        await self._stopped.wait()


def _load_repository(settings: ServerSettings) -> ModelRepository:
    root = settings.model_repo if settings.model_repo is not None else embedded_repository()
    repository = ModelRepository.load(root)
    if repository.failed and settings.strict:
        reasons = "; ".join(f"{f.name}: {f.reason}" for f in repository.failed.values())
        raise ModelsFailedError(f"--strict: {len(repository.failed)} model(s) failed to load: {reasons}")
    if not repository.ready and not settings.allow_empty:
        raise NoModelError(_nothing_to_serve(repository))
    return repository


def _nothing_to_serve(repository: ModelRepository) -> str:
    """Why ``repository`` has no model to serve: what its folder holds, or each model's failure."""
    root = repository.root
    allow = f"; {flag('allow_empty')} starts the server with none"
    if repository.failed:
        reasons = "".join(f"\n  {f.name}: {f.reason}" for f in repository.failed.values())
        return f"no model of {root} loads ({len(repository.failed)} found, each failed){allow}:{reasons}"
    if (root / CONFIG_FILE).is_file():
        return (
            f"{root} is a model folder, not a repository of them: give the folder that holds it "
            f"({flag('model_repo')} {root.parent})"
        )
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
    held = (
        f"it holds only {', '.join(found[:10])}{' ...' if len(found) > 10 else ''}"
        if found
        else "it is empty"
    )
    return (
        f"no model in {root}: {held} (a model is a folder holding {CONFIG_FILE} and model.safetensors; "
        f"kernelgen init or kernelgen import writes one; folders starting with . or _ are skipped){allow}"
    )


def _check_ports(settings: ServerSettings, reuse_port: bool) -> None:
    """Fail before any model loads when the gRPC or /metrics port cannot be had (``ListenError``).

    A worker sharing its supervisor's port (``reuse_port``) is not checked: the supervisor holds it.
    """
    if not reuse_port:
        check_free(settings.host, settings.port, setting="port", host_setting="host")
    if settings.metrics_port:
        check_free(
            settings.metrics_address(),
            settings.metrics_port,
            setting="metrics_port",
            host_setting="metrics_host",
        )


def _receive_limit(repository: ModelRepository, settings: ServerSettings) -> int:
    """Largest legal request: the widest conditioning at the row limit, float32."""
    widest = max((m.module.cond_dim or 0 for m in repository.ready.values()), default=0)
    return settings.max_conditioning_rows * widest * 4 + _ENVELOPE_BYTES


def create_server(
    settings: ServerSettings,
    *,
    repository: ModelRepository | None = None,
    metrics: Metrics | None = None,
    worker: int = 0,
    reuse_port: bool = False,
) -> tuple[Server, int]:
    """Build the server and bind its port; returns it (not started) and the bound port.

    ``worker`` is this process's index under a supervisor, and ``reuse_port`` lets it
    share the port with its sibling workers (SO_REUSEPORT); a server on its own refuses
    to share. Must be called with an event loop running (grpc.aio binds to it).
    """
    _check_ports(settings, reuse_port)
    repository = repository or _load_repository(settings)
    service = KernelService(repository, settings, metrics=metrics, worker=worker)
    interceptors: list[aio.ServerInterceptor] = []
    tokens = load_tokens(settings.auth_token_file) if settings.auth_token_file is not None else None
    if tokens is not None:
        interceptors.append(BearerTokenInterceptor(tokens))
    options: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", int(settings.max_message_bytes) + _ENVELOPE_BYTES),
        ("grpc.max_receive_message_length", _receive_limit(repository, settings)),
        # Clients may ping every 20 s, even between calls, to keep idle connections alive.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
        # A lone server never shares its port: a second one started by mistake must fail to
        # bind. Only the workers of one supervisor share theirs (supervisor.py).
        ("grpc.so_reuseport", int(reuse_port)),
        # Connections are bounded: at most connection_limit() at once (the file-descriptor
        # budget), one with no call in progress is closed after max_connection_idle_s, and
        # one that has not completed its handshake within 10 s is dropped.
        ("grpc.max_allowed_incoming_connections", settings.connection_limit()),
        ("grpc.max_connection_idle_ms", int(settings.max_connection_idle_s * 1000)),
        ("grpc.server_handshake_timeout_ms", _HANDSHAKE_TIMEOUT_MS),
        ("grpc.max_concurrent_streams", _STREAMS_PER_CONNECTION),
    ]
    grpc_server = aio.server(
        interceptors=interceptors,
        options=options,
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
    )
    registry = None
    if settings.shared_memory:
        registry = SharedMemoryRegistry(max_regions=settings.shared_memory_max_regions)
    servicer = SharedMemoryGeneratorServicer(service, registry)
    health = HealthStates()
    inference = InferenceServicer(service, health, registry)
    grpc_server.add_generic_rpc_handlers(
        (servicer.handler(), servicer.shared_memory_handler(), inference.handler())
    )
    health_pb2_grpc.add_HealthServicer_to_server(health, grpc_server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, OIP_SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME),
        grpc_server,
        pool=reflection_pool(
            pb.DESCRIPTOR, oip_pb.DESCRIPTOR, health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR
        ),
    )
    address = f"{settings.host}:{settings.port}"
    try:
        if settings.tls_cert is not None and settings.tls_key is not None:
            creds = server_credentials(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
            port = grpc_server.add_secure_port(address, creds)
        else:
            port = grpc_server.add_insecure_port(address)
    except RuntimeError:  # gRPC's "Failed to bind": taken since _check_ports, or not an address here
        port = 0
    if port == 0:
        raise ListenError(
            None,
            f"cannot listen for gRPC on {address}: gRPC could not bind it (taken meanwhile?); "
            f"check {flag('host')} and {flag('port')}",
        )
    return Server(settings, service, grpc_server, health, port, tokens, registry), port


async def serve(
    settings: ServerSettings,
    *,
    worker: int = 0,
    reuse_port: bool = False,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[int], None] | None = None,
) -> int:
    """Run until SIGTERM, SIGINT or ``stop``, then drain; the exit code of ``kernelgen serve``.

    ``on_ready(port)`` runs once the server is SERVING; by default it prints the listening line.
    """
    if settings.tune_malloc:
        tune_malloc()
    server, port = create_server(settings, worker=worker, reuse_port=reuse_port)
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
    except BaseException:
        await server.stop(0)  # a half-started gRPC server must not be left to the garbage collector
        raise
    if on_ready is None:
        print(f"kernelgen: listening on {settings.url(port)}", flush=True)
    else:
        on_ready(port)
    await stop.wait()
    await server.stop()
    return 0
