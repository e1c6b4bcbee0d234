"""The client's exception tree and the one seam that maps gRPC errors into it."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

import llama_mesh.client as client_package
from llama_mesh.client import (
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
    Task,
    TaskError,
    TaskFailedError,
    TaskStatus,
    UnauthenticatedError,
    UnavailableError,
    _exceptions,
)
from llama_mesh.client._exceptions import _CODES, _map_rpc_error

PACKAGE_DIR = Path(client_package.__file__).parent


def rpc_error(
    code: grpc.StatusCode, message: str = "went wrong", details: bytes | None = None
) -> grpc.aio.AioRpcError:
    """An ``AioRpcError`` as a failed call raises it, optionally with a rich status."""
    trailers = grpc.aio.Metadata()
    if details is not None:
        trailers.add("grpc-status-details-bin", details)
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailers, details=message)


def rich_status(code: grpc.StatusCode, **info: object) -> bytes:
    status = status_pb2.Status(code=code.value[0], message="went wrong")
    status.details.add().Pack(error_details_pb2.ErrorInfo(**info))
    data: bytes = status.SerializeToString()
    return data


def test_every_status_code_is_mapped() -> None:
    """The mapping table names every gRPC status code, each to an ApiError class."""
    assert set(_CODES) == set(grpc.StatusCode)
    for code in grpc.StatusCode:
        error = _map_rpc_error(rpc_error(code))
        assert isinstance(error, ApiError)
        assert error.code is code


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.NOT_FOUND, NotFoundError),
        (grpc.StatusCode.ALREADY_EXISTS, AlreadyExistsError),
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgumentError),
        (grpc.StatusCode.OUT_OF_RANGE, InvalidArgumentError),
        (grpc.StatusCode.FAILED_PRECONDITION, FailedPreconditionError),
        (grpc.StatusCode.ABORTED, FailedPreconditionError),
        (grpc.StatusCode.UNAUTHENTICATED, UnauthenticatedError),
        (grpc.StatusCode.PERMISSION_DENIED, PermissionDeniedError),
        (grpc.StatusCode.UNAVAILABLE, UnavailableError),
        (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceededError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, ResourceExhaustedError),
        (grpc.StatusCode.INTERNAL, ApiError),
        (grpc.StatusCode.UNKNOWN, ApiError),
    ],
)
def test_codes_map_to_their_class(code: grpc.StatusCode, cls: type[ApiError]) -> None:
    """Each status code becomes exactly the class the tree in ``_exceptions`` documents."""
    assert type(_map_rpc_error(rpc_error(code))) is cls


def test_error_info_supplies_reason_domain_and_metadata() -> None:
    """The ErrorInfo detail of ``grpc-status-details-bin`` fills reason, domain and metadata."""
    details = rich_status(
        grpc.StatusCode.NOT_FOUND,
        reason="DEPLOYMENT_NOT_FOUND",
        domain="llama-mesh",
        metadata={"deployment": "x"},
    )
    error = _map_rpc_error(
        rpc_error(grpc.StatusCode.NOT_FOUND, "Deployment 'x' not found", details)
    )
    assert isinstance(error, NotFoundError)
    assert error.message == str(error) == "Deployment 'x' not found"
    assert (error.reason, error.domain, error.metadata) == (
        "DEPLOYMENT_NOT_FOUND",
        "llama-mesh",
        {"deployment": "x"},
    )


def test_without_details_the_reason_is_the_code_name() -> None:
    """A plain status (no rich details, e.g. a connection failure) still gives a reason."""
    error = _map_rpc_error(rpc_error(grpc.StatusCode.UNAVAILABLE, "connection refused"))
    assert (error.reason, error.domain, error.metadata) == ("UNAVAILABLE", "", {})


def test_undecodable_details_are_ignored() -> None:
    """Garbage in ``grpc-status-details-bin`` does not hide the error behind another one."""
    error = _map_rpc_error(rpc_error(grpc.StatusCode.INTERNAL, "oops", b"\xff\x00garbage"))
    assert type(error) is ApiError
    assert error.message == "oops"


def test_task_failed_error_carries_the_task() -> None:
    """TaskFailedError is not an ApiError; it holds the task and names its error."""
    task = Task(
        task_id="t1",
        deployment="d",
        service_id="s",
        session_id="x",
        status=TaskStatus.FAILED,
        input={},
        result=None,
        error=TaskError("ValueError", "boom"),
        attempts=1,
        event_count=0,
        instance_id="",
        created_at=None,
        started_at=None,
        finished_at=None,
    )
    error = TaskFailedError(task)
    assert isinstance(error, LlamaMeshError)
    assert not isinstance(error, ApiError)
    assert error.task is task
    assert str(error) == "Task t1 failed: ValueError: boom"


def test_the_docstring_draws_every_exception() -> None:
    """Every exception class of the module appears in the tree of its docstring."""
    doc = _exceptions.__doc__ or ""
    classes = [
        name
        for name, obj in vars(_exceptions).items()
        if inspect.isclass(obj)
        and issubclass(obj, Exception)
        and obj.__module__ == _exceptions.__name__
    ]
    assert {"ConfigError", "TaskFailedError", "UnavailableError"} <= set(classes)
    for name in classes:
        assert re.search(rf"\b{name}\b", doc), name
    assert issubclass(ConfigError, LlamaMeshError)


def test_rpc_errors_are_translated_at_one_seam() -> None:
    """Only the transport catches ``AioRpcError`` and calls ``_map_rpc_error``."""
    users = {
        path.name
        for path in PACKAGE_DIR.glob("*.py")
        if re.search(r"AioRpcError|_map_rpc_error", path.read_text())
    }
    assert users == {"_exceptions.py", "_transport.py"}
