"""Property tests: what arrives from outside (event text, event fields, queue bytes) is either
accepted or refused with ``InvalidArgumentError`` / ``DecodeError``, and never kills a worker.

Covers ``llama_mesh.server.service.events`` (0.8's serialized events, building an event of
the worker's class from a type name and JSON fields), protobuf decoding of the NATS
envelopes, and :meth:`Worker._handle` given arbitrary bytes as a task message.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from workflows import Workflow
from workflows.events import Event

from llama_mesh.server import subjects
from llama_mesh.server.control_plane.store import ControlPlane
from llama_mesh.server.domain import HumanEvent, TaskStatus
from llama_mesh.server.errors import InvalidArgumentError
from llama_mesh.server.queues.broker import Delivery
from llama_mesh.server.queues.inprocess import InProcessBroker, InProcessStateStore
from llama_mesh.server.service.events import build_event, parse_serialized_event
from llama_mesh.server.service.worker import Worker, WorkerSettings
from llama_mesh.v1 import messages_pb2
from tests.fixtures.mesh import TESTAPP, MeshFactory

APP_MODULE = TESTAPP.parent / "app_workflows.py"


def _load_testapp() -> ModuleType:
    """``tests/data/testapp/app_workflows.py`` under the name workers import it by."""
    existing = sys.modules.get("app_workflows")
    if existing is not None:
        return existing
    spec = importlib.util.spec_from_file_location("app_workflows", APP_MODULE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["app_workflows"] = module
    spec.loader.exec_module(module)
    return module


APP = _load_testapp()
WORKFLOWS: dict[str, Workflow] = {
    name: getattr(APP, name) for name in ("echo", "stream", "hitl", "tally", "slow")
}

# -- strategies ------------------------------------------------------------------------------

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=30),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(max_size=12), children, max_size=4),
    ),
    max_leaves=25,
)
field_names = st.one_of(
    st.sampled_from(["response", "prefix", "step", "result", "value", "_data", "msg", ""]),
    st.text(max_size=12),
)
event_fields = st.dictionaries(field_names, json_values, max_size=5)
KNOWN_TYPES = [
    "llama_index.core.workflow.events.HumanResponseEvent",
    "llama_index.core.workflow.events.InputRequiredEvent",
    "workflows.events.HumanResponseEvent",
    "workflows.events.StartEvent",
    "workflows.events.StopEvent",
    "workflows.events.Event",
    "HumanResponseEvent",
    "StopEvent",
    "app_workflows.Tick",
    "Tick",
    "app_workflows.Echo",
    "workflows.Workflow",
    "json.JSONDecoder",
    "builtins.object",
    "builtins.",
    ".",
    "..x",
    ".HumanResponseEvent",
    "a\x00b.C",
]
type_names = st.one_of(st.sampled_from(KNOWN_TYPES), st.text(max_size=40))
serialized_shapes = st.fixed_dictionaries(
    {},
    optional={
        "__is_pydantic": st.one_of(st.booleans(), json_values),
        "qualified_name": st.one_of(type_names, json_values),
        "value": st.one_of(event_fields, json_values),
    },
)


# -- parse_serialized_event ------------------------------------------------------------------


def _parse(text: str) -> HumanEvent | None:
    try:
        event = parse_serialized_event(text)
    except InvalidArgumentError as exc:
        assert exc.reason == "INVALID_EVENT"
        assert "event_obj_str" in exc.message
        return None
    assert isinstance(event.type, str) and event.type
    assert isinstance(event.data, dict)
    return event


@given(st.text())
@example("")
@example("null")
@example("[]")
@example('{"qualified_name": "x"}')
@example('{"qualified_name": "", "value": {}}')
@example('{"qualified_name": "x", "value": []}')
@example("\ud800")
@settings(max_examples=300)
def test_arbitrary_text_parses_or_is_invalid_argument(text: str) -> None:
    """Any text given as 0.8's ``event_obj_str`` parses or raises InvalidArgumentError."""
    _parse(text)


@given(st.one_of(serialized_shapes, json_values))
@settings(max_examples=300)
def test_arbitrary_json_shapes_parse_or_are_invalid_argument(payload: Any) -> None:
    """Any JSON document parses only when it is an object with a non-empty string
    ``qualified_name`` and an object ``value``; everything else is InvalidArgumentError."""
    event = _parse(json.dumps(payload))
    well_formed = (
        isinstance(payload, dict)
        and isinstance(payload.get("qualified_name"), str)
        and payload["qualified_name"] != ""
        and isinstance(payload.get("value", {}), dict)
    )
    assert (event is not None) == well_formed
    if event is not None:
        assert event == HumanEvent(payload["qualified_name"], payload.get("value", {}))


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("[" * 100_000, id="deeply-nested"),
        pytest.param('{"qualified_name": "E", "value": {"n": ' + "9" * 5000 + "}}", id="big-int"),
    ],
)
def test_pathological_json_is_invalid_argument(text: str) -> None:
    """JSON that the decoder gives up on (too deep, too long a number) is still a clean
    InvalidArgumentError, like any other malformed event text."""
    with pytest.raises(InvalidArgumentError):
        parse_serialized_event(text)


# -- build_event ------------------------------------------------------------------------------


@given(st.sampled_from(sorted(WORKFLOWS)), type_names, event_fields)
@example("hitl", "llama_index.core.workflow.events.HumanResponseEvent", {"response": "ada"})
@example("hitl", "HumanResponseEvent", {"response": ["not", "a", "string"]})
@example("stream", "app_workflows.Tick", {"step": "x"})
@example("stream", "Tick", {"step": 1})
@example("echo", "app_workflows.Echo", {})
@settings(max_examples=300)
def test_build_event_builds_or_is_invalid_argument(
    workflow: str, type_name: str, data: dict[str, Any]
) -> None:
    """Any type name with any JSON fields becomes an event of one of the worker's ``Event``
    classes or raises InvalidArgumentError; a known name with valid fields gets its class."""
    try:
        event = build_event(HumanEvent(type_name, data), WORKFLOWS[workflow])
    except InvalidArgumentError as exc:
        assert exc.reason in {"INVALID_EVENT", "UNKNOWN_EVENT_TYPE"}
        return
    assert isinstance(event, Event)
    assert type(event).__name__ == type_name.rpartition(".")[2]


def test_build_event_maps_0_8_names_onto_the_worker_classes() -> None:
    """The names a 0.8 client sends resolve to the classes the worker's workflow uses."""
    hitl = WORKFLOWS["hitl"]
    name = "llama_index.core.workflow.events.HumanResponseEvent"
    event = build_event(HumanEvent(name, {"response": "ada"}), hitl)
    assert type(event).__name__ == "HumanResponseEvent"
    assert event.response == "ada"
    tick = build_event(HumanEvent("app_workflows.Tick", {"step": 3}), WORKFLOWS["stream"])
    assert isinstance(tick, APP.Tick)
    with pytest.raises(InvalidArgumentError, match="Tick"):
        build_event(HumanEvent("Tick", {"step": "three"}), WORKFLOWS["stream"])


def test_an_event_type_never_imports_a_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Naming a module that is importable but not imported in an event type does not import
    it (its top-level code would run in the worker): the type is unknown."""
    name = f"llama_mesh_fuzz_probe_{uuid.uuid4().hex}"
    marker = tmp_path / "imported"
    (tmp_path / f"{name}.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(InvalidArgumentError, match="unknown event type"):
            build_event(HumanEvent(f"{name}.Evil", {}), WORKFLOWS["hitl"])
        assert not marker.exists(), "the module named by the event type was imported"
    finally:
        sys.modules.pop(name, None)


# -- protobuf envelopes -----------------------------------------------------------------------

ENVELOPES = (
    messages_pb2.TaskMessage,
    messages_pb2.EventMessage,
    messages_pb2.TaskInputMessage,
    messages_pb2.SessionStateMessage,
)


def _task_message_bytes() -> st.SearchStrategy[bytes]:
    """Valid TaskMessage encodings, some with bytes flipped, cut or appended."""
    messages = st.builds(
        lambda task_id, deployment, input_json: messages_pb2.TaskMessage(
            task_id=task_id, deployment=deployment, service_id="echo", input_json=input_json
        ).SerializeToString(),
        st.text(max_size=20),
        st.sampled_from(["testapp", "", "other"]),
        st.binary(max_size=20),
    )
    return st.one_of(
        messages,
        st.tuples(messages, st.binary(max_size=8)).map(lambda p: p[0] + p[1]),
        st.tuples(messages, st.integers(0, 40)).map(lambda p: p[0][: p[1]]),
    )


@given(st.sampled_from(ENVELOPES), st.one_of(st.binary(max_size=200), _task_message_bytes()))
@example(messages_pb2.TaskMessage, b"\x0b" * 10_000)
@example(messages_pb2.EventMessage, b"\x0a\x02\xff\xfe")
@settings(max_examples=500)
def test_envelopes_decode_or_raise_decode_error(cls: Any, data: bytes) -> None:
    """Arbitrary bytes decode as a NATS envelope or raise protobuf's DecodeError, nothing
    else (the worker catches exactly that)."""
    try:
        msg = cls.FromString(data)
    except DecodeError:
        return
    assert isinstance(msg.SerializeToString(), bytes)


# -- the worker given arbitrary task messages ------------------------------------------------


class RecordingDelivery(Delivery):
    """A delivery that remembers how it was settled."""

    def __init__(self, data: bytes, delivery_count: int = 1) -> None:
        self._data = data
        self._count = delivery_count
        self.settlements: list[str] = []

    @property
    def data(self) -> bytes:
        return self._data

    @property
    def delivery_count(self) -> int:
        return self._count

    async def ack(self) -> None:
        self.settlements.append("ack")

    async def nak(self, delay: float = 0.0) -> None:
        self.settlements.append("nak")

    async def term(self) -> None:
        self.settlements.append("term")

    async def in_progress(self) -> None:
        pass


async def _handle(data: bytes) -> list[str]:
    """How a fresh worker of testapp/echo settles one delivery of ``data``."""
    async with InProcessBroker() as broker, InProcessStateStore() as store:
        cp = await ControlPlane.open(store)
        worker = Worker(
            broker, cp, WORKFLOWS["echo"], WorkerSettings(deployment="testapp", service_id="echo")
        )
        delivery = RecordingDelivery(data)
        async with asyncio.timeout(5):
            await worker._handle(delivery)
        return delivery.settlements


def _decodes(data: bytes) -> bool:
    try:
        messages_pb2.TaskMessage.FromString(data)
    except DecodeError:
        return False
    return True


@given(st.one_of(st.binary(max_size=200), _task_message_bytes()))
@example(b"\xff\xff\xff")
@example(b"\x0a\x02\xff\xfe")
@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
def test_worker_settles_any_bytes_once_without_raising(data: bytes) -> None:
    """Whatever bytes arrive as a task message, ``Worker._handle`` returns normally having
    settled the delivery exactly once; undecodable bytes are terminated (dead-lettered)."""
    settlements = asyncio.run(_handle(data))
    assert len(settlements) == 1, settlements
    if not _decodes(data):
        assert settlements == ["term"]


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(
            messages_pb2.TaskMessage(deployment="testapp", task_id="../..").SerializeToString(),
            id="bad-task-id",
        ),
    ],
)
def test_worker_terminates_a_message_naming_no_possible_task(data: bytes) -> None:
    """A decodable task message whose ids cannot name a task is terminated at once, not
    retried as if the failure were transient."""
    assert asyncio.run(_handle(data)) == ["term"]


async def test_worker_survives_garbage_and_serves_the_next_task(
    mesh_factory: MeshFactory,
) -> None:
    """Undecodable bytes on a service's task queue are dropped; the same replica stays
    registered and runs the next good task."""
    server = await mesh_factory(queue="inprocess", deploy=(TESTAPP,))
    mesh = server.mesh
    before = {i.instance_id for i in await mesh.cp.list_instances("testapp", "echo")}
    queue_name = subjects.task_queue("testapp", "echo")
    for n, garbage in enumerate([b"\xff\xff\xff", b"\x0a\x02\xff\xfe", b"\x0b" * 1000]):
        await server.broker.publish_task(queue_name, garbage, msg_id=f"garbage-{n}")
    async with asyncio.timeout(10):
        task = await mesh.run_task(
            "testapp", service_id="echo", session_id=None, input={"message": "still here"}
        )
    assert (task.status, task.result) == (TaskStatus.SUCCEEDED, "echo: still here")
    assert await server.broker.queue_depth(queue_name) == 0
    after = {i.instance_id for i in await mesh.cp.list_instances("testapp", "echo")}
    assert after == before != set()
