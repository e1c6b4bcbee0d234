"""``llamactl`` against a real mesh (in-process queue) running the test deployment.

Commands run in-process with click's ``CliRunner``, in a thread because each command runs
its own event loop while the server runs on the test's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner, Result

from llama_mesh.client import AsyncClient, TaskStatus
from llama_mesh.client.cli import llamactl
from tests.fixtures.mesh import TESTAPP, MeshFactory
from tests.helpers import assert_eventually

DEPLOYMENT = "testapp"
Invoke = Callable[..., Awaitable[Result]]


@pytest.fixture
async def mesh(
    mesh_factory: MeshFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Invoke, AsyncClient]]:
    """``invoke(*args)`` runs llamactl against a fresh mesh; a client for setting things up."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    for name in ("LLAMA_MESH_ADDRESS", "LLAMA_MESH_API_KEY", "LLAMA_MESH_TLS_CA"):
        monkeypatch.delenv(name, raising=False)
    server = await mesh_factory(deploy=(TESTAPP,))
    url = f"http://127.0.0.1:{server.grpc_port}"

    async def invoke(*args: str) -> Result:
        runner = CliRunner()
        return await asyncio.to_thread(
            runner.invoke, llamactl, ["-s", url, *args], prog_name="llamactl"
        )

    async with AsyncClient(url) as client:
        yield invoke, client


async def wait_running(client: AsyncClient, task_id: str) -> None:
    """Return once the task has streamed its first event (so it runs)."""
    events = client.tasks.events(DEPLOYMENT, task_id)
    async with contextlib.aclosing(events):
        async for _ in events:
            return


async def test_status(mesh: tuple[Invoke, AsyncClient]) -> None:
    """``status``: 0.8's text on a table, JSON data otherwise."""
    invoke, _ = mesh
    text = await invoke("-o", "table", "status")
    assert text.exit_code == 0
    assert "is up and running" in text.stdout
    assert f"- {DEPLOYMENT}" in text.stdout
    data = json.loads((await invoke("status")).stdout)
    assert data["healthy"] is True and data["deployments"] == [DEPLOYMENT]


async def test_run_prints_the_result(mesh: tuple[Invoke, AsyncClient]) -> None:
    """``run -a k v`` prints strings plainly and other results as JSON, exit status 0."""
    invoke, _ = mesh
    echoed = await invoke("run", "-d", DEPLOYMENT, "-a", "message", "hello world")
    assert (echoed.exit_code, echoed.stdout) == (0, "echo: hello world\n")
    streamed = await invoke("run", "-d", DEPLOYMENT, "-s", "stream", "-a", "count", "2")
    assert json.loads(streamed.stdout) == {"ticks": 2}


async def test_run_failure_exits_3(mesh: tuple[Invoke, AsyncClient]) -> None:
    """A failing task: exit status 3, ``Error: ...`` with the workflow's error on stderr."""
    invoke, _ = mesh
    result = await invoke("run", "-d", DEPLOYMENT, "-s", "fails", "-a", "message", "kaboom")
    assert result.exit_code == 3
    assert result.stdout == ""
    assert result.stderr.startswith("Error: Task ")
    assert "ValueError: kaboom" in result.stderr


async def test_api_error_exits_1(mesh: tuple[Invoke, AsyncClient]) -> None:
    """An API error: exit status 1 and the server's message on stderr."""
    invoke, _ = mesh
    result = await invoke("run", "-d", "nope")
    assert result.exit_code == 1
    assert result.stderr == "Error: Deployment 'nope' not found\n"


async def test_sessions(mesh: tuple[Invoke, AsyncClient]) -> None:
    """``sessions create|get|list|delete`` and ``run -i`` keep context in one session."""
    invoke, _ = mesh
    created = json.loads((await invoke("sessions", "create", "-d", DEPLOYMENT)).stdout)
    sid = created["session_id"]
    for amount, total in (("2", "2"), ("3", "5")):
        ran = await invoke(
            "run", "-d", DEPLOYMENT, "-s", "tally", "-i", sid, "-a", "amount", amount
        )
        assert ran.stdout.strip() == total
    got = yaml.safe_load(
        (await invoke("-o", "yaml", "sessions", "get", "-d", DEPLOYMENT, sid)).stdout
    )
    assert len(got["task_ids"]) == 2
    listed = await invoke("-o", "jsonl", "sessions", "list", "-d", DEPLOYMENT)
    assert sid in {json.loads(line)["session_id"] for line in listed.stdout.splitlines()}
    assert (await invoke("sessions", "delete", "-d", DEPLOYMENT, sid)).exit_code == 0
    assert (await invoke("sessions", "get", "-d", DEPLOYMENT, sid)).exit_code == 1


async def test_tasks_and_events(mesh: tuple[Invoke, AsyncClient]) -> None:
    """``tasks list|get|events``: events as JSON lines, from an index, ending final."""
    invoke, client = mesh
    task = await client.tasks.create(DEPLOYMENT, {"count": 3}, service="stream")
    followed = await invoke("tasks", "events", "-d", DEPLOYMENT, task.task_id, "--follow")
    events = [json.loads(line) for line in followed.stdout.splitlines()]
    assert [e["index"] for e in events] == [0, 1, 2, 3]
    assert events[-1]["kind"] == "result" and events[-1]["data"] == {"result": {"ticks": 3}}
    tail = await invoke("tasks", "events", "-d", DEPLOYMENT, task.task_id, "--from-index", "3")
    assert [json.loads(line)["index"] for line in tail.stdout.splitlines()] == [3]
    got = json.loads((await invoke("tasks", "get", "-d", DEPLOYMENT, task.task_id)).stdout)
    assert (got["status"], got["result"]) == ("succeeded", {"ticks": 3})
    listed = json.loads((await invoke("tasks", "list", "-d", DEPLOYMENT)).stdout)
    assert task.task_id in {t["task_id"] for t in listed}
    table = await invoke("-o", "table", "tasks", "list", "-d", DEPLOYMENT, "--status", "succeeded")
    assert table.stdout.startswith("TASK ID") and task.task_id in table.stdout
    result = await invoke("tasks", "result", "-d", DEPLOYMENT, task.task_id)
    assert json.loads(result.stdout) == {"ticks": 3}


async def test_events_so_far_show_the_question(mesh: tuple[Invoke, AsyncClient]) -> None:
    """``tasks events`` without --follow prints the events written so far of a task waiting
    for an answer (its question), and returns; ``tasks get`` counts them."""
    invoke, client = mesh
    task = await client.tasks.create(DEPLOYMENT, {}, service="hitl")
    await asyncio.wait_for(wait_running(client, task.task_id), 30)
    shown = await invoke("tasks", "events", "-d", DEPLOYMENT, task.task_id)
    assert shown.exit_code == 0, shown.output
    events = [json.loads(line) for line in shown.stdout.splitlines()]
    assert [(e["index"], e["type"].rsplit(".", 1)[-1]) for e in events] == [
        (0, "InputRequiredEvent")
    ]
    assert events[0]["data"]["prefix"] == "name?"
    got = json.loads((await invoke("tasks", "get", "-d", DEPLOYMENT, task.task_id)).stdout)
    assert (got["status"], got["event_count"]) == ("running", 1)
    await client.tasks.send_event(DEPLOYMENT, task.task_id, "HumanResponseEvent", {"response": "x"})
    assert await client.tasks.result(DEPLOYMENT, task.task_id) == "hi x"


async def test_final_event_time_is_when_the_task_finished(
    mesh: tuple[Invoke, AsyncClient],
) -> None:
    """The final event carries the time the task finished, the same on every read."""
    invoke, client = mesh
    task = await client.tasks.create(DEPLOYMENT, {"message": "t"})
    assert await client.tasks.result(DEPLOYMENT, task.task_id) == "echo: t"
    reads = [await invoke("tasks", "events", "-d", DEPLOYMENT, task.task_id) for _ in range(2)]
    finals = [json.loads(r.stdout.splitlines()[-1]) for r in reads]
    got = json.loads((await invoke("tasks", "get", "-d", DEPLOYMENT, task.task_id)).stdout)
    assert finals[0]["kind"] == "result"
    assert finals[0]["timestamp"] == finals[1]["timestamp"] == got["finished_at"]


async def test_run_no_wait_prints_the_task_id(mesh: tuple[Invoke, AsyncClient]) -> None:
    """``run --no-wait`` queues the task and prints its id (the task with -o json)."""
    invoke, _ = mesh
    queued = await invoke("run", "-d", DEPLOYMENT, "-a", "message", "later", "--no-wait")
    assert queued.exit_code == 0, queued.output
    task_id = queued.stdout.strip()
    assert queued.stdout == f"{task_id}\n" and task_id
    result = await invoke("tasks", "result", "-d", DEPLOYMENT, task_id)
    assert result.stdout == "echo: later\n"
    as_json = await invoke("run", "-d", DEPLOYMENT, "-s", "tally", "--no-wait", "-o", "json")
    task = json.loads(as_json.stdout)
    assert task["service_id"] == "tally" and task["status"] == "queued"


async def test_output_option_after_the_command(mesh: tuple[Invoke, AsyncClient]) -> None:
    """``-o`` works after the command as well as before it."""
    invoke, _ = mesh
    listed = await invoke("deployments", "list", "-o", "table")
    assert listed.exit_code == 0, listed.output
    assert listed.stdout.startswith("NAME") and DEPLOYMENT in listed.stdout
    status = await invoke("status", "-o", "json")
    assert json.loads(status.stdout)["healthy"] is True


async def test_human_in_the_loop(mesh: tuple[Invoke, AsyncClient]) -> None:
    """``send-event`` answers a waiting task; ``tasks result`` then prints its result."""
    invoke, client = mesh
    task = await client.tasks.create(DEPLOYMENT, {}, service="hitl")
    await asyncio.wait_for(wait_running(client, task.task_id), 30)
    sent = await invoke(
        "send-event", "-d", DEPLOYMENT, task.task_id,
        "--type", "HumanResponseEvent", "--data", '{"response": "ann"}',
    )  # fmt: skip
    assert sent.exit_code == 0, sent.output
    result = await invoke("tasks", "result", "-d", DEPLOYMENT, task.task_id)
    assert result.stdout == "hi ann\n"
    late = await invoke("send-event", "-d", DEPLOYMENT, task.task_id, "--type", "X")
    assert late.exit_code == 1 and "has finished" in late.stderr


async def test_cancel(mesh: tuple[Invoke, AsyncClient]) -> None:
    """``tasks cancel`` stops a running task and prints it cancelled; its result then exits
    with status 3."""
    invoke, client = mesh
    task = await client.tasks.create(DEPLOYMENT, {"seconds": 60}, service="slow")
    await asyncio.wait_for(wait_running(client, task.task_id), 30)

    async def recorded_running() -> bool:  # cancelled by its replica, not while queued
        return (await client.tasks.get(DEPLOYMENT, task.task_id)).status is TaskStatus.RUNNING

    await assert_eventually(recorded_running, timeout=30)
    cancelled = await invoke("tasks", "cancel", "-d", DEPLOYMENT, task.task_id)
    assert cancelled.exit_code == 0, cancelled.output
    assert json.loads(cancelled.stdout)["status"] == "cancelled"  # as it is afterwards
    result = await invoke("tasks", "result", "-d", DEPLOYMENT, task.task_id)
    assert result.exit_code == 3 and "cancelled" in result.stderr


async def test_deploy_and_deployments(mesh: tuple[Invoke, AsyncClient]) -> None:
    """``deploy --reload`` redeploys; ``deployments list|get|delete --yes``; ``services list``."""
    invoke, _ = mesh
    deployed = await invoke("-o", "table", "deploy", "--reload", str(TESTAPP))
    assert deployed.exit_code == 0, deployed.output
    assert deployed.stdout == f"Deployment successful: {DEPLOYMENT}\n"
    again = await invoke("deploy", str(TESTAPP))
    assert again.exit_code == 1 and "already exists" in again.stderr
    listed = json.loads((await invoke("deployments", "list")).stdout)
    assert [d["name"] for d in listed] == [DEPLOYMENT]
    assert listed[0]["generation"] == 2
    got = await invoke("-o", "table", "deployments", "get", DEPLOYMENT)
    assert "status" in got.stdout and "ready" in got.stdout
    services = json.loads((await invoke("services", "list", "-d", DEPLOYMENT)).stdout)
    assert "echo" in {s["id"] for s in services}
    assert (await invoke("deployments", "delete", DEPLOYMENT, "--yes")).exit_code == 0
    assert json.loads((await invoke("deployments", "list")).stdout) == []


async def test_wait(mesh: tuple[Invoke, AsyncClient]) -> None:
    """``wait`` returns 0 at once when the server answers."""
    invoke, _ = mesh
    result = await invoke("wait", "--timeout", "10")
    assert result.exit_code == 0
    assert "ready" in result.stderr
