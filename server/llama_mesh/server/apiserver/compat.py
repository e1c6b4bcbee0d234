"""The ``LlamaDeployApi`` gRPC service: Llama Deploy 0.8's JSON API over the same core.

Shapes follow 0.8 (``TaskDefinition``, ``SessionDefinition``, ``TaskResult``,
``EventDefinition``); where 0.8 answered 500 for a client mistake (bad YAML, unknown
deployment on reload, malformed input), this answers 4xx with the reason.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
from collections.abc import AsyncIterator

import grpc
from google.api import httpbody_pb2

from llama_mesh.server.apiserver.mesh import Mesh
from llama_mesh.server.domain import EventKind, JsonValue, Session, Task, TaskStatus
from llama_mesh.server.errors import InvalidArgumentError, TaskFailedError
from llama_mesh.server.jsontext import parse_json_text
from llama_mesh.server.service.events import parse_serialized_event
from llama_mesh.v1 import llama_deploy_api_pb2 as ld
from llama_mesh.v1 import llama_deploy_api_pb2_grpc as ld_grpc


def config_file_from_multipart(content_type: str, body: bytes) -> tuple[bytes, str]:
    """The ``config_file`` part of a multipart/form-data upload and its file name ('' if none)."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise InvalidArgumentError(
            f"expected a multipart/form-data upload with a 'config_file' part, "
            f"got content type '{content_type or 'none'}'",
            reason="INVALID_UPLOAD",
        )
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise InvalidArgumentError("the multipart upload is malformed", reason="INVALID_UPLOAD")
    for part in message.iter_parts():
        if part.get_param("name", header="content-disposition") == "config_file":
            payload = part.get_payload(decode=True)
            if isinstance(payload, bytes):
                return payload, part.get_filename() or ""
    raise InvalidArgumentError("the upload has no 'config_file' part", reason="INVALID_UPLOAD")


def parse_task_input(text: str) -> dict[str, JsonValue]:
    """0.8's ``TaskDefinition.input``: a JSON object, as text."""
    if not text:
        return {}
    value = parse_json_text(text, what="task input", reason="INVALID_INPUT")
    if not isinstance(value, dict):
        raise InvalidArgumentError(
            "task input must be a JSON object of workflow arguments", reason="INVALID_INPUT"
        )
    return value


def result_text(result: JsonValue) -> str:
    """A task result as 0.8's text result (strings as they are, the rest as JSON)."""
    return result if isinstance(result, str) else json.dumps(result)


def json_body(value: JsonValue, content_type: str = "application/json") -> httpbody_pb2.HttpBody:
    """A JSON value, encoded, as the HTTP response body."""
    return httpbody_pb2.HttpBody(content_type=content_type, data=json.dumps(value).encode())


def task_definition(task: Task, input_text: str | None = None) -> dict[str, JsonValue]:
    """0.8's ``TaskDefinition`` of a task."""
    return {
        "input": input_text if input_text is not None else json.dumps(task.input),
        "task_id": task.task_id,
        "session_id": task.session_id,
        "service_id": task.service_id,
    }


def session_definition(session: Session) -> dict[str, JsonValue]:
    """0.8's ``SessionDefinition`` of a session (its state is not exposed)."""
    return {"session_id": session.session_id, "task_ids": session.task_ids, "state": {}}


def task_result(task: Task) -> JsonValue:
    """0.8's ``TaskResult`` of a final task, or ``None`` while it runs."""
    if not task.status.is_final:
        return None
    if task.status is TaskStatus.SUCCEEDED:
        return {
            "task_id": task.task_id,
            "history": [],
            "result": result_text(task.result),
            "data": {},
        }
    error = task.error.message if task.error else task.status.name.lower()
    return {
        "task_id": task.task_id,
        "history": [],
        "result": error,
        "data": {"status": task.status.name.lower(), "error": error},
    }


def raise_if_failed(task: Task) -> None:
    """A failed or cancelled task as an error carrying the task's error message."""
    if task.status is TaskStatus.SUCCEEDED:
        return
    error = task.error
    message = error.message if error else task.status.name.lower()
    kind = error.type if error else task.status.name
    raise TaskFailedError(
        f"Task {task.task_id} {task.status.name.lower()}: {kind}: {message}",
        reason="TASK_" + task.status.name,
        metadata={"task_id": task.task_id, "error_type": kind},
    )


class LlamaDeployApiServicer(ld_grpc.LlamaDeployApiServicer):
    """Llama Deploy 0.8's routes, path for path."""

    def __init__(self, mesh: Mesh) -> None:
        self._mesh = mesh

    async def GetStatus(
        self, request: ld.LlamaDeployApiGetStatusRequest, context: grpc.aio.ServicerContext
    ) -> ld.LlamaDeployApiGetStatusResponse:
        deployments = self._mesh.deployments
        health = self._mesh.health
        return ld.LlamaDeployApiGetStatusResponse(
            # Llama Deploy 0.8's StatusEnum: "Healthy", "Unhealthy" or "Down".
            status="Healthy" if health.healthy else "Unhealthy",
            status_message=health.message,
            max_deployments=deployments.settings.max_deployments,
            deployments=deployments.names(),
        )

    async def ListDeployments(
        self, request: ld.LlamaDeployApiListDeploymentsRequest, context: grpc.aio.ServicerContext
    ) -> ld.LlamaDeployApiListDeploymentsResponse:
        names = self._mesh.deployments.names()
        return ld.LlamaDeployApiListDeploymentsResponse(
            body=json_body([{"name": n} for n in names])
        )

    async def GetDeployment(
        self, request: ld.LlamaDeployApiGetDeploymentRequest, context: grpc.aio.ServicerContext
    ) -> ld.LlamaDeployApiGetDeploymentResponse:
        self._mesh.deployments.check_exists(request.deployment_name)
        return ld.LlamaDeployApiGetDeploymentResponse(name=request.deployment_name)

    async def CreateDeployment(
        self,
        request: ld.LlamaDeployApiCreateDeploymentRequest,
        context: grpc.aio.ServicerContext,
    ) -> ld.LlamaDeployApiCreateDeploymentResponse:
        yaml_bytes, file_name = config_file_from_multipart(
            request.upload.content_type, request.upload.data
        )
        if not yaml_bytes.strip():
            named = f" {file_name}" if file_name else ""
            raise InvalidArgumentError(
                f"the deployment file{named} is empty", reason="INVALID_DEPLOYMENT"
            )
        record = await self._mesh.deployments.create(
            yaml_bytes,
            file_name=file_name,
            base_path=request.base_path or ".",
            reload=request.reload,
            local=request.local,
        )
        return ld.LlamaDeployApiCreateDeploymentResponse(name=record.name)

    async def RunTask(
        self, request: ld.LlamaDeployApiRunTaskRequest, context: grpc.aio.ServicerContext
    ) -> ld.LlamaDeployApiRunTaskResponse:
        definition = request.task_definition
        deployment = request.deployment_name
        session_id = request.session_id or definition.session_id
        # 0.8 semantics: a run without a session does not keep the one it used. The task
        # says so itself (its session ends with it): no writes after its result.
        task = await self._mesh.run_task(
            deployment,
            service_id=definition.service_id or None,
            session_id=session_id or None,
            input=parse_task_input(definition.input),
            ends_session=not session_id,
        )
        raise_if_failed(task)
        return ld.LlamaDeployApiRunTaskResponse(body=json_body(result_text(task.result)))

    async def CreateTask(
        self, request: ld.LlamaDeployApiCreateTaskRequest, context: grpc.aio.ServicerContext
    ) -> ld.LlamaDeployApiCreateTaskResponse:
        definition = request.task_definition
        task = await self._mesh.create_task(
            request.deployment_name,
            service_id=definition.service_id or None,
            session_id=(request.session_id or definition.session_id) or None,
            input=parse_task_input(definition.input),
        )
        return ld.LlamaDeployApiCreateTaskResponse(
            body=json_body(task_definition(task, definition.input))
        )

    async def ListTasks(
        self, request: ld.LlamaDeployApiListTasksRequest, context: grpc.aio.ServicerContext
    ) -> ld.LlamaDeployApiListTasksResponse:
        tasks = await self._mesh.list_tasks(request.deployment_name)
        return ld.LlamaDeployApiListTasksResponse(
            body=json_body([task_definition(t) for t in tasks])
        )

    async def StreamEvents(
        self, request: ld.LlamaDeployApiStreamEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ld.LlamaDeployApiStreamEventsResponse]:
        async for event in self._mesh.stream_events(request.deployment_name, request.task_id):
            if event.kind is EventKind.WORKFLOW:
                data = event.data
            elif event.kind is EventKind.RESULT:
                data = {"result": event.data.get("result")}
            else:
                data = {"error": event.data.get("error") or event.data.get("reason")}
            line = json.dumps(data).encode() + b"\n"
            body = httpbody_pb2.HttpBody(content_type="application/x-ndjson", data=line)
            yield ld.LlamaDeployApiStreamEventsResponse(body=body)

    async def SendEvent(
        self, request: ld.LlamaDeployApiSendEventRequest, context: grpc.aio.ServicerContext
    ) -> ld.LlamaDeployApiSendEventResponse:
        definition = request.event_definition
        event = parse_serialized_event(definition.event_obj_str)
        await self._mesh.send_event(request.deployment_name, request.task_id, event)
        echo = {"service_id": definition.service_id, "event_obj_str": definition.event_obj_str}
        return ld.LlamaDeployApiSendEventResponse(body=json_body(echo))

    async def GetTaskResult(
        self, request: ld.LlamaDeployApiGetTaskResultRequest, context: grpc.aio.ServicerContext
    ) -> ld.LlamaDeployApiGetTaskResultResponse:
        task = await self._mesh.get_task(request.deployment_name, request.task_id)
        return ld.LlamaDeployApiGetTaskResultResponse(body=json_body(task_result(task)))

    async def ListSessions(
        self, request: ld.LlamaDeployApiListSessionsRequest, context: grpc.aio.ServicerContext
    ) -> ld.LlamaDeployApiListSessionsResponse:
        sessions = await self._mesh.list_sessions(request.deployment_name)
        sessions = await self._mesh.with_task_ids(request.deployment_name, sessions)
        return ld.LlamaDeployApiListSessionsResponse(
            body=json_body([session_definition(s) for s in sessions])
        )

    async def GetSession(
        self, request: ld.LlamaDeployApiGetSessionRequest, context: grpc.aio.ServicerContext
    ) -> ld.LlamaDeployApiGetSessionResponse:
        session = await self._mesh.get_session(request.deployment_name, request.session_id)
        return ld.LlamaDeployApiGetSessionResponse(body=json_body(session_definition(session)))

    async def CreateSession(
        self, request: ld.LlamaDeployApiCreateSessionRequest, context: grpc.aio.ServicerContext
    ) -> ld.LlamaDeployApiCreateSessionResponse:
        session = await self._mesh.create_session(request.deployment_name)
        return ld.LlamaDeployApiCreateSessionResponse(body=json_body(session_definition(session)))

    async def DeleteSession(
        self, request: ld.LlamaDeployApiDeleteSessionRequest, context: grpc.aio.ServicerContext
    ) -> ld.LlamaDeployApiDeleteSessionResponse:
        if not request.session_id:
            raise InvalidArgumentError(
                "query parameter 'session_id' is required", reason="MISSING_SESSION_ID"
            )
        await self._mesh.delete_session(request.deployment_name, request.session_id)
        return ld.LlamaDeployApiDeleteSessionResponse(body=json_body(None))
