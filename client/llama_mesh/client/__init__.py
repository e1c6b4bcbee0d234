"""The Python SDK of llama-mesh: :class:`AsyncClient`, its blocking twin :class:`Client`,
the domain types they return and the exceptions they raise. ``llamactl`` is in ``.cli``.
"""

from importlib.metadata import PackageNotFoundError, version

from llama_mesh.client._client import AsyncClient
from llama_mesh.client._exceptions import (
    AlreadyExistsError,
    ApiError,
    ConfigError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    LlamaMeshError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    TaskFailedError,
    UnauthenticatedError,
    UnavailableError,
)
from llama_mesh.client._models import (
    Deployment,
    DeploymentStatus,
    EventKind,
    ServerStatus,
    Service,
    ServiceInstance,
    Session,
    Task,
    TaskError,
    TaskEvent,
    TaskStatus,
)
from llama_mesh.client._sync import Client

try:
    __version__ = version("llama-mesh-client")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "AlreadyExistsError",
    "ApiError",
    "AsyncClient",
    "Client",
    "ConfigError",
    "DeadlineExceededError",
    "Deployment",
    "DeploymentStatus",
    "EventKind",
    "FailedPreconditionError",
    "InvalidArgumentError",
    "LlamaMeshError",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "ServerStatus",
    "Service",
    "ServiceInstance",
    "Session",
    "Task",
    "TaskError",
    "TaskEvent",
    "TaskFailedError",
    "TaskStatus",
    "UnauthenticatedError",
    "UnavailableError",
    "__version__",
]
