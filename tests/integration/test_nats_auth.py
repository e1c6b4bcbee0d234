"""A NATS that requires a login: the server and its workers log in; nothing shows the password.

Real nats-server with an ``authorization`` block, the mesh with a worker process per
replica (the process supervisor), connected with the user and password in the NATS URL.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from llama_mesh.server.domain import TaskStatus
from llama_mesh.server.nats_server import NatsServer, NatsServerConfig, NatsUser
from llama_mesh.server.queues.base import QueueUnavailableError
from llama_mesh.server.queues.nats import connect_nats, redact_url
from tests.fixtures.mesh import TESTAPP, MeshFactory

PASSWORD = "s3cret-nats-pass"
USER = NatsUser("mesh", PASSWORD)

ECHO_ONLY = """\
name: guarded
services:
  echo:
    name: Echo
    source: {type: local, name: .}
    path: app_workflows:echo
"""


@pytest.fixture
async def guarded_nats(tmp_path: Path) -> AsyncIterator[NatsServer]:
    """A nats-server that lets in only ``USER``."""
    server = await NatsServer.start(NatsServerConfig(store_dir=tmp_path / "nats", users=(USER,)))
    yield server
    await server.stop()


def login_url(server: NatsServer, password: str = PASSWORD) -> str:
    return server.url.replace("nats://", f"nats://{USER.user}:{password}@")


def command_lines_with(text: str) -> list[str]:
    """The command lines of running processes that contain ``text``."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue  # the process ended meanwhile
        if any(text.encode() in arg for arg in args):
            found.append(" ".join(a.decode(errors="replace") for a in args))
    return found


async def test_a_wrong_password_is_a_clear_unavailable_error(guarded_nats: NatsServer) -> None:
    with pytest.raises(QueueUnavailableError, match="refused the login") as raised:
        await connect_nats(login_url(guarded_nats, "wrong-password"), connect_timeout=5)
    assert "wrong-password" not in str(raised.value)


async def test_server_and_workers_log_in_without_showing_the_password(
    guarded_nats: NatsServer,
    mesh_factory: MeshFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A task runs (the API server and the worker process both logged in), no process has
    the password on its command line, and the logs do not contain it."""
    app = tmp_path / "app"
    app.mkdir()
    shutil.copy(TESTAPP.parent / "app_workflows.py", app)
    (app / "deployment.yml").write_text(ECHO_ONLY)
    caplog.set_level(logging.INFO)
    server = await mesh_factory(
        queue="nats", nats_url=login_url(guarded_nats), deploy=(app / "deployment.yml",)
    )
    task = await server.mesh.run_task(
        "guarded", service_id=None, session_id=None, input={"message": "let me in"}
    )
    assert (task.status, task.result) == (TaskStatus.SUCCEEDED, "echo: let me in")
    assert command_lines_with(PASSWORD) == []
    assert PASSWORD not in caplog.text


def test_urls_are_redacted_for_logs() -> None:
    assert redact_url("nats://u:p@127.0.0.1:4222,nats://h:4223") == (
        "nats://u:***@127.0.0.1:4222,nats://h:4223"
    )
    assert redact_url("nats://tok@host") == "nats://tok@host"
