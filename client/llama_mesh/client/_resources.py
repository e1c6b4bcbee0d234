"""The resource namespaces of :class:`~llama_mesh.client.AsyncClient`.

``deployments``, ``services``, ``tasks`` and ``sessions`` build requests, call the transport and
turn responses into the dataclasses of ``_models``. Listings walk every page. Waiting is
push-based: ``tasks.result`` follows the task's event stream to its final event.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
from collections.abc import AsyncGenerator, Mapping
from pathlib import Path
from typing import Any

from google.protobuf import struct_pb2

from llama_mesh.client._exceptions import ConfigError, TaskFailedError, UnavailableError
from llama_mesh.client._models import (
    Deployment,
    EventKind,
    Service,
    Session,
    Task,
    TaskEvent,
    TaskStatus,
)
from llama_mesh.client._transport import Transport
from llama_mesh.v1 import apiserver_pb2, types_pb2

MAX_RESUMES = 5
"""How many times in a row ``tasks.events`` reconnects after UNAVAILABLE before giving up."""
RESUME_BACKOFF = 0.2
"""Seconds before the first reconnect; doubled for each further one."""


def _struct(data: Mapping[str, Any] | None) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    if data:
        struct.update(dict(data))
    return struct


def read_deployment_file(path: Path) -> str:
    """The text of a deployment file; :class:`ConfigError` when it is unreadable or not UTF-8."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the deployment file {path}: {exc.strerror}") from exc
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            f"{path}:{line}: not valid UTF-8 (byte {exc.start}); save the deployment file as UTF-8"
        ) from exc


def result_of(task: Task) -> Any:
    """The result of a finished task; :class:`TaskFailedError` unless it succeeded."""
    if task.status is not TaskStatus.SUCCEEDED:
        raise TaskFailedError(task)
    return task.result


class Deployments:
    """Create, inspect, reload and delete deployments."""

    def __init__(self, transport: Transport) -> None:
        self._t = transport

    async def create(
        self,
        config: str | Path,
        *,
        base_path: str | Path | None = None,
        reload: bool = False,
        local: bool = False,
    ) -> Deployment:
        """Deploy YAML text, or a YAML file (whose directory is then the default base path).

        ``base_path`` is a directory on the server's machine; ``reload`` replaces a deployment
        of the same name; ``local`` uses local sources in place instead of copying them.
        """
        file_name = ""
        if isinstance(config, Path):
            text = read_deployment_file(config)
            file_name = config.name
            if base_path is None:
                base_path = config.resolve().parent
        else:
            text = config
        request = apiserver_pb2.CreateDeploymentRequest(
            config_yaml=text,
            base_path=str(base_path or ""),
            reload=reload,
            local=local,
            file_name=file_name,
        )
        response = await self._t.unary("CreateDeployment", request)
        return Deployment._from_proto(response.deployment)

    async def list(self) -> builtins.list[Deployment]:
        """Every deployment, sorted by name."""
        out: list[Deployment] = []
        token = ""
        while True:
            request = apiserver_pb2.ListDeploymentsRequest(page_token=token)
            page = await self._t.unary("ListDeployments", request)
            out.extend(Deployment._from_proto(d) for d in page.deployments)
            token = page.next_page_token
            if not token:
                return out

    async def get(self, name: str) -> Deployment:
        """One deployment with its services and their replicas."""
        request = apiserver_pb2.GetDeploymentRequest(name=name)
        response = await self._t.unary("GetDeployment", request)
        return Deployment._from_proto(response.deployment)

    async def delete(self, name: str) -> None:
        """Stop a deployment's workers and forget it."""
        await self._t.unary("DeleteDeployment", apiserver_pb2.DeleteDeploymentRequest(name=name))

    async def reload(self, name: str) -> Deployment:
        """Re-sync sources and restart the workers of a deployment."""
        request = apiserver_pb2.ReloadDeploymentRequest(name=name)
        response = await self._t.unary("ReloadDeployment", request)
        return Deployment._from_proto(response.deployment)

    async def progress(self, name: str) -> AsyncGenerator[str, None]:
        """The progress lines of the deployment's latest (re)deploy, until its last line."""
        request = apiserver_pb2.StreamDeploymentProgressRequest(name=name)
        async with contextlib.aclosing(self._t.stream("StreamDeploymentProgress", request)) as it:
            async for message in it:
                yield message.line
                if message.done:
                    return


class Services:
    """The workflow services of a deployment."""

    def __init__(self, transport: Transport) -> None:
        self._t = transport

    async def list(self, deployment: str) -> builtins.list[Service]:
        """A deployment's services with the health of their replicas."""
        request = apiserver_pb2.ListServicesRequest(deployment=deployment)
        response = await self._t.unary("ListServices", request)
        return [Service._from_proto(s) for s in response.services]


class Tasks:
    """Create, inspect, cancel and follow tasks."""

    def __init__(self, transport: Transport) -> None:
        self._t = transport

    async def create(
        self,
        deployment: str,
        input: Mapping[str, Any] | None = None,
        *,
        service: str | None = None,
        session: str | None = None,
    ) -> Task:
        """Queue a task and return at once (``input``: the keyword arguments of ``run``)."""
        request = apiserver_pb2.CreateTaskRequest(
            deployment=deployment,
            service_id=service or "",
            session_id=session or "",
            input=_struct(input),
        )
        response = await self._t.unary("CreateTask", request)
        return Task._from_proto(response.task)

    async def get(self, deployment: str, task_id: str) -> Task:
        """A task with its status, result or error."""
        request = apiserver_pb2.GetTaskRequest(deployment=deployment, task_id=task_id)
        return Task._from_proto((await self._t.unary("GetTask", request)).task)

    async def list(
        self,
        deployment: str,
        *,
        session: str | None = None,
        status: TaskStatus | str | None = None,
    ) -> builtins.list[Task]:
        """A deployment's tasks, newest first; optionally one session's or one status'."""
        status_value = TaskStatus(status)._to_proto() if status is not None else 0
        out: list[Task] = []
        token = ""
        while True:
            request = apiserver_pb2.ListTasksRequest(
                deployment=deployment,
                session_id=session or "",
                status=types_pb2.TaskStatus.ValueType(status_value),
                page_token=token,
            )
            page = await self._t.unary("ListTasks", request)
            out.extend(Task._from_proto(t) for t in page.tasks)
            token = page.next_page_token
            if not token:
                return out

    async def cancel(self, deployment: str, task_id: str, *, reason: str = "") -> Task:
        """Cancel a task; returns it as it is afterwards: cancelled (or the final state it
        reached first), still running only if its worker did not stop it within the
        server's wait (10 s)."""
        request = apiserver_pb2.CancelTaskRequest(
            deployment=deployment, task_id=task_id, reason=reason
        )
        return Task._from_proto((await self._t.unary("CancelTask", request)).task)

    async def send_event(
        self, deployment: str, task_id: str, type: str, data: Mapping[str, Any] | None = None
    ) -> None:
        """Send an event (e.g. ``HumanResponseEvent``) into a running task."""
        request = apiserver_pb2.SendEventRequest(
            deployment=deployment, task_id=task_id, type=type, data=_struct(data)
        )
        await self._t.unary("SendEvent", request)

    async def events(
        self, deployment: str, task_id: str, *, from_index: int = 0
    ) -> AsyncGenerator[TaskEvent, None]:
        """The task's events from ``from_index``, ending with the final event.

        When the stream breaks with UNAVAILABLE, it is resumed after the last event seen, up
        to :data:`MAX_RESUMES` times in a row; each event arrives once, in order.
        """
        next_index = from_index
        failures = 0
        while True:
            request = apiserver_pb2.StreamEventsRequest(
                deployment=deployment, task_id=task_id, from_index=next_index
            )
            try:
                async with contextlib.aclosing(self._t.stream("StreamEvents", request)) as it:
                    async for message in it:
                        event = TaskEvent._from_proto(message.event)
                        if event.index < next_index:
                            continue
                        failures, next_index = 0, event.index + 1
                        yield event
                        if event.is_final:
                            return
                return
            except UnavailableError:
                failures += 1
                if failures > MAX_RESUMES:
                    raise
                await asyncio.sleep(RESUME_BACKOFF * 2 ** (failures - 1))

    async def result(self, deployment: str, task_id: str) -> Any:
        """Wait for a task to finish and return its result (:class:`TaskFailedError` if not)."""
        task = await self.get(deployment, task_id)
        if task.is_final:
            return result_of(task)
        async with contextlib.aclosing(
            self.events(deployment, task_id, from_index=task.event_count)
        ) as events:
            async for event in events:
                if event.kind is EventKind.RESULT:
                    return event.data.get("result")
                if event.is_final:
                    break
        return result_of(await self.get(deployment, task_id))


class Sessions:
    """Sessions carry workflow context from one task to the next."""

    def __init__(self, transport: Transport) -> None:
        self._t = transport

    async def create(self, deployment: str) -> Session:
        """A new, empty session."""
        request = apiserver_pb2.CreateSessionRequest(deployment=deployment)
        return Session._from_proto((await self._t.unary("CreateSession", request)).session)

    async def list(self, deployment: str) -> builtins.list[Session]:
        """Every session of a deployment."""
        out: list[Session] = []
        token = ""
        while True:
            request = apiserver_pb2.ListSessionsRequest(deployment=deployment, page_token=token)
            page = await self._t.unary("ListSessions", request)
            out.extend(Session._from_proto(s) for s in page.sessions)
            token = page.next_page_token
            if not token:
                return out

    async def get(self, deployment: str, session_id: str) -> Session:
        """A session and its task ids."""
        request = apiserver_pb2.GetSessionRequest(deployment=deployment, session_id=session_id)
        return Session._from_proto((await self._t.unary("GetSession", request)).session)

    async def delete(self, deployment: str, session_id: str) -> None:
        """Delete a session and its stored workflow context."""
        request = apiserver_pb2.DeleteSessionRequest(deployment=deployment, session_id=session_id)
        await self._t.unary("DeleteSession", request)
