"""``WorkflowService``: a workflow object served from this process joins a running mesh.

A real server (external nats-server, worker processes, the Envoy gateway) with testapp
deployed; the test process serves its own workflow object as the ``echo`` service. The
server's own ``echo`` replicas are stopped first, so every task must reach this process.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from workflows import Workflow, step
from workflows.events import StartEvent, StopEvent

from llama_mesh.server import WorkflowService
from llama_mesh.server.app import MeshServer
from llama_mesh.server.errors import InvalidArgumentError, MeshError
from llama_mesh.server.nats_server import NatsServer
from tests.fixtures.mesh import MeshFactory, deploy_testapp
from tests.helpers import assert_eventually

APP = "testapp"


class Here(Workflow):
    """Answers from the test process."""

    @step
    async def answer(self, ev: StartEvent) -> StopEvent:
        return StopEvent(result=f"served here: {ev.get('message', '')}")


def test_the_server_package_exports_workflow_service() -> None:
    """``llama_mesh.server`` exports exactly its public API, WorkflowService."""
    import llama_mesh.server

    assert llama_mesh.server.__all__ == ["WorkflowService"]
    assert llama_mesh.server.WorkflowService is WorkflowService
    with pytest.raises(AttributeError):
        llama_mesh.server.NoSuchThing  # noqa: B018


async def instance_ids(server: MeshServer, service: str) -> set[str]:
    return {i.instance_id for i in await server.mesh.cp.list_instances(APP, service)}


async def test_a_workflow_object_served_from_this_process_takes_the_services_tasks(
    nats_server: NatsServer, mesh_factory: MeshFactory
) -> None:
    """Connected with the NATS URL, the deployment and the service id, the object registers
    as a replica; tasks run through the gateway's 0.8 route reach it; leaving the ``async
    with`` deregisters it, and shutdown() stays idempotent while a second run() is refused."""
    server = await mesh_factory(queue="nats", nats_url=nats_server.url, gateway=True)
    await deploy_testapp(server, "echo")
    await server.supervisor.stop(APP)  # only this process serves the deployment now
    await assert_eventually(lambda: _no_echo_replicas(server), timeout=30)
    service = await WorkflowService.connect(
        Here(timeout=30), deployment=APP, service="echo", nats=nats_server.url
    )
    async with service:
        await assert_eventually(lambda: _registered(server, service.instance_id), timeout=30)
        assert service.address.startswith("127.0.0.1:")
        assert server.gateway_url is not None
        async with httpx.AsyncClient(base_url=server.gateway_url, timeout=60) as http:
            for message in ("one", "two", "three"):
                reply = await http.post(
                    f"/deployments/{APP}/tasks/run",
                    json={"input": json.dumps({"message": message}), "service_id": "echo"},
                )
                assert reply.status_code == 200, reply.text
                assert reply.json() == f"served here: {message}"
    assert service.instance_id not in await instance_ids(server, "echo")
    await service.shutdown()
    with pytest.raises(RuntimeError, match="runs once"):
        await service.run()


async def _no_echo_replicas(server: MeshServer) -> bool:
    return not await instance_ids(server, "echo")


async def _registered(server: MeshServer, instance_id: str) -> bool:
    return instance_id in await instance_ids(server, "echo")


async def test_connect_refuses_what_it_cannot_serve(
    nats_server: NatsServer, mesh_factory: MeshFactory, tmp_path: Path
) -> None:
    """An unknown deployment or service is a MeshError naming it; an object that is no
    workflow is an InvalidArgumentError; none of them joins the mesh."""
    server = await mesh_factory(queue="nats", nats_url=nats_server.url)
    await deploy_testapp(server, "echo")
    with pytest.raises(MeshError, match="deployment 'nope' does not exist"):
        await WorkflowService.connect(
            Here(), deployment="nope", service="echo", nats=nats_server.url
        )
    with pytest.raises(MeshError, match="service 'ech' is not in 'testapp'"):
        await WorkflowService.connect(Here(), deployment=APP, service="ech", nats=nats_server.url)
    with pytest.raises(InvalidArgumentError, match="not a workflow"):
        await WorkflowService.connect(
            object(), deployment=APP, service="echo", nats=[nats_server.url]
        )
    assert len(await instance_ids(server, "echo")) == 1  # the server's own replica only
