"""Deployments whose ``message-queue`` names Redis run there, end to end, on the session's
real redis-server (``tests/fixtures/redis.py``; it wants a password).

Needs the ``redis`` extra (``llama_mesh.server.queues.redis``): without it these deploys fail
for the missing extra. In-process replicas (~1 s), then worker processes handed the broker
through their environment (a NATS server and a replica process, ~5 s).
"""

from __future__ import annotations

from tests.fixtures.mesh import BROKERED, MeshFactory, assert_runs_there, deploy
from tests.fixtures.redis import RedisServer


def redis_section(server: RedisServer) -> str:
    return BROKERED.format(queue=f"message-queue: {{type: redis, url: '{server.url}'}}\n")


async def test_a_deployment_on_redis_runs_its_tasks_there(
    mesh_factory: MeshFactory, redis_server: RedisServer
) -> None:
    """Its tasks go over Redis (not the server's own broker), its 0.8 queue config names
    Redis without the password, and deleting it closes that broker."""
    assert redis_server.password is not None
    server = await mesh_factory()
    section = redis_section(redis_server)
    await assert_runs_there(server, section, kind="redis", password=redis_server.password)


async def test_worker_processes_are_handed_the_deployments_broker(
    mesh_factory: MeshFactory, redis_server: RedisServer
) -> None:
    """A replica process takes the deployment's tasks from Redis: the server hands it the
    broker, credentials included, through its environment."""
    server = await mesh_factory(queue="nats")
    await deploy(server, redis_section(redis_server))
    task = await server.mesh.run_task(
        "brokered", service_id="echo", session_id=None, input={"message": "in a process"}
    )
    assert task.result == "echo: in a process"
