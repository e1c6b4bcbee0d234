"""The ``ControlPlane`` gRPC service: task records for other processes, and Llama Deploy
0.8's control plane API (``Client(control_plane_url=...).core``) over the same core.

The 0.8 RPCs answer in 0.8's shapes (bare JSON in ``HttpBody``), and keep 0.8's status
codes where a 0.8 client depends on them (a missing session is 404; a result not there yet
is ``null``; deleting a session that is gone is not an error). The gateway serves them on
each deployment's ``control-plane.port`` and names the deployment in the
:data:`DEPLOYMENT_HEADER` request header, which wins over the requests' ``deployment``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator

import grpc
from google.api import httpbody_pb2
from google.protobuf import json_format

from llama_mesh.server import convert
from llama_mesh.server.apiserver.compat import (
    json_body,
    parse_task_input,
    session_definition,
    task_definition,
    task_result,
)
from llama_mesh.server.apiserver.mesh import Mesh, check_id, json_within_limit
from llama_mesh.server.deployment_config import DeploymentConfig
from llama_mesh.server.domain import EventKind, JsonValue, Task
from llama_mesh.server.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from llama_mesh.server.gateway.control_planes import DEPLOYMENT_HEADER
from llama_mesh.server.orchestrator import choose_service
from llama_mesh.server.service.events import parse_serialized_event
from llama_mesh.v1 import control_plane_pb2 as cp
from llama_mesh.v1 import control_plane_pb2_grpc as cp_grpc
from llama_mesh.v1 import types_pb2

_QUEUE_CONFIG_NAMES = {
    "nats": "NatsMessageQueueConfig",
    "inprocess": "SimpleMessageQueueConfig",
    "rabbitmq": "RabbitMQMessageQueueConfig",
    "redis": "RedisMessageQueueConfig",
}
"""0.8's name of each broker's settings class (its queue-config answer's key)."""
_QUEUE_TYPES = {"nats": "nats", "inprocess": "simple"}


def control_plane_info() -> dict[str, JsonValue]:
    """0.8's ``GET /`` answer: the control plane's settings, in 0.8's words."""
    return {
        "running": "True",
        "step_interval": "0.1",
        "services_store_key": "services",
        "tasks_store_key": "tasks",
        "session_store_key": "sessions",
    }


def service_definition(service_id: str, config: DeploymentConfig) -> dict[str, JsonValue]:
    """0.8's ``ServiceDefinition`` of one of a deployment's own services."""
    return {
        "service_name": service_id,
        "description": config.services[service_id].name or service_id,
        "prompt": [],
        "host": None,
        "port": None,
    }


def _ndjson_line(data: JsonValue) -> cp.ControlPlaneStreamTaskResultResponse:
    body = httpbody_pb2.HttpBody(
        content_type="application/x-ndjson", data=json.dumps(data).encode() + b"\n"
    )
    return cp.ControlPlaneStreamTaskResultResponse(body=body)


class ControlPlaneServicer(cp_grpc.ControlPlaneServicer):
    """Task records for other processes, and 0.8's control plane routes."""

    def __init__(self, mesh: Mesh, *, queue_kind: str) -> None:
        self._mesh = mesh
        self._cp = mesh.cp
        self._queue_kind = queue_kind

    # -- helpers -----------------------------------------------------------------------

    def _deployment(self, field_value: str, context: grpc.aio.ServicerContext) -> str:
        """The deployment a call is about (the gateway's header first); it must exist."""
        name = field_value
        for key, value in context.invocation_metadata() or ():
            if key == DEPLOYMENT_HEADER:
                name = value.decode() if isinstance(value, bytes) else str(value)
                break
        if not name:
            raise InvalidArgumentError("deployment: required", reason="MISSING_DEPLOYMENT")
        self._mesh.deployments.config(name)
        return name

    async def _session_task(self, deployment: str, session_id: str, task_id: str) -> Task:
        """A task of a session; :class:`NotFoundError` when either is unknown."""
        await self._cp.get_session(deployment, check_id("session id", session_id), task_ids=False)
        task = await self._cp.get_task(deployment, check_id("task id", task_id))
        if task.session_id != session_id:
            raise NotFoundError(
                f"Task '{task_id}' is not in session '{session_id}'", reason="TASK_NOT_FOUND"
            )
        return task

    # -- task records, for components in other processes -------------------------------

    async def ListServiceInstances(
        self, request: cp.ControlPlaneListServiceInstancesRequest, context: grpc.aio.ServicerContext
    ) -> cp.ControlPlaneListServiceInstancesResponse:
        deployment = self._deployment(request.deployment, context)
        if request.service_id:
            choose_service(self._mesh.deployments.config(deployment), request.service_id)
        instances = await self._cp.list_instances(deployment, request.service_id or None)
        return cp.ControlPlaneListServiceInstancesResponse(
            instances=[convert.instance_to_proto(i) for i in instances]
        )

    async def RecordTask(
        self, request: cp.ControlPlaneRecordTaskRequest, context: grpc.aio.ServicerContext
    ) -> cp.ControlPlaneRecordTaskResponse:
        if not request.HasField("task"):
            raise InvalidArgumentError("task: required", reason="MISSING_TASK")
        given = request.task
        if given.status not in (types_pb2.TASK_STATUS_UNSPECIFIED, types_pb2.TASK_STATUS_QUEUED):
            raise InvalidArgumentError(
                f"task.status: a new task is TASK_STATUS_QUEUED, not {given.status}",
                reason="INVALID_STATUS",
            )
        deployment = self._deployment(given.deployment, context)
        config = self._mesh.deployments.config(deployment)
        # A new task is what its caller asks for; its outcome fields are the server's.
        task = Task(
            task_id=check_id("task.task_id", given.task_id),
            deployment=deployment,
            service_id=choose_service(config, given.service_id or None),
            session_id=check_id("task.session_id", given.session_id),
            input=convert.from_struct(given.input),
        )
        json_within_limit("task.input", task.input)
        await self._cp.get_session(task.deployment, task.session_id, task_ids=False)
        stored = await self._cp.record_task(task)
        return cp.ControlPlaneRecordTaskResponse(task=convert.task_to_proto(stored.task))

    async def GetTask(
        self, request: cp.ControlPlaneGetTaskRequest, context: grpc.aio.ServicerContext
    ) -> cp.ControlPlaneGetTaskResponse:
        deployment = self._deployment(request.deployment, context)
        task = await self._cp.get_task(deployment, check_id("task_id", request.task_id))
        return cp.ControlPlaneGetTaskResponse(task=convert.task_to_proto(task))

    async def ListTasks(
        self, request: cp.ControlPlaneListTasksRequest, context: grpc.aio.ServicerContext
    ) -> cp.ControlPlaneListTasksResponse:
        deployment = self._deployment(request.deployment, context)
        if request.session_id:
            check_id("session_id", request.session_id)
        tasks = await self._cp.list_tasks(deployment, request.session_id or None)
        return cp.ControlPlaneListTasksResponse(tasks=[convert.task_to_proto(t) for t in tasks])

    async def WatchTask(
        self, request: cp.ControlPlaneWatchTaskRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[cp.ControlPlaneWatchTaskResponse]:
        deployment = self._deployment(request.deployment, context)
        task_id = check_id("task_id", request.task_id)
        await self._cp.get_task(deployment, task_id)  # NOT_FOUND before any wait
        async for task in self._mesh.watcher.follow(deployment, task_id):
            yield cp.ControlPlaneWatchTaskResponse(task=convert.task_to_proto(task))

    # -- Llama Deploy 0.8's control plane --------------------------------------------

    async def GetInfo(
        self, request: cp.ControlPlaneGetInfoRequest, context: grpc.aio.ServicerContext
    ) -> cp.ControlPlaneGetInfoResponse:
        self._deployment(request.deployment, context)
        return cp.ControlPlaneGetInfoResponse(body=json_body(control_plane_info()))

    async def GetQueueConfig(
        self, request: cp.ControlPlaneGetQueueConfigRequest, context: grpc.aio.ServicerContext
    ) -> cp.ControlPlaneGetQueueConfigResponse:
        name = self._deployment(request.deployment, context)
        return cp.ControlPlaneGetQueueConfigResponse(body=json_body(self._queue_config(name)))

    def _queue_config(self, deployment: str) -> dict[str, JsonValue]:
        """0.8's answer naming the broker the deployment really runs on; its URL without
        the password (0.8 would disclose it)."""
        choice = self._mesh.brokers.choice(deployment)
        if choice.settings is None:
            kind = self._queue_kind
            return {_QUEUE_CONFIG_NAMES[kind]: {"type": _QUEUE_TYPES[kind]}}
        body: dict[str, JsonValue] = {"type": choice.kind, "url": choice.redacted_url}
        return {_QUEUE_CONFIG_NAMES[choice.kind]: body}

    async def _services(self, deployment: str) -> dict[str, JsonValue]:
        config = self._mesh.deployments.config(deployment)
        services: dict[str, JsonValue] = {}
        for name, raw in (await self._cp.registered_services(deployment)).items():
            with contextlib.suppress(ValueError):
                services[name] = json.loads(raw)
        for service_id in config.services:
            services[service_id] = service_definition(service_id, config)
        return services

    async def ListServices(
        self, request: cp.ControlPlaneListServicesRequest, context: grpc.aio.ServicerContext
    ) -> cp.ControlPlaneListServicesResponse:
        deployment = self._deployment(request.deployment, context)
        return cp.ControlPlaneListServicesResponse(body=json_body(await self._services(deployment)))

    async def GetService(
        self, request: cp.ControlPlaneGetServiceRequest, context: grpc.aio.ServicerContext
    ) -> cp.ControlPlaneGetServiceResponse:
        deployment = self._deployment(request.deployment, context)
        services = await self._services(deployment)
        if request.service_name not in services:
            raise NotFoundError(
                f"Service '{request.service_name}' not found in deployment '{deployment}'",
                reason="SERVICE_NOT_FOUND",
            )
        return cp.ControlPlaneGetServiceResponse(body=json_body(services[request.service_name]))

    async def RegisterService(
        self, request: cp.ControlPlaneRegisterServiceRequest, context: grpc.aio.ServicerContext
    ) -> cp.ControlPlaneRegisterServiceResponse:
        deployment = self._deployment(request.deployment, context)
        definition = request.service_definition
        name = check_id("service_definition.service_name", definition.service_name)
        if name in self._mesh.deployments.config(deployment).services:
            raise AlreadyExistsError(
                f"Service '{name}' is one of deployment '{deployment}''s own services",
                reason="SERVICE_EXISTS",
            )
        value = json_format.MessageToDict(definition, preserving_proto_field_name=True)
        value.setdefault("description", "")
        value.setdefault("prompt", [])
        value.setdefault("host", None)
        value.setdefault("port", None)
        raw = json_within_limit("service_definition", value)
        await self._cp.put_registered_service(deployment, name, raw)
        return cp.ControlPlaneRegisterServiceResponse(body=json_body(control_plane_info()))

    async def DeregisterService(
        self, request: cp.ControlPlaneDeregisterServiceRequest, context: grpc.aio.ServicerContext
    ) -> cp.ControlPlaneDeregisterServiceResponse:
        deployment = self._deployment(request.deployment, context)
        if not request.service_name:
            raise InvalidArgumentError(
                "query parameter 'service_name' is required", reason="MISSING_SERVICE_NAME"
            )
        name = check_id("service_name", request.service_name)
        if name in self._mesh.deployments.config(deployment).services:
            raise FailedPreconditionError(
                f"Service '{name}' is defined by deployment '{deployment}''s file: "
                "reload or delete the deployment instead",
                reason="SERVICE_FROM_DEPLOYMENT",
            )
        await self._cp.delete_registered_service(deployment, name)
        return cp.ControlPlaneDeregisterServiceResponse(body=json_body(None))

    async def CreateSession(
        self, request: cp.ControlPlaneCreateSessionRequest, context: grpc.aio.ServicerContext
    ) -> cp.ControlPlaneCreateSessionResponse:
        deployment = self._deployment(request.deployment, context)
        session = await self._cp.create_session(deployment)
        return cp.ControlPlaneCreateSessionResponse(body=json_body(session.session_id))

    async def ListSessions(
        self, request: cp.ControlPlaneListSessionsRequest, context: grpc.aio.ServicerContext
    ) -> cp.ControlPlaneListSessionsResponse:
        deployment = self._deployment(request.deployment, context)
        sessions = await self._mesh.with_task_ids(
            deployment, await self._cp.list_sessions(deployment)
        )
        body = {s.session_id: session_definition(s) for s in sessions}
        return cp.ControlPlaneListSessionsResponse(body=json_body(body))

    async def GetSession(
        self, request: cp.ControlPlaneGetSessionRequest, context: grpc.aio.ServicerContext
    ) -> cp.ControlPlaneGetSessionResponse:
        deployment = self._deployment(request.deployment, context)
        session = await self._cp.get_session(deployment, check_id("session_id", request.session_id))
        return cp.ControlPlaneGetSessionResponse(body=json_body(session_definition(session)))

    async def DeleteSession(
        self, request: cp.ControlPlaneDeleteSessionRequest, context: grpc.aio.ServicerContext
    ) -> cp.ControlPlaneDeleteSessionResponse:
        deployment = self._deployment(request.deployment, context)
        session_id = check_id("session_id", request.session_id)
        with contextlib.suppress(NotFoundError):  # 0.8: deleting what is gone is no error
            await self._cp.delete_session(deployment, session_id)
        return cp.ControlPlaneDeleteSessionResponse(body=json_body(None))

    async def CreateSessionTask(
        self, request: cp.ControlPlaneCreateSessionTaskRequest, context: grpc.aio.ServicerContext
    ) -> cp.ControlPlaneCreateSessionTaskResponse:
        deployment = self._deployment(request.deployment, context)
        session_id = check_id("session_id", request.session_id)
        definition = request.task_definition
        if definition.session_id and definition.session_id != session_id:
            raise InvalidArgumentError(
                f"Wrong task definition: task.session_id is {definition.session_id} "
                f"but should be {session_id}",
                reason="SESSION_MISMATCH",
            )
        task = await self._mesh.create_task(
            deployment,
            service_id=definition.service_id or None,
            session_id=session_id,
            input=parse_task_input(definition.input),
        )
        return cp.ControlPlaneCreateSessionTaskResponse(body=json_body(task.task_id))

    async def _tasks_of(self, deployment: str, session_id: str) -> list[Task]:
        session = await self._cp.get_session(deployment, check_id("session_id", session_id))
        tasks = []
        for task_id in session.task_ids:
            with contextlib.suppress(NotFoundError):
                tasks.append(await self._cp.get_task(deployment, task_id))
        return tasks

    async def ListSessionTasks(
        self, request: cp.ControlPlaneListSessionTasksRequest, context: grpc.aio.ServicerContext
    ) -> cp.ControlPlaneListSessionTasksResponse:
        deployment = self._deployment(request.deployment, context)
        tasks = await self._tasks_of(deployment, request.session_id)
        body = json_body([task_definition(t) for t in tasks])
        return cp.ControlPlaneListSessionTasksResponse(body=body)

    async def GetCurrentTask(
        self, request: cp.ControlPlaneGetCurrentTaskRequest, context: grpc.aio.ServicerContext
    ) -> cp.ControlPlaneGetCurrentTaskResponse:
        deployment = self._deployment(request.deployment, context)
        tasks = await self._tasks_of(deployment, request.session_id)
        current = task_definition(tasks[-1]) if tasks else None
        return cp.ControlPlaneGetCurrentTaskResponse(body=json_body(current))

    async def GetTaskResult(
        self, request: cp.ControlPlaneGetTaskResultRequest, context: grpc.aio.ServicerContext
    ) -> cp.ControlPlaneGetTaskResultResponse:
        deployment = self._deployment(request.deployment, context)
        try:
            task = await self._session_task(deployment, request.session_id, request.task_id)
        except NotFoundError as exc:
            if exc.reason == "SESSION_NOT_FOUND":
                raise
            task = None  # 0.8: no result (yet) for a task it does not know
        body = json_body(task_result(task) if task is not None else None)
        return cp.ControlPlaneGetTaskResultResponse(body=body)

    async def StreamTaskResult(
        self, request: cp.ControlPlaneStreamTaskResultRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[cp.ControlPlaneStreamTaskResultResponse]:
        deployment = self._deployment(request.deployment, context)
        task = await self._session_task(deployment, request.session_id, request.task_id)
        async for event in self._mesh.stream_events(deployment, task.task_id):
            if event.kind is EventKind.WORKFLOW:
                yield _ndjson_line(event.data)
            elif event.kind is EventKind.RESULT:
                yield _ndjson_line({"result": event.data.get("result")})
            else:
                yield _ndjson_line({"error": event.data.get("error") or event.data.get("reason")})

    async def SendEvent(
        self, request: cp.ControlPlaneSendEventRequest, context: grpc.aio.ServicerContext
    ) -> cp.ControlPlaneSendEventResponse:
        deployment = self._deployment(request.deployment, context)
        event = parse_serialized_event(request.event_definition.event_obj_str)
        task = await self._session_task(deployment, request.session_id, request.task_id)
        await self._mesh.send_event(deployment, task.task_id, event)
        return cp.ControlPlaneSendEventResponse(body=json_body(None))

    async def GetSessionState(
        self, request: cp.ControlPlaneGetSessionStateRequest, context: grpc.aio.ServicerContext
    ) -> cp.ControlPlaneGetSessionStateResponse:
        deployment = self._deployment(request.deployment, context)
        session_id = request.session_id
        state: dict[str, JsonValue] = {}
        for task in await self._tasks_of(deployment, session_id):
            if task.status.is_final:
                state[f"result_{task.task_id}"] = task_result(task)
        raw = await self._cp.get_session_state(deployment, session_id)
        if raw is not None:
            context_dict: JsonValue = json.loads(raw)
            state[session_id] = json.dumps({"state": context_dict, "session_id": session_id})
        return cp.ControlPlaneGetSessionStateResponse(body=json_body(state))
