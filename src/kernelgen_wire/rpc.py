"""The service's name and method paths, as both ends spell them."""

from __future__ import annotations

from kernelgen_wire.v1 import kernelgen_pb2 as pb

__all__ = ["HEALTH_CHECK_PATH", "HEALTH_SERVICE_NAME", "METHOD_NAMES", "SERVICE_NAME", "method_path"]

#: ``kernelgen.v1.KernelGenerator``.
SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["KernelGenerator"].full_name
#: The service's methods, in the order the .proto declares them.
METHOD_NAMES: tuple[str, ...] = tuple(
    method.name for method in pb.DESCRIPTOR.services_by_name["KernelGenerator"].methods
)
#: The standard gRPC health service, served beside kernelgen's.
HEALTH_SERVICE_NAME = "grpc.health.v1.Health"
HEALTH_CHECK_PATH = f"/{HEALTH_SERVICE_NAME}/Check"


def method_path(name: str) -> str:
    """``/kernelgen.v1.KernelGenerator/<name>`` for one of ``METHOD_NAMES``."""
    if name not in METHOD_NAMES:
        raise ValueError(f"{SERVICE_NAME} has no method {name!r}")
    return f"/{SERVICE_NAME}/{name}"
