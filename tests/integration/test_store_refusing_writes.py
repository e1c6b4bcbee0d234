"""A JetStream that refuses writes (out of space) loses no task: a worker's last delivery of
a task keeps trying to record the task's failure instead of dropping its message.

Real nats-server; the refusal is the tasks bucket's stream at its byte limit (discard new),
the way a full store refuses every write.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from llama_mesh.server import subjects
from llama_mesh.server.apiserver.brokers import DeploymentBrokers
from llama_mesh.server.control_plane.store import ControlPlane
from llama_mesh.server.domain import Task, TaskStatus, new_id
from llama_mesh.server.errors import NotFoundError
from llama_mesh.server.nats_server import NatsServer
from llama_mesh.server.orchestrator import Orchestrator
from llama_mesh.server.queues.nats import NatsBroker
from llama_mesh.server.queues.nats import errors as nats_errors
from llama_mesh.server.service.worker import Worker, WorkerSettings
from tests.fixtures.brokers import nats_roles
from tests.helpers import assert_eventually
from tests.unit.test_event_decoding_fuzz import WORKFLOWS

TASKS_STREAM = "KV_mesh_tasks"
"""The stream of the control plane's tasks bucket."""
RETRYING = "its failure is not recorded yet"
"""What the worker logs while its last delivery of a task waits for the store."""


@dataclasses.dataclass
class Refused:
    """A worker of testapp/echo (no retries) with one task queued while the tasks bucket
    refuses writes."""

    js: Any
    broker: NatsBroker
    cp: ControlPlane
    worker: Worker
    run: asyncio.Task[None]
    task: Task
    queue: str

    async def limit(self, max_bytes: int) -> None:
        """Set the byte limit of the tasks bucket's stream (-1: none)."""
        info = await self.js.stream_info(TASKS_STREAM)
        await self.js.update_stream(dataclasses.replace(info.config, max_bytes=max_bytes))

    async def queued(self) -> bool:
        return await self.broker.find_task(self.queue, self.task.task_id) is not None

    async def stop_worker(self) -> None:
        await self.worker.shutdown()
        await asyncio.wait_for(self.run, 30)


@contextlib.asynccontextmanager
async def refused(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> AsyncIterator[Refused]:
    """:class:`Refused`, once the task's last delivery failed to record it (or settled it)."""
    connection, broker, state = await nats_roles(nats_server.url)
    try:
        cp = await ControlPlane.open(state)
        settings = WorkerSettings(deployment="testapp", service_id="echo", max_retries=0)
        worker = Worker(broker, cp, WORKFLOWS["echo"], settings)
        task_id = new_id()
        task = Task(task_id, "testapp", "echo", session_id=task_id, input={})
        case = Refused(
            connection.js,
            broker,
            cp,
            worker,
            asyncio.create_task(worker.run()),
            task,
            subjects.task_queue(task.deployment, task.service_id),
        )
        try:
            info = await connection.js.stream_info(TASKS_STREAM)
            await case.limit(max(info.state.bytes, 1))
            # Queued as the API server queues it: the message is the task's only record.
            orchestrator = Orchestrator(DeploymentBrokers(broker, state))
            await orchestrator.schedule(task, new_session=True)

            async def retrying_or_settled() -> bool:
                return RETRYING in caplog.text or not await case.queued()

            await assert_eventually(retrying_or_settled, timeout=30)
            yield case
        finally:
            if not case.run.done():
                await case.stop_worker()
    finally:
        await connection.close()


@pytest.fixture(autouse=True)
def _quick_writes(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Each write gives up after 0.3 s of refusals; the worker's warnings are captured."""
    monkeypatch.setattr(nats_errors, "_PATIENCE", 0.3)
    caplog.set_level(logging.WARNING, logger="llama_mesh.server.service.worker")


async def test_the_last_delivery_records_the_failure_once_the_store_takes_writes(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The first delivery runs the task and cannot store the result, the last cannot record
    the failure either: the message stays in the queue until the store takes writes again;
    then the task ends FAILED, found, and leaves the queue."""
    async with refused(nats_server, caplog) as case:
        assert await case.queued(), "task dropped"
        with pytest.raises(NotFoundError):
            await case.cp.read_task(case.task.deployment, case.task.task_id)
        await case.limit(-1)

        async def failed() -> Task | None:
            try:
                stored = await case.cp.read_task(case.task.deployment, case.task.task_id)
            except NotFoundError:
                return None
            return stored.task if stored.task.status is TaskStatus.FAILED else None

        final = await assert_eventually(failed, timeout=30)
        assert final is not None and final.error is not None
        assert final.error.type == "MaxRetriesExceeded"

        async def left_the_queue() -> bool:
            return not await case.queued()

        await assert_eventually(left_the_queue, timeout=30)


async def test_a_worker_stopping_on_the_last_delivery_leaves_the_task_queued(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A replica stopped while its last delivery waits for the store settles nothing: the
    message stays in the queue (found, listed as queued) rather than being dropped unrecorded."""
    async with refused(nats_server, caplog) as case:
        await case.stop_worker()
        assert await case.queued(), "task dropped"
        assert "unexpected failure on its last delivery; left in the queue" in caplog.text
