"""API keys on every route (gRPC and, through the gateway, JSON), admin-only operations,
source confinement, loopback-only listening, HTTPS on the gateway and mTLS on the gRPC port."""

from __future__ import annotations

import asyncio
import json
import ssl
from pathlib import Path

import grpc
import httpx
import pytest
from click.testing import CliRunner
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llama_mesh.client import AsyncClient, UnavailableError
from llama_mesh.client.cli import llamactl
from llama_mesh.server.allowlist import SourcePolicy
from llama_mesh.server.app import MeshServer, ServerSettings
from llama_mesh.server.auth import ApiKeys, parse_keys
from llama_mesh.server.errors import PermissionDeniedError
from llama_mesh.server.serve import build_parser, settings_from_args
from llama_mesh.v1 import apiserver_pb2, apiserver_pb2_grpc
from tests.fixtures.mesh import TESTAPP, MeshFactory
from tests.fixtures.pki import Pki

USER = "user-key-0123456789abcdef"
ADMIN = "admin-key-0123456789abcdef"
KEYS = ApiKeys(user=(USER,), admin=(ADMIN,))


def bearer(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


async def secured(mesh_factory: MeshFactory) -> MeshServer:
    return await mesh_factory(gateway=True, api_keys=KEYS, deploy=(TESTAPP,))


async def test_grpc_calls_need_a_key(mesh_factory: MeshFactory) -> None:
    """Without a key, or with an unknown one, every call is UNAUTHENTICATED; health is open."""
    server = await secured(mesh_factory)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = apiserver_pb2_grpc.ApiServerStub(channel)
        for metadata in (None, bearer("not-a-key-0123456789"), [("authorization", USER)]):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.GetStatus(apiserver_pb2.GetStatusRequest(), metadata=metadata)
            assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
        ok = await stub.GetStatus(apiserver_pb2.GetStatusRequest(), metadata=bearer(USER))
        assert "testapp" in ok.deployments
        with pytest.raises(grpc.aio.AioRpcError) as err:
            events = stub.StreamEvents(
                apiserver_pb2.StreamEventsRequest(deployment="testapp", task_id="x")
            )
            async for _ in events:
                pass
        assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_admin_operations_need_the_admin_key(mesh_factory: MeshFactory) -> None:
    """A user key runs tasks but cannot deploy or delete; an admin key can."""
    server = await secured(mesh_factory)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = apiserver_pb2_grpc.ApiServerStub(channel)
        run = apiserver_pb2.RunTaskRequest(deployment="testapp")
        task = (await stub.RunTask(run, metadata=bearer(USER))).task
        assert task.result.string_value == "echo: "
        delete = apiserver_pb2.DeleteDeploymentRequest(name="testapp")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.DeleteDeployment(delete, metadata=bearer(USER))
        assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert "admin" in (err.value.details() or "")
        await stub.DeleteDeployment(delete, metadata=bearer(ADMIN))


async def test_gateway_routes_need_a_key(mesh_factory: MeshFactory) -> None:
    """Through the gateway: 401 JSON without a key (with `detail` on 0.8 routes), 403 for a
    user key on an admin route, 200 with a good key."""
    server = await secured(mesh_factory)
    assert server.gateway_url is not None
    async with httpx.AsyncClient(base_url=server.gateway_url) as http:
        plain = await http.get("/status/")
        assert plain.status_code == 401
        assert plain.json()["code"] == 16 and "API key" in plain.json()["detail"]
        v1 = await http.get("/v1/status")
        assert v1.status_code == 401 and "detail" not in v1.json()
        ok = await http.get("/v1/status", headers={"authorization": f"Bearer {USER}"})
        assert ok.status_code == 200
        deny = await http.post(
            "/v1/deployments",
            json={"config_yaml": TESTAPP.read_text(), "reload": True},
            headers={"authorization": f"Bearer {USER}"},
        )
        assert deny.status_code == 403


def test_keys_must_be_long_enough() -> None:
    """Short keys are refused when the server starts; comma lists are split."""
    assert parse_keys(["a" * 16 + "," + "b" * 16]) == ("a" * 16, "b" * 16)
    with pytest.raises(ValueError, match="at least 16"):
        parse_keys(["short"])


async def test_local_sources_stay_inside_allowed_roots(
    mesh_factory: MeshFactory, tmp_path: Path
) -> None:
    """A local source outside the deployment directory, or a deployment outside the allowed
    roots, is refused with PERMISSION_DENIED."""
    server = await mesh_factory(allowed_local_roots=(TESTAPP.parent,))
    escape = (
        "name: esc\nservices:\n  a:\n    name: A\n"
        "    source: {type: local, name: ../..}\n    path: app_workflows:echo\n"
    )
    with pytest.raises(PermissionDeniedError, match="outside"):
        await server.mesh.deployments.create(
            escape, base_path=str(TESTAPP.parent), reload=False, local=True
        )
    elsewhere = escape.replace("../..", ".")
    with pytest.raises(PermissionDeniedError, match="allowed root"):
        await server.mesh.deployments.create(
            elsewhere, base_path=str(tmp_path), reload=False, local=True
        )


async def test_git_sources_limited_to_the_allow_list(mesh_factory: MeshFactory) -> None:
    """With an allow-list, a git source elsewhere is refused before anything is cloned."""
    server = await mesh_factory(allowed_git_prefixes=("https://git.example.com/ours/",))
    yaml = (
        "name: gitty\nservices:\n  a:\n    name: A\n"
        "    source: {type: git, name: https://elsewhere.example.com/x.git@main}\n"
        "    path: app:wf\n"
    )
    with pytest.raises(PermissionDeniedError, match="not allowed"):
        await server.mesh.deployments.create(yaml, base_path=".", reload=False, local=False)
    assert SourcePolicy().allowed_git_prefixes is None


def _listening(port: int) -> list[str]:
    """Local addresses with a TCP listener on ``port`` (from /proc/net/tcp and tcp6)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, state = fields[1], fields[3]
            host, _, hex_port = address.partition(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.append(host)
    return found


async def test_nothing_listens_beyond_loopback(mesh_factory: MeshFactory) -> None:
    """The gateway, the gRPC server and the embedded nats-server listen on 127.0.0.1 only."""
    server = await mesh_factory(queue="nats", gateway=True)
    assert server.gateway_url is not None and server.nats_url is not None
    ports = {
        "gateway": int(server.gateway_url.rsplit(":", 1)[1]),
        "grpc": server.grpc_port,
        "nats": int(server.nats_url.rsplit(":", 1)[1]),
    }
    # 127.0.0.1 as /proc/net/tcp writes it, the same as an IPv4-mapped IPv6 address, and ::1
    loopback = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}
    for name, port in ports.items():
        hosts = _listening(port)
        assert hosts, f"{name} is not listening on {port}"
        assert set(hosts) <= loopback, f"{name} listens on {hosts}"


async def tls_mesh(mesh_factory: MeshFactory, pki: Pki) -> MeshServer:
    """A server with HTTPS on the gateway and mTLS on the gRPC port, all from ``pki``."""
    return await mesh_factory(
        gateway=True,
        deploy=(TESTAPP,),
        tls_cert=pki.cert,
        tls_key=pki.key,
        internal_ca=pki.ca,
        internal_cert=pki.cert,
        internal_key=pki.key,
    )


async def test_gateway_serves_https_in_front_of_mtls(mesh_factory: MeshFactory, pki: Pki) -> None:
    """Clients trusting the CA speak HTTPS to the gateway, which reaches the mTLS-only gRPC
    port with its client certificate: status and a task run work end to end."""
    server = await tls_mesh(mesh_factory, pki)
    assert server.gateway_url is not None and server.gateway_url.startswith("https://127.0.0.1:")
    verify = ssl.create_default_context(cafile=str(pki.ca))
    async with httpx.AsyncClient(base_url=server.gateway_url, verify=verify, timeout=30) as http:
        status = await http.get("/v1/status")
        assert status.status_code == 200, status.text
        assert "testapp" in status.json()["deployments"]
        task = await http.post(
            "/v1/deployments/testapp/tasks:run", json={"input": {"message": "over TLS"}}
        )
        assert task.status_code == 200, task.text
        assert task.json()["task"]["result"] == "echo: over TLS"
    async with httpx.AsyncClient(base_url=server.gateway_url, timeout=10) as untrusting:
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await untrusting.get("/v1/status")


async def test_grpc_port_needs_a_client_certificate(mesh_factory: MeshFactory, pki: Pki) -> None:
    """Plaintext, and TLS without a client certificate, are refused; with one signed by the
    internal CA, calls and health checks succeed."""
    server = await tls_mesh(mesh_factory, pki)
    target = f"127.0.0.1:{server.grpc_port}"
    request = apiserver_pb2.GetStatusRequest()
    async with grpc.aio.insecure_channel(target) as plain:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await apiserver_pb2_grpc.ApiServerStub(plain).GetStatus(request, timeout=10)
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    ca = pki.ca.read_bytes()
    anonymous = grpc.ssl_channel_credentials(root_certificates=ca)
    async with grpc.aio.secure_channel(target, anonymous) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await apiserver_pb2_grpc.ApiServerStub(channel).GetStatus(request, timeout=10)
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    client = grpc.ssl_channel_credentials(
        root_certificates=ca,
        private_key=pki.key.read_bytes(),
        certificate_chain=pki.cert.read_bytes(),
    )
    async with grpc.aio.secure_channel(target, client) as channel:
        status = await apiserver_pb2_grpc.ApiServerStub(channel).GetStatus(request, timeout=10)
        assert "testapp" in status.deployments
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_tls_options_come_in_sets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Half a certificate/key pair, two of the three internal options, or HTTPS without the
    gateway, are refused naming the options; the flags (and their environment) fill them."""
    ca, cert, key = (tmp_path / name for name in ("ca.pem", "cert.pem", "key.pem"))
    with pytest.raises(ValueError, match=r"tls_cert, tls_key .*: set both"):
        ServerSettings(data_dir=tmp_path, tls_cert=cert)
    with pytest.raises(ValueError, match="need the gateway"):
        ServerSettings(data_dir=tmp_path, gateway=False, tls_cert=cert, tls_key=key)
    with pytest.raises(ValueError, match=r"--internal-key\): set all three"):
        ServerSettings(data_dir=tmp_path, internal_ca=ca, internal_cert=cert)
    with pytest.raises(ValueError, match="--tls-cert, --tls-key"):
        settings_from_args(build_parser().parse_args(["--tls-key", str(key)]))
    monkeypatch.setenv("LLAMA_MESH_INTERNAL_CA", str(ca))
    args = ["--internal-cert", str(cert), "--internal-key", str(key)]
    settings = settings_from_args(build_parser().parse_args(args))
    assert settings.internal_tls
    assert (settings.internal_ca, settings.internal_cert, settings.internal_key) == (ca, cert, key)


async def test_sdk_and_llamactl_present_a_client_certificate(
    mesh_factory: MeshFactory, pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the mTLS-only gRPC port, the SDK with the CA and a client certificate runs a task,
    with the CA alone it gets UnavailableError, and llamactl's --tls-* options work too."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    for name in ("ADDRESS", "API_KEY", "TLS_CA", "TLS_CERT", "TLS_KEY"):
        monkeypatch.delenv(f"LLAMA_MESH_{name}", raising=False)
    server = await tls_mesh(mesh_factory, pki)
    target = f"127.0.0.1:{server.grpc_port}"
    client = AsyncClient(target, timeout=30, tls_ca=pki.ca, tls_cert=pki.cert, tls_key=pki.key)
    async with client:
        assert await client.run("testapp", service="echo", message="mTLS") == "echo: mTLS"
    async with AsyncClient(target, timeout=10, tls_ca=pki.ca) as anonymous:
        with pytest.raises(UnavailableError):
            await anonymous.status()

    async def llamactl_(*args: str) -> tuple[int, str, str]:
        runner = CliRunner()
        argv = ["-s", target, "-t", "10", "--tls-ca", str(pki.ca), *args, "-o", "json", "status"]
        call = asyncio.to_thread(runner.invoke, llamactl, argv, prog_name="llamactl")
        result = await asyncio.wait_for(call, 60)
        return result.exit_code, result.stdout, result.stderr

    code, out, err = await llamactl_("--tls-cert", str(pki.cert), "--tls-key", str(pki.key))
    assert code == 0, err
    assert json.loads(out)["deployments"] == ["testapp"]
    code, out, err = await llamactl_()
    assert code == 1 and err.startswith(f"Error: cannot reach the server at {target}")
