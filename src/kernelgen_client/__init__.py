"""kernelgen client: generate SIREN convolution kernels on a remote kernelgen server.

Example::

    from kernelgen_client import KernelClient

    with KernelClient("127.0.0.1:50051") as client:
        kernel = client.generate("hyena-2d", [29, 29])   # numpy array [1, 57, 57, 384]

The clients (and numpy) are imported on first use, so ``kernelgen health``
and ``from kernelgen_client import errors`` start fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kernelgen_client._channel import DEFAULT_TARGET, RetryPolicy, TLSConfig
from kernelgen_client.errors import (
    Cancelled,
    ConditioningNotSupported,
    ConnectionFailed,
    DeadlineExceeded,
    FailedPrecondition,
    InternalServerError,
    InvalidRequest,
    KernelServiceError,
    KernelTooLarge,
    MalformedResponse,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    PermissionDenied,
    RegionNotFound,
    ResourceExhausted,
    ServerDraining,
    SharedMemoryUnavailable,
    Unauthenticated,
    Unavailable,
)
from kernelgen_client.results import (
    FiLMConfig,
    FlopReport,
    GroupInfo,
    HealthStatus,
    KernelResult,
    ModelConfig,
    ModelInfo,
    ServerReport,
)
from kernelgen_wire.malloc import tune_malloc

if TYPE_CHECKING:
    from kernelgen_client.aio import AsyncKernelClient
    from kernelgen_client.client import KernelClient
    from kernelgen_client.factored import FactoredKernel, KernelMask, OutputHead
    from kernelgen_client.shared_memory import SharedMemoryPolicy


def _installed_version() -> str:
    """The distribution's version from its package metadata (pyproject.toml's, once installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kernelgen")
    except PackageNotFoundError:  # a source tree without package metadata
        return "0+unknown"


__version__ = _installed_version()

__all__ = [
    "DEFAULT_TARGET",
    "AsyncKernelClient",
    "Cancelled",
    "ConditioningNotSupported",
    "ConnectionFailed",
    "DeadlineExceeded",
    "FactoredKernel",
    "FailedPrecondition",
    "FiLMConfig",
    "FlopReport",
    "GroupInfo",
    "HealthStatus",
    "InternalServerError",
    "InvalidRequest",
    "KernelClient",
    "KernelMask",
    "KernelResult",
    "KernelServiceError",
    "KernelTooLarge",
    "MalformedResponse",
    "ModelConfig",
    "ModelInfo",
    "ModelNotFound",
    "ModelNotReady",
    "OutputHead",
    "Overloaded",
    "PermissionDenied",
    "RegionNotFound",
    "ResourceExhausted",
    "RetryPolicy",
    "ServerDraining",
    "ServerReport",
    "SharedMemoryPolicy",
    "SharedMemoryUnavailable",
    "TLSConfig",
    "Unauthenticated",
    "Unavailable",
    "__version__",
    "tune_malloc",
]

_LAZY = {
    "KernelClient": "kernelgen_client.client",
    "AsyncKernelClient": "kernelgen_client.aio",
    "FactoredKernel": "kernelgen_client.factored",
    "KernelMask": "kernelgen_client.factored",
    "OutputHead": "kernelgen_client.factored",
    "SharedMemoryPolicy": "kernelgen_client.shared_memory",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kernelgen_client' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
