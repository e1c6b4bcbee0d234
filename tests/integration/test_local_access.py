"""Local processes cannot go around the API: the embedded nats-server takes only clients
with the store's generated login, and Envoy's admin interface is a Unix socket that only
its owner may use (no TCP port), with real nats-server, Envoy and worker processes."""

from __future__ import annotations

import json
import os
import stat
import urllib.parse
from pathlib import Path

import httpx
import nats
import nats.errors
import pytest

from llama_mesh.server.app import MeshServer
from llama_mesh.server.gateway.__main__ import parse_config
from llama_mesh.server.gateway.config import render_envoy_config
from llama_mesh.server.nats_server import store_login
from tests.fixtures.mesh import MeshFactory, deploy_testapp


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _plain(url: str) -> str:
    """``url`` without its user and password."""
    parts = urllib.parse.urlsplit(url)
    return f"nats://{parts.hostname}:{parts.port}"


async def _connect(url: str) -> None:
    """Connect once (no retries) and ask JetStream for the account; raise on refusal."""
    nc = await nats.connect(url, allow_reconnect=False, connect_timeout=5, max_reconnect_attempts=0)
    try:
        await nc.jetstream().account_info()
    finally:
        await nc.close()


async def test_the_embedded_nats_refuses_a_client_without_the_login(
    mesh_factory: MeshFactory, tmp_path: Path
) -> None:
    """A plain connection to the embedded nats-server, or one with a wrong password, is
    refused (authorization violation); the store's own login gets in."""
    server = await mesh_factory(queue="nats")
    assert server.nats_url is not None
    plain = _plain(server.nats_url)
    with pytest.raises((nats.errors.Error, OSError), match=r"(?i)authorization"):
        await _connect(plain)
    wrong = plain.replace("nats://", "nats://llama-mesh:not-the-password@")
    with pytest.raises((nats.errors.Error, OSError), match=r"(?i)authorization"):
        await _connect(wrong)
    await _connect(server.nats_url)


async def test_the_login_is_private_and_kept_with_the_store(
    mesh_factory: MeshFactory, tmp_path: Path
) -> None:
    """The generated login lives in the store's credentials.json with mode 0600, the
    nats-server config holding it is 0600 too, and a server started again on the same data
    dir uses the same login (and one on another data dir another)."""
    data_dir = tmp_path / "data"
    first = await mesh_factory(queue="nats", data_dir=data_dir)
    store = data_dir / "nats"
    credentials = store / "credentials.json"
    assert _mode(credentials) == 0o600
    assert _mode(store / "nats.conf") == 0o600
    saved = json.loads(credentials.read_text())
    assert first.nats_url is not None
    assert urllib.parse.urlsplit(first.nats_url).password == saved["password"]
    assert len(saved["password"]) >= 32
    await first.shutdown()

    again = await mesh_factory(queue="nats", data_dir=data_dir)
    assert json.loads(credentials.read_text()) == saved
    assert again.nats_url is not None
    assert urllib.parse.urlsplit(again.nats_url).password == saved["password"]
    other = await mesh_factory(queue="nats", data_dir=tmp_path / "other")
    assert other.nats_url is not None
    assert urllib.parse.urlsplit(other.nats_url).password != saved["password"]


def _worker_pids(server: MeshServer) -> list[int]:
    return server.supervisor.pids("testapp", "echo")


async def test_workers_get_the_login_in_their_environment_and_run_tasks(
    mesh_factory: MeshFactory,
) -> None:
    """Worker processes log in to the embedded nats-server with the login they get through
    their environment (never their command line) and run tasks."""
    server = await mesh_factory(queue="nats")
    await deploy_testapp(server, "echo")
    task = await server.mesh.run_task(
        "testapp", service_id="echo", session_id=None, input={"message": "behind a login"}
    )
    assert task.result == "echo: behind a login"
    assert server.nats_url is not None
    password = urllib.parse.urlsplit(server.nats_url).password
    assert password
    (pid,) = _worker_pids(server)
    argv = Path(f"/proc/{pid}/cmdline").read_bytes()
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert password.encode() not in argv
    assert f"LLAMA_MESH_NATS_URL={server.nats_url}".encode() in environ


def _tcp_listening_ports(pid: int) -> set[int]:
    """TCP ports process ``pid`` listens on (its sockets' inodes in /proc/net/tcp{,6})."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                ports.add(int(fields[1].rpartition(":")[2], 16))
    return ports


async def test_the_envoy_admin_is_an_owner_only_unix_socket(mesh_factory: MeshFactory) -> None:
    """Envoy listens on TCP only on the gateway's port; its admin interface is a Unix
    socket of mode 0600, which still answers its owner (readiness, stats)."""
    server = await mesh_factory(gateway=True)
    gateway = server.gateway
    assert gateway is not None
    assert _tcp_listening_ports(gateway.pid) == {gateway.port}
    socket_path = gateway.admin_socket
    assert stat.S_ISSOCK(socket_path.stat().st_mode)
    assert _mode(socket_path) == 0o600
    transport = httpx.AsyncHTTPTransport(uds=str(socket_path))
    async with httpx.AsyncClient(transport=transport, timeout=10) as admin:
        ready = await admin.get("http://admin/ready")
        assert (ready.status_code, ready.text.strip()) == (200, "LIVE")


def test_a_stored_login_left_readable_is_made_private_and_a_broken_one_replaced(
    tmp_path: Path,
) -> None:
    """A credentials file found with a looser mode is tightened to 0600 and kept; one that
    cannot be read as a login is replaced by a new one (also 0600)."""
    first = store_login(tmp_path)
    credentials = tmp_path / "credentials.json"
    credentials.chmod(0o644)
    assert store_login(tmp_path) == first
    assert _mode(credentials) == 0o600
    credentials.write_text("{not json")
    fresh = store_login(tmp_path)
    assert fresh.password != first.password
    assert _mode(credentials) == 0o600
    assert store_login(tmp_path) == fresh


def test_a_separately_run_envoy_gets_its_admin_on_a_socket_too(tmp_path: Path) -> None:
    """``python -m llama_mesh.server.gateway --admin-socket PATH`` renders the admin on that
    socket (made absolute) with mode 0600, and no admin at all without the option."""
    cfg = parse_config(["--upstream", "127.0.0.1:50051", "--admin-socket", "run/admin.sock"])
    assert cfg.admin_socket == Path.cwd() / "run" / "admin.sock"
    admin = render_envoy_config(cfg)["admin"]["address"]
    assert admin == {"pipe": {"path": str(cfg.admin_socket), "mode": 0o600}}
    assert "admin" not in render_envoy_config(parse_config(["--upstream", "127.0.0.1:50051"]))
