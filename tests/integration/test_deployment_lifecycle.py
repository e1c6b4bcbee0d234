"""Deployments that fail, restore after a restart, and services that keep crashing.

A deployment that fails is listed with its reason, can be deleted or reloaded, and does
not count against ``max_deployments``; a restart restores saved deployments in the
background (the server answers at once, each deployment is DEPLOYING until ready) and does
not re-run failed ones; a replica that keeps crashing is given up on, with its traceback.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import httpx
import pytest

from llama_mesh.server.apiserver.compat import LlamaDeployApiServicer
from llama_mesh.server.apiserver.servicer import ApiServerServicer
from llama_mesh.server.app import MeshServer
from llama_mesh.server.domain import DeploymentStatus
from llama_mesh.server.errors import (
    FailedPreconditionError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from llama_mesh.server.nats_server import NatsServer
from llama_mesh.v1 import llama_deploy_api_pb2, types_pb2
from tests.fixtures.mesh import MeshFactory
from tests.helpers import assert_eventually

# A workflow module that, at import, waits while the file $GATE is absent (a restore the
# test holds up) and raises while the file $CRASH exists (a service that cannot start).
MODULE = """\
import os
import time

from workflows import Workflow, step
from workflows.events import StartEvent, StopEvent

while os.environ.get("GATE") and not os.path.exists(os.environ["GATE"]):
    time.sleep(0.05)
if os.environ.get("CRASH") and os.path.exists(os.environ["CRASH"]):
    raise RuntimeError("the model file is missing")


class Echo(Workflow):
    @step
    async def run_it(self, ev: StartEvent) -> StopEvent:
        return StopEvent(result=ev.get("message"))


echo = Echo(timeout=60)
"""


def write_app(
    root: Path, name: str, *, source: str = "src", env: dict[str, Path] | None = None
) -> Path:
    """A deployment ``name`` under ``root/name`` with one service ``echo``; its file."""
    app = root / name
    (app / "src").mkdir(parents=True, exist_ok=True)
    (app / "src" / "app.py").write_text(MODULE)
    env_lines = "".join(f"      {k}: {str(v)!r}\n" for k, v in (env or {}).items())
    path = app / "deployment.yml"
    path.write_text(
        f"name: {name}\n"
        "services:\n"
        "  echo:\n"
        "    name: Echo\n"
        f"    source: {{type: local, name: {source}}}\n"
        f"    path: {source}/app:echo\n" + ("    env:\n" + env_lines if env_lines else "")
    )
    return path


async def described(server: MeshServer, name: str) -> types_pb2.Deployment:
    """The deployment as `/v1` and llamactl show it."""
    servicer = ApiServerServicer(server.mesh, queue_kind=server.settings.queue)
    return await servicer.deployment_proto(await server.mesh.cp.get_deployment(name))


async def test_a_deployment_that_fails_to_create_is_listed_failed_and_can_be_deleted(
    mesh_factory: MeshFactory, tmp_path: Path
) -> None:
    """A create that fails (its source is missing) leaves the deployment listed as FAILED
    with the reason (in /v1 and in the 0.8 list), refusing new tasks with that reason but
    answering reads; delete then forgets it."""
    server = await mesh_factory()
    bad = write_app(tmp_path, "nosource", source="missing")
    with pytest.raises(FailedPreconditionError):
        await server.deploy_file(bad)

    deployments = server.mesh.deployments
    assert deployments.names() == ["nosource"]
    shown = await described(server, "nosource")
    assert shown.status == types_pb2.DEPLOYMENT_STATUS_FAILED
    assert "missing" in shown.status_message and "does not exist" in shown.status_message
    compat = LlamaDeployApiServicer(server.mesh)
    listed = await compat.ListDeployments(
        llama_deploy_api_pb2.LlamaDeployApiListDeploymentsRequest(),
        None,
    )
    assert b'"nosource"' in listed.body.data
    with pytest.raises(FailedPreconditionError, match="does not exist") as refused:
        await server.mesh.create_task("nosource", service_id=None, session_id=None, input={})
    assert refused.value.reason == "DEPLOYMENT_FAILED"
    assert await server.mesh.list_tasks("nosource") == []  # reads still answer

    await deployments.delete("nosource")
    assert deployments.names() == []
    with pytest.raises(NotFoundError):
        await server.mesh.cp.get_deployment("nosource")


async def test_failed_deployments_do_not_count_against_max_deployments(
    mesh_factory: MeshFactory, tmp_path: Path
) -> None:
    """With room for one deployment, a failed one leaves that room free; the refusal of a
    second working one names the option to raise."""
    server = await mesh_factory(max_deployments=1)
    with pytest.raises(FailedPreconditionError):
        await server.deploy_file(write_app(tmp_path, "broken", source="missing"))
    await server.deploy_file(write_app(tmp_path, "first"))
    with pytest.raises(ResourceExhaustedError, match="--max-deployments"):
        await server.deploy_file(write_app(tmp_path, "second"))


async def test_a_failed_deployment_is_reloaded_once_fixed(
    mesh_factory: MeshFactory, tmp_path: Path
) -> None:
    """Reloading a failed deployment after fixing its cause brings it up; its tasks run."""
    server = await mesh_factory()
    path = write_app(tmp_path, "later", source="late")
    with pytest.raises(FailedPreconditionError):
        await server.deploy_file(path)
    (path.parent / "late").mkdir()
    (path.parent / "late" / "app.py").write_text(MODULE)

    record = await server.mesh.deployments.reload("later")

    assert record.status is DeploymentStatus.READY
    task = await server.mesh.run_task(
        "later", service_id=None, session_id=None, input={"message": "hi"}
    )
    assert task.result == "hi"


async def test_a_service_that_raises_at_import_fails_its_deploy_with_the_traceback(
    nats_server: NatsServer, mesh_factory: MeshFactory, tmp_path: Path
) -> None:
    """The deploy error of a worker whose module raises at import carries the traceback,
    down to the line of the service's code that raised, and so does its log."""
    crash = tmp_path / "crash"
    crash.touch()
    server = await mesh_factory(queue="nats", nats_url=nats_server.url)
    with pytest.raises(FailedPreconditionError) as failed:
        await server.deploy_file(write_app(tmp_path, "crashy", env={"CRASH": crash}))
    message = failed.value.message
    assert "Traceback (most recent call last)" in message
    assert 'raise RuntimeError("the model file is missing")' in message
    assert "RuntimeError: the model file is missing" in message
    shown = await described(server, "crashy")
    assert 'raise RuntimeError("the model file is missing")' in shown.status_message
    log = server.settings.data_dir / "logs" / "crashy" / "echo-0.log"
    assert "Traceback (most recent call last)" in log.read_text()


async def test_a_replica_that_keeps_crashing_is_given_up_on_with_its_traceback(
    nats_server: NatsServer, mesh_factory: MeshFactory, tmp_path: Path
) -> None:
    """A replica that crashes at every restart is restarted a bounded number of times, then
    left stopped; its service shows the traceback and the deployment shows FAILED, until a
    reload (with the cause fixed) starts it again."""
    crash = tmp_path / "crash"
    server = await mesh_factory(
        queue="nats",
        nats_url=nats_server.url,
        deploy=(write_app(tmp_path, "flaky", env={"CRASH": crash}),),
    )
    supervisor = server.supervisor
    supervisor.restart_backoff = (0.05,)  # type: ignore[attr-defined]
    supervisor.max_crash_loops = 3  # type: ignore[attr-defined]
    crash.touch()
    (pid,) = supervisor.pids("flaky", "echo")
    os.kill(pid, 9)

    await assert_eventually(lambda: supervisor.failure("flaky", "echo"), timeout=90, interval=0.2)

    shown = await described(server, "flaky")
    assert shown.status == types_pb2.DEPLOYMENT_STATUS_FAILED
    (service,) = shown.services
    assert "exited 3 times in a row" in service.failure
    assert 'raise RuntimeError("the model file is missing")' in service.failure
    assert supervisor.pids("flaky", "echo") == []
    log = server.settings.data_dir / "logs" / "flaky" / "echo-0.log"
    assert "Traceback (most recent call last)" in log.read_text()

    crash.unlink()
    await server.mesh.deployments.reload("flaky")
    assert (await described(server, "flaky")).services[0].failure == ""


async def test_a_restart_answers_at_once_and_restores_in_the_background(
    nats_server: NatsServer, mesh_factory: MeshFactory, tmp_path: Path
) -> None:
    """After a restart the gateway answers before saved deployments are back: one still
    restoring is listed DEPLOYING, its tasks get UNAVAILABLE and /readyz is 503; once it is
    ready, tasks run and /readyz is 200. A deployment that had failed is listed FAILED at
    once and not deployed again."""
    gate = tmp_path / "gate"
    gate.touch()
    data_dir = tmp_path / "data"
    first = await mesh_factory(queue="nats", nats_url=nats_server.url, data_dir=data_dir)
    await first.deploy_file(write_app(tmp_path, "gated", env={"GATE": gate}))
    with pytest.raises(FailedPreconditionError):
        await first.deploy_file(write_app(tmp_path, "broken", source="missing"))
    broken_before = await first.mesh.cp.get_deployment("broken")
    await first.shutdown()
    gate.unlink()

    second = await mesh_factory(
        queue="nats", nats_url=nats_server.url, data_dir=data_dir, gateway=True
    )
    deployments = second.mesh.deployments
    assert deployments.names() == ["broken", "gated"]
    assert (await described(second, "gated")).status == types_pb2.DEPLOYMENT_STATUS_DEPLOYING
    assert (await described(second, "broken")).status == types_pb2.DEPLOYMENT_STATUS_FAILED
    with pytest.raises(UnavailableError, match="still deploying"):
        await second.mesh.create_task("gated", service_id=None, session_id=None, input={})
    assert second.gateway_url is not None
    async with httpx.AsyncClient(base_url=second.gateway_url, timeout=30) as http:
        assert (await http.get("/healthz")).json() == {"status": "ok"}
        waiting = await http.get("/readyz")
        assert waiting.status_code == 503
        assert "restored" in waiting.json()["message"]

        gate.touch()
        async with asyncio.timeout(90):
            await second.wait_restored()
        ready = await http.get("/readyz")
        assert ready.status_code == 200
        assert ready.json() == {"status": "ok", "deployments": 2}

    task = await second.mesh.run_task(
        "gated", service_id=None, session_id=None, input={"message": "back"}
    )
    assert task.result == "back"
    broken_after = await second.mesh.cp.get_deployment("broken")
    assert broken_after.updated_at == broken_before.updated_at  # not deployed again
    assert broken_after.status is DeploymentStatus.FAILED
