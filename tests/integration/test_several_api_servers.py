"""Several servers on one NATS cluster behind one gateway, with real processes throughout.

Two ``serve --roles api,supervisor`` processes (each an API server and a candidate
supervisor: the smallest shape in which both roles can fail over) on a three-node NATS
cluster, behind one Envoy rendered by ``python -m llama_mesh.server.gateway`` with both
as ``--upstream``. Pinned: what one API server takes, the other serves (tasks watched,
answered and cancelled through the other; deployments changed through either); and under
a steady load of clients creating tasks through the gateway, SIGKILL of the API server
that supervises nothing, then of the supervisor holding the deployment's lease, then of a
NATS node: every accepted task finishes with its own result, clients see errors only for
a bounded time after each fault, and the survivor takes the lease and runs the replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format, struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llama_mesh.server.apiserver.cluster import LEASE_TTL
from llama_mesh.server.app import MeshServer
from llama_mesh.server.errors import InvalidArgumentError, UnavailableError
from llama_mesh.server.gateway import Gateway
from llama_mesh.server.gateway.__main__ import parse_config
from llama_mesh.server.nats_server import NatsServer
from llama_mesh.server.ports import free_port
from llama_mesh.v1 import apiserver_pb2, apiserver_pb2_grpc, types_pb2
from tests.fixtures.mesh import TESTAPP, MeshFactory
from tests.helpers import assert_eventually
from tests.integration.test_child_restarts import SLOW_YAML
from tests.integration.test_faults import nats_cluster

pytestmark = pytest.mark.slow

APP = "roles"
APP_YAML = SLOW_YAML.replace("name: restarts", "name: roles", 1) + (
    "  hitl:\n"
    "    name: Human in the loop\n"
    "    source: {type: local, name: .}\n"
    "    path: app_workflows:hitl\n"
)
"""testapp's `slow` (two replicas; input ``seconds``, ``tag``; result ``{"tag", "pid"}``)
and `hitl`."""
OTHER_YAML = APP_YAML.replace("name: roles", "name: roles-other", 1)
ACK_WAIT = 3.0
BLIP = LEASE_TTL + 30.0
"""Longest a client may see errors after a fault: the lease expiring, the survivor
bringing the replicas up, a NATS election, on a loaded machine."""
CLIENTS = 3
PACE = 0.1
"""Seconds each client waits between two creates: a steady load the replicas keep up with."""
AFTER_FAULT = 12
"""Tasks each fault must see accepted after it (the clients go on meanwhile)."""
FINAL = (
    types_pb2.TASK_STATUS_SUCCEEDED,
    types_pb2.TASK_STATUS_FAILED,
    types_pb2.TASK_STATUS_CANCELLED,
)


class ServeProcess:
    """A ``serve --roles api,supervisor`` in its own process group (its replicas too),
    logging to a file; killed with its group at the end."""

    def __init__(self, name: str, root: Path, nats_urls: str) -> None:
        self.name = name
        self.grpc_port = free_port()
        self.data_dir = root / name
        self.log = root / f"{name}.log"
        self._nats_urls = nats_urls
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "llama_mesh.server",
                "--roles", "api,supervisor",
                "--nats-url", self._nats_urls, "--nats-replicas", "3",
                "--grpc-port", str(self.grpc_port),
                "--data-dir", str(self.data_dir),
                "--ack-wait", str(ACK_WAIT),
                stdout=log, stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )  # fmt: skip
        await assert_eventually(lambda: self.says("ready on"), timeout=60, interval=0.2)

    def says(self, text: str) -> bool:
        return text in self.log.read_text(errors="replace")

    def holds(self, deployment: str) -> bool:
        """Whether its log says it took the lease of ``deployment`` (since its last start)."""
        last_start = self.log.read_text(errors="replace").rsplit("ready on", 1)[-1]
        return f"holding the lease of deployment {deployment}" in last_start

    async def kill(self) -> None:
        """SIGKILL the server and everything in its group (its replicas)."""
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()

    def stub(self) -> apiserver_pb2_grpc.ApiServerStub:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.grpc_port}")
        return apiserver_pb2_grpc.ApiServerStub(channel)


@dataclass
class Mesh:
    nodes: list[NatsServer]
    servers: list[ServeProcess]
    gateway: Gateway
    api: apiserver_pb2_grpc.ApiServerStub
    """Through the gateway."""


@contextlib.asynccontextmanager
async def several_servers(root: Path) -> AsyncIterator[Mesh]:
    async with nats_cluster(root / "cluster") as nodes:
        urls = ",".join(n.url for n in nodes)
        servers = [ServeProcess(name, root, urls) for name in ("a", "b")]
        try:
            await asyncio.gather(*(s.start() for s in servers))
            cfg = parse_config(
                [*(f"--upstream=127.0.0.1:{s.grpc_port}" for s in servers), "--port", "0"]
            )
            async with await Gateway.start(cfg, work_dir=root / "envoy") as gateway:
                channel = grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}")
                yield Mesh(nodes, servers, gateway, apiserver_pb2_grpc.ApiServerStub(channel))
        finally:
            for server in servers:
                await server.kill()
            print(*(f"--- {s.name} ---\n{s.log.read_text()[-3000:]}" for s in servers))


async def deploy(api: apiserver_pb2_grpc.ApiServerStub, yaml: str) -> types_pb2.Deployment:
    request = apiserver_pb2.CreateDeploymentRequest(
        config_yaml=yaml, base_path=str(TESTAPP.parent), local=True
    )
    deployment: types_pb2.Deployment = (await api.CreateDeployment(request, timeout=120)).deployment
    return deployment


def struct(**values: str | float) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(values)
    return out


async def task_of(
    api: apiserver_pb2_grpc.ApiServerStub, task_id: str, deployment: str = APP
) -> types_pb2.Task:
    request = apiserver_pb2.GetTaskRequest(deployment=deployment, task_id=task_id)
    task: types_pb2.Task = (await api.GetTask(request, timeout=10)).task
    return task


def result_of(task: types_pb2.Task) -> object:
    """A succeeded task's result as plain JSON data (None for any other task)."""
    if task.status != types_pb2.TASK_STATUS_SUCCEEDED:
        return None
    return json.loads(json_format.MessageToJson(task.result))


async def each_serves_what_the_other_took(mesh: Mesh) -> None:
    """A deployment created through one API server is known to the other; a task created
    through one is answered (human input), watched and cancelled through the other; a
    deployment deployed, reloaded and deleted through the one that does not supervise it
    is carried out by the one holding its lease, its progress readable through either."""
    a, b = (s.stub() for s in mesh.servers)
    created = await deploy(a, APP_YAML)
    assert created.status == types_pb2.DEPLOYMENT_STATUS_READY
    status = await b.GetStatus(apiserver_pb2.GetStatusRequest())
    assert APP in status.deployments

    asking = (
        await a.CreateTask(apiserver_pb2.CreateTaskRequest(deployment=APP, service_id="hitl"))
    ).task
    events = b.StreamEvents(
        apiserver_pb2.StreamEventsRequest(deployment=APP, task_id=asking.task_id)
    )
    first = await asyncio.wait_for(anext(aiter(events)), 60)
    assert first.event.type.endswith("InputRequiredEvent")
    await b.SendEvent(
        apiserver_pb2.SendEventRequest(
            deployment=APP,
            task_id=asking.task_id,
            type="HumanResponseEvent",
            data=struct(response="from b"),
        )
    )
    answered = await assert_eventually(
        lambda: finished(a, asking.task_id), timeout=60, interval=0.2
    )
    assert answered is not None and result_of(answered) == "hi from b"
    events.cancel()

    waiting = (
        await a.CreateTask(apiserver_pb2.CreateTaskRequest(deployment=APP, service_id="hitl"))
    ).task
    await b.CancelTask(apiserver_pb2.CancelTaskRequest(deployment=APP, task_id=waiting.task_id))
    cancelled = await assert_eventually(
        lambda: finished(a, waiting.task_id), timeout=60, interval=0.2
    )
    assert cancelled is not None and cancelled.status == types_pb2.TASK_STATUS_CANCELLED

    holder, other = sorted(mesh.servers, key=lambda s: not s.holds(APP))
    assert holder.holds(APP) and not other.holds(APP)
    via_other = other.stub()
    second = await deploy(via_other, OTHER_YAML)
    assert second.status == types_pb2.DEPLOYMENT_STATUS_READY
    progress = holder.stub().StreamDeploymentProgress(
        apiserver_pb2.StreamDeploymentProgressRequest(name="roles-other"), timeout=60
    )
    lines = [message.line async for message in progress]
    assert (lines[0], lines[-1]) == ("deploying generation 1", "ready"), lines
    reloaded = await via_other.ReloadDeployment(apiserver_pb2.ReloadDeploymentRequest(name=APP))
    assert reloaded.deployment.status == types_pb2.DEPLOYMENT_STATUS_READY
    assert holder.says("deployment roles: reloading") and not other.says("reloading")
    with pytest.raises(grpc.aio.AioRpcError) as exists:
        await deploy(holder.stub(), OTHER_YAML)
    assert exists.value.code() == grpc.StatusCode.ALREADY_EXISTS
    await via_other.DeleteDeployment(apiserver_pb2.DeleteDeploymentRequest(name="roles-other"))

    async def forgotten_by_both() -> bool:
        for stub in (a, b):
            names = (await stub.GetStatus(apiserver_pb2.GetStatusRequest())).deployments
            if "roles-other" in names:
                return False
        return True

    await assert_eventually(forgotten_by_both, timeout=30)


async def finished(api: apiserver_pb2_grpc.ApiServerStub, task_id: str) -> types_pb2.Task | None:
    task = await task_of(api, task_id)
    return task if task.status in FINAL else None


async def test_roles_apart_and_a_pinned_supervisor(
    nats_url: str, mesh_factory: MeshFactory
) -> None:
    """An API server alone and a supervisor alone (pinned with ``--supervise``): the
    supervisor serves health checks but no API; a deployment it may not supervise is
    refused as NO_SUPERVISOR, withdrawn; one its settings refuse gets its error (class,
    reason, message) and leaves no lease held; one it may runs its tasks; once it stops
    (its leases released), another supervisor takes the deployment over at once."""
    api = await mesh_factory(queue="nats", nats_url=nats_url, roles=frozenset({"api"}))
    assert api.cluster is not None
    patient, api.cluster.claim_timeout = api.cluster.claim_timeout, 2.0  # none will claim
    pinned = await mesh_factory(
        queue="nats",
        nats_url=nats_url,
        roles=frozenset({"supervisor"}),
        supervise=(APP,),
        max_replicas=2,
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{pinned.grpc_port}")
    health = health_pb2_grpc.HealthStub(channel)
    checked = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert checked.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.aio.AioRpcError) as no_api:
        await apiserver_pb2_grpc.ApiServerStub(channel).GetStatus(apiserver_pb2.GetStatusRequest())
    assert no_api.value.code() == grpc.StatusCode.UNIMPLEMENTED

    deployments = api.mesh.deployments
    with pytest.raises(UnavailableError) as refused:
        await deployments.create(
            OTHER_YAML, base_path=str(TESTAPP.parent), reload=False, local=True
        )
    assert refused.value.reason == "NO_SUPERVISOR"
    assert "roles-other" not in deployments.names()
    api.cluster.claim_timeout = patient
    too_many = APP_YAML.replace("replicas: 2", "replicas: 3")
    with pytest.raises(InvalidArgumentError) as refused_there:  # the supervisor's own limit
        await deployments.create(too_many, base_path=str(TESTAPP.parent), reload=False, local=True)
    assert refused_there.value.reason == "INVALID_DEPLOYMENT"
    assert "more than this server allows: 2" in refused_there.value.message
    assert pinned.cluster is not None and not pinned.cluster.leases.holds(APP)
    await deployments.create(APP_YAML, base_path=str(TESTAPP.parent), reload=False, local=True)
    assert await run_slow(api, "first") == "first"

    await pinned.shutdown()
    await mesh_factory(queue="nats", nats_url=nats_url, roles=frozenset({"supervisor"}))
    assert await run_slow(api, "after") == "after"


async def run_slow(server: MeshServer, tag: str) -> object:
    """The tag a `slow` task created through ``server`` returns."""
    mesh = server.mesh
    task = await mesh.create_task(
        APP, service_id="slow", session_id=None, input={"seconds": 0, "tag": tag}
    )
    final = await asyncio.wait_for(mesh.wait_task(APP, task.task_id), 120)
    assert isinstance(final.result, dict), final
    return final.result["tag"]


@dataclass
class Load:
    """Clients creating `slow` tasks through the gateway, each retrying after an error."""

    api: apiserver_pb2_grpc.ApiServerStub
    accepted: dict[str, str] = field(default_factory=dict)
    """Tag -> task id of every task whose creation was acknowledged."""
    errors: list[tuple[float, str]] = field(default_factory=list)
    """When (monotonic) a client saw an error, and which."""
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def client(self, n: int) -> None:
        count = 0
        while not self.stop.is_set():
            tag = f"c{n}-{count}"
            count += 1
            request = apiserver_pb2.CreateTaskRequest(
                deployment=APP, input=struct(seconds=0.1, tag=tag)
            )
            try:
                task = (await self.api.CreateTask(request, timeout=20)).task
            except grpc.aio.AioRpcError as exc:
                self.errors.append((time.monotonic(), f"{exc.code().name}: {exc.details()}"))
            else:
                self.accepted[tag] = task.task_id
            await asyncio.sleep(PACE)  # a client's pace, not a wait for anything

    async def accepts_more(self, count: int) -> None:
        """Wait until ``count`` more tasks are accepted than now."""
        target = len(self.accepted) + count
        await assert_eventually(
            lambda: len(self.accepted) >= target, timeout=BLIP + 60, interval=0.2
        )

    def errors_since(self, start: float) -> list[tuple[float, str]]:
        return [(at - start, what) for at, what in self.errors if at >= start]


async def test_api_servers_share_all_and_faults_lose_no_accepted_task(tmp_path: Path) -> None:
    """What one API server takes the other serves (see `each_serves_what_the_other_took`;
    one test with the faults, which need the same processes, to start them once). Then
    SIGKILL of the API server supervising nothing, then (it restarted) of the supervisor
    holding the lease, then of a NATS node, under load through the gateway: every accepted
    task finishes with its own result, errors end within `BLIP` of each fault, and the
    survivor holds the lease and runs the replicas."""
    async with several_servers(tmp_path) as mesh:
        await each_serves_what_the_other_took(mesh)
        load = Load(mesh.api)
        clients = [asyncio.create_task(load.client(n)) for n in range(CLIENTS)]
        faults: list[tuple[str, float]] = []
        try:
            await load.accepts_more(AFTER_FAULT)
            holder, other = sorted(mesh.servers, key=lambda s: not s.holds(APP))

            faults.append(("api server", time.monotonic()))
            await other.kill()
            await load.accepts_more(AFTER_FAULT)
            await other.start()
            await assert_eventually(lambda: knows(other, APP), timeout=60, interval=0.2)

            faults.append(("lease holder", time.monotonic()))
            await holder.kill()
            await assert_eventually(lambda: other.holds(APP), timeout=BLIP, interval=0.2)
            await load.accepts_more(AFTER_FAULT)

            faults.append(("nats node", time.monotonic()))
            await mesh.nodes[0].kill()
            await load.accepts_more(AFTER_FAULT)
        finally:
            load.stop.set()
            await asyncio.gather(*clients)

        survivor = other.stub()
        finals: dict[str, types_pb2.Task] = {}

        async def settled() -> bool:
            nonlocal finals
            finals = await final_tasks(survivor, load.accepted.values())
            return len(finals) == len(load.accepted)

        with contextlib.suppress(AssertionError):  # the counts below say what is missing
            await assert_eventually(settled, timeout=120, interval=0.5)
        wrong = [
            tag
            for tag, task_id in load.accepted.items()
            if task_id in finals and not own_result(finals[task_id], tag)
        ]
        start = faults[0][1]
        print("faults at (s after the first):", [(w, round(at - start, 1)) for w, at in faults])
        print(
            f"accepted {len(load.accepted)} / finished {len(finals)} / lost "
            f"{len(load.accepted) - len(finals)} / wrong {len(wrong)}; client errors "
            f"{len(load.errors)} at (s after the first fault) "
            f"{[round(at, 1) for at, _ in load.errors_since(start)]}: "
            f"{sorted({what.split(':')[0] for _, what in load.errors})}"
        )
        assert (len(load.accepted) - len(finals), wrong) == (0, [])
        for (what, at), (_, until) in zip(
            faults, [*faults[1:], ("end", time.monotonic())], strict=True
        ):
            late = [e for e in load.errors if at + BLIP < e[0] < until]
            assert late == [], f"errors {BLIP:.0f} s after the {what} died: {late}"


def own_result(task: types_pb2.Task, tag: str) -> bool:
    """Whether ``task`` succeeded with the result of its own input."""
    result = result_of(task)
    return isinstance(result, dict) and result.get("tag") == tag


async def knows(server: ServeProcess, deployment: str) -> bool:
    try:
        status = await server.stub().GetStatus(apiserver_pb2.GetStatusRequest(), timeout=5)
    except grpc.aio.AioRpcError:
        return False
    return deployment in status.deployments


async def final_tasks(
    api: apiserver_pb2_grpc.ApiServerStub, task_ids: Iterable[str]
) -> dict[str, types_pb2.Task]:
    """Those of ``task_ids`` that are final, by id; read in one listing, page by page."""
    tasks: dict[str, types_pb2.Task] = {}
    token = ""
    while True:
        request = apiserver_pb2.ListTasksRequest(deployment=APP, page_size=500, page_token=token)
        try:
            page = await api.ListTasks(request, timeout=20)
        except grpc.aio.AioRpcError:
            return {}
        tasks.update((t.task_id, t) for t in page.tasks if t.status in FINAL)
        token = page.next_page_token
        if not token:
            break
    return {task_id: tasks[task_id] for task_id in task_ids if task_id in tasks}
