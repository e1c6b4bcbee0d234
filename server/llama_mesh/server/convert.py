"""Conversions between domain types and ``llama_mesh.v1`` protobuf messages.

The one place where protobuf meets the core: servicers, queue payloads and stored records
call these functions, and nothing else in the core touches ``_pb2`` types.
"""

from __future__ import annotations

import json
from typing import Any

from google.protobuf import json_format, struct_pb2, timestamp_pb2

from llama_mesh.server.domain import (
    DeploymentRecord,
    DeploymentStatus,
    EventKind,
    JsonValue,
    ServiceInstance,
    Session,
    Task,
    TaskError,
    TaskEvent,
    TaskStatus,
    now,
)
from llama_mesh.v1 import messages_pb2, types_pb2


def to_timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    """A protobuf Timestamp for epoch seconds."""
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def from_timestamp(ts: timestamp_pb2.Timestamp, *, present: bool = True) -> float | None:
    """Epoch seconds of a Timestamp; None when the field was not set."""
    if not present:
        return None
    return float(ts.ToNanoseconds()) / 1e9


def to_struct(data: dict[str, JsonValue]) -> struct_pb2.Struct:
    """A Struct holding a JSON object."""
    struct = struct_pb2.Struct()
    struct.update(data)
    return struct


def from_struct(struct: struct_pb2.Struct) -> dict[str, JsonValue]:
    """The JSON object held by a Struct (whole numbers come back as ints)."""
    return _ints(json_format.MessageToDict(struct))  # type: ignore[no-any-return]


def to_value(value: JsonValue) -> struct_pb2.Value:
    """A Value holding any JSON value (``None`` becomes ``null``)."""
    out = struct_pb2.Value()
    json_format.ParseDict(value, out)
    return out


def from_value(value: struct_pb2.Value) -> JsonValue:
    """The JSON value held by a Value (whole numbers come back as ints)."""
    return _ints(json_format.MessageToDict(value))


def _ints(value: Any) -> Any:
    # Struct stores numbers as doubles; give back ints where the number is whole.
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _ints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_ints(v) for v in value]
    return value


def task_to_proto(task: Task) -> types_pb2.Task:
    """The wire form of a task."""
    msg = types_pb2.Task(
        task_id=task.task_id,
        deployment=task.deployment,
        session_id=task.session_id,
        service_id=task.service_id,
        input=to_struct(task.input),
        status=types_pb2.TaskStatus.ValueType(int(task.status)),
        attempts=task.attempts,
        event_count=task.event_count,
        instance_id=task.instance_id,
        ends_session=task.ends_session,
    )
    if task.status is TaskStatus.SUCCEEDED:
        msg.result.CopyFrom(to_value(task.result))
    if task.error is not None:
        msg.error.CopyFrom(
            types_pb2.TaskError(
                type=task.error.type, message=task.error.message, traceback=task.error.traceback
            )
        )
    for name in ("created_at", "started_at", "finished_at"):
        seconds = getattr(task, name)
        if seconds is not None:
            getattr(msg, name).CopyFrom(to_timestamp(seconds))
    return msg


def task_from_message(
    msg: messages_pb2.TaskMessage, input: dict[str, JsonValue] | None = None
) -> Task:
    """The QUEUED task a task message stands for: what its record says until the task's
    first change is stored. ``input``: the message's input already parsed (else parsed
    here; ``ValueError`` when it is not a JSON object)."""
    if input is None:
        parsed = json.loads(msg.input_json or b"{}")
        if not isinstance(parsed, dict):
            raise ValueError("the task message's input is not a JSON object")
        input = parsed
    return Task(
        task_id=msg.task_id,
        deployment=msg.deployment,
        service_id=msg.service_id,
        session_id=msg.session_id,
        input=input,
        created_at=from_timestamp(msg.created_at) or now(),
        ends_session=msg.ends_session,
    )


def task_from_proto(msg: types_pb2.Task) -> Task:
    """The domain form of a task."""
    error = None
    if msg.HasField("error"):
        error = TaskError(
            type=msg.error.type, message=msg.error.message, traceback=msg.error.traceback
        )
    return Task(
        task_id=msg.task_id,
        deployment=msg.deployment,
        service_id=msg.service_id,
        session_id=msg.session_id,
        input=from_struct(msg.input),
        status=TaskStatus(msg.status) if msg.status else TaskStatus.QUEUED,
        result=from_value(msg.result) if msg.HasField("result") else None,
        error=error,
        attempts=msg.attempts,
        event_count=msg.event_count,
        created_at=from_timestamp(msg.created_at) or now(),
        started_at=from_timestamp(msg.started_at, present=msg.HasField("started_at")),
        finished_at=from_timestamp(msg.finished_at, present=msg.HasField("finished_at")),
        instance_id=msg.instance_id,
        ends_session=msg.ends_session,
    )


def session_to_proto(session: Session) -> types_pb2.Session:
    """The wire form of a session."""
    msg = types_pb2.Session(
        session_id=session.session_id,
        deployment=session.deployment,
        task_ids=session.task_ids,
    )
    msg.created_at.CopyFrom(to_timestamp(session.created_at))
    return msg


def session_from_proto(msg: types_pb2.Session) -> Session:
    """The domain form of a session."""
    return Session(
        session_id=msg.session_id,
        deployment=msg.deployment,
        created_at=from_timestamp(msg.created_at) or now(),
        task_ids=list(msg.task_ids),
    )


def event_to_message(event: TaskEvent, *, attempt: int = 0) -> messages_pb2.EventMessage:
    """The queue envelope of a task event (JSON data kept as text)."""
    msg = messages_pb2.EventMessage(
        task_id=event.task_id,
        index=event.index,
        kind=int(event.kind),
        type=event.type,
        data_json=json.dumps(event.data, default=str).encode(),
        attempt=attempt,
    )
    msg.timestamp.CopyFrom(to_timestamp(event.timestamp))
    return msg


def event_from_message(msg: messages_pb2.EventMessage) -> TaskEvent:
    """The domain form of a task event envelope."""
    return TaskEvent(
        task_id=msg.task_id,
        index=msg.index,
        kind=EventKind(msg.kind),
        type=msg.type,
        data=json.loads(msg.data_json) if msg.data_json else {},
        timestamp=from_timestamp(msg.timestamp) or 0.0,
    )


def event_to_proto(event: TaskEvent) -> types_pb2.TaskEvent:
    """The API form of a task event."""
    msg = types_pb2.TaskEvent(
        task_id=event.task_id,
        index=event.index,
        kind=types_pb2.EventKind.ValueType(int(event.kind)),
        type=event.type,
        data=to_struct(event.data),
    )
    msg.timestamp.CopyFrom(to_timestamp(event.timestamp))
    return msg


def instance_to_proto(instance: ServiceInstance) -> types_pb2.ServiceInstance:
    """The wire form of a service replica's heartbeat."""
    msg = types_pb2.ServiceInstance(
        instance_id=instance.instance_id,
        service_id=instance.service_id,
        hostname=instance.hostname,
        pid=instance.pid,
        address=instance.address,
        in_flight=instance.in_flight,
        generation=instance.generation,
    )
    msg.last_heartbeat.CopyFrom(to_timestamp(instance.last_heartbeat))
    msg.started_at.CopyFrom(to_timestamp(instance.started_at))
    return msg


def instance_from_proto(
    msg: types_pb2.ServiceInstance, *, deployment: str, service_id: str
) -> ServiceInstance:
    """The domain form of a heartbeat; deployment and service come from its key."""
    return ServiceInstance(
        instance_id=msg.instance_id,
        deployment=deployment,
        service_id=service_id,
        hostname=msg.hostname,
        pid=msg.pid,
        address=msg.address,
        in_flight=msg.in_flight,
        generation=msg.generation,
        started_at=from_timestamp(msg.started_at) or 0.0,
        last_heartbeat=from_timestamp(msg.last_heartbeat) or 0.0,
    )


def deployment_record_to_proto(record: DeploymentRecord) -> types_pb2.Deployment:
    """The stored form of a deployment (services and replicas are filled in by the API)."""
    msg = types_pb2.Deployment(
        name=record.name,
        status=types_pb2.DeploymentStatus.ValueType(int(record.status)),
        status_message=record.status_message,
        config_yaml=record.config_yaml,
        base_path=record.base_path,
        generation=record.generation,
        local=record.local,
    )
    msg.created_at.CopyFrom(to_timestamp(record.created_at))
    msg.updated_at.CopyFrom(to_timestamp(record.updated_at))
    return msg


def deployment_record_from_proto(msg: types_pb2.Deployment) -> DeploymentRecord:
    """The domain form of a stored deployment."""
    return DeploymentRecord(
        name=msg.name,
        config_yaml=msg.config_yaml,
        base_path=msg.base_path,
        local=msg.local,
        status=DeploymentStatus(msg.status) if msg.status else DeploymentStatus.DEPLOYING,
        status_message=msg.status_message,
        generation=msg.generation,
        created_at=from_timestamp(msg.created_at) or now(),
        updated_at=from_timestamp(msg.updated_at) or 0.0,
    )
