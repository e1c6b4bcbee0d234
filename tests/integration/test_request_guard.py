"""What a web page in the user's own browser can make it send to a local server: refused.

A real server behind a real gateway (Envoy). A page on any site can send simple requests
(form posts, ``text/plain`` fetches: no CORS preflight) and, through DNS rebinding
(``evil.example`` resolving to 127.0.0.1), read the answers. Pinned here, with a
deployment whose code leaves a mark when it runs:

* a ``Host`` the server does not answer to, and an ``Origin`` that is neither an allowed
  CORS origin nor the server's own, are refused with 403 and the code never runs;
* a body that is not JSON (multipart only on ``/deployments/create``) is a 415;
* refusals are the project's JSON errors (``detail`` too on 0.8 paths);
* what clients legitimately send still works: JSON without an Origin (curl, the SDK), the
  0.8 multipart upload, an allowed or the same origin, gRPC and gRPC-Web, loopback names
  and the names the operator allows.
"""

from __future__ import annotations

import struct
import textwrap
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import pytest_asyncio

from llama_mesh.server.app import MeshServer, ServerSettings
from llama_mesh.server.gateway import GatewayConfig
from llama_mesh.server.gateway.__main__ import parse_config
from llama_mesh.server.gateway.config import request_guard_lua
from llama_mesh.server.ports import free_port
from llama_mesh.server.serve import build_parser, settings_from_args
from llama_mesh.v1 import apiserver_pb2, apiserver_pb2_grpc
from tests.fixtures.mesh import TESTAPP, MeshFactory, running_mesh

APP = "testapp"
ALLOWED_ORIGIN = "https://console.example"
EVIL_ORIGIN = "http://evil.example"
TIMEOUT = 60.0

MARKED_YAML = """\
name: {name}
control-plane:
  port: 8000
default-service: marked
services:
  marked:
    name: Marked
    source:
      type: local
      name: .
    path: marked_app:marked
"""
MARKED_MODULE = """\
from pathlib import Path

from workflows import Workflow, step
from workflows.events import StartEvent, StopEvent

Path(__file__).with_name("code-ran").write_text("the deployment's code ran")


class Marked(Workflow):
    @step
    async def run_it(self, ev: StartEvent) -> StopEvent:
        return StopEvent(result="marked")


marked = Marked(timeout=60)
"""


SHARED = pytest.mark.asyncio(loop_scope="module")
"""For tests on the module's shared ``server``: they run in the event loop it runs in."""


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[MeshServer]:
    """testapp behind a real gateway that allows one CORS origin and one more host name,
    shared by the module's tests (those that deploy use names of their own)."""
    async with running_mesh(
        tmp_path_factory.mktemp("request-guard"),
        queue="inprocess",
        gateway=True,
        deploy=(TESTAPP,),
        cors_origins=(ALLOWED_ORIGIN,),
        allowed_hosts=("mesh.internal",),
    ) as shared:
        yield shared


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def http(server: MeshServer) -> AsyncIterator[httpx.AsyncClient]:
    assert server.gateway_url is not None
    async with httpx.AsyncClient(base_url=server.gateway_url, timeout=TIMEOUT) as client:
        yield client


@pytest.fixture
def marked_source(tmp_path: Path) -> Path:
    """A deployment's source directory whose code writes ``code-ran`` when imported."""
    source = tmp_path / "marked"
    source.mkdir()
    (source / "marked_app.py").write_text(MARKED_MODULE)
    return source


def _port(server: MeshServer) -> int:
    assert server.gateway_url is not None
    port = urllib.parse.urlsplit(server.gateway_url).port
    assert port is not None
    return port


def _upload(name: str) -> dict[str, Any]:
    """A 0.8 deployment upload (what a browser form with a file input posts)."""
    return {"config_file": ("deployment.yml", MARKED_YAML.format(name=name).encode())}


def assert_refused(response: httpx.Response, status: int, words: str, *, compat: bool) -> None:
    """``response`` is the JSON error ``status`` whose message contains ``words``."""
    described = f"{response.status_code}: {response.text}"
    assert response.status_code == status, described
    assert response.headers["content-type"] == "application/json", described
    body = response.json()
    assert body["code"] == {403: 7, 415: 3}[status], described
    assert words in body["message"], described
    assert body["details"] == []
    assert ("detail" in body) is compat, described
    if compat:
        assert body["detail"] == body["message"]


async def _deployed(http: httpx.AsyncClient, name: str) -> bool:
    response = await http.get(f"/v1/deployments/{name}")
    assert response.status_code in (200, 404), response.text
    return response.status_code == 200


async def _task_count(server: MeshServer) -> int:
    return len(await server.mesh.list_tasks(APP))


# -- the attacks ---------------------------------------------------------------------------------


@SHARED
async def test_dns_rebinding_form_upload_is_refused_and_the_code_never_runs(
    server: MeshServer, http: httpx.AsyncClient, marked_source: Path
) -> None:
    """A multipart form POST to /deployments/create with Host evil.example:4501 and Origin
    http://evil.example (a rebound page) is a 403 and nothing is deployed; the same upload
    from curl is deployed and its code runs (so the refusal is what kept it from running)."""
    query = {"base_path": str(marked_source)}
    headers = {"host": f"evil.example:{_port(server)}", "origin": EVIL_ORIGIN}
    refused = await http.post(
        "/deployments/create", params=query, files=_upload("rebound"), headers=headers
    )
    assert_refused(refused, 403, "'evil.example:", compat=True)
    assert not (marked_source / "code-ran").exists()
    assert not await _deployed(http, "rebound")

    allowed = await http.post("/deployments/create", params=query, files=_upload("curl"))
    assert allowed.status_code == 200, allowed.text
    assert (marked_source / "code-ran").exists()


@SHARED
async def test_rebound_host_cannot_read_either(server: MeshServer, http: httpx.AsyncClient) -> None:
    """A GET with a foreign Host (a rebound page reading answers: no Origin on same-origin
    GETs) is a 403 on both surfaces, for any name not allowed, with or without a port."""
    for host in ("evil.example:4501", "evil.example", "127.0.0.1.evil.example", "localhost.x"):
        compat = await http.get("/deployments/", headers={"host": host})
        assert_refused(compat, 403, f"'{host}'", compat=True)
        v1 = await http.get("/v1/deployments", headers={"host": host})
        assert_refused(v1, 403, "--allowed-host", compat=False)


@SHARED
async def test_foreign_origin_is_refused_and_the_code_never_runs(
    http: httpx.AsyncClient, marked_source: Path
) -> None:
    """A cross-site form upload (right Host, Origin http://evil.example) is a 403 naming
    the origin; nothing is deployed, the code does not run."""
    response = await http.post(
        "/deployments/create",
        params={"base_path": str(marked_source)},
        files=_upload("crosssite"),
        headers={"origin": EVIL_ORIGIN},
    )
    assert_refused(response, 403, f"'{EVIL_ORIGIN}'", compat=True)
    assert not (marked_source / "code-ran").exists()
    assert not await _deployed(http, "crosssite")


@SHARED
@pytest.mark.parametrize("origin", [EVIL_ORIGIN, "null", ALLOWED_ORIGIN + ".evil.example"])
async def test_foreign_origin_cannot_read(http: httpx.AsyncClient, origin: str) -> None:
    """Any request carrying a foreign Origin (also "null", from sandboxed frames and files,
    and a look-alike of an allowed one) is refused, reads included."""
    response = await http.get(f"/v1/deployments/{APP}/tasks", headers={"origin": origin})
    assert_refused(response, 403, "--cors-origin", compat=False)


@SHARED
async def test_text_plain_deploy_is_415_and_nothing_is_deployed(
    http: httpx.AsyncClient, marked_source: Path
) -> None:
    """A text/plain POST of JSON to /v1/deployments (a fetch needing no preflight) is a
    415 and does not deploy."""
    body = {"config_yaml": MARKED_YAML.format(name="plain"), "base_path": str(marked_source)}
    response = await http.post(
        "/v1/deployments",
        content=httpx.Request("POST", "/", json=body).content,
        headers={"content-type": "text/plain;charset=UTF-8"},
    )
    assert_refused(response, 415, "send application/json", compat=False)
    assert not (marked_source / "code-ran").exists()
    assert not await _deployed(http, "plain")


@SHARED
@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
    ],
)
async def test_simple_request_content_types_cannot_run_tasks(
    server: MeshServer, http: httpx.AsyncClient, content_type: str
) -> None:
    """The content types a page can send without a preflight are 415 on tasks/run (0.8
    and v1), multipart included (it is for /deployments/create only): no task is made."""
    before = await _task_count(server)
    compat = await http.post(
        f"/deployments/{APP}/tasks/run",
        content=b'{"input": "{\\"message\\": \\"x\\"}"}',
        headers={"content-type": content_type},
    )
    assert_refused(compat, 415, f"'{content_type}'", compat=True)
    v1 = await http.post(
        f"/v1/deployments/{APP}/tasks:run",
        content=b'{"input": {"message": "x"}}',
        headers={"content-type": content_type},
    )
    assert_refused(v1, 415, "send application/json", compat=False)
    assert await _task_count(server) == before


@SHARED
async def test_a_body_without_content_type_is_415(
    server: MeshServer, http: httpx.AsyncClient
) -> None:
    """A body with no content type at all is a 415 (a JSON route wants JSON, said so)."""
    before = await _task_count(server)
    response = await http.post(f"/v1/deployments/{APP}/tasks", content=b'{"input": {}}')
    assert_refused(response, 415, "no content type", compat=False)
    assert await _task_count(server) == before


# -- what still works -----------------------------------------------------------------------------


@SHARED
async def test_json_without_origin_works_like_curl_and_the_sdk(http: httpx.AsyncClient) -> None:
    """JSON requests without an Origin (curl, the SDK, the 0.8 client) work on both
    surfaces, a charset parameter included; a body-less POST needs no content type."""
    v1 = await http.post(f"/v1/deployments/{APP}/tasks:run", json={"input": {"message": "a"}})
    assert v1.status_code == 200, v1.text
    assert v1.json()["task"]["result"] == "echo: a"
    compat = await http.post(
        f"/deployments/{APP}/tasks/run",
        content=b'{"input": "{\\"message\\": \\"b\\"}"}',
        headers={"content-type": "Application/JSON; charset=utf-8"},
    )
    assert compat.status_code == 200, compat.text
    assert compat.json() == "echo: b"
    session = await http.post(f"/deployments/{APP}/sessions/create")
    assert session.status_code == 200, session.text


@SHARED
@pytest.mark.parametrize("origin", ["allowed", "same"])
async def test_allowed_and_same_origin_work(
    server: MeshServer, http: httpx.AsyncClient, origin: str
) -> None:
    """A page of an allowed CORS origin, or of the server itself (its console), may call
    it: the request succeeds (with the CORS allow header for the allowed origin)."""
    value = ALLOWED_ORIGIN if origin == "allowed" else server.gateway_url
    assert value is not None
    response = await http.post(
        f"/v1/deployments/{APP}/tasks:run",
        json={"input": {"message": "o"}},
        headers={"origin": value},
    )
    assert response.status_code == 200, response.text
    if origin == "allowed":
        assert response.headers["access-control-allow-origin"] == ALLOWED_ORIGIN


@SHARED
@pytest.mark.parametrize(
    "host", ["localhost", "LOCALHOST.", "127.0.0.1", "[::1]", "mesh.internal", "Mesh.Internal"]
)
async def test_loopback_and_allowed_names_work(
    server: MeshServer, http: httpx.AsyncClient, host: str
) -> None:
    """Loopback names, the listen address and the names the operator allowed are answered,
    whatever their case, port or final dot."""
    response = await http.get("/status/", headers={"host": f"{host}:{_port(server)}"})
    assert response.status_code == 200, response.text


@SHARED
async def test_grpc_and_grpc_web_work_and_a_foreign_authority_is_permission_denied(
    server: MeshServer, http: httpx.AsyncClient
) -> None:
    """gRPC through the gateway works; with a foreign authority it is PERMISSION_DENIED;
    gRPC-Web from an allowed origin works."""
    address = f"127.0.0.1:{_port(server)}"
    async with grpc.aio.insecure_channel(address) as channel:
        status = await apiserver_pb2_grpc.ApiServerStub(channel).GetStatus(
            apiserver_pb2.GetStatusRequest(), timeout=TIMEOUT
        )
    assert APP in status.deployments
    options = [("grpc.default_authority", "evil.example")]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await apiserver_pb2_grpc.ApiServerStub(channel).GetStatus(
                apiserver_pb2.GetStatusRequest(), timeout=TIMEOUT
            )
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "evil.example" in (refused.value.details() or "")

    message = apiserver_pb2.GetStatusRequest().SerializeToString()
    web = await http.post(
        "/llama_mesh.v1.ApiServer/GetStatus",
        content=struct.pack(">BI", 0, len(message)) + message,
        headers={
            "content-type": "application/grpc-web+proto",
            "x-grpc-web": "1",
            "origin": ALLOWED_ORIGIN,
        },
    )
    assert web.status_code == 200, web.text
    assert b"grpc-status:0" in web.content.replace(b" ", b"")


async def test_any_host_when_the_operator_says_so(mesh_factory: MeshFactory) -> None:
    """``allowed_hosts=("*",)`` answers to any name (for a gateway behind a proxy that
    checks names itself), and ``cors_origins=("*",)`` to any origin."""
    server = await mesh_factory(
        queue="inprocess", gateway=True, allowed_hosts=("*",), cors_origins=("*",)
    )
    assert server.gateway_url is not None
    async with httpx.AsyncClient(base_url=server.gateway_url, timeout=TIMEOUT) as http:
        response = await http.get(
            "/status/", headers={"host": "anything.example", "origin": EVIL_ORIGIN}
        )
    assert response.status_code == 200, response.text


async def test_the_0_8_control_plane_listeners_are_guarded_too(mesh_factory: MeshFactory) -> None:
    """A deployment's 0.8 control plane port refuses a foreign Host or Origin (403) and a
    text/plain body (415) like the main port, and answers its own clients."""
    server = await mesh_factory(queue="inprocess", gateway=True, control_planes=True)
    port = free_port()
    config = TESTAPP.read_text().replace("port: 8000", f"port: {port}").encode()
    await server.mesh.deployments.create(
        config, base_path=str(TESTAPP.parent), reload=False, local=True
    )
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=TIMEOUT) as cp:
        answered = await cp.get("/services")
        assert answered.status_code == 200, answered.text
        rebound = await cp.get("/services", headers={"host": f"evil.example:{port}"})
        assert_refused(rebound, 403, "'evil.example:", compat=True)
        cross_site = await cp.post("/sessions/create", headers={"origin": EVIL_ORIGIN})
        assert_refused(cross_site, 403, f"'{EVIL_ORIGIN}'", compat=True)
        plain = await cp.post(
            "/services/register",
            content=b'{"service_name": "x"}',
            headers={"content-type": "text/plain"},
        )
        assert_refused(plain, 415, "send application/json", compat=True)


# -- configuration --------------------------------------------------------------------------------


def test_every_address_needs_named_hosts(tmp_path: Path) -> None:
    """Listening on 0.0.0.0 or :: without naming the hosts is refused, naming the option;
    a named host or '*' is accepted."""
    for host in ("0.0.0.0", "::"):
        with pytest.raises(ValueError, match="--allowed-host"):
            ServerSettings(data_dir=tmp_path, host=host)
        with pytest.raises(ValueError, match="allowed_hosts"):
            GatewayConfig(upstream_port=1, listen_host=host)
        ServerSettings(data_dir=tmp_path, host=host, allowed_hosts=("*",))
        GatewayConfig(upstream_port=1, listen_host=host, allowed_hosts=("mesh.example",))
    ServerSettings(data_dir=tmp_path, host="0.0.0.0", gateway=False)


def test_allowed_hosts_come_from_flags_and_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``--allowed-host`` repeats; LLAMA_MESH_ALLOWED_HOSTS is a comma-separated list; the
    gateway's own command takes the same option."""
    monkeypatch.setenv("LLAMA_MESH_ALLOWED_HOSTS", "a.example, b.example")
    args = build_parser().parse_args(["--allowed-host", "c.example", "--data-dir", str(tmp_path)])
    assert settings_from_args(args).allowed_hosts == ("a.example", "b.example", "c.example")
    cfg = parse_config(["--upstream", "h:1", "--host", "0.0.0.0", "--allowed-host", "gw"])
    assert cfg.answered_hosts == ("localhost", "127.0.0.1", "::1", "a.example", "b.example", "gw")
    monkeypatch.delenv("LLAMA_MESH_ALLOWED_HOSTS")
    with pytest.raises(SystemExit):
        parse_config(["--upstream", "h:1", "--host", "0.0.0.0"])


@pytest.mark.parametrize("bad", ['a"b', "a\\b", "a b", "", "é.example"])
def test_a_host_or_origin_that_is_no_name_is_refused(bad: str) -> None:
    """Host names and origins go into the guard's Lua code: anything but a plain name or
    origin is a configuration error, never code."""
    with pytest.raises(ValueError, match="allowed_hosts"):
        GatewayConfig(upstream_port=1, allowed_hosts=(bad,))
    if bad.strip():
        with pytest.raises(ValueError, match="cors_origins"):
            GatewayConfig(upstream_port=1, cors_origins=(bad,))


def test_the_guard_settings_name_what_is_allowed() -> None:
    """The rendered guard lists the loopback names, the listen address and the allowed
    names and origins, and the scheme of the listener."""
    cfg = GatewayConfig(
        upstream_port=1,
        listen_host="10.1.2.3",
        allowed_hosts=("[FE80::1]", "Mesh.Example."),
        cors_origins=(ALLOWED_ORIGIN,),
    )
    first_line = request_guard_lua(cfg).splitlines()[0]
    assert first_line == textwrap.dedent(
        """\
        local GUARD = {any_host = false, hosts = {["localhost"] = true, ["127.0.0.1"] = true, \
["::1"] = true, ["fe80::1"] = true, ["mesh.example"] = true, ["10.1.2.3"] = true}, \
any_origin = false, origins = {["https://console.example"] = true}, scheme = "http", \
multipart_paths = {["/deployments/create"] = true}, ui_api_key = false, \
upstream_cluster = "apiserver"}"""
    )
