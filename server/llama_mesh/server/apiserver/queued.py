"""Tasks whose message is their only record: found, listed and removed in their queues.

On a broker that can find a queued message by its id (``Broker.finds_tasks``: NATS and the
in-process broker), the API server accepts a task with one durable write, its message; the
task's record is created by its first change (its start, result or cancellation, see
:meth:`ControlPlane.change_task`). Until then the message is the record: this is what the
control plane reads for such a task (:class:`~llama_mesh.server.control_plane.store.QueuedTasks`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from google.protobuf.message import DecodeError

from llama_mesh.server import convert, subjects
from llama_mesh.server.domain import Task
from llama_mesh.v1 import messages_pb2

if TYPE_CHECKING:
    from llama_mesh.server.apiserver.deployments import DeploymentManager

logger = logging.getLogger(__name__)


class BrokerQueues:
    """The queued tasks of the deployments a :class:`DeploymentManager` runs, as their
    brokers hold them (nothing on a broker that cannot find its messages)."""

    def __init__(self, deployments: DeploymentManager) -> None:
        self._deployments = deployments

    def _queues(self, deployment: str) -> list[str]:
        """The work queues of ``deployment`` where its broker can look, if it runs."""
        config = self._deployments.running_config(deployment)
        if config is None or not self._deployments.brokers.of(deployment).finds_tasks:
            return []
        return [subjects.task_queue(deployment, service) for service in sorted(config.services)]

    async def find(self, deployment: str, task_id: str) -> Task | None:
        queues = self._queues(deployment)
        if not queues:
            return None
        broker = self._deployments.brokers.of(deployment)
        found = await asyncio.gather(*(broker.find_task(queue, task_id) for queue in queues))
        for raw in found:
            task = _read(raw, deployment) if raw is not None else None
            if task is not None and task.task_id == task_id:
                return task
        return None

    async def in_queues(self, deployment: str) -> list[Task]:
        queues = self._queues(deployment)
        broker = self._deployments.brokers.of(deployment)
        tasks = []
        for queue in queues:
            for raw in await broker.queued_tasks(queue):
                task = _read(raw, deployment)
                if task is not None:
                    tasks.append(task)
        return tasks

    async def remove(self, task: Task) -> bool:
        """Take a cancelled task's message out of its queue, so that no replica runs it;
        whether it was still there."""
        broker = self._deployments.brokers.of(task.deployment)
        if not broker.finds_tasks:
            return False
        queue = subjects.task_queue(task.deployment, task.service_id)
        return await broker.remove_task(queue, task.task_id)


def _read(raw: bytes, deployment: str) -> Task | None:
    """The task a queued message stands for; ``None`` (logged) for one that is not a task
    message of ``deployment`` (the worker drops those too)."""
    try:
        msg = messages_pb2.TaskMessage.FromString(raw)
        if msg.deployment != deployment:
            raise ValueError(f"a message of deployment {msg.deployment!r}")
        return convert.task_from_message(msg)
    except (DecodeError, ValueError) as exc:
        logger.warning("skipped a queued message of %s that is no task: %s", deployment, exc)
        return None
