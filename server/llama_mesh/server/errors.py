"""The server's exception tree; one gRPC interceptor maps it to status codes.

::

    MeshError                       INTERNAL (a bug or an unexpected failure)
    ├── InvalidArgumentError        INVALID_ARGUMENT (bad YAML, JSON, event payload, ...)
    ├── NotFoundError               NOT_FOUND (deployment, service, task, session)
    ├── AlreadyExistsError          ALREADY_EXISTS (deployment created twice without reload)
    ├── FailedPreconditionError     FAILED_PRECONDITION (task not running, no default service)
    │   └── UnreadableRecordError   a stored record that does not parse (RECORD_UNREADABLE)
    ├── ResourceExhaustedError      RESOURCE_EXHAUSTED (too many deployments, payload too big)
    ├── UnauthenticatedError        UNAUTHENTICATED (missing or unknown API key)
    ├── PermissionDeniedError       PERMISSION_DENIED (key lacks the admin role, path not allowed)
    ├── UnavailableError            UNAVAILABLE (message queue down)
    ├── DeadlineExceededError       DEADLINE_EXCEEDED (waited too long for a task)
    └── TaskFailedError             UNKNOWN (the workflow raised; carries the task's error)

Every error has a machine-readable ``reason`` (UPPER_SNAKE) that travels as a
``google.rpc.ErrorInfo`` detail, and optional ``metadata``.
"""

from __future__ import annotations

from collections.abc import Mapping


class MeshError(Exception):
    """Base class of every llama-mesh server error."""

    default_reason = "INTERNAL"

    def __init__(
        self, message: str, *, reason: str | None = None, metadata: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata: dict[str, str] = dict(metadata or {})


class InvalidArgumentError(MeshError):
    """The request is malformed: it names the field or key at fault."""

    default_reason = "INVALID_ARGUMENT"


class NotFoundError(MeshError):
    """A named deployment, service, task or session does not exist."""

    default_reason = "NOT_FOUND"


class AlreadyExistsError(MeshError):
    """The thing to create exists already."""

    default_reason = "ALREADY_EXISTS"


class FailedPreconditionError(MeshError):
    """The request is valid but the system is not in a state to carry it out."""

    default_reason = "FAILED_PRECONDITION"


class UnreadableRecordError(FailedPreconditionError):
    """A stored record (task, session, deployment) does not parse: written by another
    version, a bug or another client of the store.

    FAILED_PRECONDITION (HTTP 400), not DATA_LOSS: DATA_LOSS is an HTTP 500, and asking
    again does not help until the record is rewritten or deleted, which is what
    FAILED_PRECONDITION says. Listings skip such records (and log them) instead.
    """

    default_reason = "RECORD_UNREADABLE"


class ResourceExhaustedError(MeshError):
    """A limit was reached (deployments, payload size)."""

    default_reason = "RESOURCE_EXHAUSTED"


class UnauthenticatedError(MeshError):
    """No valid API key was presented."""

    default_reason = "UNAUTHENTICATED"


class PermissionDeniedError(MeshError):
    """The API key is valid but not allowed to do this."""

    default_reason = "PERMISSION_DENIED"


class UnavailableError(MeshError):
    """A dependency (the message queue) is unavailable; retrying may help."""

    default_reason = "UNAVAILABLE"


class DeadlineExceededError(MeshError):
    """The operation did not finish in time."""

    default_reason = "DEADLINE_EXCEEDED"


class TaskFailedError(MeshError):
    """The workflow of a task raised, timed out or ran out of retries."""

    default_reason = "TASK_FAILED"
