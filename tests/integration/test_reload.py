"""A reload is all or nothing: a failed one leaves the running version serving, unchanged,
and stored, so that a restarted server brings it back. Real nats-server, worker processes
and Envoy; reloads through the 0.8 route and ``/v1``."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from llama_mesh.server.app import MeshServer
from llama_mesh.server.domain import DeploymentStatus
from llama_mesh.server.errors import FailedPreconditionError
from llama_mesh.server.nats_server import NatsServer
from tests.fixtures.mesh import MeshFactory

NAME = "reloadable"
TASK_TIMEOUT = 90.0
"""Seconds a task may take before the test calls it hung (a stopped service never answers)."""

YAML = """\
name: reloadable
services:
  a:
    name: A
    source: {type: local, name: .}
    path: wf:a
  b:
    name: B
    source: {type: local, name: .}
    path: wf:%(b_path)s
"""

MODULE = """\
from workflows import Workflow, step
from workflows.events import StartEvent, StopEvent


class Tagged(Workflow):
    tag = ""

    @step
    async def run_it(self, ev: StartEvent) -> StopEvent:
        return StopEvent(result=f"%(version)s:{self.tag}")


class A(Tagged):
    tag = "a"


class B(Tagged):
    tag = "b"


a = A(timeout=60)
b = B(timeout=60)
"""


def write_app(directory: Path, version: str, b_path: str = "b") -> bytes:
    """A two-service deployment whose services answer ``"<version>:<service>"``."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "wf.py").write_text(MODULE % {"version": version})
    config = (YAML % {"b_path": b_path}).encode()
    (directory / "deployment.yml").write_bytes(config)
    return config


async def start(
    mesh_factory: MeshFactory, nats_server: NatsServer, data_dir: Path
) -> tuple[MeshServer, httpx.AsyncClient]:
    server = await mesh_factory(
        queue="nats", nats_url=nats_server.url, gateway=True, data_dir=data_dir
    )
    assert server.gateway_url is not None
    await server.wait_restored()  # a restarted server brings deployments back in the background
    return server, httpx.AsyncClient(base_url=server.gateway_url, timeout=TASK_TIMEOUT + 60)


async def create(http: httpx.AsyncClient, config: bytes, base_path: Path | str) -> httpx.Response:
    """The 0.8 ``POST /deployments/create?reload=true`` of ``config``."""
    return await http.post(
        "/deployments/create",
        files={"config_file": ("deployment.yml", config)},
        params={"reload": True, "base_path": str(base_path), "local": True},
    )


async def results(http: httpx.AsyncClient) -> dict[str, Any]:
    """What each service answers now (through the 0.8 ``tasks/run``), within a bound."""
    answers = {}
    async with asyncio.timeout(TASK_TIMEOUT):
        for service in ("a", "b"):
            body = {"input": json.dumps({}), "service_id": service}
            reply = await http.post(f"/deployments/{NAME}/tasks/run", json=body)
            assert reply.status_code == 200, reply.text
            answers[service] = reply.json()
    return answers


def pids(server: MeshServer) -> dict[str, list[int]]:
    return {s: sorted(server.supervisor.pids(NAME, s)) for s in ("a", "b")}


async def test_failed_reloads_over_the_0_8_route_keep_the_old_version(
    mesh_factory: MeshFactory, nats_server: NatsServer, tmp_path: Path
) -> None:
    """A reload with a base_path that does not exist, and one with a typo in one service's
    path, both fail with a 4xx naming the problem; the old workers keep running (same
    processes), tasks of every service still run on the old version, the stored record is
    unchanged, and after a restart of the server the old version is what comes back. A good
    reload afterwards does replace it (so the checks above could have seen a change)."""
    v1 = write_app(tmp_path / "v1", "v1")
    server, http = await start(mesh_factory, nats_server, tmp_path / "data")
    async with http:
        created = await create(http, v1, tmp_path / "v1")
        assert created.status_code == 200, created.text
        assert await results(http) == {"a": "v1:a", "b": "v1:b"}
        before = pids(server)
        stored = await server.mesh.cp.get_deployment(NAME)

        missing = await create(http, v1, tmp_path / "missing")
        assert 400 <= missing.status_code < 500, missing.text
        assert "does not exist" in missing.text
        typo = write_app(tmp_path / "v2", "v2", b_path="bb")
        mistyped = await create(http, typo, tmp_path / "v2")
        assert 400 <= mistyped.status_code < 500, mistyped.text
        assert "'bb'" in mistyped.text

        assert await results(http) == {"a": "v1:a", "b": "v1:b"}
        assert pids(server) == before
        kept = await server.mesh.cp.get_deployment(NAME)
        assert (kept.config_yaml, kept.base_path, kept.generation, kept.status) == (
            stored.config_yaml,
            stored.base_path,
            stored.generation,
            DeploymentStatus.READY,
        )
    await server.shutdown()

    server, http = await start(mesh_factory, nats_server, tmp_path / "data")
    async with http:
        assert await results(http) == {"a": "v1:a", "b": "v1:b"}
        good = write_app(tmp_path / "v2", "v2")
        replaced = await create(http, good, tmp_path / "v2")
        assert replaced.status_code == 200, replaced.text
        assert await results(http) == {"a": "v2:a", "b": "v2:b"}
        now = await server.mesh.cp.get_deployment(NAME)
        assert now.base_path == str(tmp_path / "v2") and now.generation > stored.generation


async def test_a_failed_v1_reload_keeps_the_old_version(
    mesh_factory: MeshFactory, nats_server: NatsServer, tmp_path: Path
) -> None:
    """``POST /v1/deployments/{name}:reload`` of a deployment whose module no longer imports
    fails with a 4xx quoting the import error, before any old worker stops: tasks still run
    on the old version and the stored generation is unchanged, also after a restart."""
    app = tmp_path / "app"
    write_app(app, "v1")
    server, http = await start(mesh_factory, nats_server, tmp_path / "data")
    async with http:
        await server.deploy_file(app / "deployment.yml")
        before, stored = pids(server), await server.mesh.cp.get_deployment(NAME)
        (app / "wf.py").write_text('raise RuntimeError("half-edited module")\n')

        failed = await http.post(f"/v1/deployments/{NAME}:reload", json={})
        assert 400 <= failed.status_code < 500, failed.text
        assert "half-edited module" in failed.text

        assert await results(http) == {"a": "v1:a", "b": "v1:b"}
        assert pids(server) == before
        assert (await server.mesh.cp.get_deployment(NAME)).generation == stored.generation
    await server.shutdown()

    write_app(app, "v1")
    server, http = await start(mesh_factory, nats_server, tmp_path / "data")
    async with http:
        assert await results(http) == {"a": "v1:a", "b": "v1:b"}
        assert (await server.mesh.cp.get_deployment(NAME)).generation == stored.generation


async def test_a_failed_in_process_reload_keeps_the_old_version(
    mesh_factory: MeshFactory, tmp_path: Path
) -> None:
    """With workers inside the server (in-process queue) a reload is all or nothing too:
    a typo in one service's path fails it naming the path, tasks still run on the old
    version and the record stays; a good reload then replaces it."""
    server = await mesh_factory()
    deployments = server.mesh.deployments
    v1 = write_app(tmp_path / "v1", "v1")
    await deployments.create(v1, base_path=str(tmp_path / "v1"), reload=False, local=True)
    stored = await server.mesh.cp.get_deployment(NAME)
    typo = write_app(tmp_path / "v2", "v2", b_path="bb")
    with pytest.raises(FailedPreconditionError, match="'bb'"):
        await deployments.create(typo, base_path=str(tmp_path / "v2"), reload=True, local=True)

    async def run(service: str) -> Any:
        async with asyncio.timeout(TASK_TIMEOUT):
            task = await server.mesh.run_task(NAME, service_id=service, session_id=None, input={})
        return task.result

    assert (await run("a"), await run("b")) == ("v1:a", "v1:b")
    assert (await server.mesh.cp.get_deployment(NAME)).generation == stored.generation
    good = write_app(tmp_path / "v3", "v3")
    await deployments.create(good, base_path=str(tmp_path / "v3"), reload=True, local=True)
    assert (await run("a"), await run("b")) == ("v3:a", "v3:b")
