"""The released Llama Deploy 0.8.1 Python ``Client``, unchanged, against the gateway.

Each of its two faces (``client.sync.apiserver...`` and ``await client.apiserver...``) is
driven by one snippet that runs in the compat virtualenv and records the outcome of every
call (its value, or the HTTP status and body of the ``httpx.HTTPStatusError`` it raised);
the two snippets run once per module, side by side, and each test below checks one
behaviour in those records. Importing llama-index takes seconds, so one process per face.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import pytest_asyncio

from tests.compat.conftest import CompatPython, write_shout_deployment

pytestmark = [pytest.mark.compat, pytest.mark.asyncio(loop_scope="module")]

MODES = ("sync", "async")
BAD_YAML = "name: broken\nservices:\n  a:\n    nme: b\n"
"""A deployment file with a misspelt key on line 4."""

PRELUDE = """\
import asyncio, io, json
import httpx
from llama_deploy import Client
from llama_deploy.types import TaskDefinition

out = {}


def failure(exc):
    if isinstance(exc, httpx.HTTPStatusError):
        try:
            body = exc.response.json()
        except ValueError:
            body = exc.response.text
        return {"http_status": exc.response.status_code, "body": body}
    return {"exception": type(exc).__name__, "message": str(exc)}


def record(name, fn):
    try:
        out[name] = {"ok": fn()}
    except Exception as exc:
        out[name] = failure(exc)


async def arecord(name, fn):
    try:
        out[name] = {"ok": await fn()}
    except Exception as exc:
        out[name] = failure(exc)


def task(service_id=None, session_id=None, **kwargs):
    return TaskDefinition(
        input=json.dumps(kwargs), service_id=service_id, session_id=session_id
    )


def status_fields(st):
    return {"status": st.status.value, "deployments": st.deployments,
            "message": st.status_message}
"""

SYNC_SNIPPET = """
client = Client(api_server_url=URL, timeout=20)
api = client.sync.apiserver


def create(reload):
    with open(SHOUT_YML) as f:
        return api.deployments.create(f, base_path=SHOUT_DIR, reload=reload).id


record("status", lambda: status_fields(api.status()))
record("create", lambda: create(False))
record("create_existing", lambda: create(False))
record("create_reload", lambda: create(True))
record("bad_yaml", lambda: api.deployments.create(io.StringIO(BAD_YAML), base_path=SHOUT_DIR).id)
record("list", lambda: sorted(d.id for d in api.deployments.list()))
record("get", lambda: api.deployments.get("testapp").id)
record("get_unknown", lambda: api.deployments.get("nope").id)
record("tasks_list_empty", lambda: list(api.deployments.get(SHOUT_NAME).tasks.list().items))
record("run_second", lambda: api.deployments.get(SHOUT_NAME).tasks.run(task(message="hi")))

testapp = api.deployments.get("testapp")
record("run_default", lambda: testapp.tasks.run(task(message="hi")))
record("run_service", lambda: testapp.tasks.run(task("stream", count=2)))
record("run_fails", lambda: testapp.tasks.run(task("fails", message="kaboom")))


def create_task():
    t = testapp.tasks.create(task("stream", count=3))
    events = t.events()
    return {"task_id": t.id, "session_id": t.session_id, "events": events,
            "result": t.results().model_dump()}


record("create_task", create_task)


def sessions():
    first = testapp.sessions.create()
    totals = [testapp.tasks.run(task("tally", first.session_id, amount=a)) for a in (3, 4)]
    second = testapp.sessions.create()
    fresh = testapp.tasks.run(task("tally", second.session_id, amount=3))
    listed = [s["session_id"] for s in testapp.sessions.list()]
    testapp.sessions.delete(first.session_id)
    after = [s["session_id"] for s in testapp.sessions.list()]
    return {"created": first.model_dump(), "totals": totals, "fresh": fresh,
            "listed": listed, "after": after, "deleted": first.session_id,
            "kept": second.session_id}


record("sessions", sessions)
deleted = out["sessions"].get("ok", {}).get("deleted", "none")
session_url = URL + "/deployments/testapp/sessions/" + deleted
record("get_deleted_session", lambda: asyncio.run(client.request("GET", session_url)).json())
record("tasks_list", lambda: list(testapp.tasks.list().items))
print(json.dumps(out))
"""

ASYNC_SNIPPET = """
from llama_index.core.workflow.events import HumanResponseEvent


async def main():
    client = Client(api_server_url=URL, timeout=20)
    api = client.apiserver

    async def create(reload):
        with open(SHOUT_YML, "rb") as f:
            return (await api.deployments.create(f, base_path=SHOUT_DIR, reload=reload)).id

    async def status():
        return status_fields(await api.status())

    async def bad_yaml():
        return (await api.deployments.create(io.StringIO(BAD_YAML), base_path=SHOUT_DIR)).id

    async def listed():
        return sorted(d.id for d in await api.deployments.list())

    async def get(name):
        return (await api.deployments.get(name)).id

    async def tasks_list(name):
        d = await api.deployments.get(name)
        return list((await d.tasks.list()).items)

    async def run_second():
        d = await api.deployments.get(SHOUT_NAME)
        return await d.tasks.run(task(message="hi"))

    await arecord("status", status)
    await arecord("create", lambda: create(False))
    await arecord("create_existing", lambda: create(False))
    await arecord("create_reload", lambda: create(True))
    await arecord("bad_yaml", bad_yaml)
    await arecord("list", listed)
    await arecord("get", lambda: get("testapp"))
    await arecord("get_unknown", lambda: get("nope"))
    await arecord("tasks_list_empty", lambda: tasks_list(SHOUT_NAME))
    await arecord("run_second", run_second)

    testapp = await api.deployments.get("testapp")
    await arecord("run_default", lambda: testapp.tasks.run(task(message="hi")))
    await arecord("run_service", lambda: testapp.tasks.run(task("stream", count=2)))
    await arecord("run_fails", lambda: testapp.tasks.run(task("fails", message="kaboom")))

    async def create_task():
        t = await testapp.tasks.create(task("stream", count=3))
        events = [ev async for ev in t.events()]
        return {"task_id": t.id, "session_id": t.session_id, "events": events,
                "result": (await t.results()).model_dump()}

    async def hitl():
        t = await testapp.tasks.create(task("hitl"))
        stream = t.events()
        before = []
        async for ev in stream:
            before.append(ev)
            if "prefix" in ev:
                break
        await stream.aclose()
        sent = await t.send_event(HumanResponseEvent(response="bob"), service_name="hitl")
        after = [ev async for ev in t.events()]
        return {"task_id": t.id, "before": before, "sent": sent.model_dump(), "after": after,
                "result": (await t.results()).model_dump()}

    async def sessions():
        first = await testapp.sessions.create()
        totals = [
            await testapp.tasks.run(task("tally", first.session_id, amount=a)) for a in (3, 4)
        ]
        second = await testapp.sessions.create()
        fresh = await testapp.tasks.run(task("tally", second.session_id, amount=3))
        listed = [s["session_id"] for s in await testapp.sessions.list()]
        await testapp.sessions.delete(first.session_id)
        after = [s["session_id"] for s in await testapp.sessions.list()]
        return {"created": first.model_dump(), "totals": totals, "fresh": fresh,
                "listed": listed, "after": after, "deleted": first.session_id,
                "kept": second.session_id}

    await arecord("create_task", create_task)
    await arecord("hitl", hitl)
    await arecord("sessions", sessions)
    deleted = out["sessions"].get("ok", {}).get("deleted", "none")
    session_url = URL + "/deployments/testapp/sessions/" + deleted

    async def get_deleted_session():
        return (await client.request("GET", session_url)).json()

    await arecord("get_deleted_session", get_deleted_session)
    await arecord("tasks_list", lambda: tasks_list("testapp"))


asyncio.run(main())
print(json.dumps(out))
"""

Probes = dict[str, dict[str, dict[str, Any]]]


def snippet(body: str, **constants: str) -> str:
    """The prelude, the constants (as Python literals), then the body."""
    assignments = "".join(f"{name} = {value!r}\n" for name, value in constants.items())
    return PRELUDE + assignments + body


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def probes(
    compat_python: CompatPython, gateway_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Probes:
    """The records of the sync and the async snippet, run side by side against the server;
    each creates its own second deployment (``shout-sync``, ``shout-async``)."""
    base = tmp_path_factory.mktemp("client-deployments")
    runs = []
    for mode, body in (("sync", SYNC_SNIPPET), ("async", ASYNC_SNIPPET)):
        name = f"shout-{mode}"
        config = write_shout_deployment(base / mode, name)
        code = snippet(
            body,
            URL=gateway_url,
            SHOUT_YML=str(config),
            SHOUT_DIR=str(config.parent),
            SHOUT_NAME=name,
            BAD_YAML=BAD_YAML,
        )
        runs.append(compat_python(code))
    sync_out, async_out = await asyncio.gather(*runs)
    return {"sync": sync_out, "async": async_out}


def ok(probes: Probes, mode: str, name: str) -> Any:
    """The value a call returned (fails with what it raised instead)."""
    outcome = probes[mode][name]
    assert "ok" in outcome, f"{mode} {name}: {outcome}"
    return outcome["ok"]


def http_error(probes: Probes, mode: str, name: str, status: int) -> dict[str, Any]:
    """The JSON body of the ``HTTPStatusError`` a call raised, which must have ``status``."""
    outcome = probes[mode][name]
    assert outcome.get("http_status") == status, f"{mode} {name}: {outcome}"
    body = outcome["body"]
    assert isinstance(body, dict)
    assert isinstance(body.get("detail"), str)
    return body


@pytest.mark.parametrize("mode", MODES)
async def test_status(probes: Probes, mode: str) -> None:
    """``apiserver.status()`` reports Healthy with the deployments in its message."""
    status = ok(probes, mode, "status")
    assert status["status"] == "Healthy"
    assert "testapp" in status["deployments"]
    assert status["message"].startswith("LlamaDeploy is up and running.")
    assert "- testapp" in status["message"]


@pytest.mark.parametrize("mode", MODES)
async def test_deployments_create_get(probes: Probes, mode: str) -> None:
    """``deployments.create`` uploads a file object and returns the deployment; again
    without ``reload`` it raises 409, with ``reload`` it succeeds; ``get`` returns a known
    deployment and raises 404 with ``detail`` for an unknown one; the new deployment runs."""
    name = f"shout-{mode}"
    assert ok(probes, mode, "create") == name
    assert name in http_error(probes, mode, "create_existing", 409)["detail"]
    assert ok(probes, mode, "create_reload") == name
    assert ok(probes, mode, "get") == "testapp"
    assert "nope" in http_error(probes, mode, "get_unknown", 404)["detail"]
    assert ok(probes, mode, "run_second") == "v1: hi"


@pytest.mark.parametrize("mode", MODES)
async def test_deployments_list_is_broken_in_the_client(probes: Probes, mode: str) -> None:
    """``deployments.list()`` of the released 0.8.1 client cannot work: it builds models
    with ``id=<item>`` from 0.8's ``[{"name": ...}]`` body, which pydantic rejects. The
    server sends exactly 0.8's body (pinned in ``test_routes``), so the client fails the
    same way it did against 0.8.1 itself; pinned so that a change here is noticed."""
    broken = probes[mode]["list"]
    assert broken.get("exception") == "ValidationError", broken
    assert "{'name': '" in broken["message"]


@pytest.mark.parametrize("mode", MODES)
async def test_bad_yaml_is_400(probes: Probes, mode: str) -> None:
    """Uploading a bad deployment file raises 400 whose ``detail`` names the key and line
    (0.8 answered 500)."""
    detail = http_error(probes, mode, "bad_yaml", 400)["detail"]
    assert "nme" in detail
    assert ":4:" in detail


@pytest.mark.parametrize("mode", MODES)
async def test_tasks_run(probes: Probes, mode: str) -> None:
    """``tasks.run`` returns the result: the default service without ``service_id``, the
    named one with it (non-string results arrive JSON-encoded, as 0.8's ``str`` did)."""
    assert ok(probes, mode, "run_default") == "echo: hi"
    assert json.loads(ok(probes, mode, "run_service")) == {"ticks": 2}


@pytest.mark.parametrize("mode", MODES)
async def test_workflow_error_is_500(probes: Probes, mode: str) -> None:
    """A workflow that raises makes ``tasks.run`` raise ``HTTPStatusError`` 500 whose
    ``detail`` carries the exception message."""
    detail = http_error(probes, mode, "run_fails", 500)["detail"]
    assert "kaboom" in detail


@pytest.mark.parametrize("mode", MODES)
async def test_create_events_results(probes: Probes, mode: str) -> None:
    """``tasks.create`` returns a task; ``task.events()`` yields the streamed events with
    their fields, in order, then the result line; ``task.results()`` is the ``TaskResult``."""
    created = ok(probes, mode, "create_task")
    assert created["events"] == [
        {"step": 0},
        {"step": 1},
        {"step": 2},
        {"result": {"ticks": 3}},
    ]
    result = created["result"]
    assert result["task_id"] == created["task_id"]
    assert json.loads(result["result"]) == {"ticks": 3}
    assert result["history"] == []


async def test_human_in_the_loop(probes: Probes) -> None:
    """Human in the loop: the events show the ``InputRequiredEvent`` fields; the released
    ``task.send_event(HumanResponseEvent(response="bob"), service_name=...)`` (llama-index
    ``JsonSerializer`` form, llama_index.core class name) resumes the workflow, which
    answers "hi bob"; ``send_event`` returns the ``EventDefinition`` it sent."""
    hitl = ok(probes, "async", "hitl")
    assert hitl["before"] == [{"prefix": "name?"}]
    sent = hitl["sent"]
    assert sent["service_id"] == "hitl"
    serialized = json.loads(sent["event_obj_str"])
    assert serialized["qualified_name"] == "llama_index.core.workflow.events.HumanResponseEvent"
    assert serialized["value"]["response"] == "bob"
    assert hitl["after"][-1] == {"result": "hi bob"}
    assert hitl["result"]["result"] == "hi bob"
    assert hitl["result"]["task_id"] == hitl["task_id"]


@pytest.mark.parametrize("mode", MODES)
async def test_sessions(probes: Probes, mode: str) -> None:
    """Sessions: ``sessions.create`` returns a ``SessionDefinition``; runs in it keep the
    workflow context (3 then 7) while another session starts fresh (3); ``sessions.list``
    contains both; after ``sessions.delete`` the list drops it and getting it is 404."""
    sessions = ok(probes, mode, "sessions")
    created = sessions["created"]
    assert created == {"session_id": sessions["deleted"], "task_ids": [], "state": {}}
    assert sessions["totals"] == ["3", "7"]
    assert sessions["fresh"] == "3"
    assert {sessions["deleted"], sessions["kept"]} <= set(sessions["listed"])
    assert sessions["deleted"] not in sessions["after"]
    assert sessions["kept"] in sessions["after"]
    assert sessions["deleted"] in http_error(probes, mode, "get_deleted_session", 404)["detail"]


@pytest.mark.parametrize("mode", MODES)
async def test_tasks_list(probes: Probes, mode: str) -> None:
    """``tasks.list()`` works on a deployment without tasks (an empty collection). On one
    with tasks the released 0.8.1 client itself breaks: it reads ``task_def.task_id`` off
    the JSON dicts, so it raises ``AttributeError`` whatever the server sends (pinned so
    that a change here is noticed; the route's shape is pinned in ``test_routes``)."""
    assert ok(probes, mode, "tasks_list_empty") == []
    broken = probes[mode]["tasks_list"]
    assert broken.get("exception") == "AttributeError", broken
    assert "task_id" in broken["message"]


async def test_snippets_are_python() -> None:
    """The snippets compile (a typo shows here rather than as a failed subprocess)."""
    constants = {"URL": "", "SHOUT_YML": "", "SHOUT_DIR": "", "SHOUT_NAME": "", "BAD_YAML": ""}
    for body in (SYNC_SNIPPET, ASYNC_SNIPPET):
        compile(snippet(body, **constants), "<snippet>", "exec")
