"""The one seam where server errors become gRPC statuses.

:class:`ErrorInterceptor` wraps every handler: a :class:`~llama_mesh.server.errors.MeshError`
becomes its status code with a ``google.rpc.Status`` carrying an ``ErrorInfo`` (reason,
metadata), so the gateway renders it as ``{"code", "message", "details"}`` JSON. Anything
else is logged with its traceback and becomes ``INTERNAL`` without leaking internals.

It also parses requests itself, so that one grpc cannot parse (a string field that is not
UTF-8, say) is ``INVALID_ARGUMENT`` rather than grpc's own ``UNKNOWN``.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from llama_mesh.server import errors
from llama_mesh.server.queues.errors import QueueUnavailableError

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


Prepare = Callable[[Any], Any]
"""Turns what grpc hands a handler (raw request bytes, or an iterator of them) into what the
servicer expects."""

# upb's reasons (the text after "Error parsing message with type '...': ") in plain words.
_DECODE_PROBLEMS = {
    "String field had bad UTF-8": (
        "a string field is not valid UTF-8 (through the HTTP gateway: a percent-escape in "
        "the path or query, such as %80, that does not decode to UTF-8)"
    ),
    "Wire format was corrupt": "its protobuf encoding is corrupt",
    "Exceeded upb_DecodeOptions_MaxDepth": "its messages are nested too deeply",
}


class ErrorInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Maps exceptions raised by handlers to gRPC statuses (unary and streaming).

    The handler it returns has no request deserializer: grpc hands it the raw request bytes
    and the wrapper parses them. Were grpc to parse them, a request it cannot parse (a string
    field that is not valid UTF-8, which is what a percent-escape such as ``%80`` in a gateway
    path or query becomes) would fail before any wrapper runs, and grpc would answer
    ``UNKNOWN`` (HTTP 500 through the gateway); here it is ``INVALID_ARGUMENT`` naming the
    problem. So interceptors *outside* this one (earlier in the server's list) see requests
    as bytes; they must pass them on untouched, as
    :class:`~llama_mesh.server.auth.AuthInterceptor` and
    :class:`~llama_mesh.server.metrics.MetricsInterceptor` do. A streaming-request servicer
    must iterate its request iterator (``context.read()`` would return bytes).
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        parse = _parser(handler.request_deserializer)
        serializer = handler.response_serializer
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, method, parse), response_serializer=serializer
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, method, parse), response_serializer=serializer
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                _wrap_unary(handler.stream_unary, method, _each(parse)),
                response_serializer=serializer,
            )
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                _wrap_stream(handler.stream_stream, method, _each(parse)),
                response_serializer=serializer,
            )
        return handler


def _parser(deserializer: Callable[[bytes], Any] | None) -> Prepare:
    """Parses one request with ``deserializer``; a request it cannot parse is the client's
    fault (:class:`~llama_mesh.server.errors.InvalidArgumentError`)."""
    if deserializer is None:
        # A handler that takes bytes: nothing to parse.
        return lambda raw: raw

    def parse(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except DecodeError as exc:
            raise _malformed_request(deserializer, exc) from exc

    return parse


def _each(parse: Prepare) -> Prepare:
    """Parses every request of a request stream as it is read."""

    async def parse_each(requests: AsyncIterator[bytes]) -> AsyncIterator[Any]:
        async for raw in requests:
            yield parse(raw)

    return parse_each


def _malformed_request(
    deserializer: Callable[[bytes], Any], exc: DecodeError
) -> errors.InvalidArgumentError:
    """The error for a request ``deserializer`` (a message class's ``FromString``) refused."""
    descriptor = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    type_name = getattr(descriptor, "full_name", None) or "request message"
    # upb says "Error parsing message with type 'T': <reason>"; other parsers say otherwise.
    text = str(exc)
    _, found, reason = text.partition("': ")
    problem = _DECODE_PROBLEMS.get(reason, reason) if found else text
    return errors.InvalidArgumentError(
        f"the request is not a valid {type_name}: {problem}",
        reason="MALFORMED_REQUEST",
        metadata={"message_type": type_name},
    )


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
    behavior: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]],
    method: str,
    prepare: Prepare,
) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behavior(prepare(request), context)
        except (grpc.aio.AbortError, grpc.RpcError):
            raise
        except Exception as exc:
            await _abort(context, exc, method)

    return wrapped


def _wrap_stream(
    behavior: Callable[[Any, grpc.aio.ServicerContext], Any], method: str, prepare: Prepare
) -> Callable[[Any, grpc.aio.ServicerContext], Any]:
    if inspect.iscoroutinefunction(behavior):
        # A handler that writes its responses with context.write() and returns None (as
        # grpc's own Health.Watch does). grpc tells that kind from an async generator by
        # the function's type, so the wrapper must be a coroutine function too.
        return _wrap_unary(behavior, method, prepare)

    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for item in behavior(prepare(request), context):
                yield item
        except (grpc.aio.AbortError, grpc.RpcError):
            raise
        except Exception as exc:
            await _abort(context, exc, method)

    return wrapped
