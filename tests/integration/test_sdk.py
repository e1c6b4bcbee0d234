"""The Python SDK against a real mesh (in-process queue) running the test deployment."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from llama_mesh.client import (
    AlreadyExistsError,
    AsyncClient,
    Client,
    DeploymentStatus,
    EventKind,
    InvalidArgumentError,
    NotFoundError,
    TaskEvent,
    TaskFailedError,
    TaskStatus,
)
from tests.fixtures.mesh import TESTAPP, MeshFactory

DEPLOYMENT = "testapp"
EVENT_TIMEOUT = 30.0


@pytest.fixture
async def client(mesh_factory: MeshFactory) -> AsyncIterator[AsyncClient]:
    """A client connected to a fresh mesh with ``testapp`` deployed."""
    server = await mesh_factory(deploy=(TESTAPP,))
    async with AsyncClient(f"127.0.0.1:{server.grpc_port}") as c:
        yield c


async def first_event(client: AsyncClient, task_id: str) -> TaskEvent:
    """The first event of a task, waited for on its stream."""
    events = client.tasks.events(DEPLOYMENT, task_id)
    async with contextlib.aclosing(events):
        async for event in events:
            return event
    raise AssertionError("the stream ended without events")


async def test_status_lists_the_deployment(client: AsyncClient) -> None:
    """``status()`` reports a healthy server and its deployments."""
    status = await client.status()
    assert status.healthy
    assert status.deployments == (DEPLOYMENT,)
    assert status.message_queue == "inprocess"


async def test_run_returns_the_result(client: AsyncClient) -> None:
    """``run`` uses the default service, passes keyword input, and returns the result."""
    assert await client.run(DEPLOYMENT, message="hi") == "echo: hi"
    assert await client.run(DEPLOYMENT, service="stream", count=2) == {"ticks": 2}


async def test_run_raises_task_failed(client: AsyncClient) -> None:
    """A workflow that raises makes ``run`` raise TaskFailedError holding the failed task."""
    with pytest.raises(TaskFailedError) as info:
        await client.run(DEPLOYMENT, service="fails", message="kaboom")
    task = info.value.task
    assert task.status is TaskStatus.FAILED
    assert task.error is not None
    assert (task.error.type, task.error.message) == ("ValueError", "kaboom")
    assert "kaboom" in str(info.value)


async def test_unknown_names_are_not_found(client: AsyncClient) -> None:
    """Unknown deployments, services, tasks and sessions raise NotFoundError with a reason."""
    with pytest.raises(NotFoundError) as info:
        await client.run("nope")
    assert info.value.reason == "DEPLOYMENT_NOT_FOUND"
    with pytest.raises(NotFoundError):
        await client.tasks.get(DEPLOYMENT, "00000000-0000-0000-0000-000000000000")
    with pytest.raises(NotFoundError):
        await client.sessions.get(DEPLOYMENT, "no-such-session")
    with pytest.raises(NotFoundError):
        await client.tasks.create(DEPLOYMENT, {}, service="no-such-service")


async def test_events_stream_in_order_and_end_final(client: AsyncClient) -> None:
    """Events arrive in index order, the last carries the result; ``from_index`` skips."""
    task = await client.tasks.create(DEPLOYMENT, {"count": 3}, service="stream")
    events = [e async for e in client.tasks.events(DEPLOYMENT, task.task_id)]
    assert [e.index for e in events] == [0, 1, 2, 3]
    assert [e.data for e in events[:3]] == [{"step": 0}, {"step": 1}, {"step": 2}]
    assert events[0].type.endswith("Tick")
    assert events[-1].kind is EventKind.RESULT and events[-1].is_final
    assert events[-1].data == {"result": {"ticks": 3}}
    tail = [e.index async for e in client.tasks.events(DEPLOYMENT, task.task_id, from_index=2)]
    assert tail == [2, 3]
    assert await client.tasks.result(DEPLOYMENT, task.task_id) == {"ticks": 3}
    done = await client.tasks.get(DEPLOYMENT, task.task_id)
    assert done.status is TaskStatus.SUCCEEDED and done.result == {"ticks": 3}


async def test_human_in_the_loop(client: AsyncClient) -> None:
    """A task waits for input; ``send_event`` answers it and ``result`` returns the outcome."""
    task = await client.tasks.create(DEPLOYMENT, {}, service="hitl")
    asked = await asyncio.wait_for(first_event(client, task.task_id), EVENT_TIMEOUT)
    assert asked.type.endswith("InputRequiredEvent")
    assert asked.data.get("prefix") == "name?"
    await client.tasks.send_event(
        DEPLOYMENT, task.task_id, "HumanResponseEvent", {"response": "bob"}
    )
    result = await asyncio.wait_for(client.tasks.result(DEPLOYMENT, task.task_id), EVENT_TIMEOUT)
    assert result == "hi bob"


async def test_sessions_keep_context(client: AsyncClient) -> None:
    """Tasks of one session share workflow context; a deleted session is gone."""
    session = await client.sessions.create(DEPLOYMENT)
    assert await client.run(DEPLOYMENT, service="tally", session=session.session_id, amount=2) == 2
    assert await client.run(DEPLOYMENT, service="tally", session=session.session_id, amount=5) == 7
    fetched = await client.sessions.get(DEPLOYMENT, session.session_id)
    assert len(fetched.task_ids) == 2
    assert session.session_id in {s.session_id for s in await client.sessions.list(DEPLOYMENT)}
    listed = await client.tasks.list(DEPLOYMENT, session=session.session_id)
    assert {t.task_id for t in listed} == set(fetched.task_ids)
    await client.sessions.delete(DEPLOYMENT, session.session_id)
    with pytest.raises(NotFoundError):
        await client.sessions.get(DEPLOYMENT, session.session_id)


async def test_tasks_list_filters_by_status(client: AsyncClient) -> None:
    """``tasks.list(status=...)`` keeps only the tasks in that status."""
    with pytest.raises(TaskFailedError):
        await client.run(DEPLOYMENT, service="fails")
    await client.run(DEPLOYMENT, message="ok")
    failed = await client.tasks.list(DEPLOYMENT, status="failed")
    assert failed and {t.status for t in failed} == {TaskStatus.FAILED}
    assert len(await client.tasks.list(DEPLOYMENT)) >= 2


async def test_cancel_a_running_task(client: AsyncClient) -> None:
    """A cancelled task ends cancelled; waiting for its result raises TaskFailedError."""
    task = await client.tasks.create(DEPLOYMENT, {"seconds": 60}, service="slow")
    await asyncio.wait_for(first_event(client, task.task_id), EVENT_TIMEOUT)
    await client.tasks.cancel(DEPLOYMENT, task.task_id, reason="enough")
    with pytest.raises(TaskFailedError) as info:
        await asyncio.wait_for(client.tasks.result(DEPLOYMENT, task.task_id), EVENT_TIMEOUT)
    assert info.value.task.status is TaskStatus.CANCELLED


async def test_deployments_and_services(client: AsyncClient) -> None:
    """Deployments list and get with their services; services report healthy replicas."""
    [deployment] = await client.deployments.list()
    assert deployment.name == DEPLOYMENT
    assert deployment.status is DeploymentStatus.READY
    assert deployment.default_service == "echo"
    got = await client.deployments.get(DEPLOYMENT)
    assert {s.id for s in got.services} >= {"echo", "stream", "hitl", "tally", "slow", "fails"}
    services = {s.id: s for s in await client.services.list(DEPLOYMENT)}
    assert services["slow"].replicas == 2
    assert all(s.healthy for s in services.values())


async def test_create_reload_and_delete(client: AsyncClient) -> None:
    """Creating an existing deployment needs ``reload``; reload bumps the generation."""
    with pytest.raises(AlreadyExistsError):
        await client.deployments.create(TESTAPP)
    before = await client.deployments.get(DEPLOYMENT)
    reloaded = await client.deployments.create(TESTAPP, reload=True, local=True)
    assert reloaded.generation == before.generation + 1
    lines = [line async for line in client.deployments.progress(DEPLOYMENT)]
    assert lines and lines[-1] == "ready"
    assert (await client.deployments.reload(DEPLOYMENT)).generation == before.generation + 2
    assert await client.run(DEPLOYMENT, message="again") == "echo: again"
    await client.deployments.delete(DEPLOYMENT)
    assert await client.deployments.list() == []
    with pytest.raises(NotFoundError):
        await client.deployments.get(DEPLOYMENT)


async def test_invalid_yaml_is_invalid_argument(client: AsyncClient) -> None:
    """A bad deployment file is rejected with InvalidArgumentError naming the key."""
    with pytest.raises(InvalidArgumentError) as info:
        await client.deployments.create("name: x\nservices:\n  a:\n    colour: red\n")
    assert info.value.reason == "INVALID_DEPLOYMENT"
    assert "colour" in info.value.message


async def test_sync_client(mesh_factory: MeshFactory) -> None:
    """The blocking Client does the same from a thread: run, create, events, result."""
    server = await mesh_factory(deploy=(TESTAPP,))

    def use() -> tuple[object, list[int], object]:
        with Client(f"127.0.0.1:{server.grpc_port}") as c:
            echoed = c.run(DEPLOYMENT, message="sync")
            task = c.tasks.create(DEPLOYMENT, {"count": 2}, service="stream")
            indexes = [e.index for e in c.tasks.events(DEPLOYMENT, task.task_id)]
            return echoed, indexes, c.tasks.result(DEPLOYMENT, task.task_id)

    assert await asyncio.to_thread(use) == ("echo: sync", [0, 1, 2], {"ticks": 2})


async def test_through_the_gateway(mesh_factory: MeshFactory) -> None:
    """The gateway's http URL (what 0.8 profiles hold) passes raw gRPC through to the API."""
    server = await mesh_factory(deploy=(TESTAPP,), gateway=True)
    assert server.gateway_url is not None and server.gateway_url.startswith("http://")
    async with AsyncClient(server.gateway_url) as c:
        assert await c.run(DEPLOYMENT, message="via envoy") == "echo: via envoy"
        with pytest.raises(NotFoundError) as info:
            await c.deployments.get("nope")
        assert info.value.reason == "DEPLOYMENT_NOT_FOUND"
