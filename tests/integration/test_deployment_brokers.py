"""A deployment's broker as the server opens it: a broker the server cannot run fails the
deploy (and the restore) with a reason, never a silent fallback; a bad ``--broker`` stops
the server from starting. In-process servers: ~1 s in all.

Deploys against unreachable RabbitMQ and Redis servers, which need the brokers' extras,
are in ``test_unreachable_brokers.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from llama_mesh.server.app import MeshServer, ServerSettings, StartupError
from llama_mesh.server.domain import DeploymentRecord, DeploymentStatus
from llama_mesh.server.errors import FailedPreconditionError
from tests.fixtures.mesh import BROKERED, TESTAPP, MeshFactory

RABBITMQ = "message-queue: {type: rabbitmq, url: 'amqp://user:secret@127.0.0.1:5672/'}\n"


def without_extra(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """This process as a server without the ``kind`` extra installed."""
    monkeypatch.setitem(sys.modules, f"llama_mesh.server.queues.{kind}", None)


async def test_a_deploy_naming_a_broker_without_its_extra_fails_with_the_fix(
    mesh_factory: MeshFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deploy fails (not onto the server's own broker), listed FAILED with a reason
    naming the pip install that helps; the server's other deployments run on."""
    without_extra(monkeypatch, "rabbitmq")
    server = await mesh_factory(deploy=(TESTAPP,))
    with pytest.raises(FailedPreconditionError, match=r"pip install 'llama-mesh\[rabbitmq\]'"):
        await server.mesh.deployments.create(
            BROKERED.format(queue=RABBITMQ),
            base_path=str(TESTAPP.parent),
            reload=False,
            local=True,
        )
    record = await server.mesh.cp.get_deployment("brokered")
    assert record.status is DeploymentStatus.FAILED
    assert "llama-mesh[rabbitmq]" in record.status_message
    assert "secret" not in record.status_message
    task = await server.mesh.run_task(
        "testapp", service_id="echo", session_id=None, input={"message": "on"}
    )
    assert task.result == "echo: on"
    await server.mesh.deployments.delete("brokered")


async def test_a_reload_onto_a_broker_that_cannot_be_opened_keeps_the_old_version(
    mesh_factory: MeshFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reload is all or nothing, its broker included: the running version keeps serving
    on its broker."""
    without_extra(monkeypatch, "rabbitmq")
    server = await mesh_factory()
    deployments = server.mesh.deployments
    base = str(TESTAPP.parent)
    await deployments.create(BROKERED.format(queue=""), base_path=base, reload=False, local=True)
    with pytest.raises(FailedPreconditionError, match=r"llama-mesh\[rabbitmq\]"):
        await deployments.create(
            BROKERED.format(queue=RABBITMQ), base_path=base, reload=True, local=True
        )
    last = [line.line async for line in deployments.progress("brokered")][-1]
    assert last.startswith("reload failed, generation 1 keeps serving: ")
    record = await server.mesh.cp.get_deployment("brokered")
    assert (record.status, record.generation) == (DeploymentStatus.READY, 1)
    assert server.mesh.brokers.of("brokered") is server.broker
    task = await server.mesh.run_task(
        "brokered", service_id="echo", session_id=None, input={"message": "still"}
    )
    assert task.result == "echo: still"


async def test_a_restore_whose_broker_cannot_be_opened_lists_the_deployment_failed(
    mesh_factory: MeshFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A saved deployment whose broker cannot be opened at startup is listed FAILED with
    the reason (the failed-deployment mechanism), refusing tasks with it."""
    without_extra(monkeypatch, "redis")
    server = await mesh_factory()
    queue = "message-queue: {type: redis, url: 'redis://:secret@127.0.0.1:6379/0'}\n"
    saved = DeploymentRecord(
        name="brokered",
        config_yaml=BROKERED.format(queue=queue),
        base_path=str(TESTAPP.parent),
        local=True,
    )
    await server.mesh.cp.put_deployment(saved)
    deployments = server.mesh.deployments
    await deployments.restore(await deployments.recall())

    record = await server.mesh.cp.get_deployment("brokered")
    assert record.status is DeploymentStatus.FAILED
    assert "llama-mesh[redis]" in record.status_message
    with pytest.raises(FailedPreconditionError, match=r"llama-mesh\[redis\]") as refused:
        await server.mesh.create_task("brokered", service_id=None, session_id=None, input={})
    assert refused.value.reason == "DEPLOYMENT_FAILED"


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://127.0.0.1:5672/", r"'http' is not a broker URL \(amqp://"),
        ("amqp://user:secret@127.0.0.1:5672/", r"pip install 'llama-mesh\[rabbitmq\]'"),
    ],
    ids=["scheme", "extra"],
)
async def test_a_default_broker_the_server_cannot_run_stops_it_from_starting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str, problem: str
) -> None:
    """``serve --broker`` is checked at start, not at the first deploy."""
    without_extra(monkeypatch, "rabbitmq")

    settings = ServerSettings(data_dir=tmp_path, queue="inprocess", gateway=False, broker_url=url)
    with pytest.raises(StartupError, match=problem):
        await MeshServer.start(settings)
