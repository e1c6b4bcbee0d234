"""The gateway: a real Envoy in front of a fake API server, driven over HTTP/1.1, gRPC and gRPC-Web.

What is pinned here is Envoy's side of the contract: the Llama Deploy 0.8 JSON shapes and paths,
the v1 JSON API, NDJSON and Server-Sent-Events streaming, JSON errors (the API server's and
Envoy's own), pass-through of raw gRPC and gRPC-Web, CORS, and the supervision of the process.

The tests that only send requests share one fake and one Envoy for the module (``client``,
``gateway``, ``fake``: the fake is reset for each test); tests that stop either, or need
other settings, start their own.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import ssl
import struct
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import pytest_asyncio
from google.rpc import error_details_pb2
from grpc_status import rpc_status

import llama_mesh.server.gateway as gateway_package
from llama_mesh.server.gateway import (
    Gateway,
    GatewayConfig,
    GatewayStartError,
    InvalidEnvoyConfigError,
    render_envoy_config,
    render_envoy_yaml,
    validate_config,
)
from llama_mesh.server.gateway.__main__ import parse_config
from llama_mesh.server.gateway.config import READ_METHOD_REGEX
from llama_mesh.v1 import apiserver_pb2, apiserver_pb2_grpc
from tests.fixtures.envoy import StartGateway
from tests.fixtures.fake_apiserver import (
    ERROR_DOMAIN,
    FakeApiServer,
    FakeApiServerHandle,
    running_fake_apiserver,
    start_fake_apiserver,
)
from tests.fixtures.pki import Pki

ALLOWED_ORIGIN = "http://allowed.example"
STREAM_TIMEOUT = 10.0


SHARED = pytest.mark.asyncio(loop_scope="module")
"""For tests on the module's shared fake and Envoy: they run in the event loop those run in."""


@pytest.fixture
async def upstream() -> AsyncIterator[FakeApiServerHandle]:
    """A fake API server of the test's own."""
    async with running_fake_apiserver() as handle:
        yield handle


@pytest.fixture
async def own_gateway(start_gateway: StartGateway, upstream: FakeApiServerHandle) -> Gateway:
    """An Envoy of the test's own in front of ``upstream``."""
    return await start_gateway(upstream.port, cors_origins=(ALLOWED_ORIGIN,))


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def shared_upstream() -> AsyncIterator[FakeApiServerHandle]:
    async with running_fake_apiserver() as handle:
        yield handle


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def shared_gateway(
    shared_upstream: FakeApiServerHandle, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Gateway]:
    cfg = GatewayConfig(
        listen_port=0, upstream_port=shared_upstream.port, cors_origins=(ALLOWED_ORIGIN,)
    )
    gateway = await Gateway.start(cfg, work_dir=tmp_path_factory.mktemp("envoy"))
    try:
        yield gateway
    finally:
        await gateway.stop()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def shared_client(shared_gateway: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=shared_gateway.url, timeout=STREAM_TIMEOUT) as http:
        yield http


@pytest.fixture
def fake(shared_upstream: FakeApiServerHandle) -> FakeApiServer:
    """The shared fake, as new: what an earlier test scripted or sent is forgotten."""
    shared_upstream.fake.reset()
    return shared_upstream.fake


@pytest.fixture
def gateway(shared_gateway: Gateway, fake: FakeApiServer) -> Gateway:
    """The shared Envoy, in front of the reset ``fake``."""
    return shared_gateway


@pytest.fixture
def client(shared_client: httpx.AsyncClient, fake: FakeApiServer) -> httpx.AsyncClient:
    """A client of the shared Envoy, in front of the reset ``fake``."""
    return shared_client


def _error_info(method: str, code: grpc.StatusCode) -> dict[str, Any]:
    return {
        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": code.name,
        "domain": ERROR_DOMAIN,
        "metadata": {"method": method},
    }


# -- Llama Deploy 0.8 shapes ---------------------------------------------------------------


@SHARED
async def test_compat_status_uses_0_8_field_names(client: httpx.AsyncClient) -> None:
    """GET /status/ is 0.8's Status: snake_case names, default values printed too."""
    response = await client.get("/status/")

    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {
        "status": "Healthy",
        "status_message": "",
        "max_deployments": 10,
        "deployments": [],
    }
    assert not any(name.startswith("grpc-") for name in response.headers)


@SHARED
async def test_compat_list_deployments_is_a_bare_list(client: httpx.AsyncClient) -> None:
    """GET /deployments/ is a top-level JSON list of {"name": ...} objects."""
    response = await client.get("/deployments/")

    assert response.status_code == 200
    assert response.json() == [{"name": "quickstart"}, {"name": "other"}]


@SHARED
async def test_compat_create_deployment_forwards_the_multipart_upload(
    client: httpx.AsyncClient, fake: FakeApiServer
) -> None:
    """POST /deployments/create passes the raw multipart body and the query to the server."""
    config = b"name: quickstart\nservices: {}\n"

    response = await client.post(
        "/deployments/create",
        params={"reload": "false", "local": "true", "base_path": "/x"},
        files={"config_file": ("deployment.yml", config)},
    )

    assert response.status_code == 200
    assert response.json() == {"name": "quickstart"}
    seen = fake.last("LlamaDeployApi.CreateDeployment")
    assert seen.upload.content_type.startswith("multipart/form-data; boundary=")
    assert b'name="config_file"' in seen.upload.data
    assert config in seen.upload.data
    assert (seen.base_path, seen.reload, seen.local) == ("/x", False, True)


@SHARED
async def test_compat_run_task_returns_the_bare_result_string(
    client: httpx.AsyncClient, fake: FakeApiServer
) -> None:
    """POST .../tasks/run takes 0.8's TaskDefinition (JSON nulls included), returns a string."""
    response = await client.post(
        "/deployments/quickstart/tasks/run",
        params={"session_id": "abc"},
        json={"input": '{"a": 1}', "task_id": "x", "session_id": None, "service_id": None},
    )

    assert response.status_code == 200
    assert response.text == '"result text"'
    seen = fake.last("LlamaDeployApi.RunTask")
    assert seen.deployment_name == "quickstart"
    assert seen.session_id == "abc"
    assert seen.task_definition.input == '{"a": 1}'
    assert seen.task_definition.task_id == "x"
    assert not seen.task_definition.HasField("session_id")
    assert not seen.task_definition.HasField("service_id")


@SHARED
async def test_compat_task_result_is_null_while_running(
    client: httpx.AsyncClient, fake: FakeApiServer
) -> None:
    """GET .../results is the JSON null while the task has no result."""
    fake.task_result = None

    response = await client.get("/deployments/d/tasks/t/results", params={"session_id": "s"})

    assert response.status_code == 200
    assert response.text == "null"
    seen = fake.last("LlamaDeployApi.GetTaskResult")
    assert (seen.deployment_name, seen.task_id, seen.session_id) == ("d", "t", "s")


@SHARED
async def test_compat_task_result_is_the_result_object(
    client: httpx.AsyncClient, fake: FakeApiServer
) -> None:
    """GET .../results is 0.8's TaskResult object once there is one."""
    fake.task_result = {"task_id": "t", "history": [], "result": "done", "data": {}}

    response = await client.get("/deployments/d/tasks/t/results", params={"session_id": "s"})

    assert response.json() == fake.task_result


@SHARED
async def test_compat_event_stream_is_incremental_ndjson(
    client: httpx.AsyncClient, fake: FakeApiServer
) -> None:
    """GET .../events streams one JSON object per line, each line as soon as it is sent."""
    url = "/deployments/d/tasks/t/events"
    async with client.stream("GET", url, params={"session_id": "s"}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/x-ndjson"
        lines = response.aiter_lines()
        async with asyncio.timeout(STREAM_TIMEOUT):
            first = await anext(lines)
        # The server sends the rest only now: the first line was not held back.
        fake.release_events.set()
        rest = [line async for line in lines]

    assert [json.loads(line) for line in [first, *rest]] == fake.events
    assert fake.last("LlamaDeployApi.StreamEvents").session_id == "s"


@SHARED
async def test_compat_delete_session_returns_null(
    client: httpx.AsyncClient, fake: FakeApiServer
) -> None:
    """POST .../sessions/delete?session_id= answers the JSON null."""
    response = await client.post("/deployments/d/sessions/delete", params={"session_id": "s"})

    assert response.status_code == 200
    assert response.text == "null"
    assert fake.last("LlamaDeployApi.DeleteSession").session_id == "s"


# -- v1 --------------------------------------------------------------------------------------


@SHARED
async def test_v1_event_stream_is_server_sent_events(
    client: httpx.AsyncClient, fake: FakeApiServer
) -> None:
    """GET /v1/.../events is text/event-stream, one `data: {json}` frame per event."""
    url = "/v1/deployments/d/tasks/t/events"
    async with client.stream("GET", url, params={"from_index": 2}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        body = (await response.aread()).decode()

    frames = body.split("\n\n")
    assert frames[-1] == ""
    events = []
    for frame in frames[:-1]:
        assert frame.startswith("data: ")
        events.append(json.loads(frame.removeprefix("data: "))["event"])
    assert [event["index"] for event in events] == ["2", "3", "4"]
    assert [event["data"] for event in events] == fake.events
    assert events[0]["kind"] == "EVENT_KIND_WORKFLOW"
    assert fake.last("ApiServer.StreamEvents").from_index == 2


# -- errors ------------------------------------------------------------------------------------


@SHARED
async def test_compat_error_is_rich_status_json_with_fastapi_detail(
    client: httpx.AsyncClient, fake: FakeApiServer
) -> None:
    """A gRPC error on a 0.8 path is google.rpc.Status JSON plus FastAPI's `detail`."""
    message = 'Deployment "nope" not found'
    fake.fail("LlamaDeployApi.GetDeployment", grpc.StatusCode.NOT_FOUND, message)

    response = await client.get("/deployments/nope")

    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"
    assert response.text.startswith('{"detail":"Deployment \\"nope\\" not found",')
    assert response.json() == {
        "detail": message,
        "code": 5,
        "message": message,
        "details": [_error_info("LlamaDeployApi.GetDeployment", grpc.StatusCode.NOT_FOUND)],
    }


@SHARED
@pytest.mark.parametrize(
    "message",
    [
        'quote " backslash \\ slash / newline \n tab \t',
        "unicode é ✓ \u2028 and a control \x01",
        '{"detail": "not me", "message": "nor me"}',
        "",
    ],
)
async def test_compat_detail_is_the_top_level_message_verbatim(
    client: httpx.AsyncClient, fake: FakeApiServer, message: str
) -> None:
    """`detail` equals `message` for any text, ignoring look-alike keys nested in details."""
    fake.fail(
        "LlamaDeployApi.GetDeployment",
        grpc.StatusCode.FAILED_PRECONDITION,
        message,
        metadata={"detail": "nested detail", "message": "nested message"},
    )

    response = await client.get("/deployments/x")

    assert response.status_code == 400
    body = response.json()
    assert body["detail"] == body["message"] == message
    assert body["details"][0]["metadata"]["detail"] == "nested detail"


@SHARED
async def test_v1_error_is_rich_status_json_without_detail(
    client: httpx.AsyncClient, fake: FakeApiServer
) -> None:
    """A gRPC error on a /v1/ path is exactly the google.rpc.Status JSON."""
    fake.fail("ApiServer.GetDeployment", grpc.StatusCode.NOT_FOUND, "no such deployment")

    response = await client.get("/v1/deployments/nope")

    assert response.status_code == 404
    assert response.json() == {
        "code": 5,
        "message": "no such deployment",
        "details": [_error_info("ApiServer.GetDeployment", grpc.StatusCode.NOT_FOUND)],
    }


@SHARED
@pytest.mark.parametrize(
    ("code", "http_status"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, 400),
        (grpc.StatusCode.UNAUTHENTICATED, 401),
        (grpc.StatusCode.PERMISSION_DENIED, 403),
        (grpc.StatusCode.ALREADY_EXISTS, 409),
        (grpc.StatusCode.UNAVAILABLE, 503),
    ],
)
async def test_grpc_status_maps_to_http_status(
    client: httpx.AsyncClient, fake: FakeApiServer, code: grpc.StatusCode, http_status: int
) -> None:
    """Each gRPC status becomes its HTTP status, with the status JSON as body."""
    fake.fail("LlamaDeployApi.GetStatus", code, f"failed with {code.name}")

    response = await client.get("/status/")

    assert response.status_code == http_status
    body = response.json()
    assert (body["code"], body["message"], body["detail"]) == (
        code.value[0],
        f"failed with {code.name}",
        f"failed with {code.name}",
    )


@SHARED
async def test_unknown_path_is_json_404(client: httpx.AsyncClient) -> None:
    """Envoy's own 404 is JSON: FastAPI's words on 0.8 paths, plain status JSON on /v1/."""
    compat = await client.get("/no/such/path")
    v1 = await client.get("/v1/no/such/path")

    assert compat.status_code == v1.status_code == 404
    assert compat.headers["content-type"] == "application/json"
    assert compat.json() == {
        "detail": "Not Found",
        "code": 5,
        "message": "Not Found",
        "details": [],
    }
    assert v1.json() == {"code": 5, "message": "Not Found", "details": []}


@SHARED
async def test_malformed_json_body_is_json_400(
    client: httpx.AsyncClient, fake: FakeApiServer
) -> None:
    """A body that is not JSON is rejected by Envoy with a 400 naming the parse problem."""
    response = await client.post(
        "/deployments/d/tasks/run",
        content=b'{"input": ',
        headers={"content-type": "application/json"},
    )

    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["code"] == 3
    assert "Unexpected end of string" in body["message"]
    assert body["detail"] == body["message"]
    assert "LlamaDeployApi.RunTask" not in fake.requests


async def test_oversized_request_is_json_413(
    start_gateway: StartGateway, upstream: FakeApiServerHandle
) -> None:
    """A request body over max_request_bytes is refused with 413 naming the limit, before
    reaching the server."""
    gateway = await start_gateway(upstream.port, max_request_bytes=64 * 1024)
    big = {"input": "x" * (100 * 1024)}

    async with httpx.AsyncClient(base_url=gateway.url) as http:
        response = await http.post("/deployments/d/tasks/run", json=big)
        small = await http.post("/deployments/d/tasks/run", json={"input": "x"})

    assert response.status_code == 413
    message = "the request body is larger than the gateway's limit of 65536 bytes (64 KiB)"
    assert response.json() == {
        "detail": message,
        "code": 8,
        "message": message,
        "details": [],
    }
    assert small.status_code == 200
    assert len(upstream.fake.requests["LlamaDeployApi.RunTask"]) == 1


async def test_upstream_down_is_json_503(
    own_gateway: Gateway, upstream: FakeApiServerHandle
) -> None:
    """With the API server gone, Envoy answers 503 with UNAVAILABLE status JSON."""
    await upstream.stop()

    async with httpx.AsyncClient(base_url=own_gateway.url, timeout=STREAM_TIMEOUT) as client:
        response = await client.get("/v1/status")

    assert response.status_code == 503
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["code"] == 14
    assert body["message"].startswith("upstream connect error")
    assert body["details"] == []


async def test_envoy_errors_to_grpc_clients_stay_grpc(
    own_gateway: Gateway, upstream: FakeApiServerHandle
) -> None:
    """gRPC clients get Envoy's own errors as a plain grpc-status and grpc-message, not JSON."""
    await upstream.stop()

    async with grpc.aio.insecure_channel(own_gateway.address) as channel:
        stub = apiserver_pb2_grpc.ApiServerStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetStatus(apiserver_pb2.GetStatusRequest(), timeout=STREAM_TIMEOUT)

    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert (caught.value.details() or "").startswith("upstream connect error")


# -- pass-through --------------------------------------------------------------------------


@SHARED
async def test_raw_grpc_passes_through(gateway: Gateway, fake: FakeApiServer) -> None:
    """gRPC (h2c) on the gateway port reaches the API server, errors and details intact."""
    fake.fail("ApiServer.GetDeployment", grpc.StatusCode.NOT_FOUND, "nope")
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        stub = apiserver_pb2_grpc.ApiServerStub(channel)
        status = await stub.GetStatus(apiserver_pb2.GetStatusRequest(), timeout=STREAM_TIMEOUT)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetDeployment(apiserver_pb2.GetDeploymentRequest(name="x"))

    assert (status.healthy, status.version, list(status.deployments)) == (
        True,
        "0.1.0",
        ["quickstart"],
    )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    rich = rpc_status.from_call(caught.value)
    assert rich is not None
    info = error_details_pb2.ErrorInfo()
    assert rich.details[0].Unpack(info)
    assert info.reason == "NOT_FOUND"


@SHARED
async def test_grpc_web_passes_through(client: httpx.AsyncClient) -> None:
    """gRPC-Web (binary) on the gateway port is bridged to gRPC and back."""
    message = apiserver_pb2.GetStatusRequest().SerializeToString()
    response = await client.post(
        "/llama_mesh.v1.ApiServer/GetStatus",
        content=struct.pack(">BI", 0, len(message)) + message,
        headers={"content-type": "application/grpc-web+proto", "x-grpc-web": "1"},
    )

    assert response.status_code == 200
    assert response.headers["content-type"] == "application/grpc-web+proto"
    frames = _grpc_web_frames(response.content)
    assert [flag for flag, _ in frames] == [0x00, 0x80]
    status = apiserver_pb2.GetStatusResponse.FromString(frames[0][1])
    assert status.healthy
    trailers = dict(
        line.split(":", 1) for line in frames[1][1].decode().strip().split("\r\n") if line
    )
    assert trailers["grpc-status"].strip() == "0"


def _grpc_web_frames(data: bytes) -> list[tuple[int, bytes]]:
    frames = []
    while data:
        flag, length = struct.unpack(">BI", data[:5])
        frames.append((flag, data[5 : 5 + length]))
        data = data[5 + length :]
    return frames


# -- CORS ---------------------------------------------------------------------------------------


@SHARED
async def test_cors_preflight_from_allowed_origin(client: httpx.AsyncClient) -> None:
    """A preflight from a configured origin is answered with the allow headers."""
    response = await client.options(
        "/deployments/d/tasks/run",
        headers={
            "origin": ALLOWED_ORIGIN,
            "access-control-request-method": "POST",
            "access-control-request-headers": "content-type",
        },
    )
    simple = await client.get("/status/", headers={"origin": ALLOWED_ORIGIN})

    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "POST" in response.headers["access-control-allow-methods"]
    assert "content-type" in response.headers["access-control-allow-headers"]
    assert simple.headers["access-control-allow-origin"] == ALLOWED_ORIGIN


@SHARED
async def test_cors_preflight_from_other_origin_gets_no_allow_headers(
    client: httpx.AsyncClient,
) -> None:
    """A preflight (or request) from an origin not configured gets no CORS allow headers:
    a 403 (see test_request_guard.py)."""
    origin = "http://elsewhere.example"
    response = await client.options(
        "/deployments/d/tasks/run",
        headers={"origin": origin, "access-control-request-method": "POST"},
    )
    simple = await client.get("/status/", headers={"origin": origin})

    assert "access-control-allow-origin" not in response.headers
    assert (response.status_code, simple.status_code) == (403, 403)
    assert "access-control-allow-origin" not in simple.headers


# -- configuration and process ---------------------------------------------------------------


def test_public_api() -> None:
    """The gateway package exports exactly this, sorted."""
    assert gateway_package.__all__ == [
        "DEFAULT_DESCRIPTOR_PATH",
        "TRANSCODED_SERVICES",
        "EnvoyNotFoundError",
        "Gateway",
        "GatewayConfig",
        "GatewayError",
        "GatewayStartError",
        "InvalidEnvoyConfigError",
        "find_envoy_binary",
        "render_envoy_config",
        "render_envoy_yaml",
        "validate_config",
    ]


def test_validate_config_accepts_the_rendered_config(tmp_path: Path) -> None:
    """`envoy --mode validate` accepts what render_envoy_yaml writes, CORS and admin included;
    the admin is a Unix socket of mode 0600, never a TCP address."""
    socket_path = tmp_path / "admin.sock"
    cfg = GatewayConfig(upstream_port=50051, admin_socket=socket_path, cors_origins=("*",))

    validate_config(cfg)

    assert "llama_mesh.v1.LlamaDeployApi" in render_envoy_yaml(cfg)
    admin = render_envoy_config(cfg)["admin"]["address"]
    assert admin == {"pipe": {"path": str(socket_path), "mode": 0o600}}


def test_validate_config_rejects_a_broken_config(tmp_path: Path) -> None:
    """A config Envoy cannot load is rejected with Envoy's own reason in the error."""
    broken = tmp_path / "broken.binpb"
    broken.write_bytes(b"this is not a descriptor set")

    with pytest.raises(InvalidEnvoyConfigError, match="Unable to parse proto descriptor"):
        validate_config(GatewayConfig(upstream_port=50051, descriptor_path=broken))


async def test_stop_leaves_no_envoy_process(
    start_gateway: StartGateway, upstream: FakeApiServerHandle
) -> None:
    """Gateway.stop() ends the Envoy process (its PID is gone) and can be called again."""
    gateway = await start_gateway(upstream.port)
    pid = gateway.pid

    await gateway.stop()
    await gateway.stop()

    assert not gateway.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_second_gateway_on_a_taken_port_fails_to_start(
    start_gateway: StartGateway, upstream: FakeApiServerHandle, tmp_path: Path
) -> None:
    """A port already served is an error with Envoy's reason, not a silently shared port."""
    first = await start_gateway(upstream.port)
    cfg = GatewayConfig(listen_port=first.port, upstream_port=upstream.port)

    with pytest.raises(GatewayStartError, match="Address already in use"):
        await Gateway.start(cfg, work_dir=tmp_path / "second")


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="needs Linux pidfd")
async def test_envoy_dies_with_its_parent(tmp_path: Path) -> None:
    """When the process that started the gateway is killed, Envoy gets SIGTERM and exits."""
    script = textwrap.dedent(
        f"""
        import asyncio, pathlib
        from llama_mesh.server.gateway import Gateway, GatewayConfig

        async def main() -> None:
            cfg = GatewayConfig(listen_port=0, upstream_port=9)
            gateway = await Gateway.start(cfg, work_dir=pathlib.Path({str(tmp_path)!r}))
            print(gateway.pid, flush=True)
            await asyncio.Event().wait()

        asyncio.run(main())
        """
    )
    parent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stdout=subprocess.PIPE
    )
    try:
        assert parent.stdout is not None
        async with asyncio.timeout(30):
            envoy_pid = int(await parent.stdout.readline())
        pidfd = os.pidfd_open(envoy_pid)
    finally:
        parent.send_signal(signal.SIGKILL)
        await parent.wait()
    loop = asyncio.get_running_loop()
    try:
        # A pidfd becomes readable when its process exits: a watch, not a polling loop.
        exited: asyncio.Future[None] = loop.create_future()
        loop.add_reader(pidfd, exited.set_result, None)
        try:
            async with asyncio.timeout(10):
                await exited
        finally:
            loop.remove_reader(pidfd)
    finally:
        os.close(pidfd)


def _make_self_signed(directory: Path, name: str, san: str) -> tuple[Path, Path]:
    """A self-signed certificate for ``san`` (e.g. ``IP:127.0.0.1``) and its key."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-days", "1", "-subj", f"/CN={san.partition(':')[2]}",
            "-addext", f"subjectAltName={san}",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )  # fmt: skip
    return cert, key


@pytest.fixture
def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key (made with the openssl command)."""
    return _make_self_signed(tmp_path, "cert", "IP:127.0.0.1")


async def test_tls_on_the_listener_and_to_the_upstream(
    tmp_path: Path, self_signed: tuple[Path, Path]
) -> None:
    """With certificates configured, clients speak HTTPS and Envoy speaks TLS to the server."""
    cert, key = self_signed
    handle = await start_fake_apiserver(
        tls=grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    )
    cfg = GatewayConfig(
        listen_port=0,
        upstream_port=handle.port,
        tls_cert=cert,
        tls_key=key,
        upstream_tls_ca=cert,
    )
    try:
        async with await Gateway.start(cfg, work_dir=tmp_path / "envoy") as gateway:
            assert gateway.url.startswith("https://127.0.0.1:")
            verify = ssl.create_default_context(cafile=str(cert))
            async with httpx.AsyncClient(base_url=gateway.url, verify=verify) as http:
                response = await http.get("/v1/status")
    finally:
        await handle.stop()

    assert response.status_code == 200
    assert response.json()["healthy"] is True


# -- TLS to the upstream by name, and the standalone CLI (docker-compose.yml) ------------------

TLS_TEST_TIMEOUT = 60.0


def _upstream_tls(cfg: GatewayConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """The rendered upstream cluster and its UpstreamTlsContext."""
    (cluster,) = render_envoy_config(cfg)["static_resources"]["clusters"]
    return cluster, cluster["transport_socket"]["typed_config"]


@pytest.mark.parametrize(
    ("upstream", "san_type", "san", "sni"),
    [
        ("apiserver:50051", "DNS", "apiserver", "apiserver"),
        ("api.mesh.internal.:50051", "DNS", "api.mesh.internal", "api.mesh.internal"),
        ("127.0.0.1:50051", "IP_ADDRESS", "127.0.0.1", None),
        ("[0:0::1]:50051", "IP_ADDRESS", "::1", None),
    ],
)
def test_cli_renders_upstream_sni_and_san_checks(
    pki: Pki, upstream: str, san_type: str, san: str, sni: str | None
) -> None:
    """TLS to the upstream checks the certificate names the host dialled (DNS name or IP, as
    Envoy prints it), and sends a host name, never an IP, as SNI; Envoy accepts the config."""
    cfg = parse_config(
        [
            "--upstream", upstream,
            "--tls-cert", str(pki.cert), "--tls-key", str(pki.key),
            "--upstream-tls-ca", str(pki.ca),
            "--upstream-tls-cert", str(pki.cert), "--upstream-tls-key", str(pki.key),
        ]
    )  # fmt: skip

    cluster, tls = _upstream_tls(cfg)
    assert cluster["type"] == ("STRICT_DNS" if san_type == "DNS" else "STATIC")
    assert tls.get("sni") == sni
    validation = tls["common_tls_context"]["validation_context"]
    assert validation["trusted_ca"] == {"filename": str(pki.ca)}
    assert validation["match_typed_subject_alt_names"] == [
        {"san_type": san_type, "matcher": {"exact": san}}
    ]
    assert tls["common_tls_context"]["tls_certificates"] == [
        {
            "certificate_chain": {"filename": str(pki.cert)},
            "private_key": {"filename": str(pki.key)},
        }
    ]
    validate_config(cfg)


def test_cli_balances_over_several_upstreams(pki: Pki) -> None:
    """Repeated ``--upstream``: one endpoint each, active gRPC health checks, ejection on
    connection failures only (never on an API server's own answers), the certificate may
    name any of the hosts (no SNI with several names), read calls retried on another
    server also after a reset or UNAVAILABLE, other calls only when they never reached one;
    Envoy accepts the config."""
    cfg = parse_config(
        [
            "--upstream", "api-a:50051", "--upstream", "10.0.0.7:50052",
            "--upstream-tls-ca", str(pki.ca),
        ]
    )  # fmt: skip

    cluster, tls = _upstream_tls(cfg)
    (locality,) = cluster["load_assignment"]["endpoints"]
    addresses = [e["endpoint"]["address"]["socket_address"] for e in locality["lb_endpoints"]]
    assert [(a["address"], a["port_value"]) for a in addresses] == [
        ("api-a", 50051),
        ("10.0.0.7", 50052),
    ]
    assert cluster["type"] == "STRICT_DNS"
    assert "sni" not in tls
    assert tls["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"] == [
        {"san_type": "DNS", "matcher": {"exact": "api-a"}},
        {"san_type": "IP_ADDRESS", "matcher": {"exact": "10.0.0.7"}},
    ]
    (check,) = cluster["health_checks"]
    assert check["grpc_health_check"] == {}
    outliers = cluster["outlier_detection"]
    assert outliers["split_external_local_origin_errors"] is True
    assert outliers["enforcing_consecutive_5xx"] == 0
    routes = {r["name"]: r for r in render_envoy_config(cfg)["static_resources"]["listeners"][0][
        "filter_chains"][0]["filters"][0]["typed_config"]["route_config"]["virtual_hosts"][0][
        "routes"]}  # fmt: skip
    reads = routes["grpc-reads"]["route"]["retry_policy"]["retry_on"].split(",")
    others = routes["grpc"]["route"]["retry_policy"]["retry_on"].split(",")
    assert set(others) == {"connect-failure", "refused-stream"}
    assert set(reads) == {"connect-failure", "refused-stream", "reset", "unavailable"}
    assert routes["v1-sse"]["route"]["retry_policy"]["retry_on"].split(",") == reads
    validate_config(cfg)


@pytest.mark.parametrize(
    ("method", "read"),
    [
        ("/llama_mesh.v1.ApiServer/GetTask", True),
        ("/llama_mesh.v1.ApiServer/WatchTasks", True),
        ("/llama_mesh.v1.LlamaDeployApi/GetTaskResult", True),
        ("/llama_mesh.v1.ControlPlane/StreamTaskResult", True),
        ("/grpc.health.v1.Health/Check", True),
        ("/llama_mesh.v1.ApiServer/CreateTask", False),
        ("/llama_mesh.v1.ApiServer/RunTask", False),
        ("/llama_mesh.v1.ApiServer/CancelTask", False),
        ("/llama_mesh.v1.ApiServer/SendEvent", False),
        ("/llama_mesh.v1.ApiServer/CreateDeployment", False),
        ("/llama_mesh.v1.ControlPlane/RegisterService", False),
        ("/llama_mesh.v1.ApiServer/GetTaskX/CreateTask", False),
    ],
)
def test_only_read_methods_are_retried_as_reads(method: str, read: bool) -> None:
    """The read-method pattern (matched whole, as Envoy's safe_regex is) takes gets, lists,
    watches and streams, never a call that changes something."""
    assert (re.fullmatch(READ_METHOD_REGEX, method) is not None) is read


@pytest.mark.parametrize(
    ("more", "balanced", "problem"),
    [
        ((("b", 2),), False, "more_upstreams: several upstreams need balanced"),
        ((("b", 0),), True, "more_upstreams: b:0 is not HOST:PORT"),
        ((("", 2),), True, "more_upstreams: :2 is not HOST:PORT"),
    ],
)
def test_further_upstreams_are_checked(
    more: tuple[tuple[str, int], ...], balanced: bool, problem: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)):
        GatewayConfig(upstream_port=1, more_upstreams=more, balanced=balanced)


def test_cli_several_upstreams_each_need_host_and_port(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_config(["--upstream", "a:1", "--upstream", "b"])
    assert exited.value.code == 2
    assert "--upstream must be HOST:PORT, not 'b'" in capsys.readouterr().err


def test_cli_tls_options_come_from_the_environment_as_absolute_paths(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """LLAMA_MESH_* give the TLS options (empty is unset, flags win); relative paths are made
    absolute against the current directory, without following symbolic links."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "real.pem").touch()
    (tmp_path / "link.pem").symlink_to(tmp_path / "real.pem")
    monkeypatch.setenv("LLAMA_MESH_TLS_CERT", "certs/gateway.pem")
    monkeypatch.setenv("LLAMA_MESH_TLS_KEY", "certs/gateway.key")
    monkeypatch.setenv("LLAMA_MESH_UPSTREAM_TLS_CA", "/certs/ca.pem")
    monkeypatch.setenv("LLAMA_MESH_UPSTREAM_TLS_CERT", "")
    monkeypatch.setenv("LLAMA_MESH_UPSTREAM_TLS_KEY", "")

    cfg = parse_config(["--upstream", "apiserver:50051", "--tls-key", "link.pem"])

    assert cfg.tls_cert == tmp_path / "certs" / "gateway.pem"
    assert cfg.tls_key == tmp_path / "link.pem"
    assert cfg.upstream_tls_ca == Path("/certs/ca.pem")
    assert cfg.upstream_tls_cert is None and cfg.upstream_tls_key is None
    assert parse_config(["--upstream", "a:1"]).listener_tls


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tls-cert", "c.pem"], "--tls-cert, --tls-key: set both"),
        (["--tls-key", "k.pem"], "--tls-cert, --tls-key: set both"),
        (["--upstream-tls-ca", "ca.pem", "--upstream-tls-cert", "c.pem"], "--upstream-tls-key"),
        (
            ["--upstream-tls-cert", "c.pem", "--upstream-tls-key", "k.pem"],
            "needs --upstream-tls-ca",
        ),
    ],
)
def test_cli_half_set_tls_options_are_usage_errors(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    """A certificate without its key (or a client certificate without a CA) is a usage error
    naming the options, not a traceback or a config Envoy would reject later."""
    for name in ("TLS_CERT", "TLS_KEY", "UPSTREAM_TLS_CA", "UPSTREAM_TLS_CERT", "UPSTREAM_TLS_KEY"):
        monkeypatch.delenv(f"LLAMA_MESH_{name}", raising=False)

    with pytest.raises(SystemExit) as exited:
        parse_config(["--upstream", "apiserver:50051", *args])

    assert exited.value.code == 2
    assert message in capsys.readouterr().err


async def test_https_gateway_in_front_of_an_mtls_upstream(pki: Pki, tmp_path: Path) -> None:
    """The module's config (HTTPS listener, mTLS upstream) serves an HTTPS request through an
    API server that requires client certificates; without Envoy's client certificate the
    same request is a prompt 503 with UNAVAILABLE status JSON."""
    handle = await start_fake_apiserver(
        tls=grpc.ssl_server_credentials(
            [(pki.key.read_bytes(), pki.cert.read_bytes())],
            root_certificates=pki.ca.read_bytes(),
            require_client_auth=True,
        )
    )
    base = ["--upstream", f"127.0.0.1:{handle.port}", "--port", "0"]
    base += ["--tls-cert", str(pki.cert), "--tls-key", str(pki.key)]
    base += ["--upstream-tls-ca", str(pki.ca)]
    client_cert = ["--upstream-tls-cert", str(pki.cert), "--upstream-tls-key", str(pki.key)]
    verify = ssl.create_default_context(cafile=str(pki.ca))
    try:
        async with asyncio.timeout(TLS_TEST_TIMEOUT):
            cfg = parse_config(base + client_cert)
            # The module prints exactly this config (what docker-compose.yml hands to Envoy).
            module = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "llama_mesh.server.gateway", *base, *client_cert,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )  # fmt: skip
            printed, errors = await module.communicate()
            assert module.returncode == 0, errors.decode()
            assert printed.decode() == render_envoy_yaml(cfg)

            async with (
                await Gateway.start(cfg, work_dir=tmp_path / "mtls") as gateway,
                httpx.AsyncClient(base_url=gateway.url, verify=verify, timeout=10) as http,
            ):
                assert gateway.url.startswith("https://")
                served = await http.get("/v1/status")
            without = parse_config(base)
            async with (
                await Gateway.start(without, work_dir=tmp_path / "no-client-cert") as gateway,
                httpx.AsyncClient(base_url=gateway.url, verify=verify, timeout=10) as http,
            ):
                refused = await http.get("/v1/status")
    finally:
        await handle.stop()

    assert served.status_code == 200
    assert served.json()["healthy"] is True
    assert refused.status_code == 503
    assert refused.headers["content-type"] == "application/json"
    assert refused.json()["code"] == 14
    assert refused.json()["message"].startswith("upstream connect error")
    assert len(handle.fake.requests["ApiServer.GetStatus"]) == 1


async def test_upstream_dialled_by_name_needs_a_certificate_for_that_name(
    pki: Pki, tmp_path: Path
) -> None:
    """Dialling the upstream as `localhost`, Envoy accepts a certificate for DNS:localhost and
    refuses (503) one that names only IP 127.0.0.1, though both are trusted."""
    by_name, by_name_key = _make_self_signed(tmp_path, "localhost", "DNS:localhost")
    results: dict[str, httpx.Response] = {}
    san_failures: dict[str, int] = {}
    for label, (cert, key, ca) in {
        "dns": (by_name, by_name_key, by_name),
        "ip-only": (pki.cert, pki.key, pki.ca),
    }.items():
        handle = await start_fake_apiserver(
            tls=grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
        )
        cfg = parse_config(
            ["--upstream", f"localhost:{handle.port}", "--port", "0", "--upstream-tls-ca", str(ca)]
        )
        try:
            async with (
                asyncio.timeout(TLS_TEST_TIMEOUT),
                await Gateway.start(cfg, work_dir=tmp_path / label) as gateway,
                httpx.AsyncClient(base_url=gateway.url, timeout=10) as http,
            ):
                results[label] = await http.get("/v1/status")
                admin = httpx.AsyncHTTPTransport(uds=str(gateway.admin_socket))
                async with httpx.AsyncClient(transport=admin, timeout=10) as admin_http:
                    stats = await admin_http.get(
                        "http://admin/stats", params={"filter": "ssl.fail_verify_san$"}
                    )
                san_failures[label] = int(stats.text.rpartition(":")[2])
        finally:
            await handle.stop()

    assert results["dns"].status_code == 200
    assert results["ip-only"].status_code == 503
    assert results["ip-only"].json()["code"] == 14
    assert san_failures["dns"] == 0
    assert san_failures["ip-only"] >= 1


async def test_upstream_host_name_is_sent_as_sni(tmp_path: Path) -> None:
    """Envoy names the upstream host in its TLS ClientHello (SNI), for servers with several."""
    cert, key = _make_self_signed(tmp_path, "localhost", "DNS:localhost")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["h2"])
    names: list[str | None] = []
    context.sni_callback = lambda _sock, name, _ctx: names.append(name)

    async def hang_up(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    cfg = parse_config(
        ["--upstream", f"localhost:{port}", "--port", "0", "--upstream-tls-ca", str(cert)]
    )
    try:
        async with (
            asyncio.timeout(TLS_TEST_TIMEOUT),
            await Gateway.start(cfg, work_dir=tmp_path / "sni") as gateway,
            httpx.AsyncClient(base_url=gateway.url, timeout=10) as http,
        ):
            response = await http.get("/v1/status")
    finally:
        server.close()
        await server.wait_closed()

    assert response.status_code == 503
    assert names and set(names) == {"localhost"}
