"""Deployments whose ``message-queue`` names RabbitMQ run there, end to end, on the session's
real rabbitmq-server (``tests/fixtures/rabbitmq.py``; its user has a password).

Needs the ``rabbitmq`` extra (``llama_mesh.server.queues.rabbitmq``). In-process replicas
(~1 s), then a worker process handed the broker through its environment (a NATS server and
a replica process, ~5 s). Each test names its own ``exchange_name``, so the queues of one
test never meet another's.
"""

from __future__ import annotations

import uuid

from tests.fixtures.mesh import BROKERED, MeshFactory, assert_runs_there, deploy
from tests.fixtures.rabbitmq import RabbitMqServer


def rabbitmq_section(server: RabbitMqServer) -> str:
    """The brokered deployment on ``server``, its objects under a prefix of their own."""
    fields = f"type: rabbitmq, url: '{server.url}', exchange_name: e2e-{uuid.uuid4().hex}"
    return BROKERED.format(queue=f"message-queue: {{{fields}}}\n")


async def test_a_deployment_on_rabbitmq_runs_its_tasks_there(
    mesh_factory: MeshFactory, rabbitmq: RabbitMqServer
) -> None:
    """Its tasks go over RabbitMQ (not the server's own broker), its 0.8 queue config names
    RabbitMQ without the password, and deleting it closes that broker."""
    server = await mesh_factory()
    section = rabbitmq_section(rabbitmq)
    await assert_runs_there(server, section, kind="rabbitmq", password=rabbitmq.password)


async def test_worker_processes_are_handed_the_deployments_broker(
    mesh_factory: MeshFactory, rabbitmq: RabbitMqServer
) -> None:
    """A replica process takes the deployment's tasks from RabbitMQ: the server hands it the
    broker, credentials included, through its environment."""
    server = await mesh_factory(queue="nats")
    await deploy(server, rabbitmq_section(rabbitmq))
    task = await server.mesh.run_task(
        "brokered", service_id="echo", session_id=None, input={"message": "in a process"}
    )
    assert task.result == "echo: in a process"
