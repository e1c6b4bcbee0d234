"""Deployment files Llama Deploy 0.8.1 accepted deploy here too, with warnings.

A real server (in-process queue and workers, the Envoy gateway): what the deploy progress
says, and how a task that needs a missing default service is answered on the 0.8 route,
on ``/v1`` and over gRPC.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest

from llama_mesh.client import AsyncClient, FailedPreconditionError
from llama_mesh.server.app import MeshServer
from tests.fixtures.mesh import TESTAPP, MeshFactory

APP_MODULE = TESTAPP.parent / "app_workflows.py"

DANGLING_DEFAULT = """\
name: dangling
control-plane:
  port: 8000
default-service: missing_one
services:
  echo:
    name: Echo
    source: {type: local, name: .}
    path: app_workflows:echo
  stream:
    name: Stream
    source: {type: local, name: .}
    path: app_workflows:stream
"""

KAFKA_QUEUE = """\
name: kafka_queue
message-queue:
  type: kafka
  url: kafka://localhost:9092
services:
  echo:
    name: Echo
    source: {type: local, name: .}
    path: app_workflows:echo
"""

NO_SERVICES = "name: empty\nservices: {}\n"


def write(directory: Path, text: str) -> Path:
    """A deployment folder with the testapp workflows and ``text`` as its YAML."""
    directory.mkdir(parents=True)
    shutil.copy(APP_MODULE, directory / "app_workflows.py")
    config = directory / "deployment.yml"
    config.write_text(text)
    return config


async def progress_lines(server: MeshServer, name: str) -> list[str]:
    """The lines of the deployment's latest deploy progress."""
    return [msg.line async for msg in server.mesh.deployments.progress(name)]


async def test_a_default_service_naming_no_service_deploys_and_tasks_needing_it_are_400(
    mesh_factory: MeshFactory, tmp_path: Path
) -> None:
    """The deploy succeeds with a warning in its progress naming the missing service; a
    task that names no service is refused naming it (HTTP 400 on the 0.8 route and /v1,
    FAILED_PRECONDITION over gRPC); a task naming a service runs."""
    server = await mesh_factory(gateway=True)
    await server.deploy_file(write(tmp_path / "d", DANGLING_DEFAULT))
    lines = await progress_lines(server, "dangling")
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(warnings) == 1
    assert "default-service: no service with id 'missing_one'" in warnings[0]
    assert lines[-1] == "ready"

    assert server.gateway_url is not None
    async with httpx.AsyncClient(base_url=server.gateway_url, timeout=30) as http:
        compat = await http.post("/deployments/dangling/tasks/run", json={"input": "{}"})
        assert compat.status_code == 400, compat.text
        assert "'missing_one'" in compat.json()["detail"]
        v1 = await http.post("/v1/deployments/dangling/tasks", json={})
        assert v1.status_code == 400, v1.text
        assert "'missing_one'" in v1.json()["message"]
        named = await http.post(
            "/deployments/dangling/tasks/run",
            json={"input": json.dumps({"message": "hi"}), "service_id": "echo"},
        )
        assert named.status_code == 200, named.text

    async with AsyncClient(f"127.0.0.1:{server.grpc_port}") as client:
        with pytest.raises(FailedPreconditionError, match="'missing_one'"):
            await client.tasks.create("dangling", {})


async def test_a_queue_type_the_server_does_not_run_deploys_with_a_warning(
    mesh_factory: MeshFactory, tmp_path: Path
) -> None:
    """message-queue type kafka (accepted by 0.8.1) deploys with a warning; its tasks run
    over the server's own broker."""
    server = await mesh_factory()
    await server.deploy_file(write(tmp_path / "k", KAFKA_QUEUE))
    lines = await progress_lines(server, "kafka_queue")
    assert any("does not run 'kafka' queues" in line for line in lines if "warning:" in line)
    async with AsyncClient(f"127.0.0.1:{server.grpc_port}") as client:
        assert await client.run("kafka_queue", message="hi") == "echo: hi"


async def test_a_deployment_without_services_deploys_with_a_warning(
    mesh_factory: MeshFactory, tmp_path: Path
) -> None:
    """``services: {}`` (accepted by 0.8.1) deploys at once with a warning; a task for it
    is refused as there is no service to run it."""
    server = await mesh_factory()
    await server.deploy_file(write(tmp_path / "e", NO_SERVICES))
    lines = await progress_lines(server, "empty")
    assert any("no services" in line for line in lines if line.startswith("warning:"))
    async with AsyncClient(f"127.0.0.1:{server.grpc_port}") as client:
        with pytest.raises(FailedPreconditionError, match="no default-service"):
            await client.tasks.create("empty", {})
