"""docker-compose.yml: valid, and its commands really run the mesh.

No Docker engine runs here, so the file is checked for consistency and each service's
command is run natively, as written, with container hosts, ports and paths mapped onto
this machine (127.0.0.1, free ports, temporary directories, the checkout).
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import signal
import sys
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from redis.asyncio import Redis

from llama_mesh.server.deployment_config import parse_deployment_config
from llama_mesh.server.gateway.__main__ import parse_config
from llama_mesh.server.gateway.config import find_envoy_binary, render_envoy_config
from llama_mesh.server.nats_server import find_nats_server_binary
from llama_mesh.server.queues.broker import ConsumerOptions
from llama_mesh.server.queues.inprocess import InProcessStateStore
from llama_mesh.server.queues.selection import BrokerChoice, select_broker
from llama_mesh.server.serve import build_parser, settings_from_args
from tests.fixtures.mesh import free_port
from tests.fixtures.redis import redis_server_binary
from tests.helpers import assert_eventually, next_within

ROOT = Path(__file__).resolve().parent.parent.parent
COMPOSE = ROOT / "docker-compose.yml"


def load() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def test_compose_file_is_consistent() -> None:
    """Every service has a command or image, dependencies name services, named volumes are
    declared, the build context has the Dockerfile, and only loopback ports are published."""
    data = load()
    services = data["services"]
    always = {name for name, service in services.items() if "profiles" not in service}
    assert always == {"nats", "apiserver", "gateway-config", "envoy", "worker"}
    volumes = set(data["volumes"])
    for name, service in services.items():
        assert service.get("image") or service.get("build"), name
        assert service.get("command"), name
        for dependency in service.get("depends_on", []):
            assert dependency in services, f"{name} depends on unknown {dependency}"
        for mount in service.get("volumes", []):
            source = mount.split(":", 1)[0]
            assert source in volumes, f"{name} mounts undeclared volume {source}"
        for published in service.get("ports", []):
            assert published.startswith("127.0.0.1:"), f"{name} publishes {published}"
        build = service.get("build")
        if build:
            assert (ROOT / build["context"] / build["dockerfile"]).is_file()


BROKERS = {"rabbitmq": ("rabbitmq:3", 5672), "redis": ("redis:7", 6379)}
"""The profile's services: each one's official image (prefix) and the port it serves on."""
DATA_DIRS = {"rabbitmq": "/var/lib/rabbitmq", "redis": "/data"}
"""Where each broker's image keeps its data."""
_SECTION = re.compile(r"^\s*#\s+(message-queue: .*)$", re.M)
"""The deployment-file lines the comment above the brokers shows."""


def broker_choices(text: str) -> dict[str, BrokerChoice]:
    """The brokers the ``message-queue`` sections in ``text``'s comments select, by kind."""
    choices = {}
    for line in _SECTION.findall(text):
        config = parse_deployment_config(f"name: d\nservices: {{}}\n{line}\n").message_queue
        choice = select_broker(config, {}, BrokerChoice())
        choices[choice.kind] = choice
    return choices


def test_compose_broker_profile_is_durable_and_named_by_its_comment() -> None:
    """RabbitMQ and Redis start only with the `brokers` profile, from official images, with
    nothing else depending on them; each keeps its data in a named volume (RabbitMQ under a
    fixed host name, which names its data directory; Redis with an fsync per write); and the
    message-queue sections the comment shows select each by its service name and port."""
    services = load()["services"]
    profiled = {name for name, service in services.items() if "profiles" in service}
    assert profiled == set(BROKERS)
    for name, (image, _) in BROKERS.items():
        service = services[name]
        assert service["profiles"] == ["brokers"]
        assert service["image"].startswith(image), name
        assert service["volumes"] == [f"{name}-data:{DATA_DIRS[name]}"]
    for name, service in services.items():
        assert not profiled & set(service.get("depends_on", [])), name
    assert services["rabbitmq"]["hostname"] == "rabbitmq"
    command = services["redis"]["command"]
    options = dict(zip(command[1::2], command[2::2], strict=True))
    assert options["--appendonly"] == "yes" and options["--appendfsync"] == "always"
    assert options["--dir"] == DATA_DIRS["redis"]

    choices = broker_choices(COMPOSE.read_text())
    assert set(choices) == set(BROKERS)
    for kind, choice in choices.items():
        url = urllib.parse.urlsplit(choice.redacted_url)
        assert (url.hostname, url.port) == (kind, BROKERS[kind][1])
    assert choices["rabbitmq"].redacted_url == "amqp://guest:***@rabbitmq:5672/"


# The commented-out TLS lines: `# environment:`, its `#   LLAMA_MESH_...` entries, and
# `# - ./certs:...  # TLS` mounts.
_TLS_LINE = re.compile(r"^(\s*)# (?=environment:$|  LLAMA_MESH_\w+: |- \./certs:.*# TLS$)", re.M)


def test_compose_tls_lines_configure_https_and_mtls(monkeypatch: pytest.MonkeyPatch) -> None:
    """Uncommented, the TLS lines make a valid file whose options give HTTPS on the gateway
    and mTLS from Envoy to the API server, dialled and checked by the name `apiserver`, with
    every file mounted where the service reading it looks."""
    text = COMPOSE.read_text()
    assert "environment:" not in yaml.safe_load(text)["services"]["gateway-config"]
    services = yaml.safe_load(_TLS_LINE.sub(r"\1", text))["services"]
    for name in ("apiserver", "envoy"):
        assert "./certs:/certs:ro" in services[name]["volumes"], name
    gateway_env = services["gateway-config"]["environment"]
    apiserver_env = services["apiserver"]["environment"]
    for value in [*gateway_env.values(), *apiserver_env.values()]:
        assert value.startswith("/certs/"), value

    script = services["gateway-config"]["command"][-1]
    words = shlex.split(script.split(">", 1)[0])
    assert words[:3] == ["python", "-m", "llama_mesh.server.gateway"]
    with monkeypatch.context() as env:  # each service sees only its own environment
        for variable, value in gateway_env.items():
            env.setenv(variable, value)
        cfg = parse_config(words[3:])
    assert cfg.listener_tls
    assert cfg.upstream_tls_cert is not None
    (cluster,) = render_envoy_config(cfg)["static_resources"]["clusters"]
    tls = cluster["transport_socket"]["typed_config"]
    assert tls["sni"] == "apiserver"
    assert tls["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"] == [
        {"san_type": "DNS", "matcher": {"exact": "apiserver"}}
    ]

    command = services["apiserver"]["command"]
    assert command[:3] == ["python", "-m", "llama_mesh.server"]
    with monkeypatch.context() as env:
        for variable, value in apiserver_env.items():
            env.setenv(variable, value)
        settings = settings_from_args(build_parser().parse_args(command[3:]))
    assert settings.internal_tls
    assert settings.internal_ca == cfg.upstream_tls_ca


class Natively:
    """Runs compose commands on this machine with a mapping of container names to local."""

    def __init__(self, tmp: Path) -> None:
        self.ports = {
            "nats": free_port(),
            "grpc": free_port(),
            "gateway": free_port(),
            "redis": free_port(),
        }
        self.tmp = tmp
        self.procs: list[asyncio.subprocess.Process] = []
        self.mapping = {
            "nats://nats:4222": f"nats://127.0.0.1:{self.ports['nats']}",
            "apiserver:50051": f"127.0.0.1:{self.ports['grpc']}",
            "0.0.0.0": "127.0.0.1",
            "50051": str(self.ports["grpc"]),
            "4501": str(self.ports["gateway"]),
            "4222": str(self.ports["nats"]),
            "8222": str(free_port()),
            "/app/": f"{ROOT}/",
            "/data/": f"{tmp}/data/",
            "/data": f"{tmp}/data",
            "redis://redis:6379": f"redis://127.0.0.1:{self.ports['redis']}",
            "/gateway/": f"{tmp}/gateway/",
            "python -": f"{sys.executable} -",
        }
        (tmp / "gateway").mkdir()
        (tmp / "data").mkdir()

    def map(self, arg: str) -> str:
        """Replace container names in one pass (a replacement is never replaced again)."""
        keys = sorted(self.mapping, key=len, reverse=True)
        pattern = re.compile("|".join(re.escape(k) for k in keys))
        return pattern.sub(lambda m: self.mapping[m.group(0)], arg)

    def command(self, service: dict[str, Any]) -> list[str]:
        words = [self.map(str(w)) for w in service["command"]]
        image = str(service.get("image", ""))
        if image.startswith("nats:"):
            words = [find_nats_server_binary(), "-a", "127.0.0.1", *words]
        if image.startswith("redis:"):
            port = str(self.ports["redis"])
            words = [redis_server_binary(), "--bind", "127.0.0.1", "--port", port, *words[1:]]
        bindir = Path(sys.executable).parent
        programs = {
            "python": sys.executable,
            "llamactl": str(bindir / "llamactl"),
            "envoy": str(find_envoy_binary()),
        }
        words[0] = programs.get(words[0], words[0])
        return words

    async def start(self, service: dict[str, Any], log: str) -> asyncio.subprocess.Process:
        out = (self.tmp / f"{log}.log").open("wb")
        proc = await asyncio.create_subprocess_exec(
            *self.command(service), stdout=out, stderr=asyncio.subprocess.STDOUT, cwd=ROOT
        )
        self.procs.append(proc)
        return proc

    async def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), 15)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()


@pytest.fixture
async def natively(tmp_path: Path) -> AsyncIterator[Natively]:
    runner = Natively(tmp_path)
    try:
        yield runner
    finally:
        await runner.stop()
        for log in sorted(tmp_path.glob("*.log")):
            print(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}")


async def wait_port(port: int, proc: asyncio.subprocess.Process, timeout: float = 60) -> None:
    async with asyncio.timeout(timeout):
        while True:
            assert proc.returncode is None, "process exited before listening"
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.1)
                continue
            writer.close()
            return


async def test_compose_commands_run_the_mesh(natively: Natively) -> None:
    """nats, the API server, the rendered gateway config, Envoy and an extra worker, started
    with the compose commands, serve a task through the gateway; the worker joins."""
    services = load()["services"]
    nats = await natively.start(services["nats"], "nats")
    await wait_port(natively.ports["nats"], nats)
    api = await natively.start(services["apiserver"], "apiserver")
    await wait_port(natively.ports["grpc"], api)
    config = await natively.start(services["gateway-config"], "gateway-config")
    assert await config.wait() == 0
    assert (natively.tmp / "gateway" / "envoy.yaml").is_file()
    envoy = await natively.start(services["envoy"], "envoy")
    await wait_port(natively.ports["gateway"], envoy)
    worker = await natively.start(services["worker"], "worker")
    base = f"http://127.0.0.1:{natively.ports['gateway']}"
    async with httpx.AsyncClient(base_url=base, timeout=10) as http:

        async def deployed() -> bool:
            try:
                return "quickstart" in (await http.get("/status/")).text
            except httpx.HTTPError:
                return False

        await assert_eventually(deployed, timeout=60, interval=0.2)
        reply = await http.post(
            "/deployments/quickstart/tasks/run", json={"input": '{"message": "compose"}'}
        )
        assert reply.status_code == 200, reply.text
        assert reply.json() == "Message received: compose"

        async def two_replicas() -> bool:
            listing = (await http.get("/v1/deployments/quickstart/services")).json()
            return len(listing["services"][0]["instances"]) == 2

        await assert_eventually(two_replicas, timeout=30, interval=0.2)
    assert worker.returncode is None
    if shutil.which("docker") and os.environ.get("LLAMA_MESH_COMPOSE_CONFIG"):
        proc = await asyncio.create_subprocess_exec("docker", "compose", "config", "-q", cwd=ROOT)
        assert await proc.wait() == 0


async def test_compose_redis_command_serves_the_broker_its_comment_names(
    natively: Natively,
) -> None:
    """The redis service's command, run natively, is a Redis the Redis broker runs on, at
    the URL the comment's section gives (a task published is delivered once), with its
    append-only file fsynced on every write, in the data directory."""
    redis = await natively.start(load()["services"]["redis"], "redis")
    await wait_port(natively.ports["redis"], redis)
    choice = broker_choices(natively.map(COMPOSE.read_text()))["redis"]
    broker = await choice.connect(state_store=InProcessStateStore())
    async with broker:
        await broker.publish_task("compose", b"task", msg_id="m1")
        await broker.publish_task("compose", b"task", msg_id="m1")
        consumer = broker.consume_tasks("compose", ConsumerOptions())
        delivery = await next_within(consumer, 30)
        assert delivery.data == b"task"
        await delivery.ack()
        assert await broker.queue_depth("compose") == 0
        await consumer.aclose()
    client = Redis.from_url(f"redis://127.0.0.1:{natively.ports['redis']}", decode_responses=True)
    async with client:
        config = await client.config_get("*")
    assert config["appendonly"] == "yes" and config["appendfsync"] == "always"
    assert config["dir"] == str((natively.tmp / "data").resolve())  # Redis reports getcwd()
