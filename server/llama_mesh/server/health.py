"""What of the server is down right now, for the status routes and gRPC health.

The parts a server depends on report themselves down (with the reason) and up again:
``nats`` (the connection to the message queue), ``gateway`` (its Envoy) and
``broker:<deployment>`` (a deployment's own broker, RabbitMQ or Redis; no gRPC health
entry of its own). ``GET /status/``
and ``/v1/status`` read :class:`Health`; :meth:`Health.publish` keeps the standard
``grpc.health.v1`` service in step: the server (``""``) and its services are NOT_SERVING
while anything is down, and each part has its own entry (``llama_mesh.nats``,
``llama_mesh.gateway``) that says which.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from grpc_health.v1 import health, health_pb2

logger = logging.getLogger(__name__)

COMPONENTS = ("nats", "gateway")
"""The parts that report their state."""
HEALTH_PREFIX = "llama_mesh."
"""gRPC health names the part ``nats`` as ``llama_mesh.nats``."""

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Health:
    """The parts that are down, each with why; changes wake :meth:`publish`."""

    def __init__(self) -> None:
        self._down: dict[str, str] = {}
        self._changed = asyncio.Event()

    def down(self, component: str, reason: str) -> None:
        """Record ``component`` as down because of ``reason``."""
        if self._down.get(component) != reason:
            if component not in self._down:
                logger.warning("%s is down: %s", component, reason)
            self._down[component] = reason
            self._changed.set()

    def up(self, component: str) -> None:
        """Record ``component`` as working again."""
        if self._down.pop(component, None) is not None:
            logger.info("%s is up again", component)
            self._changed.set()

    @property
    def healthy(self) -> bool:
        """True when nothing is down."""
        return not self._down

    @property
    def problems(self) -> dict[str, str]:
        """What is down, and why."""
        return dict(self._down)

    @property
    def message(self) -> str:
        """One line saying what is down ("" when nothing is)."""
        return "; ".join(f"{part} is down: {why}" for part, why in sorted(self._down.items()))

    async def publish(self, servicer: health.aio.HealthServicer, services: Iterable[str]) -> None:
        """Keep ``servicer`` in step with this state until cancelled: the server (``""``)
        and ``services`` are NOT_SERVING while any part is down; ``llama_mesh.<part>``
        says each part's own state."""
        names = ("", *services)
        while True:
            self._changed.clear()
            overall = _SERVING if self.healthy else _NOT_SERVING
            for name in names:
                await servicer.set(name, overall)
            for part in COMPONENTS:
                state = _NOT_SERVING if part in self._down else _SERVING
                await servicer.set(HEALTH_PREFIX + part, state)
            await self._changed.wait()
