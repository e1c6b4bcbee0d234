"""docker-compose.yml: valid, and its commands really run the mesh.

No Docker engine runs here, so the file is checked for consistency and each service's
command is run natively, as written, with container hosts, ports and paths mapped onto
this machine (127.0.0.1, free ports, temporary directories, the checkout).
"""

from __future__ import annotations

import argparse
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
from llama_mesh.server.ports import free_port
from llama_mesh.server.queues.broker import ConsumerOptions
from llama_mesh.server.queues.inprocess import InProcessStateStore
from llama_mesh.server.queues.selection import BrokerChoice, select_broker
from llama_mesh.server.serve import build_parser, settings_from_args
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
    assert always == {
        *("nats-1", "nats-2", "nats-3", "apiserver-1", "apiserver-2"),
        *("supervisor-1", "supervisor-2", "gateway-config", "envoy", "worker"),
    }
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
    for name in ("apiserver-1", "apiserver-2", "envoy"):
        assert "./certs:/certs:ro" in services[name]["volumes"], name
    gateway_env = services["gateway-config"]["environment"]
    apiserver_env = services["apiserver-1"]["environment"]
    tls_env = {k: v for k, v in apiserver_env.items() if k.startswith("LLAMA_MESH_INTERNAL_")}
    assert len(tls_env) == 3
    for value in [*gateway_env.values(), *tls_env.values()]:
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

    for name in ("apiserver-1", "apiserver-2"):
        command = services[name]["command"]
        assert command[:2] == ["llamactl", "serve"]
        with monkeypatch.context() as env:
            for variable, value in services[name]["environment"].items():
                env.setenv(variable, value)
            # Known options: only the TLS settings matter here.
            args, _ = build_parser().parse_known_args(command[2:])
            settings = settings_from_args(args)
        assert settings.internal_tls, name
        assert settings.internal_ca == cfg.upstream_tls_ca, name


def nats_options(command: list[str]) -> argparse.Namespace:
    """The nats-server options compose uses, parsed."""
    parser = argparse.ArgumentParser()
    parser.add_argument("-js", action="store_true")
    for option in ("-sd", "-p", "-m", "--name", "--cluster_name", "--cluster", "--routes"):
        parser.add_argument(option, required=True)
    return parser.parse_args(command)


def test_compose_is_a_nats_cluster_behind_one_gateway() -> None:
    """Three JetStream nodes, each routed to the other two; every API server, supervisor
    and worker is given all three and keeps streams on all three; the gateway's one
    upstream name is the network alias of both API servers, on their gRPC port."""
    services = load()["services"]
    nats = {name: nats_options(services[name]["command"]) for name in services if "nats-" in name}
    assert len(nats) == 3
    client_urls = []
    for name, options in nats.items():
        assert options.js and options.name == name
        assert options.cluster_name == "llama-mesh"
        route_port = options.cluster.rsplit(":", 1)[1]
        others = sorted(f"nats://{other}:{route_port}" for other in nats if other != name)
        assert sorted(options.routes.split(",")) == others
        client_urls.append(f"nats://{name}:{options.p}")
    serve = [name for name in services if name.startswith(("apiserver-", "supervisor-"))]
    assert len(serve) == 4
    for name in serve:
        env = services[name]["environment"]
        assert sorted(env["LLAMA_MESH_NATS_URL"].split(",")) == client_urls, name
        assert env["LLAMA_MESH_NATS_REPLICAS"] == str(len(nats)), name
    worker = services["worker"]["command"]
    assert sorted(worker[worker.index("--nats") + 1].split(",")) == client_urls

    script = services["gateway-config"]["command"][-1]
    cfg = parse_config(shlex.split(script.split(">", 1)[0])[3:])
    for name in ("apiserver-1", "apiserver-2"):
        assert services[name]["networks"]["default"]["aliases"] == [cfg.upstream_host]
        assert services[name]["environment"]["LLAMA_MESH_GRPC_PORT"] == str(cfg.upstream_port)


class Natively:
    """Runs compose services' commands on this machine, container names and ports mapped
    onto 127.0.0.1: each service's own ports (4222, 6222, 8222, 50051) to free ones of its
    own, another's `host:port` to that port, and `apiserver` (the alias of both API
    servers) to both."""

    def __init__(self, tmp: Path, services: dict[str, Any]) -> None:
        self.tmp = tmp
        self.procs: list[asyncio.subprocess.Process] = []
        self.own: dict[str, dict[str, str]] = {}
        self.mapping = {
            "0.0.0.0": "127.0.0.1",
            "/app/": f"{ROOT}/",
            "/gateway/": f"{tmp}/gateway/",
            "python -": f"{sys.executable} -",
        }
        for name in services:
            own = {port: str(free_port()) for port in ("4222", "6222", "8222", "50051", "6379")}
            own["/data"] = f"{tmp}/{name}/data"
            self.own[name] = own
            for port in ("4222", "6222", "50051", "6379"):
                self.mapping[f"{name}:{port}"] = f"127.0.0.1:{own[port]}"
        self.gateway_port = free_port()
        self.mapping["4501"] = str(self.gateway_port)
        self.mapping["apiserver:50051"] = " --upstream ".join(
            self.mapping[f"{name}:50051"] for name in ("apiserver-1", "apiserver-2")
        )
        (tmp / "gateway").mkdir()

    def port(self, name: str, port: str) -> int:
        return int(self.own[name][port])

    def map(self, name: str, arg: str) -> str:
        """Replace container names in one pass (a replacement is never replaced again)."""
        mapping = {**self.own[name], **self.mapping}
        keys = sorted(mapping, key=len, reverse=True)
        pattern = re.compile("|".join(re.escape(k) for k in keys))
        return pattern.sub(lambda m: mapping[m.group(0)], arg)

    def command(self, name: str, service: dict[str, Any]) -> list[str]:
        words = [self.map(name, str(w)) for w in service["command"]]
        image = str(service.get("image", ""))
        if image.startswith("nats:"):
            words = [find_nats_server_binary(), "-a", "127.0.0.1", *words]
        if image.startswith("redis:"):
            port = self.own[name]["6379"]
            (self.tmp / name / "data").mkdir(parents=True, exist_ok=True)
            words = [redis_server_binary(), "--bind", "127.0.0.1", "--port", port, *words[1:]]
        bindir = Path(sys.executable).parent
        programs = {
            "python": sys.executable,
            "llamactl": str(bindir / "llamactl"),
            "envoy": str(find_envoy_binary()),
        }
        words[0] = programs.get(words[0], words[0])
        return words

    async def start(self, name: str, service: dict[str, Any]) -> asyncio.subprocess.Process:
        out = (self.tmp / f"{name}.log").open("wb")
        env = {k: self.map(name, str(v)) for k, v in service.get("environment", {}).items()}
        proc = await asyncio.create_subprocess_exec(
            *self.command(name, service),
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, **env},
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
    runner = Natively(tmp_path, load()["services"])
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
    """The NATS cluster, both API servers, both supervisors, the rendered gateway config,
    Envoy and an extra worker, started with the compose commands, serve a task through
    the gateway; the worker joins."""
    services = load()["services"]
    procs = {}
    for name in ("nats-1", "nats-2", "nats-3"):
        procs[name] = await natively.start(name, services[name])
    for name in ("nats-1", "nats-2", "nats-3"):
        await wait_port(natively.port(name, "4222"), procs[name])
    for name in ("apiserver-1", "apiserver-2", "supervisor-1", "supervisor-2"):
        procs[name] = await natively.start(name, services[name])
    for name in ("apiserver-1", "apiserver-2", "supervisor-1", "supervisor-2"):
        await wait_port(natively.port(name, "50051"), procs[name], timeout=90)
    config = await natively.start("gateway-config", services["gateway-config"])
    assert await config.wait() == 0
    assert (natively.tmp / "gateway" / "envoy.yaml").is_file()
    envoy = await natively.start("envoy", services["envoy"])
    await wait_port(natively.gateway_port, envoy)
    worker = await natively.start("worker", services["worker"])
    base = f"http://127.0.0.1:{natively.gateway_port}"
    async with httpx.AsyncClient(base_url=base, timeout=10) as http:

        async def answered() -> bool:
            """A task runs once the deployment is ready (503 DEPLOYMENT_NOT_READY before:
            the supervisor holding its lease is still bringing it up)."""
            try:
                reply = await http.post(
                    "/deployments/quickstart/tasks/run", json={"input": '{"message": "compose"}'}
                )
            except httpx.HTTPError:
                return False
            if reply.status_code in (404, 503):  # not yet deployed / not yet ready
                return False
            assert reply.status_code == 200, reply.text
            assert reply.json() == "Message received: compose"
            return True

        await assert_eventually(answered, timeout=90, interval=0.5)

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
    redis = await natively.start("redis", load()["services"]["redis"])
    port = natively.port("redis", "6379")
    await wait_port(port, redis)
    choice = broker_choices(natively.map("redis", COMPOSE.read_text()))["redis"]
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
    client = Redis.from_url(f"redis://127.0.0.1:{port}", decode_responses=True)
    async with client:
        config = await client.config_get("*")
    assert config["appendonly"] == "yes" and config["appendfsync"] == "always"
    assert config["dir"] == str(
        (natively.tmp / "redis" / "data").resolve()
    )  # Redis reports getcwd()
