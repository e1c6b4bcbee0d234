"""API keys on every route (gRPC and, through the gateway, JSON), admin-only operations,
source confinement, and loopback-only listening."""

from __future__ import annotations

from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llama_mesh.server.app import MeshServer
from llama_mesh.server.auth import ApiKeys, parse_keys
from llama_mesh.server.errors import PermissionDeniedError
from llama_mesh.server.sources import SourcePolicy
from llama_mesh.v1 import apiserver_pb2, apiserver_pb2_grpc
from tests.fixtures.mesh import TESTAPP, MeshFactory

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
