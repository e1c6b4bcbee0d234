"""Serve one service of a deployment from any process: :class:`WorkflowService`.

The library form of ``llamactl worker``, which runs through it too. Given the NATS address
(and login), the deployment and the service id, it joins the mesh as one more replica of
that service: it reads the deployment from the control plane's store, registers with
heartbeats, takes the service's tasks from its work queue and serves ``WorkflowService``
info and gRPC health on 127.0.0.1. The workflow is an object handed in, or, as the worker
command does, the one the service's ``path`` names in its (synced) source::

    async with await WorkflowService.connect(
        my_workflow, deployment="quickstart", service="echo_workflow",
        nats="nats://127.0.0.1:4222",
    ) as service:
        ...  # tasks for quickstart/echo_workflow now also reach my_workflow

or ``await service.run()`` until :meth:`WorkflowService.shutdown` (from a signal handler,
another task, ...).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import grpc
from grpc_health.v1 import health

from llama_mesh.server.control_plane.store import ControlPlane
from llama_mesh.server.deployment_config import ServiceConfig, parse_deployment_config
from llama_mesh.server.domain import DeploymentRecord
from llama_mesh.server.errors import MeshError, NotFoundError
from llama_mesh.server.queues.broker import Broker
from llama_mesh.server.queues.nats import (
    NatsBroker,
    NatsConnection,
    NatsLogin,
    NatsStateStore,
    connect_nats,
)
from llama_mesh.server.queues.selection import BROKER_URL_VARIABLE, BrokerChoice, select_broker
from llama_mesh.server.service.families import family_of
from llama_mesh.server.service.loader import load_workflow
from llama_mesh.server.service.servicer import start_info_server
from llama_mesh.server.service.worker import Worker, WorkerSettings
from llama_mesh.server.sources import SourcePolicy, sync_source

logger = logging.getLogger(__name__)

STOP_GRACE = 2.0
"""Seconds the info server gives its open calls when the service stops."""


class WorkflowService:
    """One replica of a deployment's service, served from this process.

    Create it with :meth:`connect`; ``run()`` serves until ``shutdown()`` (idempotent),
    letting running tasks finish. As an async context manager it runs in the background
    and shuts down on exit.
    """

    def __init__(
        self,
        connections: tuple[Broker | NatsConnection, ...],
        worker: Worker,
        server: grpc.aio.Server,
        health_servicer: health.aio.HealthServicer,
    ) -> None:
        self._connections = connections
        self._worker = worker
        self._server = server
        self._health = health_servicer
        self._task: asyncio.Task[None] | None = None
        """The task running :meth:`run` (the background one of ``async with``)."""
        self._started = False
        self._closed = False

    @classmethod
    async def connect(
        cls,
        workflow: object | None = None,
        *,
        deployment: str,
        service: str,
        nats: str | Sequence[str],
        login: NatsLogin | None = None,
        source_dir: Path | None = None,
        ack_wait: float = 10.0,
        generation: int = 0,
        instance_id: str | None = None,
        service_config: ServiceConfig | None = None,
        broker: BrokerChoice | None = None,
    ) -> Self:
        """Connect to NATS (the control plane) and the deployment's broker, and prepare the
        replica (it takes tasks once running).

        ``workflow``: the workflow object to serve (a ``workflows.Workflow``, or a
        ``llama_index.core.workflow.Workflow``); None loads the service's own ``path``
        from ``source_dir``, or from its source synced into a temporary directory.
        ``nats``: one URL, several comma-separated, or a list; ``login``: credentials and
        TLS files. The service's ``path``, ``max-concurrent-tasks``, ``max-retries`` and
        ``timeout`` come from the deployment file, or from ``service_config`` when given
        (with ``source_dir``): the server starts a reload's replicas that way, before the
        stored deployment names the new version. ``broker``: where the service's tasks are
        (the server hands its replicas the deployment's); ``None`` chooses it as the server
        does, from the stored deployment's ``message-queue`` and this process's
        environment (``$LLAMA_MESH_BROKER_URL`` for one that names none).

        Raises:
            MeshError: the deployment or the service does not exist, or the workflow
                cannot be loaded (the message says which).
            QueueError: NATS or the broker cannot be reached.
        """
        urls = nats.split(",") if isinstance(nats, str) else list(nats)
        connection = await connect_nats(urls, login=login)
        connections: tuple[Broker | NatsConnection, ...] = (connection,)
        try:
            state_store = NatsStateStore(connection)
            cp = await ControlPlane.open(state_store)
            if service_config is not None and workflow is None and source_dir is None:
                raise MeshError("a service's settings need its source directory")
            if service_config is None:
                record, config = await _service_config(cp, deployment, service)
            else:
                record, config = None, service_config
            if workflow is None:
                workflow = await _load(record, config, source_dir)
            else:
                family_of(workflow)  # refuses what no worker could run, before joining
            if broker is None:
                broker = await _broker_of(cp, deployment, record)
            if broker.settings is None:
                task_broker: Broker = await NatsBroker.open(connection)
            else:
                task_broker = await broker.connect(state_store=state_store)
                connections = (task_broker, connection)
            settings = WorkerSettings(
                deployment=deployment,
                service_id=service,
                max_concurrent_tasks=config.max_concurrent_tasks,
                max_retries=config.max_retries,
                timeout=config.timeout,
                ack_wait=ack_wait,
                generation=generation,
                **({"instance_id": instance_id} if instance_id else {}),
            )
            worker = Worker(task_broker, cp, workflow, settings)
            server, health_servicer, port = await start_info_server(worker, workflow)
            worker.instance.address = f"127.0.0.1:{port}"
        except BaseException:
            await _close(connections)
            raise
        return cls(connections, worker, server, health_servicer)

    @property
    def instance_id(self) -> str:
        """This replica's id in the service registry."""
        return self._worker.instance.instance_id

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT`` of the replica's info and health server."""
        return self._worker.instance.address

    async def run(self) -> None:
        """Take and run the service's tasks until :meth:`shutdown`; then release
        everything (the info server, the broker and NATS connections). Runs once."""
        if self._started or self._closed:
            raise RuntimeError("a WorkflowService runs once")
        self._started = True
        self._task = self._task or asyncio.current_task()
        try:
            await self._worker.run()
        finally:
            self._closed = True
            await self._health.enter_graceful_shutdown()
            await self._server.stop(grace=STOP_GRACE)
            await _close(self._connections)

    def stop_soon(self) -> None:
        """Ask :meth:`run` to stop, from a signal handler (idempotent)."""
        self._worker.stop_soon()

    async def shutdown(self) -> None:
        """Stop taking tasks, let running ones finish and wait until released
        (idempotent; also releases a service that never ran)."""
        self._worker.stop_soon()
        task = self._task
        if task is None:
            if not self._closed:
                self._closed = True
                await self._server.stop(grace=0)
                await _close(self._connections)
        elif task is not asyncio.current_task():
            (outcome,) = await asyncio.gather(task, return_exceptions=True)
            if isinstance(outcome, Exception):
                logger.error("workflow service %s failed: %r", self.instance_id, outcome)

    async def __aenter__(self) -> Self:
        if self._task is None and not self._closed:
            name = f"workflow-service-{self.instance_id}"
            self._task = asyncio.create_task(self.run(), name=name)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.shutdown()


async def _service_config(
    cp: ControlPlane, deployment: str, service: str
) -> tuple[DeploymentRecord, ServiceConfig]:
    try:
        record = await cp.get_deployment(deployment)
    except NotFoundError:
        raise MeshError(f"deployment '{deployment}' does not exist") from None
    config = parse_deployment_config(record.config_yaml)
    if service not in config.services:
        raise MeshError(
            f"service '{service}' is not in '{deployment}' "
            f"(services: {', '.join(sorted(config.services)) or 'none'})"
        )
    return record, config.services[service]


async def _load(
    record: DeploymentRecord | None, service: ServiceConfig, source_dir: Path | None
) -> object:
    """The workflow of ``service``'s own ``path``, from its source (``source_dir``, or
    synced from ``record``'s)."""
    if source_dir is None:
        assert record is not None  # connect() refuses settings without a source directory
        dest = Path(tempfile.mkdtemp(prefix=f"llama-mesh-{record.name}-"))
        source_dir = await sync_source(
            service.source,
            base_path=Path(record.base_path or "."),
            dest=dest,
            policy=SourcePolicy(allowed_local_roots=None, allowed_git_prefixes=None),
            local=record.local,
        )
    return load_workflow(source_dir, service.path or "")


async def _broker_of(
    cp: ControlPlane, deployment: str, record: DeploymentRecord | None
) -> BrokerChoice:
    """The deployment's broker as the server chooses it: from its stored ``message-queue``
    and this process's environment (``$LLAMA_MESH_BROKER_URL`` for one naming none)."""
    if record is None:
        try:
            record = await cp.get_deployment(deployment)
        except NotFoundError:
            record = None
    section = None if record is None else parse_deployment_config(record.config_yaml).message_queue
    url = os.environ.get(BROKER_URL_VARIABLE)
    default = BrokerChoice() if not url else BrokerChoice.from_url(url, os.environ)
    return select_broker(section, os.environ, default)


async def _close(connections: tuple[Broker | NatsConnection, ...]) -> None:
    """Close the broker, then the NATS connection (and the roles on it)."""
    for connection in connections:
        with contextlib.suppress(Exception):  # a broker that is gone must not keep us alive
            async with asyncio.timeout(10):
                await connection.close()
