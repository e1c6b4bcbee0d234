"""What does not fit in one message of a real nats-server: the task fails once, with an
error that names the size and the limit, instead of being redelivered until it runs out
of retries; an input that does not fit is refused at once."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from llama_mesh.client import AsyncClient, InvalidArgumentError, TaskFailedError, TaskStatus
from llama_mesh.server.nats_server import NatsServer, NatsServerConfig
from tests.fixtures.mesh import TESTAPP, running_mesh

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

MAX_PAYLOAD = 256 * 1024
"""The nats-server's message limit here: small, so that what exceeds it stays small."""
ECHO_YAML = """\
name: limits
default-service: echo
services:
  echo:
    name: Echo
    source: {type: local, name: .}
    path: app_workflows:echo
    max-retries: 2
"""


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def client(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[AsyncClient]:
    """A client of a mesh whose nats-server takes messages of at most MAX_PAYLOAD bytes,
    shared by the module's tests (each runs its own tasks; the worker outlives them)."""
    store: Path = tmp_path_factory.mktemp("message-limits")
    config = NatsServerConfig(store_dir=store / "nats", max_payload=str(MAX_PAYLOAD))
    async with (
        await NatsServer.start(config) as nats_server,
        running_mesh(store / "mesh", queue="nats", nats_url=nats_server.url) as server,
    ):
        await server.mesh.deployments.create(
            ECHO_YAML, base_path=str(TESTAPP.parent), reload=False, local=True
        )
        async with AsyncClient(f"127.0.0.1:{server.grpc_port}") as client:
            yield client


def sizes(message: str) -> tuple[int, int]:
    """The size and the limit an error message names."""
    found = re.search(r"is (\d+) bytes, .* limit of (\d+) bytes \(NATS max_payload\)", message)
    assert found, message
    return int(found[1]), int(found[2])


async def test_result_over_the_message_limit_fails_once(client: AsyncClient) -> None:
    """A workflow whose result does not fit in one NATS message ends FAILED on its first
    attempt, its error naming the size and the limit (not MaxRetriesExceeded after every
    retry); the worker is fine and runs the next task."""
    with pytest.raises(TaskFailedError) as info:
        await client.run("limits", message="x" * 1000, repeat=400)
    task = info.value.task
    assert (task.status, task.attempts) == (TaskStatus.FAILED, 1)
    assert task.error is not None and task.error.type == "MessageTooLarge"
    size, limit = sizes(task.error.message)
    assert size > 400_000 and MAX_PAYLOAD - 4096 < limit < MAX_PAYLOAD
    assert await client.run("limits", message="small") == "echo: small"


async def test_event_over_the_message_limit_fails_once(client: AsyncClient) -> None:
    """An event too large to publish fails its task on the first attempt, naming sizes."""
    with pytest.raises(TaskFailedError) as info:
        await client.run("limits", message="x" * 1000, repeat=400, as_event=True)
    task = info.value.task
    assert (task.status, task.attempts) == (TaskStatus.FAILED, 1)
    assert task.error is not None and task.error.type == "MessageTooLarge"
    assert sizes(task.error.message)[0] > 400_000


async def test_input_over_the_message_limit_is_refused(client: AsyncClient) -> None:
    """An input under the API's own limit but over the broker's is refused at once as
    invalid, naming the limit, not left to fail as 'unavailable'."""
    with pytest.raises(InvalidArgumentError) as info:
        await client.tasks.create("limits", {"message": "x" * 300_000})
    assert sizes(str(info.value))[1] < MAX_PAYLOAD
