"""Deployments whose ``message-queue`` names Redis run there, end to end, on a real
redis-server (one for the module, with a password; ~1 s to start).

Needs the ``redis`` extra (``llama_mesh.server.queues.redis``): without it these deploys fail
for the missing extra. In-process replicas (~1 s), then worker processes handed the broker
through their environment (a NATS server and a replica process, ~5 s).
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from collections.abc import Iterator

import pytest

from tests.fixtures.mesh import BROKERED, MeshFactory, assert_runs_there, deploy, free_port

PASSWORD = "redis-secret"


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A redis-server on a free 127.0.0.1 port that wants ``PASSWORD``; its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    work = tmp_path_factory.mktemp("redis")
    argv = [binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(work)]
    argv += ["--save", "", "--appendonly", "no", "--requirepass", PASSWORD]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        # Redis says so on its log (stdout) once it accepts connections; it ends the log
        # when it exits instead.
        for line in process.stdout:
            if "Ready to accept connections" in line:
                break
        else:
            pytest.fail(f"redis-server on port {port} exited with {process.wait()}")
        # Keep reading its log, so that a full pipe never stalls it.
        threading.Thread(target=process.stdout.read, daemon=True).start()
        yield f"redis://:{PASSWORD}@127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=30)


def redis_section(url: str) -> str:
    return BROKERED.format(queue=f"message-queue: {{type: redis, url: '{url}'}}\n")


async def test_a_deployment_on_redis_runs_its_tasks_there(
    mesh_factory: MeshFactory, redis_url: str
) -> None:
    """Its tasks go over Redis (not the server's own broker), its 0.8 queue config names
    Redis without the password, and deleting it closes that broker."""
    server = await mesh_factory()
    await assert_runs_there(server, redis_section(redis_url), kind="redis", password=PASSWORD)


async def test_worker_processes_are_handed_the_deployments_broker(
    mesh_factory: MeshFactory, redis_url: str
) -> None:
    """A replica process takes the deployment's tasks from Redis: the server hands it the
    broker, credentials included, through its environment."""
    server = await mesh_factory(queue="nats")
    await deploy(server, redis_section(redis_url))
    task = await server.mesh.run_task(
        "brokered", service_id="echo", session_id=None, input={"message": "in a process"}
    )
    assert task.result == "echo: in a process"
