"""A NATS that requires a login, a client certificate or a credentials file: the server and
its workers get in; nothing shows the password.

Real nats-servers (one with an ``authorization`` block, one with TLS that verifies clients,
one in operator mode that takes JWT credentials), the mesh with a worker process per
replica (the process supervisor).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from llama_mesh.server.app import ServerSettings
from llama_mesh.server.domain import TaskStatus
from llama_mesh.server.nats_server import NatsServer, NatsServerConfig, NatsTlsConfig, NatsUser
from llama_mesh.server.queues.errors import QueueUnavailableError
from llama_mesh.server.queues.nats import NatsLogin, connect_nats, redact_url
from llama_mesh.server.serve import build_parser as serve_parser
from llama_mesh.server.service.__main__ import build_parser as worker_parser
from llama_mesh.server.service.__main__ import main as worker_main
from tests.fixtures.mesh import TESTAPP, MeshFactory
from tests.fixtures.nats_jwt import JwtNats
from tests.fixtures.pki import Pki

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


def echo_app(tmp_path: Path) -> Path:
    """A deployment of the test app's `echo` service alone; its file."""
    app = tmp_path / "app"
    app.mkdir()
    shutil.copy(TESTAPP.parent / "app_workflows.py", app)
    (app / "deployment.yml").write_text(ECHO_ONLY)
    return app / "deployment.yml"


async def test_server_and_workers_log_in_without_showing_the_password(
    guarded_nats: NatsServer,
    mesh_factory: MeshFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A task runs (the API server and the worker process both logged in), no process has
    the password on its command line, and the logs do not contain it."""
    caplog.set_level(logging.INFO)
    server = await mesh_factory(
        queue="nats", nats_url=login_url(guarded_nats), deploy=(echo_app(tmp_path),)
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


async def test_server_and_workers_reach_a_nats_that_requires_client_certificates(
    mesh_factory: MeshFactory, tmp_path: Path, pki: Pki
) -> None:
    """TLS to NATS with a client certificate (mTLS): the API server and its worker process
    connect and a task runs; without the certificate the connection is refused."""
    tls = NatsTlsConfig(cert=pki.cert, key=pki.key, ca=pki.ca, verify_clients=True)
    nats_server = await NatsServer.start(NatsServerConfig(store_dir=tmp_path / "nats", tls=tls))
    try:
        with pytest.raises(QueueUnavailableError):
            await connect_nats(nats_server.url, login=NatsLogin(tls_ca=pki.ca), connect_timeout=5)
        server = await mesh_factory(
            queue="nats",
            nats_url=nats_server.url,
            nats_tls_ca=pki.ca,
            nats_tls_cert=pki.cert,
            nats_tls_key=pki.key,
            deploy=(echo_app(tmp_path),),
        )
        task = await server.mesh.run_task(
            "guarded", service_id=None, session_id=None, input={"message": "certified"}
        )
        assert (task.status, task.result) == (TaskStatus.SUCCEEDED, "echo: certified")
    finally:
        await nats_server.stop()


async def test_server_and_workers_log_in_with_a_credentials_file(
    jwt_nats: JwtNats, mesh_factory: MeshFactory, tmp_path: Path
) -> None:
    """Operator-mode NATS (JWT and nkey seed in a creds file): the API server and its worker
    process log in with the file and a task runs; the seed is on no command line."""
    server = await mesh_factory(
        queue="nats", nats_url=jwt_nats.url, nats_creds=jwt_nats.creds, deploy=(echo_app(tmp_path),)
    )
    task = await server.mesh.run_task(
        "guarded", service_id=None, session_id=None, input={"message": "signed"}
    )
    assert (task.status, task.result) == (TaskStatus.SUCCEEDED, "echo: signed")
    seed = jwt_nats.creds.read_text().split("-----BEGIN USER NKEY SEED-----")[1].split()[0]
    assert command_lines_with(seed) == []


async def test_credentials_of_an_unknown_account_or_none_are_refused(jwt_nats: JwtNats) -> None:
    with pytest.raises(QueueUnavailableError, match="refused the login"):
        await connect_nats(
            jwt_nats.url, login=NatsLogin(creds=jwt_nats.stranger_creds), connect_timeout=5
        )
    with pytest.raises(QueueUnavailableError):
        await connect_nats(jwt_nats.url, connect_timeout=5)
    connection = await connect_nats(jwt_nats.url, login=NatsLogin(creds=jwt_nats.creds))
    await connection.close()


def test_a_login_travels_to_workers_in_their_environment(pki: Pki) -> None:
    login = NatsLogin(creds=Path("/c.creds"), tls_ca=pki.ca, tls_cert=pki.cert, tls_key=pki.key)
    assert NatsLogin.from_environment(login.environment()) == login
    assert NatsLogin.from_environment({}) == NatsLogin()
    with pytest.raises(ValueError, match="key"):
        NatsLogin(tls_cert=pki.cert)


@pytest.mark.parametrize("field", sorted(NatsLogin.VARIABLES))
def test_serve_and_the_worker_read_the_same_login_variables(
    field: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    option = f"nats_{field}"
    worker_args = ["--deployment", "d", "--service", "s"]
    monkeypatch.setenv(NatsLogin.VARIABLES[field], "/login/file")
    assert getattr(serve_parser().parse_args([]), option) == Path("/login/file")
    assert getattr(worker_parser().parse_args(worker_args), option) == Path("/login/file")
    # Compose files pass ${X:-}: an empty variable is unset, not the path ".".
    monkeypatch.setenv(NatsLogin.VARIABLES[field], "")
    assert getattr(serve_parser().parse_args([]), option) is None
    assert getattr(worker_parser().parse_args(worker_args), option) is None


def test_half_a_client_certificate_is_refused_naming_the_options(
    tmp_path: Path, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ValueError, match="--nats-tls-cert, --nats-tls-key"):
        ServerSettings(data_dir=tmp_path, nats_tls_cert=pki.cert)
    with pytest.raises(SystemExit):
        worker_main(["--nats", "nats://127.0.0.1:1", "--deployment", "d", "--service", "s",
                     "--nats-tls-key", str(pki.key)])  # fmt: skip
    assert "--nats-tls-cert, --nats-tls-key" in capsys.readouterr().err
