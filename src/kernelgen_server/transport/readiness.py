"""The standard health service, with its states readable by the server's other services.

The Open Inference Protocol's ServerReady and ModelReady answer from the same
states as ``grpc.health.v1`` (the server: ``""``; each model: its name), so
both protocols say the same thing through warm-up, drain and models that
failed to load.
"""

from __future__ import annotations

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

__all__ = ["HealthStates"]

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthStates(health_aio.HealthServicer):  # type: ignore[misc]
    """``grpc.health.v1.Health`` that also answers ``serving(name)`` in-process."""

    def __init__(self) -> None:
        super().__init__()
        self._states: dict[str, int] = {"": _SERVING}  # the base class starts the same way
        self._shutting_down = False

    def serving(self, name: str = "") -> bool:
        """Whether ``name`` (the server when empty) is SERVING; an unknown name is not."""
        return bool(self._states.get(name) == _SERVING)

    async def set(self, service: str, status: int) -> None:
        if not self._shutting_down:
            self._states[service] = status
        await super().set(service, status)

    async def enter_graceful_shutdown(self) -> None:
        self._shutting_down = True
        for name in self._states:
            self._states[name] = _NOT_SERVING
        await super().enter_graceful_shutdown()
