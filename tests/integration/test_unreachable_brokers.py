"""A deployment whose broker cannot be reached fails its deploy, naming the broker's URL
without its password; never a silent fallback to the server's own broker.

Needs the brokers' modules (the ``rabbitmq`` and ``redis`` extras): without them these
deploys fail earlier, for the missing extra (``test_deployment_brokers.py``). In-process
servers, a closed port on 127.0.0.1 as the broker: ~2 s in all.
"""

from __future__ import annotations

import pytest

from llama_mesh.server.domain import DeploymentStatus
from llama_mesh.server.errors import FailedPreconditionError
from llama_mesh.server.ports import free_port
from tests.fixtures.mesh import BROKERED, TESTAPP, MeshFactory

URLS = {
    "rabbitmq": "amqp://user:secret@127.0.0.1:{port}/",
    "redis": "redis://:secret@127.0.0.1:{port}/0",
}


async def failed_deploy(server_factory: MeshFactory, config_yaml: str, **settings: object) -> str:
    """Deploy ``config_yaml`` on a new in-process server; the failure's message, after
    checking that the record says the same."""
    server = await server_factory(**settings)
    with pytest.raises(FailedPreconditionError) as failed:
        await server.mesh.deployments.create(
            config_yaml, base_path=str(TESTAPP.parent), reload=False, local=True
        )
    record = await server.mesh.cp.get_deployment("brokered")
    assert record.status is DeploymentStatus.FAILED
    assert record.status_message in failed.value.message
    return failed.value.message


@pytest.mark.parametrize("kind", sorted(URLS))
async def test_a_deployment_naming_an_unreachable_broker_fails_naming_it(
    mesh_factory: MeshFactory, kind: str
) -> None:
    port = free_port()
    queue = f"message-queue: {{type: {kind}, url: '{URLS[kind].format(port=port)}'}}\n"
    message = await failed_deploy(mesh_factory, BROKERED.format(queue=queue))
    assert f"127.0.0.1:{port}" in message and kind in message
    assert "secret" not in message


@pytest.mark.parametrize("kind", sorted(URLS))
async def test_an_unreachable_default_broker_fails_deployments_naming_none(
    mesh_factory: MeshFactory, kind: str
) -> None:
    """``serve --broker`` down: a deployment without ``message-queue`` fails naming it,
    rather than running on the server's own broker."""
    port = free_port()
    url = URLS[kind].format(port=port)
    message = await failed_deploy(mesh_factory, BROKERED.format(queue=""), broker_url=url)
    assert f"127.0.0.1:{port}" in message and "secret" not in message
