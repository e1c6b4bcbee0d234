"""Domain types of the mesh: what the core works with instead of protobuf messages.

Conversions to and from ``llama_mesh.v1`` messages live in ``convert.py`` and are applied
at the edges only (gRPC servicers, message-queue payloads, key-value records).
"""

from __future__ import annotations

import enum
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

JsonValue = Any
"""A value that ``json.dumps`` accepts."""

ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
"""Task and session ids: they become key-value keys and subject tokens (use fullmatch)."""


def new_id() -> str:
    """A fresh random identifier (UUID4 text), used for tasks, sessions and instances."""
    return str(uuid.uuid4())


def now() -> float:
    """The wall-clock time in seconds since the epoch."""
    return time.time()


class TaskStatus(enum.IntEnum):
    """A task's lifecycle state; values match ``llama_mesh.v1.TaskStatus``."""

    QUEUED = 1
    RUNNING = 2
    SUCCEEDED = 3
    FAILED = 4
    CANCELLED = 5

    @property
    def is_final(self) -> bool:
        """True for the states a task never leaves."""
        return self in _FINAL


_FINAL = frozenset({TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED})


class EventKind(enum.IntEnum):
    """What a task event is; values match ``llama_mesh.v1.EventKind``."""

    WORKFLOW = 1
    RESULT = 2
    FAILED = 3
    CANCELLED = 4

    @property
    def is_final(self) -> bool:
        """True for the event that ends a task's stream."""
        return self is not EventKind.WORKFLOW


class DeploymentStatus(enum.IntEnum):
    """A deployment's lifecycle state; values match ``llama_mesh.v1.DeploymentStatus``."""

    DEPLOYING = 1
    READY = 2
    DEGRADED = 3
    FAILED = 4


@dataclass(frozen=True, slots=True)
class TaskError:
    """Why a task failed or was cancelled."""

    type: str
    message: str
    traceback: str = ""


@dataclass(slots=True)
class Task:
    """One run of a workflow, as the control plane stores it."""

    task_id: str
    deployment: str
    service_id: str
    session_id: str
    input: dict[str, JsonValue]
    status: TaskStatus = TaskStatus.QUEUED
    result: JsonValue = None
    error: TaskError | None = None
    attempts: int = 0
    event_count: int = 0
    created_at: float = field(default_factory=now)
    started_at: float | None = None
    finished_at: float | None = None
    instance_id: str = ""
    ends_session: bool = False
    """Its implied session ends with it (a Llama Deploy 0.8 ``tasks/run`` without a
    session): gone once the task is final, and no workflow context is stored for it."""


@dataclass(slots=True)
class Session:
    """A sequence of tasks sharing workflow context."""

    session_id: str
    deployment: str
    created_at: float = field(default_factory=now)
    task_ids: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class TaskEvent:
    """One event of a task's stream."""

    task_id: str
    index: int
    kind: EventKind
    type: str
    data: dict[str, JsonValue]
    timestamp: float = field(default_factory=now)


@dataclass(frozen=True, slots=True)
class HumanEvent:
    """An event sent into a running task; ``type`` is qualified or a bare class name."""

    type: str
    data: dict[str, JsonValue]


@dataclass(slots=True)
class ServiceInstance:
    """A live worker process (replica) of a service, as its heartbeat describes it."""

    instance_id: str
    deployment: str
    service_id: str
    hostname: str
    pid: int
    address: str = ""
    in_flight: int = 0
    generation: int = 0
    started_at: float = field(default_factory=now)
    last_heartbeat: float = field(default_factory=now)


@dataclass(slots=True)
class DeploymentRecord:
    """A deployment as persisted: its YAML, where it came from, and its state."""

    name: str
    config_yaml: str
    base_path: str
    local: bool = False
    status: DeploymentStatus = DeploymentStatus.DEPLOYING
    status_message: str = ""
    generation: int = 1
    created_at: float = field(default_factory=now)
    updated_at: float = field(default_factory=now)
