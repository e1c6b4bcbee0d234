"""API keys: bearer tokens checked on every RPC by one interceptor (and so through the gateway).

Two roles. A *user* key runs tasks, streams events, manages sessions and reads state; an
*admin* key additionally creates, reloads and deletes deployments, registers services with
a deployment's 0.8 control plane, and reaches the internal RPCs of the ``ControlPlane``
(task records) and ``Orchestrator`` services. When no key is configured, the server is
open (it listens on 127.0.0.1 only, unless told otherwise). Health checks and the ``Probes``
service (``/healthz``, ``/readyz``) are always open so that probes work.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from llama_mesh.server.errors import MeshError, PermissionDeniedError, UnauthenticatedError
from llama_mesh.server.grpc_errors import to_rpc_status

OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/llama_mesh.v1.Probes/")
"""Methods anyone may call."""
ADMIN_METHODS = frozenset(
    {
        "/llama_mesh.v1.ApiServer/CreateDeployment",
        "/llama_mesh.v1.ApiServer/DeleteDeployment",
        "/llama_mesh.v1.ApiServer/ReloadDeployment",
        "/llama_mesh.v1.LlamaDeployApi/CreateDeployment",
    }
)
"""Methods that need an admin key (plus every method of the services below)."""
ADMIN_SERVICES = ("/llama_mesh.v1.ControlPlane/", "/llama_mesh.v1.Orchestrator/")
USER_METHODS = frozenset(
    f"/llama_mesh.v1.ControlPlane/{name}"
    for name in (
        "GetInfo",
        "GetQueueConfig",
        "ListServices",
        "GetService",
        "CreateSession",
        "ListSessions",
        "GetSession",
        "DeleteSession",
        "CreateSessionTask",
        "ListSessionTasks",
        "GetCurrentTask",
        "GetTaskResult",
        "StreamTaskResult",
        "SendEvent",
        "GetSessionState",
    )
)
"""Methods of the services above that a user key may call: Llama Deploy 0.8's control plane
routes that run tasks and manage sessions, as the API server's routes do."""


@dataclass(frozen=True, slots=True)
class ApiKeys:
    """The keys a server accepts; both empty means authentication is off."""

    user: tuple[str, ...] = ()
    admin: tuple[str, ...] = ()

    @property
    def enabled(self) -> bool:
        """True when any key is configured."""
        return bool(self.user or self.admin)

    def role_of(self, token: str) -> str | None:
        """``"admin"``, ``"user"`` or ``None`` for an unknown token (constant-time compare)."""
        given = token.encode()
        if any(hmac.compare_digest(given, k.encode()) for k in self.admin):
            return "admin"
        if any(hmac.compare_digest(given, k.encode()) for k in self.user):
            return "user"
        return None


def parse_keys(values: Sequence[str]) -> tuple[str, ...]:
    """Keys from flags or comma-separated environment values; blanks dropped."""
    keys = tuple(k.strip() for v in values for k in v.split(",") if k.strip())
    for key in keys:
        if len(key) < 16:
            raise ValueError("an API key must be at least 16 characters long")
    return keys


def needs_admin(method: str) -> bool:
    """Whether ``method`` (``/package.Service/Method``) needs an admin key."""
    if method in USER_METHODS:
        return False
    return method in ADMIN_METHODS or method.startswith(ADMIN_SERVICES)


def check(keys: ApiKeys, method: str, metadata: Sequence[tuple[str, Any]] | None) -> None:
    """Raise :class:`UnauthenticatedError` / :class:`PermissionDeniedError` unless allowed."""
    if not keys.enabled or method.startswith(OPEN_PREFIXES):
        return
    header = ""
    for key, value in metadata or ():
        if key == "authorization":
            header = value.decode() if isinstance(value, bytes) else str(value)
            break
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise UnauthenticatedError(
            "missing API key: send 'authorization: Bearer <key>'", reason="API_KEY_MISSING"
        )
    role = keys.role_of(token.strip())
    if role is None:
        raise UnauthenticatedError("unknown API key", reason="API_KEY_INVALID")
    if role != "admin" and needs_admin(method):
        raise PermissionDeniedError(
            f"{method.rsplit('/', 1)[-1]} needs an admin API key", reason="ADMIN_KEY_REQUIRED"
        )


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Rejects calls without an acceptable key before they reach a servicer."""

    def __init__(self, keys: ApiKeys) -> None:
        self._keys = keys

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        try:
            check(self._keys, handler_call_details.method, handler_call_details.invocation_metadata)
        except MeshError as exc:
            return _rejecting(handler, exc)
        return handler


def _rejecting(handler: grpc.RpcMethodHandler | None, exc: MeshError) -> grpc.RpcMethodHandler:
    status = to_rpc_status(exc)

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort_with_status(status)

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort_with_status(status)
        yield  # pragma: no cover - makes this an async generator

    deserializer = handler.request_deserializer if handler is not None else None
    serializer = handler.response_serializer if handler is not None else None
    if handler is not None and handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            stream, request_deserializer=deserializer, response_serializer=serializer
        )
    if handler is not None and handler.stream_stream:
        return grpc.stream_stream_rpc_method_handler(
            stream, request_deserializer=deserializer, response_serializer=serializer
        )
    if handler is not None and handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            unary, request_deserializer=deserializer, response_serializer=serializer
        )
    return grpc.unary_unary_rpc_method_handler(
        unary, request_deserializer=deserializer, response_serializer=serializer
    )
