"""Llama Deploy 0.8's JSON API on the gateway, route by route, with raw HTTP.

Pins what the released 0.8 client and ``llamactl`` rely on (paths, status codes, content
types, exact JSON shapes: bare JSON strings, ``null`` bodies, NDJSON streams, FastAPI-style
``detail`` on errors), where llama-mesh deliberately answers differently from 0.8 (an error
status for a failed workflow, 400 for a bad upload), and that the JSON paths and gRPC (which
passes through the same gateway port) are two views of the same tasks.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import pytest
import pytest_asyncio
from google.protobuf import json_format, struct_pb2

from llama_mesh.v1 import apiserver_pb2, apiserver_pb2_grpc
from tests.fixtures.mesh import TESTAPP

pytestmark = [pytest.mark.compat, pytest.mark.asyncio(loop_scope="module")]

TIMEOUT = 30.0
TASK_DEFINITION_KEYS = {"input", "task_id", "session_id", "service_id"}
SESSION_DEFINITION_KEYS = {"session_id", "task_ids", "state"}
HUMAN_RESPONSE = json.dumps(
    {
        "__is_pydantic": True,
        "value": {"response": "bob"},
        "qualified_name": "llama_index.core.workflow.events.HumanResponseEvent",
    }
)
"""A ``HumanResponseEvent`` as 0.8's client serializes it (llama-index ``JsonSerializer``)."""


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def http(gateway_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gateway_url, timeout=TIMEOUT) as client:
        yield client


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def stub(gateway_url: str) -> AsyncIterator[Any]:
    """An ``ApiServer`` gRPC stub talking to the gateway's port (raw gRPC passes through)."""
    async with grpc.aio.insecure_channel(gateway_url.removeprefix("http://")) as channel:
        yield apiserver_pb2_grpc.ApiServerStub(channel)


def task_body(service_id: str | None = None, **kwargs: Any) -> dict[str, Any]:
    """A 0.8 ``TaskDefinition`` JSON body."""
    body: dict[str, Any] = {"input": json.dumps(kwargs)}
    if service_id is not None:
        body["service_id"] = service_id
    return body


def assert_json(response: httpx.Response, status: int = 200) -> Any:
    """The JSON body of a response with the given status and an ``application/json`` type."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    return response.json()


def assert_error(response: httpx.Response, status: int, *fragments: str) -> dict[str, Any]:
    """An error response: JSON with FastAPI's ``detail`` equal to the gRPC-style message."""
    body = assert_json(response, status)
    assert isinstance(body, dict)
    assert isinstance(body["detail"], str)
    assert body["detail"] == body["message"]
    for fragment in fragments:
        assert fragment in body["detail"]
    return body


async def ndjson(http: httpx.AsyncClient, task: dict[str, Any]) -> list[Any]:
    """Every line of a task's event stream, read until the server ends it."""
    url = f"/deployments/testapp/tasks/{task['task_id']}/events"
    params = {"session_id": task["session_id"]}
    async with http.stream("GET", url, params=params) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/x-ndjson"
        return [json.loads(line) async for line in response.aiter_lines() if line]


def struct(**fields: Any) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(fields)
    return message


def task_dict(task: Any) -> dict[str, Any]:
    """A ``Task`` message as the gateway renders it in JSON (proto field names, defaults)."""
    rendered: dict[str, Any] = json_format.MessageToDict(
        task, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return rendered


async def test_status(http: httpx.AsyncClient) -> None:
    """``GET /status/`` is 0.8's ``Status`` object: healthy, with the deployment names."""
    body = assert_json(await http.get("/status/"))
    assert body == {
        "status": "Healthy",
        "status_message": "",
        "max_deployments": 10,
        "deployments": ["testapp"],
    }


async def test_deployments_list_and_get(http: httpx.AsyncClient) -> None:
    """``GET /deployments/`` lists ``{"name"}`` objects; ``GET /deployments/{name}`` is one,
    and an unknown name is 404 with ``detail``."""
    assert assert_json(await http.get("/deployments/")) == [{"name": "testapp"}]
    assert assert_json(await http.get("/deployments/testapp")) == {"name": "testapp"}
    assert_error(await http.get("/deployments/nope"), 404, "nope", "not found")


async def test_run_returns_bare_json_string(http: httpx.AsyncClient) -> None:
    """``tasks/run`` answers the bare JSON string result: the default service when no
    ``service_id`` is given, non-string results JSON-encoded into the string."""
    run = "/deployments/testapp/tasks/run"
    response = await http.post(run, json=task_body(message="hi"))
    assert assert_json(response) == "echo: hi"
    assert response.content == b'"echo: hi"'
    stream = assert_json(await http.post(run, json=task_body("stream", count=2)))
    assert isinstance(stream, str)
    assert json.loads(stream) == {"ticks": 2}
    assert assert_json(await http.post(run, json=task_body("tally", amount=5))) == "5"


async def test_a_run_without_a_session_keeps_none(http: httpx.AsyncClient) -> None:
    """``tasks/run`` without a ``session_id`` leaves no session behind (0.8 deletes the one
    it used): the sessions listed after it are those listed before, its task's session is
    404, and the next run starts from a fresh context."""
    sessions = "/deployments/testapp/sessions"
    tasks = "/deployments/testapp/tasks"
    run = f"{tasks}/run"
    before = {item["session_id"] for item in assert_json(await http.get(sessions))}
    earlier = {item["task_id"] for item in assert_json(await http.get(tasks))}
    assert assert_json(await http.post(run, json=task_body("tally", amount=2))) == "2"
    assert assert_json(await http.post(run, json=task_body("tally", amount=2))) == "2"
    assert {item["session_id"] for item in assert_json(await http.get(sessions))} == before
    ran = [item for item in assert_json(await http.get(tasks)) if item["task_id"] not in earlier]
    assert len(ran) == 2
    for item in ran:
        assert_error(await http.get(f"{sessions}/{item['session_id']}"), 404, item["session_id"])


async def test_run_errors(http: httpx.AsyncClient) -> None:
    """A workflow that raises is HTTP 500 whose ``detail`` carries the exception (0.8 gave
    the error text with 200); unknown deployment or service is 404; input that is not a
    JSON object is 400."""
    run = "/deployments/testapp/tasks/run"
    failed = assert_error(
        await http.post(run, json=task_body("fails", message="kaboom")), 500, "kaboom"
    )
    assert "ValueError" in failed["detail"]
    assert_error(await http.post("/deployments/nope/tasks/run", json=task_body()), 404, "nope")
    assert_error(await http.post(run, json=task_body("nosuch")), 404, "nosuch")
    assert_error(await http.post(run, json={"input": "[1, 2]"}), 400, "JSON object")
    assert_error(await http.post(run, json={"input": "{nope"}), 400, "not valid JSON")


async def test_create_events_results(http: httpx.AsyncClient) -> None:
    """``tasks/create`` answers the ``TaskDefinition`` with ids filled in; ``results`` is
    ``null`` while the task waits for a human, ``POST events`` (0.8's serialized
    ``HumanResponseEvent``) echoes the ``EventDefinition`` and resumes it; the NDJSON event
    stream replays the workflow's events then ends with the result line; ``results`` is
    then 0.8's ``TaskResult``."""
    body = task_body("hitl")
    task = assert_json(await http.post("/deployments/testapp/tasks/create", json=body))
    assert set(task) == TASK_DEFINITION_KEYS
    assert task["input"] == body["input"]
    assert task["service_id"] == "hitl"
    assert task["task_id"] and task["session_id"]

    base = f"/deployments/testapp/tasks/{task['task_id']}"
    params = {"session_id": task["session_id"]}
    async with http.stream("GET", f"{base}/events", params=params) as response:
        assert response.headers["content-type"] == "application/x-ndjson"
        first = await anext(response.aiter_lines())
    assert json.loads(first) == {"prefix": "name?"}

    running = await http.get(f"{base}/results", params=params)
    assert assert_json(running) is None
    assert running.content == b"null"

    event = {"service_id": "hitl", "event_obj_str": HUMAN_RESPONSE}
    assert assert_json(await http.post(f"{base}/events", params=params, json=event)) == event

    assert await ndjson(http, task) == [{"prefix": "name?"}, {"result": "hi bob"}]
    result = assert_json(await http.get(f"{base}/results", params=params))
    assert result == {"task_id": task["task_id"], "history": [], "result": "hi bob", "data": {}}


async def test_event_stream_ndjson(http: httpx.AsyncClient) -> None:
    """The event stream is ``application/x-ndjson``: one object per workflow event with its
    fields, in order, then ``{"result": ...}``; a failed workflow ends with ``{"error": ...}``
    and its ``results`` carry the error text (0.8's shape)."""
    create = "/deployments/testapp/tasks/create"
    task = assert_json(await http.post(create, json=task_body("stream", count=3)))
    assert await ndjson(http, task) == [
        {"step": 0},
        {"step": 1},
        {"step": 2},
        {"result": {"ticks": 3}},
    ]

    failing = assert_json(await http.post(create, json=task_body("fails", message="bad")))
    lines = await ndjson(http, failing)
    assert len(lines) == 1
    assert set(lines[0]) == {"error"}
    assert "bad" in lines[0]["error"]
    url = f"/deployments/testapp/tasks/{failing['task_id']}/results"
    result = assert_json(await http.get(url, params={"session_id": failing["session_id"]}))
    assert result["task_id"] == failing["task_id"]
    assert "bad" in result["result"]


async def test_list_tasks(http: httpx.AsyncClient) -> None:
    """``GET tasks`` lists every task of the deployment as 0.8 ``TaskDefinition`` objects."""
    create = "/deployments/testapp/tasks/create"
    task = assert_json(await http.post(create, json=task_body(message="listed")))
    await ndjson(http, task)
    listed = assert_json(await http.get("/deployments/testapp/tasks"))
    assert isinstance(listed, list)
    assert all(set(item) == TASK_DEFINITION_KEYS for item in listed)
    mine = [item for item in listed if item["task_id"] == task["task_id"]]
    assert len(mine) == 1
    assert mine[0]["session_id"] == task["session_id"]
    assert mine[0]["service_id"] == "echo"
    assert json.loads(mine[0]["input"]) == {"message": "listed"}
    assert_error(await http.get("/deployments/nope/tasks"), 404, "nope")


async def test_sessions(http: httpx.AsyncClient) -> None:
    """Sessions: ``create`` is a ``SessionDefinition``; ``tasks/run?session_id=`` keeps the
    workflow context between runs (the tally grows) while a new session starts fresh;
    ``sessions`` lists it, ``sessions/{id}`` shows its tasks in order; ``sessions/delete``
    answers ``null`` and the session is then 404; ``delete`` without an id is 400."""
    sessions = "/deployments/testapp/sessions"
    created = assert_json(await http.post(f"{sessions}/create"))
    assert created == {"session_id": created["session_id"], "task_ids": [], "state": {}}
    sid = created["session_id"]

    run = "/deployments/testapp/tasks/run"
    in_session = {"session_id": sid}
    first = await http.post(run, params=in_session, json=task_body("tally", amount=3))
    second = await http.post(run, params=in_session, json=task_body("tally", amount=4))
    assert [assert_json(first), assert_json(second)] == ["3", "7"]
    other = assert_json(await http.post(f"{sessions}/create"))["session_id"]
    fresh = await http.post(run, params={"session_id": other}, json=task_body("tally", amount=3))
    assert assert_json(fresh) == "3"

    listed = assert_json(await http.get(sessions))
    assert all(set(item) == SESSION_DEFINITION_KEYS for item in listed)
    assert {sid, other} <= {item["session_id"] for item in listed}
    session = assert_json(await http.get(f"{sessions}/{sid}"))
    assert set(session) == SESSION_DEFINITION_KEYS
    assert session["session_id"] == sid
    assert len(session["task_ids"]) == 2

    deleted = await http.post(f"{sessions}/delete", params=in_session)
    assert assert_json(deleted) is None
    assert deleted.content == b"null"
    assert_error(await http.get(f"{sessions}/{sid}"), 404, sid)
    assert_error(await http.post(f"{sessions}/delete"), 400, "session_id")
    assert_error(await http.post("/deployments/nope/sessions/create"), 404, "nope")


async def test_create_deployment(http: httpx.AsyncClient) -> None:
    """``POST /deployments/create`` (multipart ``config_file``): a bad file is 400 naming
    the key and line (0.8 answered 500), a non-multipart body is 400, an existing name
    without ``reload`` is 409, with ``reload`` it is replaced and answers ``{"name"}``."""
    create = "/deployments/create"
    typo = b"name: x\nservices:\n  a:\n    nme: b\n"
    assert_error(
        await http.post(create, files={"config_file": typo}), 400, "nme", ":4:", "services.a"
    )
    broken = b"name: [x\n"
    assert_error(await http.post(create, files={"config_file": broken}), 400, "invalid YAML")
    plain = await http.post(create, content=b"name: x", headers={"content-type": "text/plain"})
    assert_error(plain, 415, "multipart")  # refused by the gateway

    upload = {"config_file": TESTAPP.read_bytes()}
    params: dict[str, Any] = {"base_path": str(TESTAPP.parent), "local": True}
    exists = await http.post(create, files=upload, params={**params, "reload": False})
    assert_error(exists, 409, "testapp", "already exists")
    reloaded = await http.post(create, files=upload, params={**params, "reload": True})
    assert assert_json(reloaded) == {"name": "testapp"}
    run = await http.post("/deployments/testapp/tasks/run", json=task_body(message="back"))
    assert assert_json(run) == "echo: back"


async def test_json_run_equals_grpc_run(http: httpx.AsyncClient, stub: Any) -> None:
    """The same task through 0.8's ``tasks/run`` and through gRPC ``ApiServer.RunTask`` on
    the gateway port gives the same result (the JSON path encodes it into a string)."""
    for service_id, kwargs in (("echo", {"message": "same"}), ("stream", {"count": 2})):
        text = assert_json(
            await http.post("/deployments/testapp/tasks/run", json=task_body(service_id, **kwargs))
        )
        request = apiserver_pb2.RunTaskRequest(
            deployment="testapp", service_id=service_id, input=struct(**kwargs)
        )
        task = (await stub.RunTask(request, timeout=TIMEOUT)).task
        assert task_dict(task)["status"] == "TASK_STATUS_SUCCEEDED"
        result = json.loads(json_format.MessageToJson(task.result))
        expected = text if isinstance(result, str) else json.loads(text)
        assert result == expected


async def test_v1_json_equals_grpc(http: httpx.AsyncClient, stub: Any) -> None:
    """``/v1`` JSON and gRPC are two views of one task: a task run over JSON reads the same
    over gRPC, and one run over gRPC reads the same over JSON (field for field)."""
    ran = await http.post(
        "/v1/deployments/testapp/tasks:run", json={"service_id": "stream", "input": {"count": 2}}
    )
    over_json = assert_json(ran)["task"]
    assert over_json["status"] == "TASK_STATUS_SUCCEEDED"
    got = await stub.GetTask(
        apiserver_pb2.GetTaskRequest(deployment="testapp", task_id=over_json["task_id"]),
        timeout=TIMEOUT,
    )
    assert task_dict(got.task) == over_json

    request = apiserver_pb2.RunTaskRequest(
        deployment="testapp", service_id="tally", input=struct(amount=2)
    )
    over_grpc = (await stub.RunTask(request, timeout=TIMEOUT)).task
    read = await http.get(f"/v1/deployments/testapp/tasks/{over_grpc.task_id}")
    assert assert_json(read)["task"] == task_dict(over_grpc)


async def test_concurrent_runs_all_finish(http: httpx.AsyncClient) -> None:
    """Tasks run side by side all finish: rounds of concurrent ``tasks/run`` calls on
    three services (two each) answer within seconds. (Last in the module: a task that
    never finishes blocks its single-replica service for any test after it.)"""
    run = "/deployments/testapp/tasks/run"
    bodies = [task_body("echo", message="x"), task_body("tally", amount=1)] * 2
    bodies += [task_body("stream", count=1)] * 2
    expected = ["echo: x", "1", "echo: x", "1", '{"ticks": 1}', '{"ticks": 1}']
    for round_ in range(30):
        try:
            answers = await asyncio.gather(*(http.post(run, json=b, timeout=10.0) for b in bodies))
        except httpx.ReadTimeout:
            listed = await http.get("/v1/deployments/testapp/tasks", params={"page_size": 12})
            stuck = [
                (t["service_id"], t["status"], t.get("instance_id"))
                for t in listed.json()["tasks"]
                if t["status"] in ("TASK_STATUS_QUEUED", "TASK_STATUS_RUNNING")
            ]
            pytest.fail(f"round {round_}: a run got no answer in 10 s; unfinished: {stuck}")
        assert [assert_json(a) for a in answers] == expected
