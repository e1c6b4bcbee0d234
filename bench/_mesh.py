"""llama-mesh under load: the server in a child process, driven over gRPC and JSON.

The server (``bench._mesh_server``) runs in its own process with an embedded nats-server,
one worker process per replica and the Envoy gateway; this process is only the client. Its
memory and CPU time are read from ``/proc`` for the API server, the nats-server and the
workers separately.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import aiohttp
import grpc
import httpx
from google.protobuf import struct_pb2

from bench import _disk
from bench._apps import (
    DEPLOYMENT,
    GATE_DEPLOYMENT,
    MESH_DEPLOYMENTS,
    TWO_REPLICAS_DEPLOYMENT,
    write_mesh_app,
)
from bench._procs import children, cpu_seconds, dir_bytes, settled_rss
from bench._stats import Latencies, Memory, Throughput, per_1000_mib
from llama_mesh.server.ports import free_port
from llama_mesh.v1 import apiserver_pb2, apiserver_pb2_grpc, types_pb2

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 120.0
STOP_TIMEOUT = 60.0
DEPLOY_TIMEOUT = 180.0
DRAIN_TIMEOUT = 60.0
"""Seconds the gate worker gets to acknowledge the cancelled messages of the memory phase."""


@dataclass
class MeshServer:
    """A running benchmark server: its process, addresses and helper processes."""

    process: asyncio.subprocess.Process
    pid: int
    grpc_target: str
    gateway_url: str
    data_dir: Path
    stub: Any
    nats_url: str
    """The embedded nats-server, with the store's login."""

    def helper(self, name: str) -> int:
        """The pid of the child process named ``name`` (``nats-server``, ``envoy``)."""
        for child in children(self.pid):
            if child.name == name:
                return child.pid
        raise LookupError(f"no {name} process under pid {self.pid}")

    def workers(self, service: str) -> list[int]:
        """Pids of the worker processes of ``service``."""
        pids = []
        for child in children(self.pid):
            argv = child.argv
            is_worker = "llama_mesh.server.service" in argv and "--service" in argv
            if is_worker and argv[argv.index("--service") + 1] == service:
                pids.append(child.pid)
        return pids


@contextlib.asynccontextmanager
async def run_server(
    work: Path,
    *,
    name: str = "mesh",
    deployments: Mapping[str, Mapping[str, Mapping[str, object]]] = MESH_DEPLOYMENTS,
    message_queue: Mapping[str, str] | None = None,
    nats_sync: str = "always",
) -> AsyncIterator[MeshServer]:
    """Start the server in a child process, deploy the benchmark app, stop it at the end.

    ``name`` keeps this server's data, app and log apart in ``work``; ``message_queue`` is
    the deployments' broker (none: the server's own NATS); ``nats_sync`` is its
    ``--nats-sync``.
    """
    data_dir = work / f"{name}-data"
    app_dir = work / f"{name}-app"
    configs = write_mesh_app(app_dir, deployments, message_queue)
    log = (work / f"{name}-server.log").open("wb")
    args = ["--data-dir", str(data_dir), "--port", str(free_port()), "--nats-sync", nats_sync]
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench._mesh_server",
        *args,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=log,
    )
    try:
        assert process.stdout is not None
        try:
            line = await asyncio.wait_for(process.stdout.readline(), START_TIMEOUT)
        except TimeoutError:
            line = b""
        if not line:
            raise RuntimeError(f"the llama-mesh server did not start; see {log.name}")
        info = json.loads(line)
        target = f"127.0.0.1:{info['grpc_port']}"
        async with grpc.aio.insecure_channel(target) as channel:
            stub = apiserver_pb2_grpc.ApiServerStub(channel)
            for config_yaml in configs.values():
                await stub.CreateDeployment(
                    apiserver_pb2.CreateDeploymentRequest(
                        config_yaml=config_yaml, base_path=str(app_dir), reload=True, local=True
                    ),
                    timeout=DEPLOY_TIMEOUT,
                )
            yield MeshServer(
                process,
                info["pid"],
                target,
                info["gateway_url"],
                data_dir,
                stub,
                info["nats_url"],
            )
    finally:
        await _stop(process)
        log.close()


async def _stop(process: asyncio.subprocess.Process) -> None:
    """Close its stdin (it shuts down), then SIGTERM (the same), then SIGKILL."""
    if process.stdin is not None:
        process.stdin.close()
    for step in ("wait", "terminate", "kill"):
        if process.returncode is not None:
            return
        if step == "terminate":
            process.terminate()
        elif step == "kill":
            process.kill()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT)


async def cancel_stuck(server: MeshServer) -> int:
    """Cancel the tasks still RUNNING in the echo deployments; how many there were.

    A RunTask cut off at its deadline leaves its task behind; cancelling it also frees a
    replica slot that a hung task holds (the cancel message reaches the stuck input pump).
    """
    stuck: list[tuple[str, str]] = []
    for deployment in (DEPLOYMENT, TWO_REPLICAS_DEPLOYMENT):
        request = apiserver_pb2.ListTasksRequest(
            deployment=deployment, status=types_pb2.TASK_STATUS_RUNNING, page_size=1000
        )
        response = await server.stub.ListTasks(request, timeout=60)
        stuck += [(deployment, task.task_id) for task in response.tasks]
    ids = iter(stuck)

    async def cancel() -> None:
        deployment, task_id = next(ids)
        cancel_request = apiserver_pb2.CancelTaskRequest(deployment=deployment, task_id=task_id)
        await server.stub.CancelTask(cancel_request, timeout=30)

    await _bounded(len(stuck), 16, cancel)
    return len(stuck)


def _struct(values: dict[str, Any]) -> struct_pb2.Struct:
    msg = struct_pb2.Struct()
    msg.update(values)
    return msg


SUCCEEDED = types_pb2.TASK_STATUS_SUCCEEDED


async def _run_grpc(stub: Any, service: str, deadline: float, deployment: str = DEPLOYMENT) -> bool:
    response = await _run_task(stub, service, deadline, deployment)
    return bool(response.task.status == SUCCEEDED)


async def _run_task(stub: Any, service: str, deadline: float, deployment: str) -> Any:
    return await stub.RunTask(
        apiserver_pb2.RunTaskRequest(
            deployment=deployment, service_id=service, input=_struct({"message": "hi"})
        ),
        timeout=deadline,
    )


def task_segments(task: Any, sent: float, received: float) -> dict[str, float]:
    """Where one RunTask's time went, from the task's own timestamps (one machine clock).

    ``created_at`` is stamped by the API server when it builds the task (before it writes
    its message and, in an existing session, its index entry), ``started_at`` by the worker
    when the delivery reaches it, ``finished_at`` before it writes the result.
    """
    created = task.created_at.ToNanoseconds() / 1e9
    started = task.started_at.ToNanoseconds() / 1e9
    finished = task.finished_at.ToNanoseconds() / 1e9
    return {
        "client → task built (gRPC in)": created - sent,
        "task built → worker starts it (written, queued, delivered)": (started - created),
        "worker: start → finished (run, context saved when there is any)": finished - started,
        "finished → client (result written, watch wakes API, gRPC out)": received - finished,
    }


Between = Callable[[], Awaitable[None]]
"""What a latency loop runs before each block of its measured calls (the in-process run
measured next to it, ``bench._inprocess.Pairing``)."""

BLOCK = 25
"""Measured calls between two calls of a latency loop's ``between``."""


async def _between(between: Between | None, i: int, warmup: int) -> None:
    if between is not None and i >= warmup and (i - warmup) % BLOCK == 0:
        await between()


async def grpc_latency(
    target: str,
    *,
    iterations: int,
    warmup: int,
    deadline: float,
    service: str = "echo",
    between: Between | None = None,
) -> Latencies:
    """Sequential ``ApiServer.RunTask`` calls of the echo workflow over one channel."""
    sample = Latencies()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = apiserver_pb2_grpc.ApiServerStub(channel)
        for i in range(warmup + iterations):
            await _between(between, i, warmup)
            started, sent = time.perf_counter(), time.time()
            try:
                task = (await _run_task(stub, service, deadline, DEPLOYMENT)).task
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise
                sample.timeouts += 1
                task = None
            elapsed = time.perf_counter() - started
            if i >= warmup:
                sample.add(elapsed)
                if task is not None and task.status == SUCCEEDED:
                    sample.add_segments(task_segments(task, sent, time.time()))
                elif task is not None:
                    sample.errors += 1
    return sample


JsonClient = Literal["aiohttp", "httpx"]
"""The HTTP library of a JSON latency row."""


async def json_latency(
    base_url: str,
    path: str,
    body: dict[str, Any],
    *,
    iterations: int,
    warmup: int,
    deadline: float,
    client: JsonClient = "aiohttp",
    between: Between | None = None,
) -> Latencies:
    """Sequential ``POST path`` with a JSON body over one keep-alive HTTP/1.1 connection.

    ``client``: aiohttp for the rows with targets; httpx, a row of its own, costs the caller
    about 1.8 ms more per call on this machine (docs/benchmarks.md).
    """
    sample = Latencies()
    async with _json_poster(client, base_url, deadline) as post:
        for i in range(warmup + iterations):
            await _between(between, i, warmup)
            started = time.perf_counter()
            status = await post(path, body)
            elapsed = time.perf_counter() - started
            if i >= warmup:
                sample.add(elapsed)
                if status is None:
                    sample.timeouts += 1
                else:
                    sample.errors += status != 200
    return sample


JsonPost = Callable[[str, dict[str, Any]], Awaitable[int | None]]
"""``post(path, body)``: the response's status, ``None`` when cut off at the deadline."""


@contextlib.asynccontextmanager
async def _json_poster(
    client: JsonClient, base_url: str, deadline: float
) -> AsyncIterator[JsonPost]:
    if client == "httpx":
        async with httpx.AsyncClient(base_url=base_url, timeout=deadline) as http:

            async def post_httpx(path: str, body: dict[str, Any]) -> int | None:
                try:
                    return (await http.post(path, json=body)).status_code
                except httpx.TimeoutException:
                    return None

            yield post_httpx
        return
    timeout = aiohttp.ClientTimeout(total=deadline)
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(base_url, timeout=timeout, connector=connector) as session:

        async def post_aiohttp(path: str, body: dict[str, Any]) -> int | None:
            try:
                async with session.post(path, json=body) as response:
                    await response.read()
                    return response.status
            except TimeoutError:
                return None

        yield post_aiohttp


async def throughput(
    server: MeshServer,
    deployment: str,
    service: str,
    *,
    clients: int,
    seconds: float,
    deadline: float,
    others: Mapping[str, int] | None = None,
) -> Throughput:
    """``clients`` concurrent RunTask loops over one channel for ``seconds``.

    CPU time per task is read from ``/proc`` for the API server, the nats-server, the
    service's workers, the ``others`` (name: pid; an external broker), and for this (client)
    process. The nats-server's fsyncs are counted over the window and the drain after it
    (the last tasks' acknowledgements), as its streams' writes are.
    """
    done = 0
    stop_at = 0.0
    failures: Counter[str] = Counter()

    async def client(stub: Any) -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            try:
                ok = await _run_grpc(stub, service, deadline, deployment)
            except grpc.aio.AioRpcError as exc:
                failures[exc.code().name] += 1
                continue
            if ok:
                done += 1
            else:
                failures["task not succeeded"] += 1

    async with grpc.aio.insecure_channel(server.grpc_target) as channel:
        stub = apiserver_pb2_grpc.ApiServerStub(channel)
        stop_at = time.perf_counter() + min(1.0, seconds / 3)  # warm-up, not counted
        await asyncio.gather(*(client(stub) for _ in range(clients)))
        done = 0
        failures.clear()
        pids = {
            "API server": [server.pid],
            "nats-server": [server.helper("nats-server")],
            "workers": server.workers(service),
            **{name: [pid] for name, pid in (others or {}).items()},
        }
        async with _disk.count_fsyncs(pids["nats-server"][0]) as fsyncs:
            streams_before = await _disk.stream_states(server.nats_url)
            cpu_before = {k: sum(cpu_seconds(p) for p in v) for k, v in pids.items()}
            client_before = _self_cpu()
            started = time.perf_counter()
            stop_at = started + seconds
            await asyncio.gather(*(client(stub) for _ in range(clients)))
            elapsed = time.perf_counter() - started
            streams_after = await _queues_drained(server, streams_before)
    writes = _disk.stream_writes(streams_before, streams_after)
    per_task = max(done, 1)
    cpu = {
        k: (sum(cpu_seconds(p) for p in v) - cpu_before[k]) * 1e3 / per_task
        for k, v in pids.items()
    }
    cpu["client"] = (_self_cpu() - client_before) * 1e3 / per_task
    return Throughput(done, elapsed, clients, dict(failures), cpu, writes, fsyncs.count)


async def _queues_drained(
    server: MeshServer, before: dict[str, _disk.StreamState] | None = None, *, timeout: float = 5.0
) -> dict[str, _disk.StreamState]:
    """The streams' counters once the work queues hold no more than they held ``before``
    (``None``: nothing at all), or after ``timeout`` seconds anyway."""
    give_up = time.perf_counter() + timeout
    while True:
        now = await _disk.stream_states(server.nats_url)
        drained = all(
            state.messages <= (0 if before is None else before[name].messages)
            for name, state in now.items()
            if state.work_queue and (before is None or name in before)
        )
        if drained or time.perf_counter() > give_up:
            return now
        await asyncio.sleep(0.05)


def _self_cpu() -> float:
    times = os.times()
    return times.user + times.system


async def streaming(
    server: MeshServer, *, count: int, interval: float, skip: int, deadline: float
) -> Latencies:
    """Receive time minus write time of each ``Stamp`` event, over ``StreamEvents``."""
    sample = Latencies()
    stub = server.stub
    created = await stub.CreateTask(
        apiserver_pb2.CreateTaskRequest(
            deployment=DEPLOYMENT,
            service_id="stream",
            input=_struct({"count": count, "interval": interval, "start_delay": 0.3}),
        ),
        timeout=deadline,
    )
    request = apiserver_pb2.StreamEventsRequest(deployment=DEPLOYMENT, task_id=created.task.task_id)
    async for response in stub.StreamEvents(request, timeout=deadline + count * interval):
        event = response.event
        if event.kind != types_pb2.EVENT_KIND_WORKFLOW:
            break
        received = time.time_ns()
        fields = event.data.fields
        if "t_ns" in fields and fields["seq"].number_value >= skip:
            sample.add((received - int(fields["t_ns"].number_value)) / 1e9)
    return sample


async def memory_sessions(server: MeshServer, *, count: int, concurrency: int) -> Memory:
    """RSS added to the API server and the nats-server by ``count`` new sessions."""
    pids = {"API server": server.pid, "nats-server": server.helper("nats-server")}
    before = await settled_rss(pids)
    store_before = dir_bytes(server.data_dir / "nats")
    request = apiserver_pb2.CreateSessionRequest(deployment=GATE_DEPLOYMENT)
    await _bounded(count, concurrency, lambda: server.stub.CreateSession(request, timeout=30))
    after = await settled_rss(pids)
    store_after = dir_bytes(server.data_dir / "nats")
    return Memory(
        count,
        {k: per_1000_mib(after[k] - before[k], count) for k in pids},
        {"JetStream store": per_1000_mib(store_after - store_before, count)},
    )


async def memory_queued(server: MeshServer, *, count: int, concurrency: int) -> Memory:
    """RSS added by ``count`` tasks queued behind a busy ``gate`` replica; then cancels them.

    The gate service takes one task at a time (``max-concurrent-tasks: 1``), and its first
    task sleeps, so the others wait in the JetStream work queue.
    """
    nats_pid = server.helper("nats-server")
    (worker,) = server.workers("gate")
    pids = {"API server": server.pid, "nats-server": nats_pid, "gate worker": worker}
    before = await settled_rss(pids)
    store_before = dir_bytes(server.data_dir / "nats")
    task_ids: list[str] = []

    async def create() -> None:
        response = await server.stub.CreateTask(
            apiserver_pb2.CreateTaskRequest(
                deployment=GATE_DEPLOYMENT, service_id="gate", input=_struct({"seconds": 3600})
            ),
            timeout=30,
        )
        task_ids.append(response.task.task_id)

    await _bounded(count, concurrency, create)
    after = await settled_rss(pids)
    store_after = dir_bytes(server.data_dir / "nats")

    async def cancel(task_id: str) -> None:
        request = apiserver_pb2.CancelTaskRequest(deployment=GATE_DEPLOYMENT, task_id=task_id)
        await server.stub.CancelTask(request, timeout=30)

    ids = iter(task_ids)
    await _bounded(len(task_ids), concurrency, lambda: cancel(next(ids)))
    # The gate worker going through the cancelled tasks would slow the phases after this one.
    await _queues_drained(server, timeout=DRAIN_TIMEOUT)
    return Memory(
        count,
        {k: per_1000_mib(after[k] - before[k], count) for k in pids},
        {"JetStream store": per_1000_mib(store_after - store_before, count)},
    )


async def _bounded(count: int, concurrency: int, call: Any) -> None:
    """Run ``call()`` ``count`` times with at most ``concurrency`` at once."""
    remaining = count

    async def lane() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await call()

    await asyncio.gather(*(lane() for _ in range(min(concurrency, count))))


def json_body_v1() -> dict[str, Any]:
    """The ``/v1`` RunTask body of the echo task."""
    return {"input": {"message": "hi"}}


def json_body_08(message: str = "hi") -> dict[str, Any]:
    """The Llama Deploy 0.8 ``tasks/run`` body: ``input`` is JSON text."""
    return {"input": json.dumps({"message": message})}
