"""The ``ControlPlane`` and ``Orchestrator`` gRPC services, through their generated stubs.

Every RPC of both contracts is called against a real server (gRPC in process, workers): the
task-record RPCs as another process would use them (record a task, schedule it, follow it
to its result), the Llama Deploy 0.8 control plane RPCs with the ``deployment`` field a
gRPC client sets. Then hypothesis calls every RPC with random field values: the answer is a
result or a clear error (never INTERNAL or UNKNOWN), and the server keeps answering.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from llama_mesh.server.app import MeshServer
from llama_mesh.v1 import (
    control_plane_pb2,
    control_plane_pb2_grpc,
    llama_deploy_api_pb2,
    orchestrator_pb2,
    orchestrator_pb2_grpc,
    types_pb2,
)
from tests.fixtures.mesh import TESTAPP, MeshFactory

APP = "testapp"
CALL_TIMEOUT = 60.0
cp = control_plane_pb2
ld = llama_deploy_api_pb2


@dataclass
class Stubs:
    """A server with testapp, and stubs of its two internal services."""

    server: MeshServer
    control_plane: control_plane_pb2_grpc.ControlPlaneStub
    orchestrator: orchestrator_pb2_grpc.OrchestratorStub


@pytest.fixture
async def stubs(mesh_factory: MeshFactory) -> AsyncIterator[Stubs]:
    """testapp on a real server (in-process queue: workers as tasks), and the stubs."""
    server = await mesh_factory(queue="inprocess", deploy=(TESTAPP,))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        yield Stubs(
            server,
            control_plane_pb2_grpc.ControlPlaneStub(channel),
            orchestrator_pb2_grpc.OrchestratorStub(channel),
        )


def body(response: Any) -> Any:
    """The JSON an HttpBody ``body`` field carries."""
    return json.loads(response.body.data)


async def final_task(stubs: Stubs, task_id: str) -> types_pb2.Task:
    """The task's record once final, followed with ``WatchTask``."""
    last = None
    async for change in stubs.control_plane.WatchTask(
        cp.ControlPlaneWatchTaskRequest(deployment=APP, task_id=task_id), timeout=CALL_TIMEOUT
    ):
        last = change.task
    assert last is not None
    task: types_pb2.Task = last
    return task


async def test_a_recorded_task_is_scheduled_run_and_followed(stubs: Stubs) -> None:
    """``RecordTask`` then ``ScheduleTask`` runs a task on a worker; ``WatchTask`` follows it
    to SUCCEEDED; ``GetTask`` and ``ListTasks`` show it; scheduling it again is refused."""
    c, o = stubs.control_plane, stubs.orchestrator
    session_id = body(await c.CreateSession(cp.ControlPlaneCreateSessionRequest(deployment=APP)))
    task_id = uuid.uuid4().hex
    task = types_pb2.Task(
        task_id=task_id,
        deployment=APP,
        session_id=session_id,
        service_id="echo",
        status=types_pb2.TASK_STATUS_QUEUED,
    )
    task.input.update({"message": "rpc"})
    recorded = await c.RecordTask(cp.ControlPlaneRecordTaskRequest(task=task))
    assert recorded.task.status == types_pb2.TASK_STATUS_QUEUED
    scheduled = await o.ScheduleTask(
        orchestrator_pb2.ScheduleTaskRequest(deployment=APP, task_id=task_id)
    )
    assert scheduled.service_id == "echo" and scheduled.queue
    final = await final_task(stubs, task_id)
    assert final.status == types_pb2.TASK_STATUS_SUCCEEDED
    got = await c.GetTask(cp.ControlPlaneGetTaskRequest(deployment=APP, task_id=task_id))
    assert got.task.status == types_pb2.TASK_STATUS_SUCCEEDED
    listed = await c.ListTasks(
        cp.ControlPlaneListTasksRequest(deployment=APP, session_id=session_id)
    )
    assert [t.task_id for t in listed.tasks] == [task_id]
    with pytest.raises(grpc.aio.AioRpcError) as again:
        await o.ScheduleTask(orchestrator_pb2.ScheduleTaskRequest(deployment=APP, task_id=task_id))
    assert again.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_schedule_and_record_refuse_what_would_be_dropped(stubs: Stubs) -> None:
    """A task never recorded is NOT_FOUND to ``ScheduleTask`` (no message a worker would
    drop); ``RecordTask`` refuses a session that does not exist, naming it."""
    c, o = stubs.control_plane, stubs.orchestrator
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await o.ScheduleTask(orchestrator_pb2.ScheduleTaskRequest(deployment=APP, task_id="nope"))
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    task = types_pb2.Task(
        task_id="t1", deployment=APP, session_id="missing", status=types_pb2.TASK_STATUS_QUEUED
    )
    with pytest.raises(grpc.aio.AioRpcError) as no_session:
        await c.RecordTask(cp.ControlPlaneRecordTaskRequest(task=task))
    assert no_session.value.code() == grpc.StatusCode.NOT_FOUND
    assert "missing" in (no_session.value.details() or "")


async def test_service_instances_are_listed(stubs: Stubs) -> None:
    """``ListServiceInstances`` lists live replicas, of one service when asked."""
    c = stubs.control_plane
    every = await c.ListServiceInstances(cp.ControlPlaneListServiceInstancesRequest(deployment=APP))
    assert {"echo", "hitl"} <= {i.service_id for i in every.instances}
    echo = await c.ListServiceInstances(
        cp.ControlPlaneListServiceInstancesRequest(deployment=APP, service_id="echo")
    )
    assert echo.instances and {i.service_id for i in echo.instances} == {"echo"}


async def test_the_0_8_rpcs_work_over_grpc(stubs: Stubs) -> None:
    """Each Llama Deploy 0.8 control plane RPC, called over gRPC with ``deployment`` set:
    info, queue config, services (list, get, register, deregister), sessions (create, list,
    get, delete), tasks of a session (create, list, current, result), a result stream with
    an event sent into the waiting task, and the session state."""
    c = stubs.control_plane
    assert body(await c.GetInfo(cp.ControlPlaneGetInfoRequest(deployment=APP)))["running"] == "True"
    queue = body(await c.GetQueueConfig(cp.ControlPlaneGetQueueConfigRequest(deployment=APP)))
    assert queue == {"SimpleMessageQueueConfig": {"type": "simple"}}
    definition = cp.LlamaDeployServiceDefinition(service_name="extra", description="mine")
    await c.RegisterService(
        cp.ControlPlaneRegisterServiceRequest(deployment=APP, service_definition=definition)
    )
    services = body(await c.ListServices(cp.ControlPlaneListServicesRequest(deployment=APP)))
    assert services["extra"]["description"] == "mine" and "echo" in services
    got = await c.GetService(cp.ControlPlaneGetServiceRequest(deployment=APP, service_name="hitl"))
    assert body(got)["description"] == "Human in the loop"
    await c.DeregisterService(
        cp.ControlPlaneDeregisterServiceRequest(deployment=APP, service_name="extra")
    )
    services = body(await c.ListServices(cp.ControlPlaneListServicesRequest(deployment=APP)))
    assert "extra" not in services

    session_id = body(await c.CreateSession(cp.ControlPlaneCreateSessionRequest(deployment=APP)))
    sessions = body(await c.ListSessions(cp.ControlPlaneListSessionsRequest(deployment=APP)))
    assert session_id in sessions
    session = await c.GetSession(
        cp.ControlPlaneGetSessionRequest(deployment=APP, session_id=session_id)
    )
    assert body(session)["task_ids"] == []

    in_session: dict[str, Any] = {"deployment": APP, "session_id": session_id}
    task_id = body(
        await c.CreateSessionTask(
            cp.ControlPlaneCreateSessionTaskRequest(
                **in_session,
                task_definition=ld.LlamaDeployTaskDefinition(input="{}", service_id="hitl"),
            )
        )
    )
    lines = []
    async for line in c.StreamTaskResult(
        cp.ControlPlaneStreamTaskResultRequest(**in_session, task_id=task_id), timeout=CALL_TIMEOUT
    ):
        event = json.loads(line.body.data)
        lines.append(event)
        if event.get("prefix") == "name?":
            obj = json.dumps(
                {
                    "__is_pydantic": True,
                    "value": {"response": "Bo"},
                    "qualified_name": "llama_index.core.workflow.events.HumanResponseEvent",
                }
            )
            sent = await c.SendEvent(
                cp.ControlPlaneSendEventRequest(
                    **in_session,
                    task_id=task_id,
                    event_definition=ld.LlamaDeployEventDefinition(
                        service_id="hitl", event_obj_str=obj
                    ),
                )
            )
            assert body(sent) is None
    assert lines[-1] == {"result": "hi Bo"}
    result = await c.GetTaskResult(
        cp.ControlPlaneGetTaskResultRequest(**in_session, task_id=task_id)
    )
    assert body(result)["result"] == "hi Bo"
    tasks = body(await c.ListSessionTasks(cp.ControlPlaneListSessionTasksRequest(**in_session)))
    assert [t["task_id"] for t in tasks] == [task_id]
    current = body(await c.GetCurrentTask(cp.ControlPlaneGetCurrentTaskRequest(**in_session)))
    assert current["task_id"] == task_id and current["service_id"] == "hitl"
    state = body(await c.GetSessionState(cp.ControlPlaneGetSessionStateRequest(**in_session)))
    assert state[f"result_{task_id}"]["result"] == "hi Bo"
    await c.DeleteSession(cp.ControlPlaneDeleteSessionRequest(**in_session))
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await c.GetSession(cp.ControlPlaneGetSessionRequest(**in_session))
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND


# -- every RPC with random input ----------------------------------------------------------------

SERVICES = (
    control_plane_pb2.DESCRIPTOR.services_by_name["ControlPlane"],
    orchestrator_pb2.DESCRIPTOR.services_by_name["Orchestrator"],
)
RPCS = [(service, method) for service in SERVICES for method in service.methods]
SAFE_SERVICES = ("echo", "hitl", "stream", "tally", "fails")
"""Services random tasks may name (never ``crashy``: its workflow ends its own process,
here the test's)."""
_F = descriptor.FieldDescriptor


def words() -> st.SearchStrategy[str]:
    """Strings a request field may hold: real names, empty, odd, or random text."""
    return st.one_of(
        st.sampled_from([APP, "", "nope", "a.b", "*", ">", " ", "../x", "x" * 300, *SAFE_SERVICES]),
        st.text(max_size=40),
    )


def field_values(field: descriptor.FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    """Values for one field of a request (``None``: leave it unset)."""
    if field.type == _F.TYPE_STRING:
        value: st.SearchStrategy[Any] = words()
    elif field.type in (_F.TYPE_INT32, _F.TYPE_INT64, _F.TYPE_SINT32, _F.TYPE_SINT64):
        value = st.integers(-(2**31), 2**31 - 1)
    elif field.type in (_F.TYPE_UINT32, _F.TYPE_UINT64):
        value = st.integers(0, 2**32 - 1)
    elif field.type == _F.TYPE_BOOL:
        value = st.booleans()
    elif field.type in (_F.TYPE_DOUBLE, _F.TYPE_FLOAT):
        value = st.floats(allow_nan=False, allow_infinity=False, width=32)
    elif field.type == _F.TYPE_ENUM:
        assert field.enum_type is not None
        value = st.sampled_from([v.number for v in field.enum_type.values] + [99])
    elif field.type == _F.TYPE_BYTES:
        value = st.binary(max_size=40)
    elif field.type == _F.TYPE_MESSAGE and depth < 2:
        assert field.message_type is not None
        value = messages(field.message_type, depth + 1)
    else:
        return st.none()
    if field.is_repeated:
        return st.lists(value, max_size=2) if field.type != _F.TYPE_MESSAGE else st.none()
    return st.one_of(st.none(), value)


def messages(message: descriptor.Descriptor, depth: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    """Random field values of ``message`` (well-known types left empty)."""
    if message.full_name.startswith("google.protobuf."):
        return st.just({})
    return st.fixed_dictionaries({f.name: field_values(f, depth) for f in message.fields})


def build(message: descriptor.Descriptor, values: dict[str, Any]) -> Message:
    """A request message of ``message``'s type with ``values`` (``None`` left unset)."""
    cls = _message_class(message)
    out = cls()
    for name, value in values.items():
        if value is None:
            continue
        field = message.fields_by_name[name]
        if field.message_type is not None:
            getattr(out, name).CopyFrom(build(field.message_type, value))
        elif field.is_repeated:
            getattr(out, name).extend(value)
        else:
            setattr(out, name, value)
    return out


def _message_class(message: descriptor.Descriptor) -> Callable[[], Message]:
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(message)


@st.composite
def calls(
    draw: st.DrawFn,
) -> tuple[descriptor.ServiceDescriptor, descriptor.MethodDescriptor, Message]:
    """An RPC of either service, with a random request."""
    service, method = draw(st.sampled_from(RPCS))
    values = draw(messages(method.input_type))
    return service, method, build(method.input_type, values)


REFUSED = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
ODD_IDS = ("", "a.b", "*", "a b", "x" * 300)
"""Ids that cannot be keys of the state store (empty, a separator, a wildcard, a space,
too long): each must be INVALID_ARGUMENT or NOT_FOUND naming the field, never INTERNAL."""


def call_of(service: str, rpc: str, **fields: Any) -> tuple[Any, Any, Message]:
    """One explicit call, for ``@example``."""
    found = next(s for s in SERVICES if s.name == service)
    method = found.methods_by_name[rpc]
    return found, method, _message_class(method.input_type)(**fields)


EXAMPLES = [
    *(
        call_of("ControlPlane", rpc, deployment=deployment, **{key: value})
        for rpc, key in (
            ("GetTask", "task_id"),
            ("WatchTask", "task_id"),
            ("GetSession", "session_id"),
            ("DeleteSession", "session_id"),
            ("GetSessionState", "session_id"),
            ("ListTasks", "session_id"),
        )
        for deployment in (APP, "a.b")
        for value in ODD_IDS
    ),
    *(call_of("ControlPlane", "CreateSession", deployment=d) for d in ODD_IDS),
    *(call_of("ControlPlane", "ListServiceInstances", deployment=d) for d in ODD_IDS),
    call_of(
        "ControlPlane", "RecordTask", task=types_pb2.Task(status=types_pb2.TaskStatus.ValueType(99))
    ),
    call_of("ControlPlane", "RecordTask", task=types_pb2.Task(deployment=APP, task_id="a.b")),
    *(call_of("Orchestrator", "ScheduleTask", deployment=APP, task_id=i) for i in ODD_IDS),
]


def with_examples(test: Any) -> Any:
    """``test`` with every call of :data:`EXAMPLES` as an explicit example."""
    for call in EXAMPLES:
        test = example(call=call)(test)
    return test


@with_examples
@given(call=calls())
@settings(
    max_examples=400,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
async def test_random_requests_to_every_rpc_get_clear_answers(
    fuzz_channel: grpc.aio.Channel, call: tuple[Any, Any, Message]
) -> None:
    """Any request to any ControlPlane or Orchestrator RPC is answered with a result or a
    clear error (INVALID_ARGUMENT, NOT_FOUND, ...), never INTERNAL or UNKNOWN."""
    service, method, request = call
    path = f"/{service.full_name}/{method.name}"
    response_cls = _message_class(method.output_type)
    try:
        if method.server_streaming:
            rpc = fuzz_channel.unary_stream(
                path,
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=response_cls.FromString,  # type: ignore[attr-defined]
            )
            stream = rpc(request, timeout=5.0)
            try:
                async for _ in stream:
                    break  # the first answer tells; a running task would stream on
            finally:
                stream.cancel()
        else:
            unary = fuzz_channel.unary_unary(
                path,
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=response_cls.FromString,  # type: ignore[attr-defined]
            )
            await unary(request, timeout=CALL_TIMEOUT)
    except grpc.aio.AioRpcError as exc:
        described = f"{path}({request}) -> {exc.code().name}: {exc.details()}"
        assert exc.code() not in REFUSED, described
        if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            assert method.server_streaming, described


@pytest.fixture
async def fuzz_channel(stubs: Stubs) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to the server of ``stubs``."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{stubs.server.grpc_port}") as channel:
        yield channel
