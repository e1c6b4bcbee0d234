"""Fault injection with real processes: killed workers, a killed API server, a restarted or
killed nats-server, a flooded queue and a three-node NATS cluster losing a node.

What is pinned is DESIGN.md's reliability rules: a task that was acknowledged to its
client is never lost and ends exactly once with its own result; a restart of any one
process loses nothing acknowledged; a backlog costs the API server no memory per task.

Deployments here are small (the `slow` and `echo` workflows of ``tests/data/testapp``,
configured as the test needs) so that each test deploys in seconds. Every process a test
starts is stopped by PID, leftovers included.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import grpc
import nats.errors
import pytest
from google.protobuf import struct_pb2

from llama_mesh.server import convert, subjects
from llama_mesh.server.apiserver.brokers import DeploymentBrokers
from llama_mesh.server.apiserver.deployments import DeploymentManager, DeploymentSettings
from llama_mesh.server.apiserver.mesh import Mesh
from llama_mesh.server.apiserver.supervisor import InProcessSupervisor
from llama_mesh.server.app import ServerSettings
from llama_mesh.server.control_plane.store import ControlPlane
from llama_mesh.server.domain import EventKind, Task, TaskStatus, now
from llama_mesh.server.errors import UnavailableError
from llama_mesh.server.nats_server import (
    NatsClusterConfig,
    NatsServer,
    NatsServerConfig,
)
from llama_mesh.server.orchestrator import Orchestrator
from llama_mesh.server.ports import free_port
from llama_mesh.server.queues.broker import Broker, ConsumerOptions, Delivery
from llama_mesh.server.queues.errors import QueueError, QueueUnavailableError
from llama_mesh.server.queues.inprocess import InProcessBroker, InProcessStateStore
from llama_mesh.server.queues.iterators import Subscription
from llama_mesh.server.queues.nats import NatsBroker
from llama_mesh.server.queues.state import KeyValueStore, StateStore
from llama_mesh.v1 import apiserver_pb2, apiserver_pb2_grpc
from tests.fixtures.brokers import nats_roles
from tests.fixtures.mesh import TESTAPP, MeshFactory
from tests.helpers import assert_eventually

pytestmark = pytest.mark.slow

APP = "faults"
SLOW_YAML = """\
name: faults
default-service: slow
services:
  slow:
    name: Slow
    source: {type: local, name: .}
    path: app_workflows:slow
    replicas: 2
    max-concurrent-tasks: 4
    max-retries: 3
  tally:
    name: Session tally
    source: {type: local, name: .}
    path: app_workflows:tally
"""
"""Two replicas of `slow` (input ``seconds``, ``tag``; result ``{"tag", "pid"}``), and `tally`
(a total kept in the session's context)."""
ECHO_YAML = """\
name: faults
services:
  echo:
    name: Echo
    source: {type: local, name: .}
    path: app_workflows:echo
    replicas: 1
    max-concurrent-tasks: 1
"""
"""One replica of `echo` taking one task at a time: the slowest consumer there is."""
OUTAGE = 1.5
"""Seconds nats-server stays down after a SIGKILL: longer than a task, shorter than a TTL."""
WAIT = 60.0
"""Upper bound for a batch of tasks to finish after a fault (they take seconds)."""


async def deploy(mesh: Mesh, config_yaml: str, base_path: Path = TESTAPP.parent) -> None:
    """Deploy ``config_yaml`` with its local sources in ``base_path`` (testapp's by default)."""
    await mesh.deployments.create(config_yaml, base_path=str(base_path), reload=False, local=True)


async def create_slow_tasks(mesh: Mesh, tags: Iterable[str], seconds: float) -> dict[str, str]:
    """One `slow` task per tag; task id -> tag."""
    created = {}
    for tag in tags:
        task = await mesh.create_task(
            APP, service_id="slow", session_id=None, input={"seconds": seconds, "tag": tag}
        )
        created[task.task_id] = tag
    return created


async def wait_all(mesh: Mesh, task_ids: Iterable[str], timeout: float = WAIT) -> list[Task]:
    """Every task once final (watches, no polling), within ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        return list(await asyncio.gather(*(mesh.wait_task(APP, t) for t in task_ids)))


def assert_own_results(finals: list[Task], tags: dict[str, str]) -> None:
    """Every task succeeded with the tag it was given."""
    for task in finals:
        assert task.status is TaskStatus.SUCCEEDED, (task.task_id, task.status, task.error)
        assert task.result["tag"] == tags[task.task_id], (task.task_id, task.result)


async def running_on_some_instance(
    mesh: Mesh, task_ids: Iterable[str], *, started_within: float | None = None
) -> str:
    """The instance id of a replica that runs one of the tasks now ('' if none does);
    ``started_within``: one that started it at most that many seconds ago."""
    for task_id in task_ids:
        task = await mesh.get_task(APP, task_id)
        if task.status is not TaskStatus.RUNNING or not task.instance_id:
            continue
        if started_within is None or now() - (task.started_at or 0.0) <= started_within:
            return task.instance_id
    return ""


def depth_at_most(queue: Broker, name: str, limit: int) -> Callable[[], Awaitable[bool]]:
    """A predicate for :func:`assert_eventually`: ``queue_depth(name) <= limit``."""

    async def check() -> bool:
        return await queue.queue_depth(name) <= limit

    return check


def rss_bytes() -> int:
    """Resident memory of this process (``VmRSS`` of ``/proc/self/status``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def worker_pids(nats_url: str) -> list[int]:
    """PIDs of worker processes connected to ``nats_url`` (each test's NATS port is its own)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        # Workers get the NATS URL in their environment (never on the command line).
        if (
            b"llama_mesh.server.service" in argv
            and f"LLAMA_MESH_NATS_URL={nats_url}".encode() in env
        ):
            pids.append(int(entry.name))
    return pids


def kill_pids(pids: Iterable[int]) -> None:
    """SIGKILL each PID that still exists."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    """Whether a process with this PID exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


# -- workers ---------------------------------------------------------------------------------


async def test_killed_replica_loses_no_task_of_many_in_flight(mesh_factory: MeshFactory) -> None:
    """30 tasks over two replicas, one replica SIGKILLed while it runs some: every task ends
    SUCCEEDED once with its own tag (the killed replica's tasks on another replica), its
    final record is never rewritten, the queue drains, and the supervisor restarts the
    killed replica."""
    server = await mesh_factory(queue="nats")
    mesh = server.mesh
    await deploy(mesh, SLOW_YAML)
    original = set(server.supervisor.pids(APP, "slow"))
    assert len(original) == 2
    tags = await create_slow_tasks(mesh, (f"t{n:02}" for n in range(30)), seconds=0.5)

    async def some_done_and_one_running() -> str:
        finished = [t for t in await mesh.list_tasks(APP) if t.status is TaskStatus.SUCCEEDED]
        if len(finished) < 4:
            return ""
        # A task with half its 0.5 s ahead: a kill just as a replica's tasks end would hit
        # them between their stored results and their acknowledgements, which redelivers
        # them without running them again (attempts stay 1), not a task in flight.
        return await running_on_some_instance(mesh, tags, started_within=0.25)

    instance_id = await assert_eventually(some_done_and_one_running, timeout=30)
    victim = next(
        i.pid for i in await mesh.cp.list_instances(APP, "slow") if i.instance_id == instance_id
    )
    os.kill(victim, signal.SIGKILL)

    finals = await wait_all(mesh, tags)
    assert_own_results(finals, tags)
    redelivered = [t for t in finals if t.attempts > 1]
    assert redelivered, "the SIGKILL hit no task in flight"
    assert all(t.result["pid"] != victim for t in redelivered)
    assert all(t.instance_id != instance_id for t in redelivered)
    listed = await mesh.list_tasks(APP)
    assert sorted(t.task_id for t in listed) == sorted(tags)
    again = {t.task_id: (t.status, t.result, t.finished_at) for t in listed}
    assert again == {t.task_id: (t.status, t.result, t.finished_at) for t in finals}
    queue_name = subjects.task_queue(APP, "slow")
    await assert_eventually(depth_at_most(server.broker, queue_name, 0), timeout=10)

    async def restarted() -> bool:
        pids = set(server.supervisor.pids(APP, "slow"))
        registered = {i.pid for i in await mesh.cp.list_instances(APP, "slow")}
        return len(pids) == 2 and victim not in pids and pids <= registered

    await assert_eventually(restarted, timeout=30)


# -- the API server --------------------------------------------------------------------------


@dataclasses.dataclass
class ServerProcess:
    """``python -m llama_mesh.server`` running as a child process."""

    process: asyncio.subprocess.Process
    grpc_port: int
    log_path: Path

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

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


async def start_server_process(nats_url: str, data_dir: Path, log_path: Path) -> ServerProcess:
    """Start an API server on its own process, without gateway, and wait for its ready line."""
    grpc_port = free_port()
    command = [
        sys.executable,
        "-m",
        "llama_mesh.server",
        *("--queue", "nats", "--nats-url", nats_url, "--data-dir", str(data_dir)),
        *("--port", str(free_port()), "--grpc-port", str(grpc_port), "--no-gateway"),
        *("--ack-wait", "2", "--log-level", "INFO"),
    ]
    with log_path.open("ab") as log:
        process = await asyncio.create_subprocess_exec(
            *command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=log
        )
    server = ServerProcess(process, grpc_port, log_path)
    assert process.stdout is not None
    try:
        async with asyncio.timeout(60):
            while b"ready on" not in (line := await process.stdout.readline()):
                if not line:
                    raise AssertionError(f"the server exited before ready:\n{server.log_tail()}")
    except BaseException:
        process.kill()
        await process.wait()
        raise
    return server


def struct(**fields: Any) -> struct_pb2.Struct:
    value = struct_pb2.Struct()
    value.update(fields)
    return value


@contextlib.asynccontextmanager
async def api(port: int) -> AsyncIterator[apiserver_pb2_grpc.ApiServerStub]:
    """A gRPC ``ApiServer`` stub for the server on 127.0.0.1:``port``."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield apiserver_pb2_grpc.ApiServerStub(channel)


async def grpc_final(stub: apiserver_pb2_grpc.ApiServerStub, task_id: str) -> Task:
    """The task once its event stream (pushed by the server) has ended."""
    request = apiserver_pb2.StreamEventsRequest(deployment=APP, task_id=task_id)
    async for _ in stub.StreamEvents(request, timeout=WAIT):
        pass
    reply = await stub.GetTask(apiserver_pb2.GetTaskRequest(deployment=APP, task_id=task_id))
    return convert.task_from_proto(reply.task)


async def test_sigkilled_api_server_loses_nothing(nats_server: NatsServer, tmp_path: Path) -> None:
    """SIGKILL of the API server process with tasks in flight and queued, then a new server
    on the same data dir and NATS: the deployment, the session with its context, finished
    results and every task created before the kill are there, and all of them finish."""
    data_dir, log_path = tmp_path / "server", tmp_path / "server.log"
    servers: list[ServerProcess] = []
    try:
        first = await start_server_process(nats_server.url, data_dir, log_path)
        servers.append(first)
        async with api(first.grpc_port) as stub:
            await stub.CreateDeployment(
                apiserver_pb2.CreateDeploymentRequest(
                    config_yaml=SLOW_YAML, base_path=str(TESTAPP.parent), local=True
                ),
                timeout=WAIT,
            )
            session = (
                await stub.CreateSession(apiserver_pb2.CreateSessionRequest(deployment=APP))
            ).session
            tallied = await stub.RunTask(
                apiserver_pb2.RunTaskRequest(
                    deployment=APP,
                    service_id="tally",
                    session_id=session.session_id,
                    input=struct(amount=5),
                ),
                timeout=WAIT,
            )
            assert convert.task_from_proto(tallied.task).result == 5
            tags = {}
            for n in range(12):  # 8 run at once, 4 wait in the queue
                reply = await stub.CreateTask(
                    apiserver_pb2.CreateTaskRequest(
                        deployment=APP,
                        service_id="slow",
                        input=struct(seconds=3, tag=f"k{n}"),
                    )
                )
                tags[reply.task.task_id] = f"k{n}"

            async def some_running() -> bool:
                for task_id in tags:
                    reply = await stub.GetTask(
                        apiserver_pb2.GetTaskRequest(deployment=APP, task_id=task_id)
                    )
                    if reply.task.status == TaskStatus.RUNNING:
                        return True
                return False

            await assert_eventually(some_running, timeout=30)
        first.process.send_signal(signal.SIGKILL)
        await first.process.wait()

        second = await start_server_process(nats_server.url, data_dir, log_path)
        servers.append(second)
        async with api(second.grpc_port) as stub:
            listed = await stub.ListDeployments(apiserver_pb2.ListDeploymentsRequest())
            assert [d.name for d in listed.deployments] == [APP]
            kept = await stub.GetSession(
                apiserver_pb2.GetSessionRequest(deployment=APP, session_id=session.session_id)
            )
            assert list(kept.session.task_ids) == [tallied.task.task_id]
            done = await stub.GetTask(
                apiserver_pb2.GetTaskRequest(deployment=APP, task_id=tallied.task.task_id)
            )
            assert convert.task_from_proto(done.task).result == 5
            async with asyncio.timeout(WAIT):
                finals = await asyncio.gather(*(grpc_final(stub, t) for t in tags))
            assert_own_results(list(finals), tags)
            again = await stub.RunTask(
                apiserver_pb2.RunTaskRequest(
                    deployment=APP,
                    service_id="tally",
                    session_id=session.session_id,
                    input=struct(amount=1),
                ),
                timeout=WAIT,
            )
            assert convert.task_from_proto(again.task).result == 6
    finally:
        for server in reversed(servers):
            await server.stop()
        kill_pids(worker_pids(nats_server.url))


async def test_workers_exit_when_their_server_is_killed(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """The worker processes a server supervises exit when that server is SIGKILLed, as the
    gateway's Envoy does, instead of living on unsupervised."""
    server = await start_server_process(nats_server.url, tmp_path / "s", tmp_path / "s.log")
    try:
        async with api(server.grpc_port) as stub:
            await stub.CreateDeployment(
                apiserver_pb2.CreateDeploymentRequest(
                    config_yaml=ECHO_YAML, base_path=str(TESTAPP.parent), local=True
                ),
                timeout=WAIT,
            )
        workers = worker_pids(nats_server.url)
        assert len(workers) == 1
        server.process.send_signal(signal.SIGKILL)
        await server.process.wait()
        await assert_eventually(lambda: not any(alive(p) for p in workers), timeout=8)
    finally:
        await server.stop()
        kill_pids(worker_pids(nats_server.url))


# -- nats-server -----------------------------------------------------------------------------


async def test_nats_restart_and_crash_lose_nothing_acknowledged(
    nats_server: NatsServer, mesh_factory: MeshFactory
) -> None:
    """A graceful restart of nats-server, then a SIGKILL and a start on the same store, each
    while tasks run and wait: the server and workers reconnect, every task created before
    the fault completes with its own result, and new tasks run afterwards."""
    server = await mesh_factory(queue="nats", nats_url=nats_server.url)
    mesh = server.mesh
    await deploy(mesh, SLOW_YAML)
    all_tags: dict[str, str] = {}
    for phase in ("restart", "kill"):
        tags = await create_slow_tasks(mesh, (f"{phase}{n}" for n in range(12)), seconds=1.0)
        all_tags.update(tags)
        await assert_eventually(functools.partial(running_on_some_instance, mesh, tags), 30)
        if phase == "restart":
            await nats_server.restart()
        else:
            await nats_server.kill()
            await asyncio.sleep(OUTAGE)  # running tasks end while NATS is down
            await nats_server.restart()  # same port, same store
        finals = await wait_all(mesh, tags)
        assert_own_results(finals, tags)
    after = await create_slow_tasks(mesh, ["after"], seconds=0.1)
    assert_own_results(await wait_all(mesh, after), after)
    listed = await mesh.list_tasks(APP)
    assert sorted(t.task_id for t in listed) == sorted({**all_tags, **after})


BACKLOG = 500
PADDING = 32 * 1024
"""Bytes of input per backlog task: 500 of them queue 16 MB, twice the memory bound."""
MEMORY_BOUND = BACKLOG * PADDING // 2


async def test_backlog_costs_no_memory_per_task_and_drains(mesh_factory: MeshFactory) -> None:
    """500 tasks of 32 KB input queued for one replica that takes one at a time: the API
    server's memory grows by less than half the queued input (it holds no task after
    queueing it), the queue depth goes down as the replica works, and every task completes
    with its own result."""
    server = await mesh_factory(queue="nats")
    mesh = server.mesh
    await deploy(mesh, ECHO_YAML)
    queue_name = subjects.task_queue(APP, "echo")
    padding = "x" * PADDING
    before = rss_bytes()
    task_ids: list[str] = []
    for n in range(BACKLOG):
        task = await mesh.create_task(
            APP, service_id="echo", session_id=None, input={"message": f"{n} {padding}"}
        )
        task_ids.append(task.task_id)
    grown = rss_bytes() - before
    assert grown < MEMORY_BOUND, f"RSS grew by {grown / 2**20:.1f} MiB while queueing"
    queued = await server.broker.queue_depth(queue_name)
    assert queued > 0
    await assert_eventually(depth_at_most(server.broker, queue_name, queued - 1), timeout=10)
    async with asyncio.timeout(120):
        last = await mesh.wait_task(APP, task_ids[-1])
    assert last.status is TaskStatus.SUCCEEDED
    await assert_eventually(depth_at_most(server.broker, queue_name, 0), timeout=30)
    grown = rss_bytes() - before
    assert grown < MEMORY_BOUND, f"RSS grew by {grown / 2**20:.1f} MiB while draining"
    finals = {t.task_id: t for t in await mesh.list_tasks(APP)}
    assert len(finals) == BACKLOG
    for n, task_id in enumerate(task_ids):
        task = finals[task_id]
        assert (task.status, task.result) == (TaskStatus.SUCCEEDED, f"echo: {n} {padding}")


# -- a NATS cluster --------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def nats_cluster(store: Path, size: int = 3) -> AsyncIterator[list[NatsServer]]:
    """``size`` clustered nats-servers on 127.0.0.1 with JetStream, routes to each other,
    each with its own name, ports and store; all stopped (by PID) on exit."""
    client_ports = [free_port() for _ in range(size)]
    route_ports = [free_port() for _ in range(size)]
    configs = [
        NatsServerConfig(
            store_dir=store / f"n{i}",
            port=client_ports[i],
            server_name=f"n{i}",
            cluster=NatsClusterConfig(
                name="mesh-test",
                port=route_ports[i],
                routes=tuple(
                    f"nats-route://127.0.0.1:{p}" for j, p in enumerate(route_ports) if j != i
                ),
            ),
        )
        for i in range(size)
    ]
    # Started together: JetStream is ready only once a quorum of peers has met.
    started = await asyncio.gather(
        *(NatsServer.start(cfg, ready_timeout=30) for cfg in configs), return_exceptions=True
    )
    servers = [s for s in started if isinstance(s, NatsServer)]
    try:
        for result in started:
            if isinstance(result, BaseException):
                raise result
        yield servers
    finally:
        for server in servers:
            await server.stop()


async def open_mesh(state_store: StateStore, broker: Broker, data_dir: Path) -> Mesh:
    """The mesh's core over ``state_store`` and ``broker`` (every deployment's), with
    replicas as tasks of this process."""
    cp = await ControlPlane.open(state_store)
    supervisor = InProcessSupervisor(broker, cp.records_only())
    brokers = DeploymentBrokers(broker, state_store)
    deployments = DeploymentManager(
        cp, brokers, supervisor, DeploymentSettings(data_dir=data_dir, ack_wait=2.0)
    )
    return Mesh(cp, deployments, Orchestrator(brokers))


NAP_MODULE = """\
import asyncio
import os

from workflows import Workflow, step
from workflows.events import StartEvent, StopEvent


class Nap(Workflow):
    @step
    async def run_it(self, ev: StartEvent) -> StopEvent:
        await asyncio.sleep(float(ev.get("seconds", 1)))
        return StopEvent(result={"tag": ev.get("tag"), "pid": os.getpid()})


nap = Nap(timeout=300)
"""
"""`slow` without its streamed event: a task that publishes nothing while it runs (see
test_a_broker_error_publishing_an_event_is_not_the_workflows_failure for why)."""
NAP_YAML = """\
name: faults
services:
  slow:
    name: Nap
    source: {type: local, name: .}
    path: faults_nap:nap
    replicas: 2
    max-concurrent-tasks: 4
    max-retries: 3
"""


@contextlib.asynccontextmanager
async def clustered_mesh(
    store: Path,
) -> AsyncIterator[tuple[list[NatsServer], NatsBroker, Mesh]]:
    """A three-node cluster, a broker and state store on it with everything replicated
    three times (checked), and the mesh's core over them with `NAP_YAML` deployed
    (replicas in-process)."""
    source = store / "source"
    source.mkdir()
    (source / "faults_nap.py").write_text(NAP_MODULE)
    async with nats_cluster(store / "cluster") as nodes:
        connection, queue, state_store = await nats_roles([n.url for n in nodes], replicas=3)
        try:
            mesh = await open_mesh(state_store, queue, store / "mesh")
            try:
                await deploy(mesh, NAP_YAML, base_path=source)
                for stream in (queue.tasks_stream, queue.topics_stream, "KV_mesh_tasks"):
                    info = await queue.js.stream_info(stream)
                    assert info.config.num_replicas == 3, stream
                yield nodes, queue, mesh
            finally:
                await mesh.deployments.supervisor.shutdown()
        finally:
            await connection.close()


async def cluster_serves(queue: NatsBroker, mesh: Mesh, task_ids: Iterable[str]) -> bool:
    """Whether the streams and the `slow` consumer have leaders again and every task's
    record can be read (False while the cluster elects leaders)."""
    try:
        for stream in (queue.tasks_stream, queue.topics_stream, "KV_mesh_tasks"):
            cluster = (await queue.js.stream_info(stream)).cluster
            if cluster is None or not cluster.leader:
                return False
        consumer = queue.consumer_name(subjects.task_queue(APP, "slow"))
        cluster = (await queue.js.consumer_info(queue.tasks_stream, consumer)).cluster
        if cluster is None or not cluster.leader:
            return False
        for task_id in task_ids:
            await mesh.get_task(APP, task_id)
    except (QueueError, nats.errors.Error):
        return False
    return True


async def test_a_server_on_a_cluster_replicates_what_it_creates(
    tmp_path: Path, mesh_factory: MeshFactory
) -> None:
    """``--nats-replicas 3`` against a three-node cluster: every stream and bucket the
    server creates (work queue, topics, control-plane buckets) has three copies. (Tasks on
    such streams: the node-loss tests below.)"""
    async with nats_cluster(tmp_path / "cluster") as nodes:
        server = await mesh_factory(
            queue="nats", nats_url=",".join(n.url for n in nodes), nats_replicas=3
        )
        queue = server.broker
        assert isinstance(queue, NatsBroker)
        streams = {info.config.name: info.config for info in await queue.js.streams_info()}
        assert {queue.tasks_stream, queue.topics_stream, "KV_mesh_tasks"} <= set(streams)
        assert {name: config.num_replicas for name, config in streams.items()} == dict.fromkeys(
            streams, 3
        )
        await server.shutdown()


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({"nats_replicas": 2}, "use 1, or 3 or 5"),
        ({"nats_replicas": 3}, "needs a NATS cluster"),
        ({"nats_replicas": 3, "queue": "inprocess", "nats_url": "nats://x"}, "needs a NATS"),
    ],
)
def test_replicas_need_a_cluster(tmp_path: Path, settings: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        ServerSettings(data_dir=tmp_path, **settings)


async def test_cluster_node_loss_loses_no_acknowledged_task(tmp_path: Path) -> None:
    """On a three-node cluster with streams and buckets replicated three times, SIGKILL of
    the node leading the tasks stream while tasks run and wait: once the cluster serves
    again, every task created before is still recorded, all complete with their own
    results, and new tasks run."""
    async with clustered_mesh(tmp_path) as (nodes, queue, mesh):
        tags = await create_slow_tasks(mesh, (f"c{n}" for n in range(16)), seconds=0.5)
        await assert_eventually(lambda: running_on_some_instance(mesh, tags), timeout=30)
        leader = (await queue.js.stream_info(queue.tasks_stream)).cluster
        assert leader is not None and leader.leader
        victim = next(n for n in nodes if n.config.server_name == leader.leader)
        await victim.kill()

        await assert_eventually(lambda: cluster_serves(queue, mesh, tags), timeout=30, interval=0.5)
        finals = await wait_all(mesh, tags)
        assert_own_results(finals, tags)
        after = await assert_eventually(lambda: accepted(mesh, "after"), timeout=30, interval=0.5)
        assert_own_results(await wait_all(mesh, after), after)


STREAMING_TASKS = 8
TICKS = 200
STREAM_YAML = f"""\
name: testapp
services:
  stream:
    name: Streaming
    source: {{type: local, name: .}}
    path: app_workflows:stream
    max-concurrent-tasks: {STREAMING_TASKS}
"""
"""testapp's `stream` alone, running every task at once: all of them publish while the
cluster elects a new leader (one after the other, they took half a minute)."""


async def test_streaming_tasks_survive_the_loss_of_the_event_streams_leader(
    tmp_path: Path,
) -> None:
    """SIGKILL of the node leading the event topics stream while tasks stream events and
    callers follow them: the workers' publishes wait for the new leader instead of failing
    the tasks (they used to fail every retry during the election, ending FAILED), so every
    task succeeds on its first delivery and every caller gets every event, then the
    result."""
    async with clustered_mesh(tmp_path) as (nodes, queue, mesh):
        await deploy(mesh, STREAM_YAML)
        tasks = [
            await mesh.create_task(
                "testapp",
                service_id="stream",
                session_id=None,
                input={"count": TICKS, "delay": 0.01},
            )
            for _ in range(STREAMING_TASKS)
        ]

        seen: dict[str, list[EventKind]] = {t.task_id: [] for t in tasks}

        async def follow(task_id: str) -> None:
            async for event in mesh.stream_events("testapp", task_id):
                seen[task_id].append(event.kind)

        async with asyncio.timeout(120):
            followers = [asyncio.ensure_future(follow(t.task_id)) for t in tasks]
            await assert_eventually(lambda: all(seen.values()), timeout=60)  # all running
            leader = (await queue.js.stream_info(queue.topics_stream)).cluster
            assert leader is not None and leader.leader
            await next(n for n in nodes if n.config.server_name == leader.leader).kill()
            await asyncio.gather(*followers)
            finals = await asyncio.gather(*(mesh.wait_task("testapp", t.task_id) for t in tasks))
        for kinds in seen.values():
            assert kinds == [EventKind.WORKFLOW] * TICKS + [EventKind.RESULT]
        for final in finals:
            assert (final.status, final.attempts) == (TaskStatus.SUCCEEDED, 1), final.error
            assert final.result == {"ticks": TICKS}


class FlakyEventsBroker(InProcessBroker):
    """The in-process broker, refusing the first ``failures`` publishes to event topics as
    NATS does while a cluster elects leaders."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def publish(self, topic: str, data: bytes) -> None:
        if topic.startswith("ev.") and self.failures > 0:
            self.failures -= 1
            raise QueueUnavailableError("NATS is unavailable: NoStreamResponseError()")
        await super().publish(topic, data)


async def test_a_broker_error_publishing_an_event_is_not_the_workflows_failure(
    tmp_path: Path,
) -> None:
    """When the broker refuses a streamed event (a failover), the task is retried, not
    failed: it ends SUCCEEDED on a later delivery."""
    async with FlakyEventsBroker(failures=1) as queue, InProcessStateStore() as state_store:
        mesh = await open_mesh(state_store, queue, tmp_path)
        try:
            await deploy(mesh, SLOW_YAML)
            tags = await create_slow_tasks(mesh, ["flaky"], seconds=0.1)
            (final,) = await wait_all(mesh, tags, timeout=30)
            assert (final.status, final.error) == (TaskStatus.SUCCEEDED, None)
            assert final.attempts == 2
        finally:
            await mesh.deployments.supervisor.shutdown()


class _DeafDelivery(Delivery):
    def __init__(self, delivery: Delivery) -> None:
        self._delivery = delivery

    @property
    def data(self) -> bytes:
        return self._delivery.data

    @property
    def delivery_count(self) -> int:
        return self._delivery.delivery_count

    async def ack(self) -> None:
        await self._delivery.ack()

    async def nak(self, delay: float = 0.0) -> None:
        await self._delivery.nak(delay)

    async def term(self) -> None:
        await self._delivery.term()

    async def in_progress(self) -> None:
        pass


class _DeafDeliveries(Subscription[Delivery]):
    def __init__(self, deliveries: Subscription[Delivery], counts: list[int]) -> None:
        self._deliveries = deliveries
        self._counts = counts

    async def __anext__(self) -> Delivery:
        delivery = await anext(self._deliveries)
        self._counts.append(delivery.delivery_count)
        return _DeafDelivery(delivery)

    async def aclose(self) -> None:
        await self._deliveries.aclose()


class DeafBroker(InProcessBroker):
    """The in-process broker deaf to ``in_progress``: a worker's heartbeats unheard, as
    while a NATS cluster elects a consumer leader, so every delivery still unsettled after
    ``ack_wait`` is redelivered. ``delivery_counts``: of every delivery handed out."""

    def __init__(self) -> None:
        super().__init__()
        self.delivery_counts: list[int] = []

    def consume_tasks(self, queue: str, options: ConsumerOptions) -> Subscription[Delivery]:
        return _DeafDeliveries(super().consume_tasks(queue, options), self.delivery_counts)


COUNTED_NAP_MODULE = """\
import asyncio
from pathlib import Path

from workflows import Workflow, step
from workflows.events import StartEvent, StopEvent


class CountedNap(Workflow):
    @step
    async def run_it(self, ev: StartEvent) -> StopEvent:
        with Path(ev.get("runs")).open("a") as runs:
            runs.write("run\\n")
        await asyncio.sleep(float(ev.get("seconds")))
        return StopEvent(result={"tag": ev.get("tag")})


nap = CountedNap(timeout=300)
"""
"""A nap that appends a line to the file ``runs`` each time it starts."""
COUNTED_NAP_YAML = """\
name: faults
services:
  nap:
    name: Counted nap
    source: {type: local, name: .}
    path: faults_counted:nap
    max-concurrent-tasks: 4
    max-retries: 3
"""


async def test_a_redelivery_to_the_replica_running_the_task_waits_for_that_run(
    tmp_path: Path,
) -> None:
    """A replica's heartbeats unheard (``ack_wait`` 2 s) while it runs a 5 s task: the
    message is redelivered to that replica, which does not run the task again. The
    redeliveries wait for the run, then find the task final and are acknowledged: the
    workflow ran once, the task succeeded on its first attempt, and its message is gone."""
    async with DeafBroker() as queue, InProcessStateStore() as state_store:
        mesh = await open_mesh(state_store, queue, tmp_path)
        try:
            source = tmp_path / "source"
            source.mkdir()
            (source / "faults_counted.py").write_text(COUNTED_NAP_MODULE)
            await deploy(mesh, COUNTED_NAP_YAML, base_path=source)
            runs = tmp_path / "runs"
            task = await mesh.create_task(
                APP,
                service_id="nap",
                session_id=None,
                input={"seconds": 5, "tag": "deaf", "runs": str(runs)},
            )
            (final,) = await wait_all(mesh, [task.task_id], timeout=60)
            assert (final.status, final.attempts, final.result) == (
                TaskStatus.SUCCEEDED,
                1,
                {"tag": "deaf"},
            )
            assert max(queue.delivery_counts) >= 2  # it was redelivered while it ran
            assert runs.read_text() == "run\n"
            queue_name = subjects.task_queue(APP, "nap")
            await assert_eventually(depth_at_most(queue, queue_name, 0), timeout=30)
        finally:
            await mesh.deployments.supervisor.shutdown()


async def test_the_final_event_is_made_from_the_record_not_the_topic(
    tmp_path: Path,
) -> None:
    """No one publishes a task's final event to its topic (here every publish to an event
    topic would fail): a caller streaming the task's events gets it from the task's record
    as soon as the record is final and no workflow event is missing, not after the grace
    period for missing events."""
    async with (
        FlakyEventsBroker(failures=1_000_000) as queue,
        InProcessStateStore() as state_store,
    ):
        mesh = await open_mesh(state_store, queue, tmp_path)
        mesh.final_event_grace = 60.0
        try:
            source = tmp_path / "source"
            source.mkdir()
            (source / "faults_nap.py").write_text(NAP_MODULE)
            await deploy(mesh, NAP_YAML, base_path=source)
            tags = await create_slow_tasks(mesh, ["unpublished"], seconds=0.1)
            (task_id,) = tags
            async with asyncio.timeout(20):
                events = [e async for e in mesh.stream_events(APP, task_id)]
            assert [(e.index, e.kind) for e in events] == [(0, EventKind.RESULT)]
            assert events[0].data["result"]["tag"] == "unpublished"
            assert queue.failures == 1_000_000  # nothing was published to the topic
        finally:
            await mesh.deployments.supervisor.shutdown()


class RefusingIndexStore(InProcessStateStore):
    """The in-process state store, its session index refusing every write: a broker that
    fails part-way through accepting a task in an existing session (its message is stored,
    its entry in the session's index is not)."""

    async def kv(self, bucket: str, *, ttl: float | None = None) -> KeyValueStore:
        store = await super().kv(bucket, ttl=ttl)
        if bucket == "session_tasks":

            async def refuse(key: str, value: bytes) -> int:
                raise QueueUnavailableError("NATS is unavailable: NoRespondersError()")

            store.put = refuse  # type: ignore[method-assign]
        return store


@pytest.mark.parametrize("waits", [True, False], ids=["run", "create"])
async def test_a_task_whose_creation_fails_half_way_is_failed_not_left_queued(
    tmp_path: Path, waits: bool
) -> None:
    """The task's message is stored but its entry in its session's index is refused: the
    caller gets UNAVAILABLE naming the cause, and the task is marked FAILED at once — not
    left QUEUED, and not run to its end by the worker that got its message."""
    async with RefusingIndexStore() as state_store, InProcessBroker() as queue:
        mesh = await open_mesh(state_store, queue, tmp_path)
        try:
            await deploy(mesh, SLOW_YAML)
            session = await mesh.create_session(APP)
            create = mesh.run_task if waits else mesh.create_task
            with pytest.raises(UnavailableError, match=r"could not be created.*NoResponders"):
                await create(
                    APP,
                    service_id="slow",
                    session_id=session.session_id,
                    input={"seconds": 3.0, "tag": "x"},
                )
            (task,) = await mesh.cp.list_tasks(APP)
            (final,) = await wait_all(mesh, [task.task_id], timeout=2.0)
            assert final.status is TaskStatus.FAILED
            assert final.error is not None and final.error.type == "Unavailable"
        finally:
            await mesh.deployments.supervisor.shutdown()


async def accepted(mesh: Mesh, tag: str) -> dict[str, str]:
    """A new `slow` task, or {} while the queue refuses it (a client retries an UNAVAILABLE;
    right after a failover a publish may find no responder for a moment)."""
    try:
        return await create_slow_tasks(mesh, [tag], seconds=0.1)
    except (QueueError, UnavailableError):  # the Mesh reports a queue failure as UNAVAILABLE
        return {}


async def test_waiting_callers_survive_the_loss_of_a_cluster_node(tmp_path: Path) -> None:
    """Callers already waiting for tasks keep waiting through the SIGKILL of the node their
    connection uses, and get each task's result."""
    async with clustered_mesh(tmp_path) as (nodes, queue, mesh):
        tags = await create_slow_tasks(mesh, (f"w{n}" for n in range(8)), seconds=1.0)
        waiting = asyncio.ensure_future(wait_all(mesh, tags))
        try:
            await assert_eventually(lambda: running_on_some_instance(mesh, tags), timeout=30)
            connected = queue.nc.connected_url
            assert connected is not None
            await next(n for n in nodes if n.port == connected.port).kill()
            assert_own_results(await waiting, tags)
        finally:
            waiting.cancel()
            with contextlib.suppress(BaseException):
                await waiting


async def test_a_default_connection_keeps_replicated_streams_replicated(
    tmp_path: Path,
) -> None:
    """A process connecting with default options (as the API server and every worker do)
    does not reduce the replication of streams created with ``replicas=3``."""
    async with nats_cluster(tmp_path / "cluster") as nodes:
        urls = [n.url for n in nodes]
        connection, replicated, _ = await nats_roles(urls, replicas=3)
        try:
            plain, _, _ = await nats_roles(urls)
            await plain.close()
            info = await replicated.js.stream_info(replicated.tasks_stream)
            assert info.config.num_replicas == 3
        finally:
            await connection.close()
