"""Watching a deployment's tasks (``ApiServer.WatchTasks``) and a service's queue depth.

The watch is checked over gRPC and through the real gateway, where it is Server-Sent Events;
the queue depth against a real nats-server, with tasks queued for a service whose replicas
are stopped.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import grpc
import httpx
import pytest

from llama_mesh.client import AsyncClient
from llama_mesh.server.app import MeshServer
from llama_mesh.server.domain import TaskStatus
from llama_mesh.server.errors import NotFoundError
from llama_mesh.server.nats_server import NatsServer
from llama_mesh.v1 import apiserver_pb2, apiserver_pb2_grpc, types_pb2
from tests.fixtures.mesh import TESTAPP, MeshFactory, deploy_testapp
from tests.helpers import assert_eventually

APP = "testapp"
STREAM_TIMEOUT = 120
"""Seconds a test waits for the next message of a watch: a loaded machine is slow."""


async def next_message(
    messages: AsyncIterator[apiserver_pb2.WatchTasksResponse],
) -> apiserver_pb2.WatchTasksResponse:
    async with asyncio.timeout(STREAM_TIMEOUT):
        return await anext(messages)


async def test_watch_over_grpc_gives_the_snapshot_then_every_change(
    mesh_factory: MeshFactory,
) -> None:
    """WatchTasks sends the tasks that exist, then `snapshot_end`, then a task created
    afterwards and each of its status changes (QUEUED, RUNNING, then CANCELLED once it is
    cancelled); cancelling the call ends the server's watch of the deployment."""
    server = await mesh_factory(deploy=(TESTAPP,))
    mesh = server.mesh
    before = await mesh.run_task(APP, service_id="echo", session_id=None, input={"message": "a"})

    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = apiserver_pb2_grpc.ApiServerStub(channel)
        call = stub.WatchTasks(apiserver_pb2.WatchTasksRequest(deployment=APP))
        messages = aiter(call)
        first = await next_message(messages)
        assert (first.task.task_id, first.task.status) == (
            before.task_id,
            types_pb2.TASK_STATUS_SUCCEEDED,
        )
        end = await next_message(messages)
        assert end.snapshot_end and not end.HasField("task")
        assert mesh.watcher.watching == 1

        created = await mesh.create_task(
            APP, service_id="slow", session_id=None, input={"seconds": 3600}
        )

        async def statuses_until(last: int) -> list[int]:
            statuses: list[int] = []
            while last not in statuses:
                message = await next_message(messages)
                assert message.task.task_id == created.task_id
                assert not message.deleted and not message.snapshot_end
                statuses.append(message.task.status)
            return statuses

        assert (await statuses_until(types_pb2.TASK_STATUS_RUNNING))[0] == (
            types_pb2.TASK_STATUS_QUEUED
        )
        await mesh.cancel_task(APP, created.task_id, "enough")
        await statuses_until(types_pb2.TASK_STATUS_CANCELLED)

        call.cancel()
    await assert_eventually(lambda: mesh.watcher.watching == 0, timeout=STREAM_TIMEOUT)


async def test_watch_reports_a_deleted_task(mesh_factory: MeshFactory) -> None:
    """Deleting the deployment deletes its tasks: the watch reports each as `deleted`,
    with its ids."""
    server = await mesh_factory(deploy=(TESTAPP,))
    mesh = server.mesh
    task = await mesh.run_task(APP, service_id="echo", session_id=None, input={})
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = apiserver_pb2_grpc.ApiServerStub(channel)
        call = stub.WatchTasks(apiserver_pb2.WatchTasksRequest(deployment=APP))
        messages = aiter(call)
        while not (await next_message(messages)).snapshot_end:
            pass
        await mesh.deployments.delete(APP)
        gone = await next_message(messages)
        assert gone.deleted
        assert (gone.task.deployment, gone.task.task_id) == (APP, task.task_id)
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await next_message(messages)
        assert ended.value.code() == grpc.StatusCode.NOT_FOUND
        assert "was deleted" in (ended.value.details() or "")
    assert mesh.watcher.watching == 0


async def test_deleting_a_deployment_ends_the_waits_for_its_queued_tasks(
    mesh_factory: MeshFactory,
) -> None:
    """A task still queued (its message is its only record) when its deployment is deleted:
    a caller waiting for its result or streaming its events gets NOT_FOUND rather than
    waiting forever or an end without a final event, and the deployment's watch reports it
    deleted, then ends."""
    server = await mesh_factory(deploy=(TESTAPP,))
    mesh = server.mesh
    await mesh.deployments.supervisor.stop(APP)
    queued = await mesh.create_task(APP, service_id="echo", session_id=None, input={})
    watch = mesh.watch_tasks(APP)
    assert (await anext(watch)) is not None  # the queued task
    assert (await anext(watch)) is None  # the end of the snapshot
    waiting = asyncio.create_task(mesh.wait_task(APP, queued.task_id))

    async def stream() -> list[object]:
        return [event async for event in mesh.stream_events(APP, queued.task_id)]

    streaming = asyncio.create_task(stream())
    await assert_eventually(lambda: mesh.watcher.following == 2)
    await mesh.deployments.delete(APP)
    with pytest.raises(NotFoundError, match="was deleted"):
        await asyncio.wait_for(waiting, STREAM_TIMEOUT)
    with pytest.raises(NotFoundError, match="was deleted"):
        await asyncio.wait_for(streaming, STREAM_TIMEOUT)
    gone = await anext(watch)
    assert gone is not None and (gone.task_id, gone.task) == (queued.task_id, None)
    with pytest.raises(NotFoundError, match="was deleted"):
        await anext(watch)


async def test_watch_of_an_unknown_deployment_is_not_found(mesh_factory: MeshFactory) -> None:
    """WatchTasks of a deployment that does not exist ends at once with NOT_FOUND."""
    server = await mesh_factory()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = apiserver_pb2_grpc.ApiServerStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async with asyncio.timeout(STREAM_TIMEOUT):
                async for _ in stub.WatchTasks(apiserver_pb2.WatchTasksRequest(deployment="no")):
                    pass
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert server.mesh.watcher.watching == 0


async def sse_frames(response: httpx.Response) -> AsyncIterator[dict[str, object]]:
    """The JSON of each `data:` frame of a Server-Sent Events response."""
    buffer = ""
    async for chunk in response.aiter_text():
        buffer += chunk
        while "\n\n" in buffer:
            frame, buffer = buffer.split("\n\n", 1)
            assert frame.startswith("data: "), frame
            yield json.loads(frame.removeprefix("data: "))


async def test_watch_through_the_gateway_is_server_sent_events(
    mesh_factory: MeshFactory,
) -> None:
    """GET /v1/deployments/{name}/tasks:watch is text/event-stream: the snapshot's end, a
    task created by POST after the watch began, and its status changes (up to CANCELLED
    after a cancel) each arrive as a `data: {json}` frame; closing the connection ends the
    server's watch."""
    server = await mesh_factory(gateway=True, deploy=(TESTAPP,))
    assert server.gateway_url is not None
    async with httpx.AsyncClient(base_url=server.gateway_url, timeout=STREAM_TIMEOUT) as http:
        path = f"/v1/deployments/{APP}/tasks:watch"
        async with http.stream("GET", path) as response:
            assert response.status_code == 200
            assert response.headers["content-type"] == "text/event-stream"
            frames = sse_frames(response)
            async with asyncio.timeout(STREAM_TIMEOUT):
                assert await anext(frames) == {"snapshot_end": True, "deleted": False}
            created = await http.post(
                f"/v1/deployments/{APP}/tasks",
                json={"service_id": "slow", "input": {"seconds": 3600}},
            )
            assert created.status_code == 200, created.text
            task_id = created.json()["task"]["task_id"]

            async def statuses_until(last: str) -> list[object]:
                statuses: list[object] = []
                async with asyncio.timeout(STREAM_TIMEOUT):
                    while last not in statuses:
                        frame = await anext(frames)
                        task = frame["task"]
                        assert isinstance(task, dict) and task["task_id"] == task_id
                        statuses.append(task["status"])
                return statuses

            assert (await statuses_until("TASK_STATUS_RUNNING"))[0] == "TASK_STATUS_QUEUED"
            cancelled = await http.post(f"/v1/deployments/{APP}/tasks/{task_id}:cancel", json={})
            assert cancelled.status_code == 200, cancelled.text
            await statuses_until("TASK_STATUS_CANCELLED")
            assert server.mesh.watcher.watching == 1
    await assert_eventually(lambda: server.mesh.watcher.watching == 0, timeout=STREAM_TIMEOUT)


async def services_by_id(server: MeshServer) -> dict[str, dict[str, object]]:
    assert server.gateway_url is not None
    async with httpx.AsyncClient(base_url=server.gateway_url, timeout=STREAM_TIMEOUT) as http:
        response = await http.get(f"/v1/deployments/{APP}/services")
    assert response.status_code == 200, response.text
    return {service["id"]: service for service in response.json()["services"]}


async def test_queue_depth_counts_tasks_waiting_for_a_service_without_replicas(
    nats_server: NatsServer, mesh_factory: MeshFactory
) -> None:
    """With the deployment's replicas stopped, tasks created for `echo` wait in its queue:
    the service's `queue_depth` (JSON through the gateway, and the SDK's `Service`) counts
    them, other services
    show 0, and once the replicas are back the queue drains to 0."""
    server = await mesh_factory(queue="nats", nats_url=nats_server.url, gateway=True)
    await deploy_testapp(server, "echo", "stream")
    mesh = server.mesh
    assert (await services_by_id(server))["echo"]["queue_depth"] == 0
    await mesh.deployments.supervisor.stop(APP)

    async def no_echo_replica() -> bool:
        return not await mesh.cp.list_instances(APP, "echo")

    await assert_eventually(no_echo_replica, timeout=STREAM_TIMEOUT)
    tasks = [
        await mesh.create_task(APP, service_id="echo", session_id=None, input={"message": str(n)})
        for n in range(3)
    ]
    services = await services_by_id(server)
    assert services["echo"]["queue_depth"] == 3
    async with AsyncClient(f"127.0.0.1:{server.grpc_port}") as client:
        sdk = {s.id: s for s in await client.services.list(APP)}
    assert (sdk["echo"].queue_depth, sdk["stream"].queue_depth) == (3, 0)
    assert services["echo"]["healthy"] is False
    assert services["stream"]["queue_depth"] == 0

    await mesh.deployments.reload(APP)
    for task in tasks:
        done = await asyncio.wait_for(mesh.wait_task(APP, task.task_id), STREAM_TIMEOUT)
        assert done.status is TaskStatus.SUCCEEDED

    async def drained() -> bool:
        return (await services_by_id(server))["echo"]["queue_depth"] == 0

    await assert_eventually(drained, timeout=STREAM_TIMEOUT)
