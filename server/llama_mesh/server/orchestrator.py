"""The orchestrator: picks the service that runs a task and hands the task to its queue."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import grpc

from llama_mesh.server import convert, subjects
from llama_mesh.server.deployment_config import DeploymentConfig
from llama_mesh.server.domain import ID_PATTERN, Task, TaskStatus
from llama_mesh.server.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from llama_mesh.v1 import messages_pb2, orchestrator_pb2, orchestrator_pb2_grpc

if TYPE_CHECKING:
    from llama_mesh.server.apiserver.brokers import DeploymentBrokers
    from llama_mesh.server.apiserver.deployments import DeploymentManager


def choose_service(config: DeploymentConfig, service_id: str | None) -> str:
    """The service a task goes to: the one named, else the default service.

    A deployment with a single service uses it when no default is set. An unknown
    service is a :class:`NotFoundError` at once, never a task that waits forever; a
    ``default-service`` that names no service (accepted at deploy time, as Llama Deploy 0.8
    did) is a :class:`FailedPreconditionError` when a task needs it.
    """
    if service_id:
        if service_id not in config.services:
            raise NotFoundError(
                f"Service '{service_id}' not found in deployment '{config.name}' "
                f"(services: {', '.join(sorted(config.services))})",
                reason="SERVICE_NOT_FOUND",
            )
        return service_id
    if config.unknown_default_service:
        raise FailedPreconditionError(
            f"No service given and the default-service of deployment '{config.name}', "
            f"'{config.unknown_default_service}', names no service "
            f"(services: {', '.join(sorted(config.services)) or 'none'})",
            reason="DEFAULT_SERVICE_NOT_FOUND",
        )
    if config.default_service:
        return config.default_service
    if len(config.services) == 1:
        return next(iter(config.services))
    raise FailedPreconditionError(
        f"No service given and deployment '{config.name}' has no default-service",
        reason="NO_DEFAULT_SERVICE",
    )


class Orchestrator:
    """Publishes task messages to the chosen service's durable work queue, on its
    deployment's broker."""

    def __init__(self, brokers: DeploymentBrokers) -> None:
        self._brokers = brokers

    async def schedule(
        self,
        task: Task,
        *,
        generation: int = 0,
        new_session: bool = False,
        recorded: bool = False,
        input_json: bytes | None = None,
    ) -> str:
        """Publish ``task`` to its service's queue; returns the queue.

        The task id is the de-duplication id, so scheduling twice enqueues once.
        ``new_session`` says the task's session was created with it, ``recorded`` that its
        record was stored first (see ``TaskMessage``); ``input_json`` is the task's input
        already encoded as JSON, if the caller has it.
        """
        queue_name = subjects.task_queue(task.deployment, task.service_id)
        msg = messages_pb2.TaskMessage(
            task_id=task.task_id,
            deployment=task.deployment,
            service_id=task.service_id,
            session_id=task.session_id,
            input_json=input_json if input_json is not None else json.dumps(task.input).encode(),
            generation=generation,
            new_session=new_session,
            recorded=recorded,
            ends_session=task.ends_session,
        )
        msg.created_at.CopyFrom(convert.to_timestamp(task.created_at))
        broker = self._brokers.of(task.deployment)
        await broker.publish_task(queue_name, msg.SerializeToString(), msg_id=task.task_id)
        return queue_name


class OrchestratorServicer(orchestrator_pb2_grpc.OrchestratorServicer):
    """The ``Orchestrator`` gRPC service: queues tasks another process recorded
    (``ControlPlane.RecordTask``)."""

    def __init__(self, orchestrator: Orchestrator, deployments: DeploymentManager) -> None:
        self._orchestrator = orchestrator
        self._deployments = deployments

    async def ScheduleTask(
        self, request: orchestrator_pb2.ScheduleTaskRequest, context: grpc.aio.ServicerContext
    ) -> orchestrator_pb2.ScheduleTaskResponse:
        if not request.deployment:
            raise InvalidArgumentError("deployment: required", reason="MISSING_DEPLOYMENT")
        config = self._deployments.config(request.deployment)
        if not ID_PATTERN.fullmatch(request.task_id):
            raise InvalidArgumentError(
                f"invalid task_id {request.task_id!r}: use letters, digits, '-' and '_'",
                reason="INVALID_ID",
            )
        task = await self._deployments.control_plane.get_task(config.name, request.task_id)
        if task.status is not TaskStatus.QUEUED:
            raise FailedPreconditionError(
                f"Task '{task.task_id}' is {task.status.name}, not QUEUED: "
                "only a recorded, queued task is scheduled",
                reason="TASK_NOT_QUEUED",
            )
        task.service_id = choose_service(config, task.service_id or None)
        queue = await self._orchestrator.schedule(
            task, generation=self._deployments.generation(config.name), recorded=True
        )
        return orchestrator_pb2.ScheduleTaskResponse(service_id=task.service_id, queue=queue)
