"""The client's exception tree, and the one function that maps gRPC errors into it.

::

    LlamaMeshError                      every error this package raises
    ├── ConfigError                     bad address, profile or config file (names the key)
    ├── TaskFailedError                 run()/tasks.result(): the task failed or was cancelled
    └── ApiError                        the server answered with an error (code, reason, ...)
        ├── InvalidArgumentError        INVALID_ARGUMENT, OUT_OF_RANGE
        ├── NotFoundError               NOT_FOUND
        ├── AlreadyExistsError          ALREADY_EXISTS
        ├── FailedPreconditionError     FAILED_PRECONDITION, ABORTED
        ├── ResourceExhaustedError      RESOURCE_EXHAUSTED
        ├── UnauthenticatedError        UNAUTHENTICATED
        ├── PermissionDeniedError       PERMISSION_DENIED
        ├── UnavailableError            UNAVAILABLE (server down or unreachable; retry may help)
        └── DeadlineExceededError       DEADLINE_EXCEEDED (the client's timeout elapsed)

Every other status code (CANCELLED, UNKNOWN, UNIMPLEMENTED, INTERNAL, DATA_LOSS, OK) is a
plain :class:`ApiError`. :func:`_map_rpc_error` is the only place that looks at status codes;
the transport calls it for every failed RPC.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

if TYPE_CHECKING:
    from llama_mesh.client._models import Task

_STATUS_DETAILS_KEY = "grpc-status-details-bin"


class LlamaMeshError(Exception):
    """Base class of every llama-mesh client error."""


class ConfigError(LlamaMeshError):
    """The client configuration (address, profile, config file, TLS files) is unusable."""


class TaskFailedError(LlamaMeshError):
    """A task ended failed or cancelled; ``task`` holds its status and error."""

    def __init__(self, task: Task) -> None:
        self.task = task
        error = task.error
        detail = f"{error.type}: {error.message}" if error else "no error details"
        super().__init__(f"Task {task.task_id} {task.status.value}: {detail}")


class ApiError(LlamaMeshError):
    """The server rejected a call; ``reason`` and ``metadata`` come from its ErrorInfo."""

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode = grpc.StatusCode.UNKNOWN,
        reason: str = "",
        domain: str = "",
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.reason = reason
        self.domain = domain
        self.metadata: dict[str, str] = dict(metadata or {})

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}({self.message!r}, code={self.code.name}, reason={self.reason!r})"


class InvalidArgumentError(ApiError):
    """The request is malformed (bad YAML, JSON, id, page token, ...)."""


class NotFoundError(ApiError):
    """A deployment, service, task or session does not exist."""


class AlreadyExistsError(ApiError):
    """The thing to create exists already (deploy with ``reload`` to replace it)."""


class FailedPreconditionError(ApiError):
    """The request is valid but cannot be carried out now (e.g. the task has finished)."""


class ResourceExhaustedError(ApiError):
    """A server limit was reached (deployments, payload size)."""


class UnauthenticatedError(ApiError):
    """No valid API key was presented."""


class PermissionDeniedError(ApiError):
    """The API key is valid but not allowed to do this."""


class UnavailableError(ApiError):
    """The server cannot be reached or a dependency of it is down; retrying may help."""


class DeadlineExceededError(ApiError):
    """The call did not finish within the client's timeout."""


_CODES: dict[grpc.StatusCode, type[ApiError]] = {
    grpc.StatusCode.OK: ApiError,
    grpc.StatusCode.CANCELLED: ApiError,
    grpc.StatusCode.UNKNOWN: ApiError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.ABORTED: FailedPreconditionError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.UNIMPLEMENTED: ApiError,
    grpc.StatusCode.INTERNAL: ApiError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DATA_LOSS: ApiError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
}
"""Every gRPC status code and the class it becomes (a test pins that none is missing)."""


def _map_rpc_error(exc: grpc.aio.AioRpcError) -> ApiError:
    """The :class:`ApiError` for a failed call: class by code, details from its ErrorInfo."""
    code: grpc.StatusCode = exc.code()
    message = exc.details() or code.name
    reason, domain, metadata = _error_info(exc.trailing_metadata())
    cls = _CODES.get(code, ApiError)
    return cls(message, code=code, reason=reason or code.name, domain=domain, metadata=metadata)


def _error_info(trailers: Any) -> tuple[str, str, dict[str, str]]:
    """Reason, domain and metadata of the first ErrorInfo in the rich status, if any."""
    for key, value in trailers or ():
        if key != _STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        try:
            status = status_pb2.Status.FromString(value)
        except DecodeError:
            return "", "", {}
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                return info.reason, info.domain, dict(info.metadata)
    return "", "", {}
