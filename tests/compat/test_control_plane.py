"""The released Llama Deploy 0.8.1 ``Client(...).core`` against a deployment's control plane port.

One real server (embedded nats-server, worker processes, Envoy) serves ``tests/data/testapp``
with its ``control-plane.port`` rewritten to a free port; a snippet in the compat virtualenv
drives every ``.core`` call a 0.8 user makes there (sessions, runs, result streams, events
into a running task, services) and records what it got; the tests below each check one
behaviour in that record. The port clash tests deploy more deployments next to it.
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from llama_mesh.server.app import MeshServer, ServerSettings
from llama_mesh.server.auth import ApiKeys
from llama_mesh.server.ports import free_port
from tests.compat.conftest import CompatPython, write_shout_deployment
from tests.fixtures.mesh import TESTAPP

pytestmark = [pytest.mark.compat, pytest.mark.asyncio(loop_scope="module")]

USER_KEY = "user-key-0123456789abcdef"
ADMIN_KEY = "admin-key-0123456789abcdef"

SNIPPET = """
import asyncio, json
import httpx
from llama_deploy import Client
from llama_deploy.types import ServiceDefinition
from llama_index.core.workflow.events import HumanResponseEvent

out = {}
client = Client(control_plane_url=CP, timeout=60, poll_interval=0.1)

# The blocking face, as a script without an event loop uses it.
sync_session = client.sync.core.sessions.create()
out["sync_session"] = sync_session.id
out["sync_run"] = sync_session.run("echo", message="sync")


async def status_of(coro):
    try:
        await coro
        return 200
    except httpx.HTTPStatusError as exc:
        return {"status": exc.response.status_code, "body": exc.response.json()}


async def main():
    core = client.core
    session = await core.sessions.create()
    out["session"] = session.id
    out["listed"] = [s.id for s in await core.sessions.list()]
    out["got"] = (await core.sessions.get(session.id)).id
    out["get_unknown"] = await status_of(core.sessions.get("no-such-session"))

    out["run"] = await session.run("echo", message="hi")

    stream_task = await session.run_nowait("stream", count=3)
    out["stream_events"] = [ev async for ev in session.get_task_result_stream(stream_task)]
    out["stream_result"] = (await session.get_task_result(stream_task)).model_dump()

    hitl_task = await session.run_nowait("hitl")
    hitl_events = []
    async for ev in session.get_task_result_stream(hitl_task):
        hitl_events.append(ev)
        if ev.get("prefix") == "name?":
            await session.send_event("hitl", hitl_task, HumanResponseEvent(response="Ann"))
    out["hitl_events"] = hitl_events
    out["hitl_result"] = (await session.get_task_result(hitl_task)).result

    tally = await core.sessions.create()
    out["tally"] = [await tally.run("tally", amount=2), await tally.run("tally", amount=3)]
    out["tally_tasks"] = [(t.service_id, json.loads(t.input)) for t in await tally.get_tasks()]

    async with httpx.AsyncClient(base_url=CP) as http:
        async def get(path):
            r = await http.get(path)
            return {"status": r.status_code, "body": r.json()}

        out["home"] = await get("/")
        out["queue_config"] = await get("/queue_config")
        out["current_task"] = await get(f"/sessions/{tally.id}/current_task")
        out["state"] = await get(f"/sessions/{tally.id}/state")
        out["unknown_result"] = await get(f"/sessions/{tally.id}/tasks/no-such-task/result")
        out["service_echo"] = await get("/services/echo")
        out["service_unknown"] = await get("/services/nope")
        r = await http.post(f"/sessions/{tally.id}/tasks",
                            json={"input": "{}", "service_id": "echo", "session_id": "other"})
        out["wrong_session"] = {"status": r.status_code, "body": r.json()}

    await core.services.register(ServiceDefinition(service_name="extra", description="mine"))
    out["services"] = sorted(s.id for s in await core.services.list())
    await core.services.deregister("extra")
    out["services_after"] = sorted(s.id for s in await core.services.list())

    await core.sessions.delete(session.id)
    out["after_delete"] = await status_of(core.sessions.get(session.id))
    out["delete_again"] = await status_of(core.sessions.delete(session.id))


asyncio.run(main())
print(json.dumps(out))
"""


def yaml_for_testapp(port: int) -> bytes:
    """``tests/data/testapp``'s deployment file asking for control plane ``port``."""
    text = TESTAPP.read_text()
    assert "port: 8000" in text
    return text.replace("port: 8000", f"port: {port}").encode()


async def progress_lines(server: MeshServer, name: str) -> list[str]:
    """The deploy progress lines of ``name``'s latest (re)deploy."""
    return [msg.line async for msg in server.mesh.deployments.progress(name)]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def cp_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[MeshServer]:
    """A server that serves 0.8 control planes, with testapp deployed on a free port."""
    settings = ServerSettings(
        data_dir=tmp_path_factory.mktemp("cp-mesh"),
        port=0,
        queue="nats",
        control_planes=True,
        ack_wait=2.0,
        ready_timeout=60.0,
    )
    server = await MeshServer.start(settings)
    try:
        await server.mesh.deployments.create(
            yaml_for_testapp(free_port()), base_path=str(TESTAPP.parent), reload=False, local=True
        )
        yield server
    finally:
        await server.shutdown()


@pytest.fixture(scope="module")
def cp_url(cp_server: MeshServer) -> str:
    """The URL of testapp's control plane."""
    return f"http://127.0.0.1:{cp_server.mesh.deployments.control_planes.served['testapp']}"  # type: ignore[union-attr]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def core(compat_python: CompatPython, cp_url: str) -> dict[str, Any]:
    """What the released client's ``.core`` calls returned against testapp's port."""
    result: dict[str, Any] = await compat_python(f"CP = {cp_url!r}\n" + SNIPPET, timeout=300)
    return result


async def test_deploy_progress_names_the_control_plane_port(cp_server: MeshServer) -> None:
    """A deployment's progress says on which port its 0.8 control plane is served."""
    port = cp_server.mesh.deployments.control_planes.served["testapp"]  # type: ignore[union-attr]
    assert f"0.8 control plane API on port {port}" in await progress_lines(cp_server, "testapp")


async def test_sessions_create_list_get(core: dict[str, Any]) -> None:
    """``sessions.create/list/get`` work; an unknown session is 0.8's 404 with a detail."""
    assert core["got"] == core["session"]
    assert core["session"] in core["listed"] and core["sync_session"] in core["listed"]
    assert core["get_unknown"]["status"] == 404
    assert "no-such-session" in core["get_unknown"]["body"]["detail"]


async def test_session_run_waits_for_the_result(core: dict[str, Any]) -> None:
    """``session.run(service, **kwargs)`` returns the workflow's result, async and sync."""
    assert core["run"] == "echo: hi"
    assert core["sync_run"] == "echo: sync"


async def test_result_stream_is_the_events_then_the_result(core: dict[str, Any]) -> None:
    """``get_task_result_stream`` yields each streamed event's fields, then the result;
    ``get_task_result`` gives 0.8's ``TaskResult``."""
    assert core["stream_events"] == [
        {"step": 0},
        {"step": 1},
        {"step": 2},
        {"result": {"ticks": 3}},
    ]
    result = core["stream_result"]
    assert json.loads(result["result"]) == {"ticks": 3}
    assert result["history"] == [] and result["task_id"]


async def test_send_event_answers_a_waiting_workflow(core: dict[str, Any]) -> None:
    """``session.send_event`` delivers a ``HumanResponseEvent`` to the task waiting for it."""
    assert core["hitl_events"][0]["prefix"] == "name?"
    assert core["hitl_events"][-1] == {"result": "hi Ann"}
    assert core["hitl_result"] == "hi Ann"


async def test_session_context_carries_from_run_to_run(core: dict[str, Any]) -> None:
    """Runs in one session share the workflow context; ``get_tasks`` lists them in order."""
    assert core["tally"] == ["2", "5"]
    assert core["tally_tasks"] == [["tally", {"amount": 2}], ["tally", {"amount": 3}]]


async def test_current_task_and_state(core: dict[str, Any]) -> None:
    """``current_task`` is the session's latest task; ``state`` holds each result under
    ``result_<task_id>`` and the stored workflow context under the session id."""
    current = core["current_task"]
    assert current["status"] == 200
    assert current["body"]["service_id"] == "tally"
    assert json.loads(current["body"]["input"]) == {"amount": 3}
    state = core["state"]["body"]
    task_id = current["body"]["task_id"]
    assert state[f"result_{task_id}"]["result"] == "5"
    session_id = current["body"]["session_id"]
    stored = json.loads(state[session_id])
    assert stored["session_id"] == session_id and stored["state"]


async def test_result_of_unknown_task_is_null(core: dict[str, Any]) -> None:
    """As in 0.8, the result of a task the session does not know is ``null``, not an error."""
    assert core["unknown_result"] == {"status": 200, "body": None}


async def test_home_queue_config_and_services(core: dict[str, Any]) -> None:
    """``/``, ``/queue_config`` and ``/services/{name}`` answer 0.8's shapes."""
    assert core["home"]["status"] == 200 and core["home"]["body"]["running"] == "True"
    assert core["queue_config"]["body"] == {"NatsMessageQueueConfig": {"type": "nats"}}
    assert core["service_echo"]["body"]["service_name"] == "echo"
    assert core["service_echo"]["body"]["description"] == "Echo"
    assert core["service_unknown"]["status"] == 404


async def test_task_in_the_wrong_session_is_400(core: dict[str, Any]) -> None:
    """A task posted to one session naming another is 0.8's 400, saying so."""
    assert core["wrong_session"]["status"] == 400
    assert "Wrong task definition" in core["wrong_session"]["body"]["detail"]


async def test_services_list_register_deregister(core: dict[str, Any]) -> None:
    """``services.list`` has the deployment's services; ``register`` adds one, ``deregister``
    removes it."""
    own = ["crashy", "echo", "fails", "hitl", "limited", "slow", "stream", "tally"]
    assert core["services"] == sorted([*own, "extra"])
    assert core["services_after"] == own


async def test_sessions_delete(core: dict[str, Any]) -> None:
    """``sessions.delete`` removes the session (then 404); deleting it again is no error."""
    assert core["after_delete"]["status"] == 404
    assert core["delete_again"] == 200


async def test_second_deployment_on_the_same_port_is_told_and_still_works(
    cp_server: MeshServer, cp_url: str, gateway_client: httpx.AsyncClient, tmp_path: Path
) -> None:
    """A deployment asking for a port another deployment's control plane has: its progress
    names the port and the holder, it still runs through the API server, and the port keeps
    serving the first deployment (a client cannot name another one there)."""
    port = int(cp_url.rsplit(":", 1)[1])
    config = write_shout_deployment(tmp_path / "clash", "clash")
    yaml = config.read_text().replace("port: 8000", f"port: {port}")
    await cp_server.mesh.deployments.create(
        yaml, base_path=str(config.parent), reload=False, local=True
    )
    lines = await progress_lines(cp_server, "clash")
    assert any(f"port {port} is already served for deployment 'testapp'" in x for x in lines)
    ran = await gateway_client.post(
        "/deployments/clash/tasks/run", json={"input": json.dumps({"message": "x"})}
    )
    assert ran.status_code == 200 and ran.json() == "v1: x"
    async with httpx.AsyncClient(base_url=cp_url) as http:
        services = (await http.get("/services")).json()
        # The port's deployment is the listener's, whatever a client names.
        spoofed = (await http.get("/services", params={"deployment": "clash"})).json()
        spoofed_header = await http.get("/services", headers={"x-llama-mesh-deployment": "clash"})
    assert "echo" in services and "shout" not in services
    assert spoofed == services and spoofed_header.json() == services


async def test_port_held_by_another_process_is_told(
    cp_server: MeshServer, gateway_client: httpx.AsyncClient, tmp_path: Path
) -> None:
    """A port another process listens on: the progress says so naming the port, and the
    deployment runs through the API server."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        config = write_shout_deployment(tmp_path / "taken", "taken")
        yaml = config.read_text().replace("port: 8000", f"port: {port}")
        await cp_server.mesh.deployments.create(
            yaml, base_path=str(config.parent), reload=False, local=True
        )
    lines = await progress_lines(cp_server, "taken")
    assert any(f"port {port} is in use by another process" in x for x in lines)
    ran = await gateway_client.post(
        "/deployments/taken/tasks/run", json={"input": json.dumps({"message": "y"})}
    )
    assert ran.json() == "v1: y"


async def test_deleting_a_deployment_closes_its_port(cp_server: MeshServer, tmp_path: Path) -> None:
    """A deleted deployment's control plane port stops being served (new connections are
    refused once the deletion returns)."""
    port = free_port()
    config = write_shout_deployment(tmp_path / "gone", "gone")
    yaml = config.read_text().replace("port: 8000", f"port: {port}")
    await cp_server.mesh.deployments.create(
        yaml, base_path=str(config.parent), reload=False, local=True
    )
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        assert "shout" in (await http.get("/services")).json()
    await cp_server.mesh.deployments.delete("gone")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        with pytest.raises(httpx.ConnectError):
            await http.get("/services")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def gateway_client(cp_server: MeshServer) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of the server's main gateway port."""
    assert cp_server.gateway_url is not None
    async with httpx.AsyncClient(base_url=cp_server.gateway_url, timeout=60) as http:
        yield http


async def test_api_keys_guard_the_control_plane_port(tmp_path: Path) -> None:
    """With API keys, a control plane port refuses calls without a key (401), lets a user
    key run the 0.8 routes, and keeps registering services to an admin key (403)."""
    port = free_port()
    settings = ServerSettings(
        data_dir=tmp_path / "keys",
        port=0,
        queue="nats",
        control_planes=True,
        api_keys=ApiKeys(user=(USER_KEY,), admin=(ADMIN_KEY,)),
        ready_timeout=60.0,
    )
    server = await MeshServer.start(settings)
    try:
        config = write_shout_deployment(tmp_path / "app", "keyed")
        yaml = config.read_text().replace("port: 8000", f"port: {port}")
        await server.mesh.deployments.create(
            yaml, base_path=str(config.parent), reload=False, local=True
        )
        user = {"authorization": f"Bearer {USER_KEY}"}
        admin = {"authorization": f"Bearer {ADMIN_KEY}"}
        service = {"service_name": "extra", "description": "d"}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            assert (await http.post("/sessions/create")).status_code == 401
            created = await http.post("/sessions/create", headers=user)
            assert created.status_code == 200
            session_id = created.json()
            assert (await http.get(f"/sessions/{session_id}", headers=user)).status_code == 200
            denied = await http.post("/services/register", json=service, headers=user)
            assert denied.status_code == 403
            allowed = await http.post("/services/register", json=service, headers=admin)
            assert allowed.status_code == 200
    finally:
        await server.shutdown()
