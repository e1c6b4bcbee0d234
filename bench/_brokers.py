"""The external brokers a deployment can name, started for the benchmark.

RabbitMQ and Redis run exactly as the tests start them (``tests/fixtures/rabbitmq.py``,
``tests/fixtures/redis.py``: 127.0.0.1, free ports, a data directory of the run's own; Redis
with ``appendonly yes`` and ``appendfsync always``, as the Redis broker's durability needs),
so the figures are those of the configuration the tests pin. The llama-mesh server keeps its
own embedded nats-server for its state (task records, results); only the deployment's task
messages go over the named broker, as in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import redis

from tests.fixtures.rabbitmq import EPMD, RABBITMQ_SERVER, RabbitMqServer
from tests.fixtures.redis import RedisServer

EXTERNAL = ("rabbitmq", "redis")
"""The broker kinds with rows of their own, as the ``message-queue`` types name them."""
LABELS = {"rabbitmq": "RabbitMQ", "redis": "Redis"}


@dataclass(frozen=True, slots=True)
class RunningBroker:
    """A broker server: its kind, URL (credentials included) and the pid doing its work."""

    kind: str
    url: str
    pid: int

    @property
    def label(self) -> str:
        return LABELS[self.kind]

    @property
    def message_queue(self) -> dict[str, str]:
        """The ``message-queue`` section of a deployment on this broker."""
        return {"type": self.kind, "url": self.url}


def missing(kind: str) -> str | None:
    """What this machine lacks to run ``kind`` (``None``: nothing)."""
    if kind == "rabbitmq":
        if not RABBITMQ_SERVER.is_file() or shutil.which(EPMD) is None:
            return f"needs {RABBITMQ_SERVER} and {EPMD} (apt-get install rabbitmq-server)"
    elif shutil.which("redis-server") is None:
        return "needs redis-server (apt-get install redis-server)"
    return None


@contextlib.asynccontextmanager
async def running(kind: str, root: Path) -> AsyncIterator[RunningBroker]:
    """Start a ``kind`` server with its data in ``root``; stop it (by pid) at the end."""
    if kind == "rabbitmq":
        node = RabbitMqServer(root)
        try:
            await asyncio.to_thread(node.start)
            # The start script's beam (the node) writes its own pid there once booted.
            pid = int((root / "rabbitmq.pid").read_text().strip())
            yield RunningBroker(kind, node.url, pid)
        finally:
            await asyncio.to_thread(node.close)
    else:
        server = RedisServer(root)
        try:
            await asyncio.to_thread(server.start)
            yield RunningBroker(kind, server.url, await asyncio.to_thread(_redis_pid, server.url))
        finally:
            await asyncio.to_thread(server.stop)


def _redis_pid(url: str) -> int:
    """The pid Redis reports of itself (``INFO server``)."""
    with redis.Redis.from_url(url) as client:
        info = client.info("server")
    return int(info["process_id"])
