"""``grpc.health.v1.Health/Check`` without the grpcio-health-checking package.

The two messages are tiny (``HealthCheckRequest { string service = 1; }``,
``HealthCheckResponse { ServingStatus status = 1; }``), so they are encoded
by hand: the light client keeps its three dependencies and ``kernelgen
health`` stays cheap to start.
"""

from __future__ import annotations

from kernelgen_client.results import HealthStatus
from kernelgen_wire.protowire import fields, varint

__all__ = ["decode_response", "encode_request"]


def encode_request(service: str) -> bytes:
    """A serialized ``HealthCheckRequest`` (empty service: the whole server)."""
    name = service.encode()
    return b"\x0a" + varint(len(name)) + name if name else b""


def decode_response(data: bytes) -> HealthStatus:
    """The status of a serialized ``HealthCheckResponse``; unknown values read as UNKNOWN."""
    status = 0
    for number, _wire_type, value in fields(memoryview(data)):
        if number == 1 and isinstance(value, int):
            status = value
    try:
        return HealthStatus(status)
    except ValueError:
        return HealthStatus.UNKNOWN
