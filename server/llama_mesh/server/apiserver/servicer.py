"""The ``ApiServer`` gRPC service (the ``/v1/`` JSON surface through the gateway)."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Sequence
from typing import TypeVar

import grpc

from llama_mesh.server import convert, subjects
from llama_mesh.server.apiserver.mesh import Mesh, check_id
from llama_mesh.server.deployment_config import redact_secrets
from llama_mesh.server.domain import DeploymentRecord, HumanEvent, TaskStatus
from llama_mesh.server.errors import InvalidArgumentError
from llama_mesh.v1 import apiserver_pb2, apiserver_pb2_grpc, types_pb2

VERSION = "0.1.0"
DEFAULT_PAGE = 100
MAX_PAGE = 1000
T = TypeVar("T")


def paginate(items: Sequence[T], page_size: int, page_token: str) -> tuple[Sequence[T], str]:
    """One page of ``items`` and the token of the next page ('' on the last)."""
    if page_size < 0:
        raise InvalidArgumentError("page_size must be >= 0", reason="INVALID_PAGE")
    size = min(page_size or DEFAULT_PAGE, MAX_PAGE)
    start = 0
    if page_token:
        try:
            start = int(base64.urlsafe_b64decode(page_token.encode()).decode())
        except ValueError as exc:
            raise InvalidArgumentError("invalid page_token", reason="INVALID_PAGE") from exc
    end = start + size
    token = base64.urlsafe_b64encode(str(end).encode()).decode() if end < len(items) else ""
    return items[start:end], token


class ApiServerServicer(apiserver_pb2_grpc.ApiServerServicer):
    """Deployments, tasks, sessions and typed events."""

    def __init__(self, mesh: Mesh, *, queue_kind: str) -> None:
        self._mesh = mesh
        self._queue_kind = queue_kind

    async def deployment_proto(self, record: DeploymentRecord) -> types_pb2.Deployment:
        """A deployment with its services and their live replicas."""
        msg = convert.deployment_record_to_proto(record)
        msg.config_yaml = redact_secrets(record.config_yaml)
        deployments = self._mesh.deployments
        if deployments.is_pending(record.name):  # restored after a restart, in turn
            msg.status = types_pb2.DEPLOYMENT_STATUS_DEPLOYING
        config = deployments.described_config(record.name, record.config_yaml)
        if config is None:
            return msg
        msg.default_service = config.default_service or ""
        instances = await self._mesh.cp.list_instances(record.name)
        broker = self._mesh.brokers.of(record.name)
        depths = await asyncio.gather(
            *(broker.queue_depth(subjects.task_queue(record.name, sid)) for sid in config.services)
        )
        for (sid, svc), depth in zip(config.services.items(), depths, strict=True):
            live = [i for i in instances if i.service_id == sid]
            msg.services.append(
                types_pb2.Service(
                    id=sid,
                    name=svc.name,
                    path=svc.path or "",
                    replicas=svc.replicas,
                    max_concurrent_tasks=svc.max_concurrent_tasks,
                    timeout_seconds=svc.timeout or 0.0,
                    max_retries=svc.max_retries,
                    instances=[convert.instance_to_proto(i) for i in live],
                    healthy=bool(live),
                    failure=deployments.supervisor.failure(record.name, sid),
                    queue_depth=depth,
                )
            )
        given_up = [s for s in msg.services if s.failure]
        if given_up and msg.status == types_pb2.DEPLOYMENT_STATUS_READY:
            every = len(given_up) == len(msg.services)
            msg.status = (
                types_pb2.DEPLOYMENT_STATUS_FAILED
                if every
                else types_pb2.DEPLOYMENT_STATUS_DEGRADED
            )
            msg.status_message = "\n".join(f"service '{s.id}': {s.failure}" for s in given_up)
        return msg

    async def GetStatus(
        self, request: apiserver_pb2.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> apiserver_pb2.GetStatusResponse:
        deployments = self._mesh.deployments
        return apiserver_pb2.GetStatusResponse(
            healthy=self._mesh.health.healthy,
            version=VERSION,
            deployments=deployments.names(),
            max_deployments=deployments.settings.max_deployments,
            message_queue=self._queue_kind,
        )

    async def CreateDeployment(
        self, request: apiserver_pb2.CreateDeploymentRequest, context: grpc.aio.ServicerContext
    ) -> apiserver_pb2.CreateDeploymentResponse:
        if not request.config_yaml.strip():
            named = f" {request.file_name}" if request.file_name else ""
            raise InvalidArgumentError(
                f"the deployment file{named} is empty", reason="INVALID_DEPLOYMENT"
            )
        record = await self._mesh.deployments.create(
            request.config_yaml,
            base_path=request.base_path,
            reload=request.reload,
            local=request.local,
            file_name=request.file_name,
        )
        return apiserver_pb2.CreateDeploymentResponse(
            deployment=await self.deployment_proto(record)
        )

    async def ListDeployments(
        self, request: apiserver_pb2.ListDeploymentsRequest, context: grpc.aio.ServicerContext
    ) -> apiserver_pb2.ListDeploymentsResponse:
        names = self._mesh.deployments.names()
        page, token = paginate(names, request.page_size, request.page_token)
        out = apiserver_pb2.ListDeploymentsResponse(next_page_token=token)
        # Records that cannot be read are left out (and logged) by list_deployments.
        records = {record.name: record for record in await self._mesh.cp.list_deployments()}
        for name in page:
            if name in records:
                out.deployments.append(await self.deployment_proto(records[name]))
        return out

    async def GetDeployment(
        self, request: apiserver_pb2.GetDeploymentRequest, context: grpc.aio.ServicerContext
    ) -> apiserver_pb2.GetDeploymentResponse:
        self._mesh.deployments.check_exists(request.name)
        record = await self._mesh.cp.get_deployment(request.name)
        return apiserver_pb2.GetDeploymentResponse(deployment=await self.deployment_proto(record))

    async def DeleteDeployment(
        self, request: apiserver_pb2.DeleteDeploymentRequest, context: grpc.aio.ServicerContext
    ) -> apiserver_pb2.DeleteDeploymentResponse:
        await self._mesh.deployments.delete(request.name)
        return apiserver_pb2.DeleteDeploymentResponse()

    async def ReloadDeployment(
        self, request: apiserver_pb2.ReloadDeploymentRequest, context: grpc.aio.ServicerContext
    ) -> apiserver_pb2.ReloadDeploymentResponse:
        record = await self._mesh.deployments.reload(request.name)
        return apiserver_pb2.ReloadDeploymentResponse(
            deployment=await self.deployment_proto(record)
        )

    async def StreamDeploymentProgress(
        self,
        request: apiserver_pb2.StreamDeploymentProgressRequest,
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[apiserver_pb2.StreamDeploymentProgressResponse]:
        async for line in self._mesh.deployments.progress(request.name):
            yield line

    async def ListServices(
        self, request: apiserver_pb2.ListServicesRequest, context: grpc.aio.ServicerContext
    ) -> apiserver_pb2.ListServicesResponse:
        self._mesh.deployments.check_exists(request.deployment)
        record = await self._mesh.cp.get_deployment(request.deployment)
        deployment = await self.deployment_proto(record)
        return apiserver_pb2.ListServicesResponse(services=deployment.services)

    async def RunTask(
        self, request: apiserver_pb2.RunTaskRequest, context: grpc.aio.ServicerContext
    ) -> apiserver_pb2.RunTaskResponse:
        task = await self._mesh.run_task(
            request.deployment,
            service_id=request.service_id or None,
            session_id=request.session_id or None,
            input=convert.from_struct(request.input),
        )
        return apiserver_pb2.RunTaskResponse(task=convert.task_to_proto(task))

    async def CreateTask(
        self, request: apiserver_pb2.CreateTaskRequest, context: grpc.aio.ServicerContext
    ) -> apiserver_pb2.CreateTaskResponse:
        task = await self._mesh.create_task(
            request.deployment,
            service_id=request.service_id or None,
            session_id=request.session_id or None,
            input=convert.from_struct(request.input),
        )
        return apiserver_pb2.CreateTaskResponse(task=convert.task_to_proto(task))

    async def ListTasks(
        self, request: apiserver_pb2.ListTasksRequest, context: grpc.aio.ServicerContext
    ) -> apiserver_pb2.ListTasksResponse:
        tasks = await self._mesh.list_tasks(request.deployment, request.session_id or None)
        if request.status:
            tasks = [t for t in tasks if t.status == TaskStatus(request.status)]
        page, token = paginate(tasks, request.page_size, request.page_token)
        return apiserver_pb2.ListTasksResponse(
            tasks=[convert.task_to_proto(t) for t in page], next_page_token=token
        )

    async def WatchTasks(
        self, request: apiserver_pb2.WatchTasksRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[apiserver_pb2.WatchTasksResponse]:
        async for change in self._mesh.watch_tasks(request.deployment):
            if change is None:
                yield apiserver_pb2.WatchTasksResponse(snapshot_end=True)
            elif change.task is None:
                gone = types_pb2.Task(deployment=change.deployment, task_id=change.task_id)
                yield apiserver_pb2.WatchTasksResponse(task=gone, deleted=True)
            else:
                yield apiserver_pb2.WatchTasksResponse(task=convert.task_to_proto(change.task))

    async def GetTask(
        self, request: apiserver_pb2.GetTaskRequest, context: grpc.aio.ServicerContext
    ) -> apiserver_pb2.GetTaskResponse:
        task = await self._mesh.task_so_far(request.deployment, request.task_id)
        return apiserver_pb2.GetTaskResponse(task=convert.task_to_proto(task))

    async def CancelTask(
        self, request: apiserver_pb2.CancelTaskRequest, context: grpc.aio.ServicerContext
    ) -> apiserver_pb2.CancelTaskResponse:
        task = await self._mesh.cancel_task(request.deployment, request.task_id, request.reason)
        return apiserver_pb2.CancelTaskResponse(task=convert.task_to_proto(task))

    async def StreamEvents(
        self, request: apiserver_pb2.StreamEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[apiserver_pb2.StreamEventsResponse]:
        events = self._mesh.stream_events(
            request.deployment, request.task_id, from_index=request.from_index
        )
        async for event in events:
            yield apiserver_pb2.StreamEventsResponse(event=convert.event_to_proto(event))

    async def SendEvent(
        self, request: apiserver_pb2.SendEventRequest, context: grpc.aio.ServicerContext
    ) -> apiserver_pb2.SendEventResponse:
        event = HumanEvent(type=request.type, data=convert.from_struct(request.data))
        await self._mesh.send_event(request.deployment, request.task_id, event)
        return apiserver_pb2.SendEventResponse()

    async def CreateSession(
        self, request: apiserver_pb2.CreateSessionRequest, context: grpc.aio.ServicerContext
    ) -> apiserver_pb2.CreateSessionResponse:
        session = await self._mesh.create_session(request.deployment)
        return apiserver_pb2.CreateSessionResponse(session=convert.session_to_proto(session))

    async def ListSessions(
        self, request: apiserver_pb2.ListSessionsRequest, context: grpc.aio.ServicerContext
    ) -> apiserver_pb2.ListSessionsResponse:
        sessions = await self._mesh.list_sessions(request.deployment)
        page, token = paginate(sessions, request.page_size, request.page_token)
        page = await self._mesh.with_task_ids(request.deployment, list(page))
        return apiserver_pb2.ListSessionsResponse(
            sessions=[convert.session_to_proto(s) for s in page], next_page_token=token
        )

    async def GetSession(
        self, request: apiserver_pb2.GetSessionRequest, context: grpc.aio.ServicerContext
    ) -> apiserver_pb2.GetSessionResponse:
        session = await self._mesh.get_session(request.deployment, request.session_id)
        return apiserver_pb2.GetSessionResponse(session=convert.session_to_proto(session))

    async def DeleteSession(
        self, request: apiserver_pb2.DeleteSessionRequest, context: grpc.aio.ServicerContext
    ) -> apiserver_pb2.DeleteSessionResponse:
        await self._mesh.delete_session(
            request.deployment, check_id("session id", request.session_id)
        )
        return apiserver_pb2.DeleteSessionResponse()
