"""The one seam where server errors become gRPC statuses.

:class:`ErrorInterceptor` wraps every handler: a :class:`~llama_mesh.server.errors.MeshError`
becomes its status code with a ``google.rpc.Status`` carrying an ``ErrorInfo`` (reason,
metadata), so the gateway renders it as ``{"code", "message", "details"}`` JSON. Anything
else is logged with its traceback and becomes ``INTERNAL`` without leaking internals.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from llama_mesh.server import errors
from llama_mesh.server.queues.base import QueueUnavailableError

logger = logging.getLogger(__name__)

DOMAIN = "llama-mesh"

CODES: dict[type[errors.MeshError], grpc.StatusCode] = {
    errors.InvalidArgumentError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFoundError: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExistsError: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPreconditionError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhaustedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDeniedError: grpc.StatusCode.PERMISSION_DENIED,
    errors.UnavailableError: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExceededError: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.TaskFailedError: grpc.StatusCode.UNKNOWN,
    errors.MeshError: grpc.StatusCode.INTERNAL,
}
"""Every error class of ``errors`` and its status (a test pins that none is missing)."""


def status_code_of(exc: errors.MeshError) -> grpc.StatusCode:
    """The status code of an error: that of its nearest class in :data:`CODES`."""
    for cls in type(exc).__mro__:
        if cls in CODES:
            return CODES[cls]
    return grpc.StatusCode.INTERNAL


def to_rpc_status(exc: errors.MeshError) -> grpc.Status:
    """A rich status: code, message and an ``ErrorInfo`` detail."""
    code = status_code_of(exc)
    info = error_details_pb2.ErrorInfo(reason=exc.reason, domain=DOMAIN, metadata=exc.metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    status = status_pb2.Status(
        code=getattr(code_pb2, code.name), message=exc.message, details=[detail]
    )
    return rpc_status.to_status(status)


class ErrorInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Maps exceptions raised by handlers to gRPC statuses (unary and streaming)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> None:
    if isinstance(exc, QueueUnavailableError):
        exc = errors.UnavailableError(f"the message queue is unavailable: {exc}")
    if isinstance(exc, errors.MeshError):
        if status_code_of(exc) is grpc.StatusCode.INTERNAL:
            logger.error("%s failed: %s", method, exc.message, exc_info=exc)
        await context.abort_with_status(to_rpc_status(exc))
    logger.error("%s failed unexpectedly", method, exc_info=exc)
    internal = errors.MeshError("internal error; see the server log", reason="INTERNAL")
    await context.abort_with_status(to_rpc_status(internal))


def _wrap_unary(
    behavior: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]], method: str
) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behavior(request, context)
        except (grpc.aio.AbortError, grpc.RpcError):
            raise
        except Exception as exc:
            await _abort(context, exc, method)

    return wrapped


def _wrap_stream(
    behavior: Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]], method: str
) -> Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for item in behavior(request, context):
                yield item
        except (grpc.aio.AbortError, grpc.RpcError):
            raise
        except Exception as exc:
            await _abort(context, exc, method)

    return wrapped
