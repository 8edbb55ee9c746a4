"""Everything a client channel is built from: target, service config, options, credentials.

Targets:
- ``"host:port"`` goes to gRPC's DNS resolver unchanged (a name resolving to
  several addresses is balanced over all of them);
- several ``host:port`` (a list, or one comma-separated string) become one
  static ``ipv4:`` / ``ipv6:`` target, each host resolved once, here;
- a URI with a scheme (``dns:///name:port``, ``ipv4:...``, ``unix:...``)
  passes through.

Every channel balances with ``round_robin`` and retries through gRPC's own
retry policy: UNAVAILABLE always; RESOURCE_EXHAUSTED only as the server's
``grpc-retry-pushback-ms`` trailer allows (positive for a full queue, -1 for
a kernel over a limit, which gRPC then never retries). Keepalive pings every
30 s, within the server's permitted minimum of 10 s.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kernelgen_wire.rpc import HEALTH_SERVICE_NAME, SERVICE_NAME

__all__ = [
    "DEFAULT_TARGET",
    "MetadataLike",
    "RetryPolicy",
    "TLSConfig",
    "TargetLike",
    "bearer",
    "channel_credentials",
    "channel_options",
    "coerce_tls",
    "default_target",
    "merge_metadata",
    "resolve_target",
    "service_config",
]

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_PORT = 50051

#: A target: ``"host:port"``, ``"h1:p1,h2:p2"``, a list of ``host:port``, or a gRPC URI.
TargetLike = str | Sequence[str]
#: Call metadata: a mapping or ``(key, value)`` pairs; keys are lower-case.
MetadataLike = Mapping[str, str] | Sequence[tuple[str, str]]
PemLike = bytes | str | Path

_URI_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:", "xds:")


def default_target() -> str:
    """``$KERNELGEN_TARGET``, else ``127.0.0.1:50051``."""
    return os.environ.get("KERNELGEN_TARGET", "").strip() or DEFAULT_TARGET


def _split_host_port(address: str) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or a bare host (port 50051)."""
    address = address.strip()
    if not address:
        raise ValueError("empty target address")
    if address.startswith("["):
        host, sep, rest = address[1:].partition("]")
        if not sep:
            raise ValueError(f"target {address!r}: unclosed '[' in an IPv6 address")
        port_text = rest.removeprefix(":") if rest else ""
    elif address.count(":") > 1:  # a bare IPv6 address
        host, port_text = address, ""
    else:
        host, _, port_text = address.partition(":")
    if not port_text:
        return host, DEFAULT_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"target {address!r}: port must be a number from 1 to 65535")
    return host, int(port_text)


def _resolve(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ValueError(f"target host {host!r} does not resolve: {exc.strerror}") from None
    seen: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if address not in seen:
            seen.append(address)
    return seen


def resolve_target(target: TargetLike) -> str:
    """The gRPC target string for a ``TargetLike``.

    >>> resolve_target(["127.0.0.1:5001", "127.0.0.2:5002"])
    'ipv4:127.0.0.1:5001,127.0.0.2:5002'
    >>> resolve_target("dns:///kernelgen.default.svc:50051")
    'dns:///kernelgen.default.svc:50051'
    """
    if isinstance(target, str):
        text = target.strip()
        if text.startswith(_URI_SCHEMES):
            return text
        parts = [p for p in text.split(",") if p.strip()]
    else:
        parts = [str(p) for p in target]
    if not parts:
        raise ValueError("no target address given")
    if len(parts) == 1:
        host, port = _split_host_port(parts[0])
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    # Several addresses: one static list. gRPC's ipv4:/ipv6: schemes each take one family.
    resolved = [(_resolve(host, port), port) for host, port in map(_split_host_port, parts)]
    for version, scheme in ((4, "ipv4"), (6, "ipv6")):
        chosen = []
        for addresses, port in resolved:
            match = next((a for a in addresses if a.version == version), None)
            if match is None:
                break
            chosen.append(f"{match}:{port}" if version == 4 else f"[{match}]:{port}")
        else:
            return f"{scheme}:" + ",".join(chosen)
    raise ValueError(
        f"targets {parts} mix IPv4-only and IPv6-only hosts; gRPC balances over one family at a "
        "time (use a dns:/// name that resolves to all of them)"
    )


@dataclass(frozen=True)
class RetryPolicy:
    """How calls are retried: gRPC's built-in retry, configured through the service config.

    UNAVAILABLE is retried with jittered exponential backoff; RESOURCE_EXHAUSTED
    only when the server allows it with a positive ``grpc-retry-pushback-ms``
    (a full queue), never for an over-size kernel (pushback -1). gRPC allows at
    most 5 attempts. ``wait_for_ready`` makes calls wait for a connection
    (until their deadline) instead of failing at once while none is up, which
    carries a client across a server restart.

    gRPC retries a call only until its response has begun. ``replays`` is how
    many times a kernel call whose response was then cut (a replica that died
    mid-response, a proxy's reset: ``KernelServiceError.interrupted``) is sent
    again from the start, within its deadline; every kernelgen call is
    idempotent. Behind a proxy this is what keeps a streamed kernel whose
    replica died from being lost.

    Example::

        KernelClient("127.0.0.1:50051", retries=RetryPolicy(max_attempts=3, wait_for_ready=True))
    """

    max_attempts: int = 5
    initial_backoff: float = 0.1
    max_backoff: float = 2.0
    backoff_multiplier: float = 2.0
    wait_for_ready: bool = False
    replays: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.replays <= 3:
            raise ValueError(f"replays must be 0 to 3, got {self.replays}")
        if not 1 <= self.max_attempts <= 5:
            raise ValueError(f"max_attempts must be 1 to 5 (gRPC's limit), got {self.max_attempts}")
        if not 0 < self.initial_backoff <= self.max_backoff:
            raise ValueError("backoffs must satisfy 0 < initial_backoff <= max_backoff")
        if self.backoff_multiplier < 1:
            raise ValueError("backoff_multiplier must be >= 1")

    @classmethod
    def coerce(cls, value: RetryPolicy | int | None) -> RetryPolicy:
        """``None`` or ``0`` turns retries (and replays) off, an int sets ``max_attempts``."""
        if isinstance(value, RetryPolicy):
            return value
        if value is None or value == 0:
            return cls(max_attempts=1, replays=0)
        return cls(max_attempts=int(value))


def _seconds(value: float) -> str:
    return f"{value:.3f}s"


def service_config(retries: RetryPolicy, load_balancing: str = "round_robin") -> str:
    """The service config JSON: load balancing policy and the retry policy."""
    config: dict[str, Any] = {"loadBalancingConfig": [{load_balancing: {}}]}
    if retries.max_attempts > 1:
        config["methodConfig"] = [
            {
                "name": [{"service": SERVICE_NAME}, {"service": HEALTH_SERVICE_NAME}],
                "retryPolicy": {
                    "maxAttempts": retries.max_attempts,
                    "initialBackoff": _seconds(retries.initial_backoff),
                    "maxBackoff": _seconds(retries.max_backoff),
                    "backoffMultiplier": retries.backoff_multiplier,
                    "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
                },
            }
        ]
    return json.dumps(config)


def channel_options(
    retries: RetryPolicy,
    *,
    load_balancing: str = "round_robin",
    server_name_override: str | None = None,
    extra: Sequence[tuple[str, Any]] = (),
) -> list[tuple[str, Any]]:
    """Channel arguments; ``extra`` ones win."""
    from kernelgen_client import __version__

    options: list[tuple[str, Any]] = [
        ("grpc.service_config", service_config(retries, load_balancing)),
        ("grpc.enable_retries", 1),
        # Conditioning of up to ~16 MiB stays retryable (gRPC's default buffer is 256 KiB).
        ("grpc.per_rpc_retry_buffer_size", 16 << 20),
        # Unary kernels are small by choice; a server with a raised limit must still be readable.
        ("grpc.max_receive_message_length", -1),
        ("grpc.max_send_message_length", -1),
        # Keepalive within the server's policy (min 10 s between pings, allowed while idle).
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # Reconnect soon after a server comes back (gRPC's default starts at 1 s, grows to 120 s).
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 5_000),
        ("grpc.primary_user_agent", f"kernelgen-python/{__version__}"),
    ]
    if server_name_override:
        options.append(("grpc.ssl_target_name_override", server_name_override))
    names = {name for name, _ in extra}
    return [(n, v) for n, v in options if n not in names] + list(extra)


def _pem(value: PemLike | None) -> bytes | None:
    """PEM bytes from bytes, PEM text, or a path to a PEM file."""
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, str) and value.lstrip().startswith("-----BEGIN"):
        return value.encode()
    return Path(value).expanduser().read_bytes()


@dataclass(frozen=True)
class TLSConfig:
    """TLS settings; each PEM is bytes, PEM text, or a path to a file.

    Without ``root_certificates`` the system's trust store is used. Give
    ``certificate_chain`` and ``private_key`` for mutual TLS.
    ``server_name_override`` checks the server's certificate against that name
    instead of the target's host (for tests and IP targets only).

    Example::

        KernelClient("kernelgen.example.com:443", tls=TLSConfig(root_certificates="ca.pem"))
    """

    root_certificates: PemLike | None = None
    certificate_chain: PemLike | None = None
    private_key: PemLike | None = None
    server_name_override: str | None = None

    def __post_init__(self) -> None:
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ValueError("certificate_chain and private_key go together (mutual TLS)")


def channel_credentials(tls: TLSConfig) -> Any:
    import grpc

    return grpc.ssl_channel_credentials(
        root_certificates=_pem(tls.root_certificates),
        private_key=_pem(tls.private_key),
        certificate_chain=_pem(tls.certificate_chain),
    )


def coerce_tls(tls: TLSConfig | bool | None) -> TLSConfig | None:
    if tls is True:
        return TLSConfig()
    if tls is None or tls is False:
        return None
    return tls


def merge_metadata(*layers: MetadataLike | None) -> tuple[tuple[str, str], ...]:
    """Metadata pairs, later layers adding to earlier ones (a repeated key is sent twice)."""
    pairs: list[tuple[str, str]] = []
    for layer in layers:
        if not layer:
            continue
        items = layer.items() if isinstance(layer, Mapping) else layer
        for key, value in items:
            pairs.append((str(key).lower(), str(value)))
    return tuple(pairs)


def bearer(token: str | None) -> tuple[tuple[str, str], ...]:
    """The ``authorization`` metadata for a bearer token."""
    return (("authorization", f"Bearer {token}"),) if token else ()
