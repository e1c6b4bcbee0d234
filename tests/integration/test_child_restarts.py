"""The server's own child processes are supervised: a SIGKILLed embedded nats-server or
Envoy is restarted on the same port (and store and login), callers waiting meanwhile get
their results, health says what is down while it is down, and a restart that cannot
succeed ends the server with the reason. Real nats-server, Envoy and worker processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llama_mesh.server import children, convert
from llama_mesh.server.app import MeshServer
from llama_mesh.server.control_plane.store import ControlPlane
from llama_mesh.server.domain import Task, TaskStatus
from llama_mesh.server.errors import AlreadyExistsError
from llama_mesh.server.nats_server import NatsServer
from llama_mesh.server.ports import free_port
from llama_mesh.server.queues.errors import KeyExistsError
from llama_mesh.server.queues.inprocess import InProcessStateStore
from llama_mesh.server.queues.state import KeyValueStore
from llama_mesh.v1 import types_pb2
from tests.fixtures.mesh import TESTAPP, MeshFactory
from tests.helpers import assert_eventually

pytestmark = pytest.mark.slow

APP = "restarts"
SLOW_YAML = """\
name: restarts
default-service: slow
services:
  slow:
    name: Slow
    source: {type: local, name: .}
    path: app_workflows:slow
    replicas: 2
    max-concurrent-tasks: 4
    max-retries: 3
"""
"""Two replicas of `slow` (input ``seconds``, ``tag``; result ``{"tag", "pid"}``)."""
CALLERS = 6
TASKS_PER_CALLER = 20
KILL_AFTER = 30
"""Tasks finished before nats-server is killed: the rest are queued, running or not yet
created when it dies."""
WAIT = 120.0
"""Upper bound for anything to recover or finish (it takes seconds)."""
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING


@dataclass
class Tally:
    """What the callers saw."""

    accepted: int = 0
    refused: int = 0
    """Creations answered 503 (not accepted) while NATS was down; tried again."""
    finished: int = 0
    correct: int = 0
    wrong: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    broken_waits: int = 0
    """Waiting calls (event streams) that ended without the task's final event."""
    redelivered: int = 0
    """Tasks that ran more than once (in flight when NATS died)."""


async def healthy(http: httpx.AsyncClient) -> bool:
    """Whether ``/v1/status`` answers and says healthy."""
    try:
        reply = await http.get("/v1/status")
    except httpx.TransportError:
        return False
    return reply.status_code == 200 and reply.json()["healthy"] is True


async def final_task(http: httpx.AsyncClient, task_id: str) -> dict[str, object] | None:
    """The task's record once final, else ``None``."""
    reply = await http.get(f"/v1/deployments/{APP}/tasks/{task_id}")
    if reply.status_code != 200:
        return None
    task: dict[str, object] = reply.json()["task"]
    final = task["status"] not in ("TASK_STATUS_QUEUED", "TASK_STATUS_RUNNING")
    return task if final else None


async def run_one(http: httpx.AsyncClient, tag: str, tally: Tally) -> None:
    """Create a `slow` task (again while the server answers 503: not accepted), wait for
    its final event on its event stream, then check its record."""
    body = {"service_id": "slow", "input": {"seconds": 0.2, "tag": tag}}
    while True:
        created = await http.post(f"/v1/deployments/{APP}/tasks", json=body)
        if created.status_code == 200:
            break
        assert created.status_code == 503, created.text
        tally.refused += 1
        await assert_eventually(lambda: healthy(http), timeout=WAIT, interval=0.1)
    tally.accepted += 1
    task_id = created.json()["task"]["task_id"]
    ended = False
    try:
        async with http.stream("GET", f"/v1/deployments/{APP}/tasks/{task_id}/events") as events:
            async for line in events.aiter_lines():
                if line.startswith("data:") and '"result"' in line:
                    ended = True
    except httpx.HTTPError:
        pass
    if not ended:
        tally.broken_waits += 1
    try:
        task = await assert_eventually(lambda: final_task(http, task_id), timeout=WAIT)
    except AssertionError:
        tally.lost.append(task_id)
        return
    assert task is not None
    tally.finished += 1
    attempts = task.get("attempts")
    if isinstance(attempts, int) and attempts > 1:
        tally.redelivered += 1
    result = task.get("result")
    succeeded = task["status"] == "TASK_STATUS_SUCCEEDED"
    if succeeded and isinstance(result, dict) and result.get("tag") == tag:
        tally.correct += 1
        return
    tally.wrong.append(f"{task_id}: {task['status']} {result!r} (wanted {tag})")


async def caller(http: httpx.AsyncClient, n: int, tally: Tally) -> None:
    for i in range(TASKS_PER_CALLER):
        await run_one(http, f"c{n}-{i}", tally)


async def test_sigkilled_embedded_nats_under_load_loses_nothing(
    mesh_factory: MeshFactory,
) -> None:
    """SIGKILL of the embedded nats-server while concurrent callers create tasks through
    the gateway and wait for them: it is restarted on the same port, every accepted task
    finishes once with its own result (lost 0, wrong 0), waiting calls get their final
    event, and status is healthy again."""
    server = await mesh_factory(queue="nats", gateway=True)
    await server.mesh.deployments.create(
        SLOW_YAML, base_path=str(TESTAPP.parent), reload=False, local=True
    )
    assert server.gateway_url is not None and server.nats_url is not None
    store = server.settings.data_dir / "nats"
    victim, port = nats_pid(store), urllib.parse.urlsplit(server.nats_url).port
    tally = Tally()
    async with httpx.AsyncClient(base_url=server.gateway_url, timeout=WAIT) as http:
        callers = [asyncio.ensure_future(caller(http, n, tally)) for n in range(CALLERS)]
        try:
            await assert_eventually(lambda: tally.finished >= KILL_AFTER, timeout=WAIT)
            os.kill(victim, signal.SIGKILL)

            def restarted() -> bool:
                pid = nats_pid(store)
                return pid != victim and Path(f"/proc/{pid}").exists()

            await assert_eventually(restarted, timeout=WAIT)
            async with asyncio.timeout(WAIT * 2):
                await asyncio.gather(*callers)
        finally:
            for task in callers:
                task.cancel()
            await asyncio.gather(*callers, return_exceptions=True)
        total = CALLERS * TASKS_PER_CALLER
        print(
            f"\nnats-server SIGKILLed after {KILL_AFTER} of {total} tasks: accepted "
            f"{tally.accepted}, finished correctly {tally.correct}, lost {len(tally.lost)}, "
            f"wrong {len(tally.wrong)} (creations refused while down and tried again: "
            f"{tally.refused}; waits without their final event: {tally.broken_waits}; "
            f"run again after the kill: {tally.redelivered})"
        )
        assert server.nats_server is not None and server.nats_server.port == port
        assert tally.accepted == total
        assert tally.lost == [] and tally.wrong == []
        assert tally.correct == total
        assert tally.broken_waits == 0
        assert await healthy(http)
        status = (await http.get("/status/")).json()
        assert (status["status"], status["status_message"]) == ("Healthy", "")


async def grpc_health(port: int, service: str = "") -> int:
    """The gRPC health status of ``service`` on 127.0.0.1:``port``."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=10
        )
        return int(reply.status)


@dataclass
class ServeProcess:
    """``python -m llama_mesh.server`` (the real ``serve``) as a child process."""

    process: asyncio.subprocess.Process
    gateway_url: str
    grpc_port: int
    stderr_path: Path

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after 20 s; idempotent."""
        if self.process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.process.terminate()
        try:
            await asyncio.wait_for(self.process.wait(), 20)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()


async def start_serve(data_dir: Path, stderr_path: Path) -> ServeProcess:
    """Start ``serve`` with its embedded nats-server and gateway, in its own process group
    (as a shell runs a command); wait for its ready line."""
    port, grpc_port = free_port(), free_port()
    with stderr_path.open("ab") as stderr:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "llama_mesh.server",
            *("--port", str(port), "--grpc-port", str(grpc_port), "--data-dir", str(data_dir)),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            process_group=0,
        )
    assert process.stdout is not None
    try:
        async with asyncio.timeout(WAIT):
            while b"ready on" not in (line := await process.stdout.readline()):
                if not line:
                    raise AssertionError(f"serve exited:\n{stderr_path.read_text()}")
    except BaseException:
        process.kill()
        await process.wait()
        raise
    return ServeProcess(process, f"http://127.0.0.1:{port}", grpc_port, stderr_path)


def nats_pid(store: Path) -> int:
    """The pid of the nats-server running on ``store`` (written into the store's lock)."""
    return int((store / "llama-mesh.lock").read_text())


async def test_health_says_nats_is_down_and_serve_ends_when_it_cannot_restart_it(
    tmp_path: Path,
) -> None:
    """The embedded nats-server SIGKILLed with its store made unusable (its JetStream
    directory replaced by a file): while serve tries to restart it, ``/status/`` says
    Unhealthy naming NATS, and gRPC health says NOT_SERVING for the server and for
    ``llama_mesh.nats``; after the failed attempts serve exits with status 1 and says
    that nats-server could not be restarted, and why."""
    data_dir = tmp_path / "data"
    serve = await start_serve(data_dir, tmp_path / "serve.err")
    try:
        async with httpx.AsyncClient(base_url=serve.gateway_url, timeout=30) as http:
            status = (await http.get("/status/")).json()
            assert status["status"] == "Healthy"
            assert await grpc_health(serve.grpc_port) == SERVING
            assert await grpc_health(serve.grpc_port, "llama_mesh.nats") == SERVING
            store = data_dir / "nats"
            (store / "jetstream").rename(store / "jetstream.moved")
            (store / "jetstream").write_text("not a directory\n")
            os.kill(nats_pid(store), signal.SIGKILL)

            async def says_nats_is_down() -> bool:
                status = (await http.get("/status/")).json()
                return status["status"] == "Unhealthy" and "nats" in status["status_message"]

            await assert_eventually(says_nats_is_down, timeout=WAIT)
            assert await grpc_health(serve.grpc_port) == NOT_SERVING
            assert await grpc_health(serve.grpc_port, "llama_mesh.nats") == NOT_SERVING
            assert await grpc_health(serve.grpc_port, "llama_mesh.gateway") == SERVING
            assert (await http.get("/v1/status")).json()["healthy"] is False
        code = await asyncio.wait_for(serve.process.wait(), WAIT)
        err = serve.stderr_path.read_text()
        assert code == 1, err
        assert "cannot go on: nats-server could not be restarted (5 attempts)" in err
        assert "jetstream" in err  # nats-server's own reason, from its log
    finally:
        await serve.stop()


async def test_ctrl_c_stops_serve_without_restarting_its_children(tmp_path: Path) -> None:
    """SIGINT to serve's whole process group (Ctrl-C in a terminal) reaches serve only: it
    stops its nats-server and Envoy itself and exits 0, restarting neither."""
    data_dir = tmp_path / "data"
    serve = await start_serve(data_dir, tmp_path / "serve.err")
    try:
        nats = nats_pid(data_dir / "nats")
        os.killpg(serve.process.pid, signal.SIGINT)
        code = await asyncio.wait_for(serve.process.wait(), WAIT)
        err = serve.stderr_path.read_text()
        assert code == 0, err
        assert "restarting" not in err
        assert f"stopping nats-server (pid {nats})" in err
    finally:
        await serve.stop()


async def test_a_killed_or_quit_envoy_is_restarted_on_its_port(mesh_factory: MeshFactory) -> None:
    """Envoy SIGKILLed, then told to quit through its admin socket: each time the gateway
    answers again on the same port, from a new Envoy process."""
    server = await mesh_factory(gateway=True)
    gateway = server.gateway
    assert gateway is not None and server.gateway_url is not None
    port = gateway.port
    async with httpx.AsyncClient(base_url=server.gateway_url, timeout=10) as http:

        async def answers_from_a_new_envoy(old: int) -> bool:
            if gateway.pid == old:
                return False
            try:
                reply = await http.get("/status/")
            except httpx.TransportError:
                return False
            return reply.status_code == 200

        killed = gateway.pid
        os.kill(killed, signal.SIGKILL)
        await assert_eventually(lambda: answers_from_a_new_envoy(killed), timeout=WAIT)
        assert gateway.port == port

        quit_one = gateway.pid
        transport = httpx.AsyncHTTPTransport(uds=str(gateway.admin_socket))
        async with httpx.AsyncClient(transport=transport, timeout=10) as admin:
            assert (await admin.post("http://admin/quitquitquit")).status_code == 200
        await assert_eventually(lambda: answers_from_a_new_envoy(quit_one), timeout=WAIT)
        assert gateway.port == port


async def test_an_envoy_that_cannot_restart_is_reported_and_fails_the_server(
    mesh_factory: MeshFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Envoy SIGKILLed when it cannot be started again (its log path made a directory):
    gRPC health says NOT_SERVING for the server and ``llama_mesh.gateway``, and after the
    failed attempts the server reports that it cannot go on, naming Envoy. (The pauses
    between attempts are shortened: what is pinned is the count, not the 18 s they add
    up to.)"""
    monkeypatch.setattr(children, "RESTART_BACKOFF", (0.1,))
    server: MeshServer = await mesh_factory(gateway=True)
    gateway = server.gateway
    assert gateway is not None
    gateway.log_path.rename(gateway.log_path.with_suffix(".old"))
    gateway.log_path.mkdir()
    os.kill(gateway.pid, signal.SIGKILL)

    async def gateway_down() -> bool:
        return bool(await grpc_health(server.grpc_port, "llama_mesh.gateway") == NOT_SERVING)

    await assert_eventually(gateway_down, timeout=WAIT)
    assert await grpc_health(server.grpc_port) == NOT_SERVING
    assert await grpc_health(server.grpc_port, "llama_mesh.nats") == SERVING
    await asyncio.wait_for(server.failed.wait(), WAIT)
    assert "envoy could not be restarted (5 attempts)" in server.failure
    assert "gateway" in server.mesh.health.problems  # still says what is down


async def test_health_follows_an_external_nats_going_down_and_back(
    nats_server: NatsServer, mesh_factory: MeshFactory
) -> None:
    """With ``--nats-url`` (a NATS the server does not run), the status routes and gRPC
    health say NATS is down from the moment the connection is lost until it is back."""
    server = await mesh_factory(queue="nats", nats_url=nats_server.url, gateway=True)
    assert server.gateway_url is not None
    async with httpx.AsyncClient(base_url=server.gateway_url, timeout=30) as http:

        async def status() -> dict[str, str]:
            reply: dict[str, str] = (await http.get("/status/")).json()
            return reply

        assert (await status())["status"] == "Healthy"
        await nats_server.kill()

        async def down() -> bool:
            now = await status()
            return now["status"] == "Unhealthy" and "nats is down" in now["status_message"]

        await assert_eventually(down, timeout=WAIT)
        assert await grpc_health(server.grpc_port, "llama_mesh.nats") == NOT_SERVING
        assert await grpc_health(server.grpc_port) == NOT_SERVING
        await nats_server.restart()

        async def up() -> bool:
            return (await status())["status"] == "Healthy"

        await assert_eventually(up, timeout=WAIT)
        assert await grpc_health(server.grpc_port, "llama_mesh.nats") == SERVING
        assert await grpc_health(server.grpc_port) == SERVING


class LostCreateAnswerStore(InProcessStateStore):
    """The in-process state store, its tasks bucket storing a new record, then seeing it updated
    (a worker marking the task RUNNING) before it answers "key exists": what a create tried
    again after NATS came back finds when its first attempt was stored but the answer lost."""

    async def kv(self, bucket: str, *, ttl: float | None = None) -> KeyValueStore:
        store = await super().kv(bucket, ttl=ttl)
        if bucket == "tasks":
            create = store.create

            async def stored_then_taken(key: str, value: bytes) -> int:
                await create(key, value)
                running = convert.task_from_proto(types_pb2.Task.FromString(value))
                running.status = TaskStatus.RUNNING
                await store.put(key, convert.task_to_proto(running).SerializeToString())
                raise KeyExistsError(key)

            store.create = stored_then_taken  # type: ignore[method-assign]
        return store


async def test_a_create_whose_answer_was_lost_is_the_task_not_a_conflict() -> None:
    """Recording a task whose key turns out taken by that very task (its first attempt
    stored, then updated by a worker) answers the stored record, not ALREADY_EXISTS (a 409
    for a task that runs); a different task under the same id is still refused."""
    async with LostCreateAnswerStore() as store:
        cp = await ControlPlane.open(store)
        task = Task(task_id="t-1", deployment="d", service_id="s", session_id="x", input={"n": 1})
        stored = await cp.record_task(task, index=False)
        assert (stored.task.task_id, stored.task.status) == ("t-1", TaskStatus.RUNNING)
        other = Task(task_id="t-1", deployment="d", service_id="s", session_id="x", input={"n": 2})
        with pytest.raises(AlreadyExistsError, match="Task 't-1' already exists"):
            await cp.record_task(other, index=False)
