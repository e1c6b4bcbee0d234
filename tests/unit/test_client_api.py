"""The SDK's public surface, its configuration, its models, and its calls against a fake server.

The fake is a small in-process ``grpc.aio`` server with scripted answers: it pins what the
client sends (bearer token, page tokens, resume indexes) without a whole mesh behind it.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from google.protobuf import struct_pb2

import llama_mesh.client
from llama_mesh.client import (
    AsyncClient,
    Client,
    ConfigError,
    Deployment,
    DeploymentStatus,
    EventKind,
    Task,
    TaskEvent,
    TaskStatus,
    UnavailableError,
    _resources,
)
from llama_mesh.client._config import ConfigFile, Profile, grpc_target, resolve_settings
from llama_mesh.v1 import apiserver_pb2, apiserver_pb2_grpc, types_pb2

PUBLIC_API = [
    "AlreadyExistsError",
    "ApiError",
    "AsyncClient",
    "Client",
    "ConfigError",
    "DeadlineExceededError",
    "Deployment",
    "DeploymentStatus",
    "EventKind",
    "FailedPreconditionError",
    "InvalidArgumentError",
    "LlamaMeshError",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "ServerStatus",
    "Service",
    "ServiceInstance",
    "Session",
    "Task",
    "TaskError",
    "TaskEvent",
    "TaskFailedError",
    "TaskStatus",
    "UnauthenticatedError",
    "UnavailableError",
    "__version__",
]


def test_public_api_is_pinned_and_sorted() -> None:
    """``llama_mesh.client.__all__`` is exactly the documented surface, sorted, importable."""
    assert llama_mesh.client.__all__ == PUBLIC_API
    assert sorted(PUBLIC_API) == PUBLIC_API
    for name in PUBLIC_API:
        assert hasattr(llama_mesh.client, name), name


def test_client_does_not_import_the_server() -> None:
    """Importing the SDK and the CLI loads no ``llama_mesh.server`` module (nor nats)."""
    code = (
        "import sys, llama_mesh.client, llama_mesh.client.cli; "
        "bad = [m for m in sys.modules "
        "       if m.startswith(('llama_mesh.server', 'nats', 'workflows'))]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


# -- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("server", "target", "tls"),
    [
        ("http://localhost:4501", "localhost:4501", False),
        ("http://localhost:4501/", "localhost:4501", False),
        ("https://mesh.example.com", "mesh.example.com:443", True),
        ("HTTP://example.com", "example.com:80", False),
        ("http://[::1]:4501", "[::1]:4501", False),
        ("127.0.0.1:9000", "127.0.0.1:9000", None),
        ("mesh.internal", "mesh.internal:4501", None),
        ("dns:///mesh:4501", "dns:///mesh:4501", None),
        ("unix:/tmp/mesh.sock", "unix:/tmp/mesh.sock", None),
    ],
)
def test_server_urls_become_grpc_targets(server: str, target: str, tls: bool | None) -> None:
    """0.8's HTTP URLs and plain addresses both give a gRPC target; https means TLS."""
    assert grpc_target(server) == (target, tls)


@pytest.mark.parametrize("server", ["", "ftp://host", "http://:80", "http://host:notaport"])
def test_bad_server_urls_are_config_errors(server: str) -> None:
    """An unusable server address is a ConfigError that names it, not a gRPC failure later."""
    with pytest.raises(ConfigError):
        grpc_target(server)


def write_profiles(path: Path, **profiles: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump({"current_profile": "default", "profiles": profiles}))
    return path


def test_precedence_is_explicit_then_env_then_profile_then_default(tmp_path: Path) -> None:
    """Each setting comes from the argument, else the environment, else the profile file."""
    config = write_profiles(
        tmp_path / "config.yaml",
        default={"server": "http://profile:1111", "timeout": 7},
        other={"server": "https://other:2222"},
    )
    env = {"LLAMA_MESH_ADDRESS": "env:3333", "LLAMA_MESH_API_KEY": "env-key"}
    explicit = resolve_settings("arg:4444", api_key="k", config_path=config, environ=env)
    assert (explicit.target, explicit.api_key, explicit.timeout) == ("arg:4444", "k", 7.0)
    from_env = resolve_settings(config_path=config, environ=env)
    assert (from_env.target, from_env.api_key) == ("env:3333", "env-key")
    from_profile = resolve_settings(config_path=config, environ={})
    assert (from_profile.target, from_profile.tls, from_profile.api_key) == (
        "profile:1111",
        False,
        None,
    )
    other = resolve_settings(config_path=config, profile="other", environ={})
    assert (other.target, other.tls, other.timeout) == ("other:2222", True, 120.0)
    missing = tmp_path / "absent.yaml"
    default = resolve_settings(config_path=missing, environ={})
    assert (default.target, default.tls, default.timeout) == ("127.0.0.1:4501", False, None)
    with pytest.raises(ConfigError, match="Profile nope does not exist"):
        resolve_settings(config_path=config, profile="nope", environ={})


def test_a_ca_file_from_the_environment_turns_tls_on(tmp_path: Path) -> None:
    """``LLAMA_MESH_TLS_CA`` names a PEM file: its bytes become the trusted roots."""
    ca = tmp_path / "ca.pem"
    ca.write_bytes(b"-----BEGIN CERTIFICATE-----\n")
    settings = resolve_settings(
        "mesh:443", config_path=tmp_path / "none.yaml", environ={"LLAMA_MESH_TLS_CA": str(ca)}
    )
    assert (settings.tls, settings.root_certificates) == (True, ca.read_bytes())
    with pytest.raises(ConfigError, match="LLAMA_MESH_TLS_CA"):
        resolve_settings(environ={"LLAMA_MESH_TLS_CA": str(tmp_path / "nope.pem")})


def pem_files(tmp_path: Path, *names: str) -> list[Path]:
    """Files standing for PEM certificates and keys (their bytes are their names)."""
    paths = [tmp_path / f"{name}.pem" for name in names]
    for path in paths:
        path.write_bytes(path.name.encode())
    return paths


def test_the_ca_comes_from_argument_then_env_then_profile(tmp_path: Path) -> None:
    """``tls_ca=`` (a path), else ``LLAMA_MESH_TLS_CA``, else the profile's ``tls_ca``
    (relative to the profile file); ``root_certificates=`` and ``tls_ca=`` exclude each other."""
    arg, env, prof = pem_files(tmp_path, "arg-ca", "env-ca", "prof-ca")
    config = write_profiles(tmp_path / "config.yaml", default={"tls_ca": "prof-ca.pem"})
    environ = {"LLAMA_MESH_TLS_CA": str(env)}
    explicit = resolve_settings("mesh:1", tls_ca=arg, config_path=config, environ=environ)
    assert (explicit.tls, explicit.root_certificates) == (True, b"arg-ca.pem")
    from_env = resolve_settings("mesh:1", config_path=config, environ=environ)
    assert from_env.root_certificates == b"env-ca.pem"
    from_profile = resolve_settings("mesh:1", config_path=config, environ={})
    assert (from_profile.tls, from_profile.root_certificates) == (True, b"prof-ca.pem")
    with pytest.raises(ConfigError, match="root_certificates and tls_ca"):
        resolve_settings(root_certificates=b"x", tls_ca=arg, config_path=config, environ={})
    prof.unlink()
    with pytest.raises(ConfigError, match=r"profiles\.default\.tls_ca: cannot read"):
        resolve_settings(config_path=config, environ={})


def test_a_client_certificate_comes_as_a_pair(tmp_path: Path) -> None:
    """``tls_cert=`` with ``tls_key=``, else ``LLAMA_MESH_TLS_CERT`` with ``_KEY``, else the
    profile's pair: the PEM bytes to present (TLS on); half a pair is an error naming both."""
    a_cert, a_key, e_cert, e_key, p_cert, p_key = pem_files(
        tmp_path, "a-cert", "a-key", "e-cert", "e-key", "p-cert", "p-key"
    )
    config = write_profiles(
        tmp_path / "config.yaml",
        default={"server": "http://mesh:1", "tls_cert": str(p_cert), "tls_key": p_key.name},
        half={"tls_cert": str(p_cert)},
    )
    env = {"LLAMA_MESH_TLS_CERT": str(e_cert), "LLAMA_MESH_TLS_KEY": str(e_key)}
    explicit = resolve_settings(tls_cert=a_cert, tls_key=a_key, config_path=config, environ=env)
    assert (explicit.certificate_chain, explicit.private_key) == (b"a-cert.pem", b"a-key.pem")
    assert explicit.tls and explicit.root_certificates is None  # the system's roots
    assert "a-key" not in repr(explicit)
    from_env = resolve_settings(config_path=config, environ=env)
    assert (from_env.certificate_chain, from_env.private_key) == (b"e-cert.pem", b"e-key.pem")
    from_profile = resolve_settings(config_path=config, environ={})
    assert (from_profile.tls, from_profile.certificate_chain, from_profile.private_key) == (
        True,
        b"p-cert.pem",
        b"p-key.pem",
    )
    with pytest.raises(ConfigError, match="tls_cert and tls_key: set both or neither"):
        resolve_settings(tls_key=a_key, config_path=config, environ=env)
    half_env = {"LLAMA_MESH_TLS_CERT": str(e_cert)}
    with pytest.raises(ConfigError, match="LLAMA_MESH_TLS_CERT and LLAMA_MESH_TLS_KEY: set"):
        resolve_settings(config_path=config, environ=half_env)
    with pytest.raises(ConfigError, match=r"profiles\.half\.tls_cert and tls_key: set"):
        resolve_settings(config_path=config, profile="half", environ={})
    missing = {"LLAMA_MESH_TLS_CERT": str(e_cert), "LLAMA_MESH_TLS_KEY": str(tmp_path / "no")}
    with pytest.raises(ConfigError, match="LLAMA_MESH_TLS_KEY: cannot read"):
        resolve_settings(config_path=config, environ=missing)


async def test_the_channel_presents_the_client_certificate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CA, certificate and key all reach ``grpc.ssl_channel_credentials``."""
    ca, cert, key = pem_files(tmp_path, "ca", "cert", "key")
    seen: list[dict[str, Any]] = []
    real = grpc.ssl_channel_credentials

    def spy(**kwargs: Any) -> grpc.ChannelCredentials:
        seen.append(kwargs)
        return real()

    monkeypatch.setattr(grpc, "ssl_channel_credentials", spy)
    async with AsyncClient("127.0.0.1:1", tls_ca=ca, tls_cert=cert, tls_key=key) as client:
        client._transport._get_stub()
    assert seen == [
        {
            "root_certificates": b"ca.pem",
            "private_key": b"key.pem",
            "certificate_chain": b"cert.pem",
        }
    ]


@pytest.mark.parametrize(
    ("content", "key"),
    [
        ("profiles: {default: {timeout: -1}}", "profiles.default.timeout"),
        ("profiles: {default: {server: 12}}", "profiles.default.server"),
        ("profiles: {default: {insecure: maybe}}", "profiles.default.insecure"),
        ("profiles: {default: {colour: red}}", "profiles.default.colour"),
        ("profiles: {default: {tls_cert: 12}}", "profiles.default.tls_cert"),
        ("profiles: [1, 2]", "'profiles'"),
        ("- just a list", "top level"),
    ],
)
def test_profile_file_errors_name_the_key(tmp_path: Path, content: str, key: str) -> None:
    """A malformed profile file is a ConfigError naming the file and the key at fault."""
    path = tmp_path / "config.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=key) as info:
        ConfigFile.load(path)
    assert str(path) in str(info.value)


def test_profile_file_round_trips_in_the_08_layout(tmp_path: Path) -> None:
    """``write`` saves ``current_profile`` and ``profiles`` the way Llama Deploy 0.8 reads them."""
    path = tmp_path / "sub" / "config.yaml"
    config = ConfigFile.load(path)
    assert config.profiles == {"default": Profile()}
    config.profiles["x"] = Profile(server="http://x:1", insecure=True, timeout=3.0)
    config.current_profile = "x"
    config.write()
    assert yaml.safe_load(path.read_text()) == {
        "current_profile": "x",
        "profiles": {
            "default": {"server": "http://localhost:4501", "insecure": False, "timeout": 120.0},
            "x": {"server": "http://x:1", "insecure": True, "timeout": 3.0},
        },
    }
    assert ConfigFile.load(path) == config
    config.profiles["x"] = Profile(tls_ca="/ca.pem", tls_cert="/c.pem", tls_key="/k.pem")
    config.write()
    saved = yaml.safe_load(path.read_text())["profiles"]["x"]
    assert (saved["tls_ca"], saved["tls_cert"], saved["tls_key"]) == ("/ca.pem", "/c.pem", "/k.pem")
    assert ConfigFile.load(path) == config


# -- models ----------------------------------------------------------------------------------


def test_task_from_proto() -> None:
    """A Task message becomes a Task: enums, JSON values with ints, unset times as None."""
    msg = types_pb2.Task(
        task_id="t",
        deployment="d",
        service_id="s",
        session_id="x",
        status=types_pb2.TASK_STATUS_FAILED,
        error=types_pb2.TaskError(type="ValueError", message="boom"),
        attempts=2,
    )
    msg.input.update({"n": 3, "f": 1.5, "nested": {"k": [1, "a"]}})
    msg.created_at.FromSeconds(1_700_000_000)
    task = Task._from_proto(msg)
    assert task.status is TaskStatus.FAILED and task.is_final
    assert task.input == {"n": 3, "f": 1.5, "nested": {"k": [1, "a"]}}
    assert isinstance(task.input["n"], int)
    assert task.error is not None and task.error.type == "ValueError"
    assert task.created_at is not None and task.created_at.timestamp() == 1_700_000_000
    assert task.started_at is None and task.result is None
    done = types_pb2.Task(status=types_pb2.TASK_STATUS_SUCCEEDED)
    done.result.CopyFrom(struct_pb2.Value(string_value="ok"))
    assert Task._from_proto(done).result == "ok"
    assert Task._from_proto(types_pb2.Task()).status is TaskStatus.QUEUED


def test_event_and_deployment_from_proto() -> None:
    """Events know whether they are final; deployments carry their services and replicas."""
    event = types_pb2.TaskEvent(task_id="t", index=4, kind=types_pb2.EVENT_KIND_RESULT, type="r")
    event.data.update({"result": 2})
    parsed = TaskEvent._from_proto(event)
    assert (parsed.kind, parsed.is_final, parsed.data) == (EventKind.RESULT, True, {"result": 2})
    assert not TaskEvent._from_proto(
        types_pb2.TaskEvent(kind=types_pb2.EVENT_KIND_WORKFLOW)
    ).is_final
    msg = types_pb2.Deployment(name="d", status=types_pb2.DEPLOYMENT_STATUS_READY, generation=3)
    msg.services.add(id="echo", replicas=2, healthy=True).instances.add(instance_id="i", pid=7)
    deployment = Deployment._from_proto(msg)
    assert deployment.status is DeploymentStatus.READY
    assert deployment.services[0].instances[0].pid == 7
    assert deployment.created_at is None


# -- against a fake server -------------------------------------------------------------------


@dataclass
class Fake(apiserver_pb2_grpc.ApiServerServicer):
    """Scripted ApiServer: records metadata and requests, breaks event streams on demand."""

    auth: list[str] = field(default_factory=list)
    from_indexes: list[int] = field(default_factory=list)
    break_after: list[int] = field(default_factory=list)
    """For each StreamEvents call in turn: abort with UNAVAILABLE after this many events."""
    total_events: int = 4

    def _record(self, context: grpc.aio.ServicerContext) -> None:
        meta = dict(context.invocation_metadata() or ())
        self.auth.append(str(meta.get("authorization", "")))

    async def GetStatus(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._record(context)
        return apiserver_pb2.GetStatusResponse(healthy=True, version="9", deployments=["d"])

    async def ListDeployments(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._record(context)
        page = int(request.page_token or 0)
        token = str(page + 1) if page < 2 else ""
        deployment = types_pb2.Deployment(name=f"d{page}")
        return apiserver_pb2.ListDeploymentsResponse(
            deployments=[deployment], next_page_token=token
        )

    async def StreamEvents(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        self._record(context)
        self.from_indexes.append(request.from_index)
        limit = self.break_after.pop(0) if self.break_after else None
        sent = 0
        for index in range(request.from_index, self.total_events):
            if limit is not None and sent >= limit:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")
            final = index == self.total_events - 1
            kind = types_pb2.EVENT_KIND_RESULT if final else types_pb2.EVENT_KIND_WORKFLOW
            yield apiserver_pb2.StreamEventsResponse(
                event=types_pb2.TaskEvent(task_id=request.task_id, index=index, kind=kind)
            )
            sent += 1
        if limit is not None and sent >= limit:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")


@pytest.fixture
async def fake() -> AsyncIterator[tuple[Fake, str]]:
    servicer = Fake()  # type: ignore[abstract]
    server = grpc.aio.server()
    apiserver_pb2_grpc.add_ApiServerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


@pytest.fixture(autouse=True)
def no_profile_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never read the developer's own ``~/.config/llamactl`` or environment."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    for name in ("ADDRESS", "API_KEY", "TLS_CA", "TLS_CERT", "TLS_KEY"):
        monkeypatch.delenv(f"LLAMA_MESH_{name}", raising=False)


async def test_bearer_token_on_every_call(fake: tuple[Fake, str]) -> None:
    """With an API key, every unary and streaming call carries ``authorization: Bearer``."""
    servicer, address = fake
    async with AsyncClient(address, api_key="s3cret") as client:
        await client.status()
        await client.deployments.list()
        [event async for event in client.tasks.events("d", "t")]
    assert servicer.auth and set(servicer.auth) == {"Bearer s3cret"}
    async with AsyncClient(address) as client:
        await client.status()
    assert servicer.auth[-1] == ""


async def test_listing_walks_every_page(fake: tuple[Fake, str]) -> None:
    """``deployments.list()`` follows ``next_page_token`` to the last page."""
    _, address = fake
    async with AsyncClient(address) as client:
        assert [d.name for d in await client.deployments.list()] == ["d0", "d1", "d2"]


async def test_events_resume_after_unavailable(
    fake: tuple[Fake, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream broken by UNAVAILABLE resumes after the last event seen: no gap, no repeat."""
    monkeypatch.setattr(_resources, "RESUME_BACKOFF", 0.0)
    servicer, address = fake
    servicer.break_after = [2, 0, 1]
    async with AsyncClient(address) as client:
        events = [e async for e in client.tasks.events("d", "t", from_index=0)]
    assert [e.index for e in events] == [0, 1, 2, 3]
    assert events[-1].is_final
    assert servicer.from_indexes == [0, 2, 2, 3]


async def test_events_give_up_after_bounded_retries(
    fake: tuple[Fake, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the stream keeps failing without progress, UnavailableError ends the iteration."""
    monkeypatch.setattr(_resources, "RESUME_BACKOFF", 0.0)
    servicer, address = fake
    servicer.break_after = [0] * 20
    async with AsyncClient(address) as client:
        with pytest.raises(UnavailableError):
            [e async for e in client.tasks.events("d", "t")]
    assert len(servicer.from_indexes) == _resources.MAX_RESUMES + 1


async def test_unreachable_server_is_unavailable(fake: tuple[Fake, str]) -> None:
    """A closed port gives UnavailableError at once; ``connect()`` checks the server first."""
    async with AsyncClient("127.0.0.1:1", timeout=5) as client:
        with pytest.raises(UnavailableError):
            await client.status()
    with pytest.raises(UnavailableError):
        await AsyncClient.connect("127.0.0.1:1")
    connected = await AsyncClient.connect(fake[1], api_key="k")
    async with connected:
        assert connected.settings.target == fake[1]
        assert (await connected.status()).deployments == ("d",)


async def test_sync_client_inside_and_outside_a_loop(fake: tuple[Fake, str]) -> None:
    """``Client`` blocks on its own background loop: usable from threads and from a loop."""
    _, address = fake

    def use() -> tuple[str, list[int]]:
        with Client(address) as client:
            events = [e.index for e in client.tasks.events("d", "t", from_index=2)]
            return client.status().version, events

    assert await asyncio.to_thread(use) == ("9", [2, 3])
    # Called from this test's running loop (which also runs the fake, so aim elsewhere):
    # no "asyncio.run() cannot be called from a running event loop".
    with Client("127.0.0.1:1") as client:
        with pytest.raises(UnavailableError):
            client.status()
        client.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        client.status()
