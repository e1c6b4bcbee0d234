"""Domain types of the SDK: frozen dataclasses built from ``llama_mesh.v1`` messages.

``_from_proto`` is the edge: nothing above this module sees a ``_pb2`` type. Timestamps become
timezone-aware UTC datetimes (``None`` when unset); Struct and Value fields become plain JSON
values, with whole numbers given back as ints.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format

from llama_mesh.v1 import apiserver_pb2, types_pb2


def _time(msg: Any, field: str) -> datetime | None:
    if not msg.HasField(field):
        return None
    ts = getattr(msg, field)
    return datetime.fromtimestamp(ts.ToNanoseconds() / 1e9, tz=UTC)


def _json(msg: Any) -> Any:
    """The JSON value of a Struct or Value message (whole numbers as ints)."""
    return _ints(json_format.MessageToDict(msg))


def _ints(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _ints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_ints(v) for v in value]
    return value


def _enum_name(wrapper: Any, value: int, prefix: str) -> str:
    """The name of a protobuf enum value without its prefix ('' for unknown values)."""
    try:
        return str(wrapper.Name(value)).removeprefix(prefix)
    except ValueError:
        return ""


class TaskStatus(enum.StrEnum):
    """The lifecycle state of a task."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        """True for the states a task never leaves."""
        return self in (TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED)

    @classmethod
    def _from_proto(cls, value: int) -> TaskStatus:
        name = _enum_name(types_pb2.TaskStatus, value, "TASK_STATUS_")
        return cls[name] if name in cls.__members__ else cls.QUEUED

    def _to_proto(self) -> int:
        return int(types_pb2.TaskStatus.Value(f"TASK_STATUS_{self.name}"))


class DeploymentStatus(enum.StrEnum):
    """The lifecycle state of a deployment."""

    DEPLOYING = "deploying"
    READY = "ready"
    DEGRADED = "degraded"
    FAILED = "failed"

    @classmethod
    def _from_proto(cls, value: int) -> DeploymentStatus:
        name = _enum_name(types_pb2.DeploymentStatus, value, "DEPLOYMENT_STATUS_")
        return cls[name] if name in cls.__members__ else cls.DEPLOYING


class EventKind(enum.StrEnum):
    """What a task event is: a workflow event, or the final event of the stream."""

    WORKFLOW = "workflow"
    RESULT = "result"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @classmethod
    def _from_proto(cls, value: int) -> EventKind:
        name = _enum_name(types_pb2.EventKind, value, "EVENT_KIND_")
        return cls[name] if name in cls.__members__ else cls.WORKFLOW


@dataclass(frozen=True, slots=True)
class ServerStatus:
    """What ``status()`` reports about the server."""

    healthy: bool
    version: str
    deployments: tuple[str, ...]
    max_deployments: int
    message_queue: str

    @classmethod
    def _from_proto(cls, msg: apiserver_pb2.GetStatusResponse) -> ServerStatus:
        return cls(
            healthy=msg.healthy,
            version=msg.version,
            deployments=tuple(msg.deployments),
            max_deployments=msg.max_deployments,
            message_queue=msg.message_queue,
        )


@dataclass(frozen=True, slots=True)
class ServiceInstance:
    """One running worker process (replica) of a service."""

    instance_id: str
    hostname: str
    pid: int
    address: str
    in_flight: int
    generation: int
    last_heartbeat: datetime | None
    started_at: datetime | None

    @classmethod
    def _from_proto(cls, msg: types_pb2.ServiceInstance) -> ServiceInstance:
        return cls(
            instance_id=msg.instance_id,
            hostname=msg.hostname,
            pid=msg.pid,
            address=msg.address,
            in_flight=msg.in_flight,
            generation=msg.generation,
            last_heartbeat=_time(msg, "last_heartbeat"),
            started_at=_time(msg, "started_at"),
        )


@dataclass(frozen=True, slots=True)
class Service:
    """One workflow service of a deployment and its live replicas."""

    id: str
    name: str
    path: str
    replicas: int
    max_concurrent_tasks: int
    timeout_seconds: float
    max_retries: int
    healthy: bool
    instances: tuple[ServiceInstance, ...]
    failure: str = ""
    """Why the service was given up on (its replicas kept crashing), with their last output."""
    queue_depth: int = 0
    """Tasks waiting in the service's work queue (queued, or taken and not yet settled)."""

    @classmethod
    def _from_proto(cls, msg: types_pb2.Service) -> Service:
        return cls(
            id=msg.id,
            name=msg.name,
            path=msg.path,
            replicas=msg.replicas,
            max_concurrent_tasks=msg.max_concurrent_tasks,
            timeout_seconds=msg.timeout_seconds,
            max_retries=msg.max_retries,
            healthy=msg.healthy,
            instances=tuple(ServiceInstance._from_proto(i) for i in msg.instances),
            failure=msg.failure,
            queue_depth=msg.queue_depth,
        )


@dataclass(frozen=True, slots=True)
class Deployment:
    """A named set of workflow services created from one deployment YAML file."""

    name: str
    status: DeploymentStatus
    status_message: str
    default_service: str
    services: tuple[Service, ...]
    generation: int
    base_path: str
    local: bool
    created_at: datetime | None
    updated_at: datetime | None
    config_yaml: str

    @classmethod
    def _from_proto(cls, msg: types_pb2.Deployment) -> Deployment:
        return cls(
            name=msg.name,
            status=DeploymentStatus._from_proto(msg.status),
            status_message=msg.status_message,
            default_service=msg.default_service,
            services=tuple(Service._from_proto(s) for s in msg.services),
            generation=msg.generation,
            base_path=msg.base_path,
            local=msg.local,
            created_at=_time(msg, "created_at"),
            updated_at=_time(msg, "updated_at"),
            config_yaml=msg.config_yaml,
        )


@dataclass(frozen=True, slots=True)
class TaskError:
    """Why a task failed or was cancelled."""

    type: str
    message: str
    traceback: str = ""

    @classmethod
    def _from_proto(cls, msg: types_pb2.TaskError) -> TaskError:
        return cls(type=msg.type, message=msg.message, traceback=msg.traceback)


@dataclass(frozen=True, slots=True)
class Task:
    """One run of a workflow: its input, status, and result or error."""

    task_id: str
    deployment: str
    service_id: str
    session_id: str
    status: TaskStatus
    input: dict[str, Any]
    result: Any
    error: TaskError | None
    attempts: int
    event_count: int
    instance_id: str
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None

    @property
    def is_final(self) -> bool:
        """True once the task succeeded, failed or was cancelled."""
        return self.status.is_final

    @classmethod
    def _from_proto(cls, msg: types_pb2.Task) -> Task:
        return cls(
            task_id=msg.task_id,
            deployment=msg.deployment,
            service_id=msg.service_id,
            session_id=msg.session_id,
            status=TaskStatus._from_proto(msg.status),
            input=_json(msg.input),
            result=_json(msg.result) if msg.HasField("result") else None,
            error=TaskError._from_proto(msg.error) if msg.HasField("error") else None,
            attempts=msg.attempts,
            event_count=msg.event_count,
            instance_id=msg.instance_id,
            created_at=_time(msg, "created_at"),
            started_at=_time(msg, "started_at"),
            finished_at=_time(msg, "finished_at"),
        )


@dataclass(frozen=True, slots=True)
class Session:
    """A session: carries workflow context from one task to the next."""

    session_id: str
    deployment: str
    task_ids: tuple[str, ...]
    created_at: datetime | None

    @classmethod
    def _from_proto(cls, msg: types_pb2.Session) -> Session:
        return cls(
            session_id=msg.session_id,
            deployment=msg.deployment,
            task_ids=tuple(msg.task_ids),
            created_at=_time(msg, "created_at"),
        )


@dataclass(frozen=True, slots=True)
class TaskEvent:
    """One event of a task's stream; the last one (``is_final``) carries result or error."""

    task_id: str
    index: int
    kind: EventKind
    type: str
    data: dict[str, Any]
    timestamp: datetime | None

    @property
    def is_final(self) -> bool:
        """True for the event that ends the stream (result, failure or cancellation)."""
        return self.kind is not EventKind.WORKFLOW

    @classmethod
    def _from_proto(cls, msg: types_pb2.TaskEvent) -> TaskEvent:
        return cls(
            task_id=msg.task_id,
            index=msg.index,
            kind=EventKind._from_proto(msg.kind),
            type=msg.type,
            data=_json(msg.data),
            timestamp=_time(msg, "timestamp"),
        )
