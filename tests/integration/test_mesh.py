"""The mesh end to end against a real nats-server: workers as processes, state in JetStream.

Tests that only run tasks in sessions of their own share one server per queue with
``tests/data/testapp`` deployed (``testapp``); those that are about the runtime rather than
the transport also run on the in-process queue. Tests that kill replicas, delete the
deployment or restart the server start their own (``mesh_factory``) with just the services
they use.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from llama_mesh.server import subjects
from llama_mesh.server.app import MeshServer
from llama_mesh.server.domain import EventKind, HumanEvent, Task, TaskStatus, new_id
from llama_mesh.server.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from llama_mesh.server.nats_server import NatsServer
from tests.fixtures.mesh import TESTAPP, MeshFactory, deploy_testapp, running_mesh
from tests.helpers import assert_eventually

APP = "testapp"
SHARED = pytest.mark.asyncio(loop_scope="module")
"""For tests on a module-scoped server: they run in the event loop it runs in."""


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def inprocess_testapp(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[MeshServer]:
    """testapp on the in-process queue, shared by the module's tests."""
    data_dir = tmp_path_factory.mktemp("inprocess-testapp")
    async with running_mesh(data_dir, queue="inprocess", deploy=(TESTAPP,)) as server:
        yield server


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def nats_testapp(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[MeshServer]:
    """testapp on an embedded nats-server (nine worker processes), shared by the module's
    tests."""
    data_dir = tmp_path_factory.mktemp("nats-testapp")
    async with running_mesh(data_dir, queue="nats", deploy=(TESTAPP,)) as server:
        yield server


@pytest.fixture(params=["inprocess", "nats"])
def testapp(request: pytest.FixtureRequest) -> MeshServer:
    """The shared testapp server on each queue in turn."""
    server: MeshServer = request.getfixturevalue(f"{request.param}_testapp")
    return server


@SHARED
async def test_run_returns_the_workflow_result(testapp: MeshServer) -> None:
    """A task with JSON kwargs runs on the default service and returns its result."""
    task = await testapp.mesh.run_task(
        APP, service_id=None, session_id=None, input={"message": "hi"}
    )
    assert task.status is TaskStatus.SUCCEEDED
    assert task.result == "echo: hi"
    assert task.service_id == "echo"
    assert task.attempts == 1


@SHARED
async def test_unknown_service_fails_at_once(testapp: MeshServer) -> None:
    """Naming a service the deployment lacks is NOT_FOUND immediately, never a hang."""
    async with asyncio.timeout(2):
        with pytest.raises(NotFoundError, match="nope"):
            await testapp.mesh.run_task(APP, service_id="nope", session_id=None, input={})
        with pytest.raises(NotFoundError, match="Deployment 'other' not found"):
            await testapp.mesh.run_task("other", service_id=None, session_id=None, input={})


@SHARED
async def test_workflow_exception_fails_the_task(testapp: MeshServer) -> None:
    """A workflow that raises gives a FAILED task whose error carries the message."""
    task = await testapp.mesh.run_task(
        APP, service_id="fails", session_id=None, input={"message": "disk on fire"}
    )
    assert task.status is TaskStatus.FAILED
    assert task.error is not None
    assert (task.error.type, task.error.message) == ("ValueError", "disk on fire")
    assert "disk on fire" in task.error.traceback


@SHARED
async def test_events_stream_in_order_and_resume(testapp: MeshServer) -> None:
    """Streamed events arrive in order with type and index, end with the result, and a
    stream opened later from an index replays from there."""
    mesh = testapp.mesh
    task = await mesh.create_task(APP, service_id="stream", session_id=None, input={"count": 4})
    events = [e async for e in mesh.stream_events(APP, task.task_id)]
    assert [e.index for e in events] == [0, 1, 2, 3, 4]
    assert [e.data for e in events[:4]] == [{"step": i} for i in range(4)]
    assert {e.type for e in events[:4]} == {"app_workflows.Tick"}
    assert events[4].kind is EventKind.RESULT
    assert events[4].data == {"result": {"ticks": 4}}
    resumed = [e async for e in mesh.stream_events(APP, task.task_id, from_index=3)]
    assert [e.index for e in resumed] == [3, 4]


@SHARED
async def test_human_in_the_loop_with_llama_index_names(testapp: MeshServer) -> None:
    """An event sent to a running task reaches the workflow; 0.8's qualified names map onto
    the classes the worker has."""
    mesh = testapp.mesh
    task = await mesh.create_task(APP, service_id="hitl", session_id=None, input={})
    seen = []
    async for event in mesh.stream_events(APP, task.task_id):
        seen.append(event)
        if event.type.endswith("InputRequiredEvent"):
            assert event.data == {"prefix": "name?"}
            name = "llama_index.core.workflow.events.HumanResponseEvent"
            await mesh.send_event(APP, task.task_id, HumanEvent(name, {"response": "ada"}))
    assert seen[-1].data == {"result": "hi ada"}
    with pytest.raises(FailedPreconditionError, match="finished"):
        await mesh.send_event(APP, task.task_id, HumanEvent("HumanResponseEvent", {}))


@SHARED
async def test_a_new_session_keeps_context_only_when_there_is_some(testapp: MeshServer) -> None:
    """A task that creates its session stores the workflow's context only when it holds
    something to resume: the stateless echo leaves none; tally's total is kept and the
    session's next task continues from it."""
    mesh = testapp.mesh
    echoed = await mesh.run_task(APP, service_id="echo", session_id=None, input={"message": "x"})
    assert echoed.status is TaskStatus.SUCCEEDED
    assert await mesh.cp.get_session_state(APP, echoed.session_id) is None
    first = await mesh.run_task(APP, service_id="tally", session_id=None, input={"amount": 5})
    assert await mesh.cp.get_session_state(APP, first.session_id) is not None
    second = await mesh.run_task(
        APP, service_id="tally", session_id=first.session_id, input={"amount": 2}
    )
    assert (first.result, second.result) == (5, 7)


@SHARED
async def test_a_task_that_ends_its_session_leaves_none(testapp: MeshServer) -> None:
    """A task run with ``ends_session`` (0.8's ``tasks/run`` without a session): its
    implied session is gone once it is final, with no context stored for it (tally's total
    would be) and no write to the session buckets; the task itself stays readable."""
    mesh = testapp.mesh
    task = await mesh.run_task(
        APP, service_id="tally", session_id=None, input={"amount": 5}, ends_session=True
    )
    assert (task.status, task.result, task.ends_session) == (TaskStatus.SUCCEEDED, 5, True)
    assert await mesh.cp.get_session_state(APP, task.session_id) is None
    with pytest.raises(NotFoundError):
        await mesh.get_session(APP, task.session_id)
    assert task.session_id not in [s.session_id for s in await mesh.list_sessions(APP)]
    assert await mesh.cp.session_task_ids(APP, task.session_id) == []
    with pytest.raises(NotFoundError):
        await mesh.create_task(APP, service_id="tally", session_id=task.session_id, input={})
    assert (await mesh.get_task(APP, task.task_id)).ends_session
    for bucket in ("sessions", "session_state"):
        assert await mesh.cp._buckets[bucket].get(f"{APP}.{task.session_id}", deleted=True) is None


ONE_AT_A_TIME = (
    "name: {name}\nservices:\n  slow:\n    name: S\n    source: {{type: local, name: .}}\n"
    "    path: app_workflows:slow\n    max-concurrent-tasks: 1\n"
)
"""A deployment whose one replica runs one `slow` task at a time: the others wait queued."""


@pytest.mark.parametrize("queue", ["inprocess", "nats"])
async def test_a_queued_task_is_its_message(mesh_factory: MeshFactory, queue: str) -> None:
    """A task is accepted with one durable write, its message: while it waits in the queue
    it has no record (revision 0), yet every read shows it QUEUED — by id, in listings,
    in its session, in a watch — and the session it implies (no record either) is found.
    Cancelling it creates its record as CANCELLED and takes the message out of the queue, so
    that it never runs. The others run, and their first change creates their record."""
    server = await mesh_factory(queue=queue)
    await server.mesh.deployments.create(
        ONE_AT_A_TIME.format(name="one"), base_path=str(TESTAPP.parent), reload=False, local=True
    )
    mesh = server.mesh
    busy = await mesh.create_task("one", service_id=None, session_id=None, input={"seconds": 1})

    async def started() -> bool:
        return (await mesh.get_task("one", busy.task_id)).status is TaskStatus.RUNNING

    await assert_eventually(started)
    waiting = await mesh.create_task("one", service_id=None, session_id=None, input={"tag": "w"})
    doomed = await mesh.create_task(
        "one", service_id=None, session_id=waiting.session_id, input={"tag": "d"}
    )
    for task in (waiting, doomed):
        stored = await mesh.cp.read_task("one", task.task_id)
        assert (stored.revision, stored.task.status) == (0, TaskStatus.QUEUED)
        assert stored.task.input == task.input and stored.task.session_id == task.session_id
    listed = {t.task_id: t.status for t in await mesh.list_tasks("one")}
    assert listed[waiting.task_id] is listed[doomed.task_id] is TaskStatus.QUEUED
    in_session = [t.task_id for t in await mesh.list_tasks("one", waiting.session_id)]
    assert sorted(in_session) == sorted([waiting.task_id, doomed.task_id])
    assert waiting.session_id == waiting.task_id
    session = await mesh.get_session("one", waiting.session_id)
    assert session.task_ids == [waiting.task_id, doomed.task_id]
    sessions = [s.session_id for s in await mesh.list_sessions("one")]
    assert sessions == sorted([busy.task_id, waiting.task_id])
    watch = mesh.watch_tasks("one")
    snapshot = {}
    async for change in watch:
        if change is None:
            break
        snapshot[change.task_id] = change
    assert snapshot[doomed.task_id].revision == 0
    queue_name = subjects.task_queue("one", "slow")
    assert await mesh.brokers.of("one").queue_depth(queue_name) == 3

    cancelled = await mesh.cancel_task("one", doomed.task_id, "not needed")
    assert cancelled.status is TaskStatus.CANCELLED
    assert (await mesh.cp.read_task("one", doomed.task_id)).revision > 0
    assert await mesh.brokers.of("one").queue_depth(queue_name) == 2
    async with asyncio.timeout(30):
        async for change in watch:
            assert change is not None
            if change.task_id == doomed.task_id:
                assert change.task is not None and change.task.status is TaskStatus.CANCELLED
                break
    await watch.aclose()
    finals = [await mesh.wait_task("one", t.task_id) for t in (busy, waiting)]
    assert [t.status for t in finals] == [TaskStatus.SUCCEEDED] * 2
    after = await mesh.get_task("one", doomed.task_id)
    assert (after.status, after.attempts, after.started_at) == (TaskStatus.CANCELLED, 0, None)


async def test_a_recorded_task_message_without_its_record_is_dropped(
    mesh_factory: MeshFactory,
) -> None:
    """A message that says its record was stored first (a broker that cannot find queued
    messages) whose record is gone (the task deleted) is dropped at once: it leaves the
    queue, no record is made up, and the replica goes on running other tasks. The same
    message without that flag is a task accepted by its message alone: it runs."""
    server = await mesh_factory(queue="inprocess")
    await deploy_testapp(server, "echo")
    mesh = server.mesh
    queue = subjects.task_queue(APP, "echo")
    ghost = Task(task_id=new_id(), deployment=APP, service_id="echo", session_id=new_id(), input={})
    await mesh.orchestrator.schedule(ghost, new_session=True, recorded=True)

    async def drained() -> bool:
        return await mesh.brokers.of(APP).queue_depth(queue) == 0  # settled, not just delivered

    await assert_eventually(drained, timeout=10)
    with pytest.raises(NotFoundError):
        await mesh.get_task(APP, ghost.task_id)
    accepted = Task(
        task_id=new_id(), deployment=APP, service_id="echo", session_id=new_id(), input={}
    )
    await mesh.orchestrator.schedule(accepted, new_session=True)
    final = await mesh.wait_task(APP, accepted.task_id)
    assert final.status is TaskStatus.SUCCEEDED


@SHARED
async def test_session_context_carries_over(testapp: MeshServer) -> None:
    """Runs in one session share workflow context; another session starts fresh."""
    mesh = testapp.mesh
    first = await mesh.create_session(APP)
    totals = []
    for amount in (3, 4):
        task = await mesh.run_task(
            APP, service_id="tally", session_id=first.session_id, input={"amount": amount}
        )
        totals.append(task.result)
    assert totals == [3, 7]
    other = await mesh.create_session(APP)
    fresh = await mesh.run_task(APP, service_id="tally", session_id=other.session_id, input={})
    assert fresh.result == 1
    assert len((await mesh.get_session(APP, first.session_id)).task_ids) == 2
    await mesh.delete_session(APP, first.session_id)
    with pytest.raises(NotFoundError):
        await mesh.get_session(APP, first.session_id)


@SHARED
async def test_a_session_implied_by_its_task_lists_it_first(testapp: MeshServer) -> None:
    """A task run without a session starts one with the task's id and no record of its own
    (implied by the task); later tasks follow in order, in every listing, with the context
    carried over; deleting the session forgets them all while the task lives on."""
    mesh = testapp.mesh
    first = await mesh.run_task(APP, service_id="tally", session_id=None, input={"amount": 2})
    session_id = first.session_id
    assert session_id == first.task_id
    assert (await mesh.get_session(APP, session_id)).task_ids == [first.task_id]
    later = [
        await mesh.run_task(APP, service_id="tally", session_id=session_id, input={"amount": 1})
        for _ in range(2)
    ]
    assert [t.result for t in later] == [3, 4]
    ids = [first.task_id, *(t.task_id for t in later)]
    assert (await mesh.get_session(APP, session_id)).task_ids == ids
    assert await mesh.cp.session_task_ids(APP, session_id) == ids
    listed = await mesh.list_tasks(APP, session_id)
    assert [t.task_id for t in listed] == list(reversed(ids))
    (summary,) = [s for s in await mesh.list_sessions(APP) if s.session_id == session_id]
    assert summary.task_ids == []  # listings leave task ids out
    (filled,) = await mesh.with_task_ids(APP, [summary])
    assert filled.task_ids == ids
    await mesh.delete_session(APP, session_id)
    with pytest.raises(NotFoundError):
        await mesh.get_session(APP, session_id)
    assert await mesh.cp.session_task_ids(APP, session_id) == []
    assert session_id not in [s.session_id for s in await mesh.list_sessions(APP)]
    assert (await mesh.get_task(APP, first.task_id)).result == 2
    with pytest.raises(NotFoundError):
        await mesh.create_task(APP, service_id="tally", session_id=session_id, input={})


@SHARED
async def test_cancel_a_running_task(testapp: MeshServer) -> None:
    """Cancelling a running task stops it; its stream ends with a cancelled event."""
    mesh = testapp.mesh
    task = await mesh.create_task(APP, service_id="slow", session_id=None, input={"seconds": 60})
    async with asyncio.timeout(20):
        async for event in mesh.stream_events(APP, task.task_id):
            if event.index == 0:
                await mesh.cancel_task(APP, task.task_id, "changed my mind")
            last = event
    assert last.kind is EventKind.CANCELLED
    final = await mesh.get_task(APP, task.task_id)
    assert final.status is TaskStatus.CANCELLED
    assert final.error is not None and final.error.message == "changed my mind"


@SHARED
async def test_service_timeout_fails_the_task(testapp: MeshServer) -> None:
    """A service's `timeout` ends a longer task as failed with a timeout error."""
    task = await testapp.mesh.run_task(
        APP, service_id="limited", session_id=None, input={"seconds": 30}
    )
    assert task.status is TaskStatus.FAILED
    assert task.error is not None and task.error.type == "TimeoutError"


@SHARED
async def test_bad_yaml_names_key_and_line(testapp: MeshServer) -> None:
    """An invalid deployment file is INVALID_ARGUMENT naming the key and its line; it leaves
    nothing behind that stops the next deploy of that name."""
    name = f"bad-{new_id()}"
    bad = (
        f"name: {name}\nservices:\n  a:\n    name: A\n    source: {{type: local, name: .}}\n"
        "    path: m:w\n    replicas: two\n"
    )
    with pytest.raises(InvalidArgumentError, match=r":7: services\.a\.replicas"):
        await testapp.mesh.deployments.create(
            bad, base_path=str(TESTAPP.parent), reload=False, local=True
        )
    await deploy_testapp(testapp, "echo", name=name)
    with pytest.raises(AlreadyExistsError):
        await deploy_testapp(testapp, "echo", name=name)
    await testapp.mesh.deployments.delete(name)


async def test_max_concurrent_tasks_is_honoured(mesh_factory: MeshFactory) -> None:
    """A replica runs at most `max-concurrent-tasks` tasks at once; the rest wait queued."""
    server = await mesh_factory(queue="inprocess")
    yaml = (
        "name: conc\nservices:\n  slow:\n    name: S\n    source: {type: local, name: .}\n"
        "    path: app_workflows:slow\n    max-concurrent-tasks: 2\n"
    )
    await server.mesh.deployments.create(
        yaml, base_path=str(TESTAPP.parent), reload=False, local=True
    )
    mesh = server.mesh
    tasks = [
        await mesh.create_task("conc", service_id=None, session_id=None, input={"seconds": 1.5})
        for _ in range(4)
    ]

    async def running() -> int:
        states = [(await mesh.get_task("conc", t.task_id)).status for t in tasks]
        return states.count(TaskStatus.RUNNING)

    async def two_running() -> bool:
        return await running() == 2

    await assert_eventually(two_running)
    assert [(await mesh.get_task("conc", t.task_id)).status for t in tasks].count(
        TaskStatus.QUEUED
    ) == 2
    done = [await mesh.wait_task("conc", t.task_id) for t in tasks]
    assert all(t.status is TaskStatus.SUCCEEDED for t in done)


async def test_worker_env_is_its_own(
    mesh_factory: MeshFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker process sees the service's `env`, not the server's environment."""
    monkeypatch.setenv("LLAMA_MESH_TEST_SERVER_SECRET", "leaked")
    server = await mesh_factory(queue="nats")
    await deploy_testapp(server, "echo")
    mesh = server.mesh
    own = await mesh.run_task(APP, service_id="echo", session_id=None, input={"env": "GREETING"})
    assert own.result == "hello from env"
    leak = await mesh.run_task(
        APP, service_id="echo", session_id=None, input={"env": "LLAMA_MESH_TEST_SERVER_SECRET"}
    )
    assert leak.result == "<unset>"


async def test_killed_worker_task_completes_on_another_replica(mesh_factory: MeshFactory) -> None:
    """SIGKILL of the replica running a task: the task is redelivered and succeeds on the
    other replica, once, with the right result."""
    server = await mesh_factory(queue="nats")
    await deploy_testapp(server, "slow")
    mesh = server.mesh
    task = await mesh.create_task(
        APP, service_id="slow", session_id=None, input={"seconds": 2, "tag": "survivor"}
    )

    async def running_instance() -> str:
        current = await mesh.get_task(APP, task.task_id)
        return current.instance_id if current.status is TaskStatus.RUNNING else ""

    instance_id = await assert_eventually(running_instance, timeout=15)
    instances = await mesh.cp.list_instances(APP, "slow")
    victim = next(i.pid for i in instances if i.instance_id == instance_id)
    os.kill(victim, signal.SIGKILL)
    try:
        final = await asyncio.wait_for(mesh.wait_task(APP, task.task_id), 60)
    except TimeoutError:
        stuck = await mesh.get_task(APP, task.task_id)
        raise AssertionError(f"task never finished; stored as {stuck}") from None
    assert final.status is TaskStatus.SUCCEEDED
    assert final.result["tag"] == "survivor"
    assert final.result["pid"] != victim
    assert final.attempts == 2


async def test_task_fails_after_max_retries(mesh_factory: MeshFactory) -> None:
    """A task that kills every replica it reaches ends failed after max-retries, with the
    reason, instead of disappearing."""
    server = await mesh_factory(queue="nats")
    await deploy_testapp(server, "crashy")
    task = await server.mesh.create_task(
        APP, service_id="crashy", session_id=None, input={"spare_pid": os.getpid()}
    )
    final = await asyncio.wait_for(server.mesh.wait_task(APP, task.task_id), 60)
    assert final.status is TaskStatus.FAILED
    assert final.error is not None and final.error.type == "MaxRetriesExceeded"
    assert "max-retries: 1" in final.error.message


async def test_dead_replica_leaves_the_registry(mesh_factory: MeshFactory) -> None:
    """A killed replica disappears from the registry and the supervisor starts a new one."""
    server = await mesh_factory(queue="nats")
    await deploy_testapp(server, "echo")
    cp = server.mesh.cp
    before = await cp.list_instances(APP, "echo")
    assert len(before) == 1
    os.kill(before[0].pid, signal.SIGKILL)

    async def replaced() -> bool:
        now = await cp.list_instances(APP, "echo")
        ids = {i.instance_id for i in now}
        return before[0].instance_id not in ids and len(ids) == 1

    await assert_eventually(replaced, timeout=30)
    task = await server.mesh.run_task(APP, service_id="echo", session_id=None, input={})
    assert task.status is TaskStatus.SUCCEEDED


async def test_restart_keeps_deployments_sessions_and_results(
    nats_server: NatsServer, mesh_factory: MeshFactory, tmp_path: Path
) -> None:
    """After the API server stops and starts again, deployments, sessions, session context
    and task results are all still there."""
    first = await mesh_factory(queue="nats", nats_url=nats_server.url, data_dir=tmp_path / "a")
    await deploy_testapp(first, "tally")
    mesh = first.mesh
    session = await mesh.create_session(APP)
    done = await mesh.run_task(
        APP, service_id="tally", session_id=session.session_id, input={"amount": 5}
    )
    await first.shutdown()

    second = await mesh_factory(queue="nats", nats_url=nats_server.url, data_dir=tmp_path / "a")
    mesh = second.mesh
    assert mesh.deployments.names() == [APP]
    await second.wait_restored()
    kept = await mesh.get_task(APP, done.task_id)
    assert (kept.status, kept.result) == (TaskStatus.SUCCEEDED, 5)
    again = await mesh.run_task(
        APP, service_id="tally", session_id=session.session_id, input={"amount": 1}
    )
    assert again.result == 6


BROKEN_YAML = """\
name: broken
services:
  echo:
    name: Echo
    source: {type: local, name: .}
    path: broken_workflows:echo
"""


async def test_a_service_that_cannot_start_fails_its_deploy_with_its_output(
    nats_server: NatsServer, mesh_factory: MeshFactory, tmp_path: Path
) -> None:
    """A worker process that dies while loading its workflow fails the deploy at once (not
    after the ready timeout), quoting the last lines it wrote; they are in its log file."""
    app = tmp_path / "broken"
    app.mkdir()
    (app / "broken_workflows.py").write_text('raise RuntimeError("no such model: gpt-0")\n')
    (app / "deployment.yml").write_text(BROKEN_YAML)
    server = await mesh_factory(queue="nats", nats_url=nats_server.url, ready_timeout=120.0)
    async with asyncio.timeout(60):
        with pytest.raises(FailedPreconditionError) as failed:
            await server.deploy_file(app / "deployment.yml")
    message = str(failed.value)
    assert "service 'echo' did not start" in message
    assert "RuntimeError: no such model: gpt-0" in message
    logs = list((server.settings.data_dir / "logs").rglob("echo-*.log"))
    assert logs and "no such model: gpt-0" in logs[0].read_text()


async def test_external_worker_joins_with_only_a_nats_url(
    nats_server: NatsServer, mesh_factory: MeshFactory
) -> None:
    """`llamactl worker` started elsewhere, given only the NATS URL and the deployment,
    registers as another replica of the service."""
    server = await mesh_factory(queue="nats", nats_url=nats_server.url)
    await deploy_testapp(server, "echo")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "llama_mesh.server.service",
        "--nats",
        nats_server.url,
        "--deployment",
        APP,
        "--service",
        "echo",
        "--instance-id",
        "external-1",
    )
    try:

        async def joined() -> bool:
            instances = await server.mesh.cp.list_instances(APP, "echo")
            return "external-1" in {i.instance_id for i in instances}

        await assert_eventually(joined, timeout=20)
    finally:
        proc.terminate()
        await proc.wait()


async def test_delete_deployment_stops_its_workers(mesh_factory: MeshFactory) -> None:
    """Deleting a deployment stops its replicas and forgets it."""
    server = await mesh_factory(queue="nats")
    await deploy_testapp(server, "echo")
    pids = server.supervisor.pids(APP, "echo")
    assert pids
    await server.mesh.deployments.delete(APP)
    with pytest.raises(NotFoundError):
        server.mesh.deployments.config(APP)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@SHARED
async def test_replicas_serve_info_and_health(nats_testapp: MeshServer) -> None:
    """Every replica serves WorkflowService and gRPC health at the address it registers."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from llama_mesh.v1 import service_pb2, service_pb2_grpc

    (instance,) = await nats_testapp.mesh.cp.list_instances(APP, "stream")
    assert instance.address.startswith("127.0.0.1:")
    async with grpc.aio.insecure_channel(instance.address) as channel:
        info = await service_pb2_grpc.WorkflowServiceStub(channel).GetServiceInfo(
            service_pb2.GetServiceInfoRequest()
        )
        assert (info.deployment, info.service_id) == (APP, "stream")
        assert info.instance_id == instance.instance_id
        assert info.workflow_class == "app_workflows.Stream"
        assert "run_it" in info.steps
        check = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert check.status == health_pb2.HealthCheckResponse.SERVING
