"""The ``ControlPlane`` gRPC service: the store, for components in other processes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import grpc

from llama_mesh.server import convert
from llama_mesh.server.control_plane.store import ControlPlane
from llama_mesh.server.control_plane.watcher import TaskWatcher
from llama_mesh.server.domain import TaskStatus
from llama_mesh.server.errors import InvalidArgumentError
from llama_mesh.v1 import control_plane_pb2 as cp
from llama_mesh.v1 import control_plane_pb2_grpc as cp_grpc


class ControlPlaneServicer(cp_grpc.ControlPlaneServicer):
    """Registry, tasks, sessions and session state over gRPC."""

    def __init__(self, store: ControlPlane, watcher: TaskWatcher) -> None:
        self._store = store
        self._watcher = watcher

    async def ListServiceInstances(
        self, request: cp.ControlPlaneListServiceInstancesRequest, context: grpc.aio.ServicerContext
    ) -> cp.ControlPlaneListServiceInstancesResponse:
        instances = await self._store.list_instances(request.deployment, request.service_id or None)
        return cp.ControlPlaneListServiceInstancesResponse(
            instances=[convert.instance_to_proto(i) for i in instances]
        )

    async def RecordTask(
        self, request: cp.ControlPlaneRecordTaskRequest, context: grpc.aio.ServicerContext
    ) -> cp.ControlPlaneRecordTaskResponse:
        task = convert.task_from_proto(request.task)
        if task.status is not TaskStatus.QUEUED or not task.task_id or not task.deployment:
            raise InvalidArgumentError("a new task needs an id, a deployment and status QUEUED")
        stored = await self._store.record_task(task)
        return cp.ControlPlaneRecordTaskResponse(task=convert.task_to_proto(stored.task))

    async def GetTask(
        self, request: cp.ControlPlaneGetTaskRequest, context: grpc.aio.ServicerContext
    ) -> cp.ControlPlaneGetTaskResponse:
        task = await self._store.get_task(request.deployment, request.task_id)
        return cp.ControlPlaneGetTaskResponse(task=convert.task_to_proto(task))

    async def ListTasks(
        self, request: cp.ControlPlaneListTasksRequest, context: grpc.aio.ServicerContext
    ) -> cp.ControlPlaneListTasksResponse:
        tasks = await self._store.list_tasks(request.deployment, request.session_id or None)
        return cp.ControlPlaneListTasksResponse(tasks=[convert.task_to_proto(t) for t in tasks])

    async def WatchTask(
        self, request: cp.ControlPlaneWatchTaskRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[cp.ControlPlaneWatchTaskResponse]:
        async for task in self._watcher.follow(request.deployment, request.task_id):
            yield cp.ControlPlaneWatchTaskResponse(task=convert.task_to_proto(task))

    async def CreateSession(
        self, request: cp.ControlPlaneCreateSessionRequest, context: grpc.aio.ServicerContext
    ) -> cp.ControlPlaneCreateSessionResponse:
        session = await self._store.create_session(request.deployment)
        return cp.ControlPlaneCreateSessionResponse(session=convert.session_to_proto(session))

    async def GetSession(
        self, request: cp.ControlPlaneGetSessionRequest, context: grpc.aio.ServicerContext
    ) -> cp.ControlPlaneGetSessionResponse:
        session = await self._store.get_session(request.deployment, request.session_id)
        return cp.ControlPlaneGetSessionResponse(session=convert.session_to_proto(session))

    async def ListSessions(
        self, request: cp.ControlPlaneListSessionsRequest, context: grpc.aio.ServicerContext
    ) -> cp.ControlPlaneListSessionsResponse:
        sessions = await self._store.list_sessions(request.deployment)
        return cp.ControlPlaneListSessionsResponse(
            sessions=[convert.session_to_proto(s) for s in sessions]
        )

    async def DeleteSession(
        self, request: cp.ControlPlaneDeleteSessionRequest, context: grpc.aio.ServicerContext
    ) -> cp.ControlPlaneDeleteSessionResponse:
        await self._store.delete_session(request.deployment, request.session_id)
        return cp.ControlPlaneDeleteSessionResponse()

    async def GetSessionState(
        self, request: cp.ControlPlaneGetSessionStateRequest, context: grpc.aio.ServicerContext
    ) -> cp.ControlPlaneGetSessionStateResponse:
        raw = await self._store.get_session_state(request.deployment, request.session_id)
        out = cp.ControlPlaneGetSessionStateResponse()
        if raw is not None:
            out.context.CopyFrom(convert.to_struct(json.loads(raw)))
        return out
