"""A deployment whose ``message-queue`` names RabbitMQ or Redis runs through that broker end
to end, with the guarantees it has on NATS, also when a worker is killed mid-task or the
broker itself restarts.

One server per broker for the module (worker processes, its own nats-server for the state
store) with :data:`APP_YAML` deployed on the session's real rabbitmq-server or redis-server
(``tests/fixtures/rabbitmq.py``, ``tests/fixtures/redis.py``). Tests use tasks and sessions
of their own, so they share it; the broker restarts come last in each broker's run (pytest
keeps the definition order within a module-scoped parameter).

Cost, on a loaded 2-core machine: 60-90 s in all. Per broker about 10 s to start the server
and deploy, 5-10 s to kill a worker and redeliver, 3 s (Redis) to 15 s (RabbitMQ) for the
broker restart, the rest about 5 s; plus the session's rabbitmq-server boot if no test
before started it.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

import aio_pika
import pytest
import pytest_asyncio
import redis.asyncio

from llama_mesh.server import subjects
from llama_mesh.server.apiserver.mesh import Mesh
from llama_mesh.server.app import MeshServer, ServerSettings
from llama_mesh.server.domain import EventKind, HumanEvent, TaskStatus
from llama_mesh.server.errors import InvalidArgumentError, NotFoundError
from llama_mesh.server.queues.broker import Broker
from tests.fixtures.mesh import TESTAPP
from tests.fixtures.rabbitmq import RabbitMqServer
from tests.fixtures.redis import RedisServer
from tests.helpers import aclose, assert_eventually, next_within
from tests.integration.test_faults import (
    WAIT,
    create_slow_tasks,
    running_on_some_instance,
    wait_all,
)
from tests.unit.contract import assert_nothing_within

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

APP = "faults"
"""The deployment's name: the one ``test_faults``' helpers for `slow` tasks work on."""
APP_YAML = """\
name: faults
services:
  echo: {{name: Echo, source: {{type: local, name: .}}, path: app_workflows:echo}}
  stream: {{name: Streaming, source: {{type: local, name: .}}, path: app_workflows:stream}}
  hitl: {{name: Human in the loop, source: {{type: local, name: .}}, path: app_workflows:hitl}}
  tally: {{name: Session tally, source: {{type: local, name: .}}, path: app_workflows:tally}}
  fails: {{name: Fails, source: {{type: local, name: .}}, path: app_workflows:fails}}
  slow:
    name: Slow
    source: {{type: local, name: .}}
    path: app_workflows:slow
    replicas: 2
    max-concurrent-tasks: 4
    max-retries: 3
message-queue: {{{queue}}}
"""
"""The testapp services these tests need (each one a worker process), on the broker that
``{queue}`` (the fields of a ``message-queue`` flow mapping) names."""
LIMITS = {"rabbitmq": "RabbitMQ max_message_size", "redis": "Redis proto-max-bulk-len"}
"""What each broker's limit on one message is called; both servers set it to 1 MiB."""
OVER_THE_LIMIT = 1100
"""Times ``"x" * 1000``: over each broker's 1 MiB, well under the server's NATS limit."""


@dataclass
class OnBroker:
    """The module's server, :data:`APP` deployed on the external broker ``kind``."""

    kind: str
    server: MeshServer
    rabbitmq: RabbitMqServer | None = None
    exchange: str = ""
    """The deployment's ``exchange_name`` on RabbitMQ: the prefix of its queues and streams."""
    redis: RedisServer | None = None

    @property
    def mesh(self) -> Mesh:
        return self.server.mesh

    @property
    def broker(self) -> Broker:
        return self.mesh.brokers.of(APP)

    async def restart_broker(self) -> None:
        """Restart the broker server (off the event loop, which goes on serving): RabbitMQ
        stopped and started on its data; Redis SIGKILLed and started on its AOF."""
        if self.rabbitmq is not None:
            await asyncio.to_thread(self.rabbitmq.restart)
        else:
            assert self.redis is not None
            await asyncio.to_thread(self.redis.kill)
            await asyncio.to_thread(self.redis.start)

    async def on_the_broker(self, queue: str, topic: str) -> bool:
        """Whether work queue ``queue`` and topic ``topic`` exist on the broker server, as a
        separate client connected to it sees them."""
        if self.rabbitmq is not None:
            names = [f"{self.exchange}.tasks.{queue}", f"{self.exchange}.topics.{topic}"]
            return await _on_rabbitmq(self.rabbitmq.url, names)
        assert self.redis is not None
        client = redis.asyncio.Redis.from_url(self.redis.url)
        try:
            prefix = "llama-mesh:default"
            found = await client.exists(f"{prefix}:queue:{queue}", f"{prefix}:topic:{topic}")
            return bool(found == 2)
        finally:
            await client.aclose()


async def _on_rabbitmq(url: str, names: Iterable[str]) -> bool:
    """Whether every queue (or stream) named exists: a passive declare each, on a channel of
    its own (a missing one closes its channel)."""
    connection = await aio_pika.connect(url)
    try:
        for name in names:
            channel = await connection.channel()
            try:
                await channel.declare_queue(name, passive=True)
            except aio_pika.exceptions.ChannelClosed:
                return False
            await channel.close()
        return True
    finally:
        await connection.close()


@pytest_asyncio.fixture(loop_scope="module", scope="module", params=["rabbitmq", "redis"])
async def on(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[OnBroker]:
    """A server with worker processes and :data:`APP` deployed on the broker of the
    parameter (the session's server of that kind)."""
    kind: str = request.param
    rabbitmq: RabbitMqServer | None = None
    redis_server: RedisServer | None = None
    exchange = f"e2e-{uuid.uuid4().hex}"
    if kind == "rabbitmq":
        rabbitmq = request.getfixturevalue("rabbitmq_server")
        queue = f"type: rabbitmq, url: '{rabbitmq.url}', exchange_name: {exchange}"
    else:
        redis_server = request.getfixturevalue("redis_server")
        queue = f"type: redis, url: '{redis_server.url}'"
    settings = ServerSettings(
        data_dir=tmp_path_factory.mktemp(f"on-{kind}"),
        port=0,
        queue="nats",
        gateway=False,
        control_planes=False,
        ack_wait=2.0,
        ready_timeout=120.0,
    )
    server = await MeshServer.start(settings)
    try:
        await server.mesh.deployments.create(
            APP_YAML.format(queue=queue), base_path=str(TESTAPP.parent), reload=False, local=True
        )
        assert server.mesh.brokers.of(APP) is not server.broker
        yield OnBroker(kind, server, rabbitmq, exchange, redis_server)
    finally:
        await server.shutdown()


async def test_a_task_returns_its_result(on: OnBroker) -> None:
    """A task runs on a replica process and returns its workflow's result, first try."""
    task = await on.mesh.run_task(
        APP, service_id="slow", session_id=None, input={"seconds": 0, "tag": on.kind}
    )
    assert (task.status, task.result["tag"], task.attempts) == (TaskStatus.SUCCEEDED, on.kind, 1)
    assert task.result["pid"] in on.server.supervisor.pids(APP, "slow")


async def test_events_stream_in_order_and_resume(on: OnBroker) -> None:
    """Streamed events (on the broker's topic) arrive in order and end with the result; a
    stream opened later from an index replays from there."""
    mesh = on.mesh
    task = await mesh.create_task(APP, service_id="stream", session_id=None, input={"count": 4})
    events = [e async for e in mesh.stream_events(APP, task.task_id)]
    assert [e.index for e in events] == [0, 1, 2, 3, 4]
    assert [e.data for e in events[:4]] == [{"step": i} for i in range(4)]
    assert events[4].kind is EventKind.RESULT
    assert events[4].data == {"result": {"ticks": 4}}
    resumed = [e async for e in mesh.stream_events(APP, task.task_id, from_index=3)]
    assert [e.index for e in resumed] == [3, 4]


async def test_human_in_the_loop(on: OnBroker) -> None:
    """An event sent to a running task (over the broker's inputs topic) reaches it."""
    mesh = on.mesh
    task = await mesh.create_task(APP, service_id="hitl", session_id=None, input={})
    seen = []
    async with asyncio.timeout(WAIT):
        async for event in mesh.stream_events(APP, task.task_id):
            seen.append(event)
            if event.type.endswith("InputRequiredEvent"):
                await mesh.send_event(
                    APP, task.task_id, HumanEvent("HumanResponseEvent", {"response": on.kind})
                )
    assert seen[-1].data == {"result": f"hi {on.kind}"}


async def test_session_context_carries_over(on: OnBroker) -> None:
    """A session started by a task (implied by it: the task's id, no record of its own) goes
    on from the context that task left; a task in a session of its own starts fresh.
    Deleted, the session is gone while its task lives on."""
    mesh = on.mesh
    first = await mesh.run_task(APP, service_id="tally", session_id=None, input={"amount": 3})
    second = await mesh.run_task(
        APP, service_id="tally", session_id=first.session_id, input={"amount": 4}
    )
    other = await mesh.run_task(APP, service_id="tally", session_id=None, input={"amount": 2})
    assert (first.result, second.result, other.result) == (3, 7, 2)
    assert first.session_id == first.task_id
    session = await mesh.get_session(APP, first.session_id)
    assert session.task_ids == [first.task_id, second.task_id]
    assert first.session_id in [s.session_id for s in await mesh.list_sessions(APP)]
    await mesh.delete_session(APP, first.session_id)
    with pytest.raises(NotFoundError):
        await mesh.get_session(APP, first.session_id)
    assert first.session_id not in [s.session_id for s in await mesh.list_sessions(APP)]
    assert (await mesh.get_task(APP, first.task_id)).result == 3


async def test_a_workflow_error_fails_the_task(on: OnBroker) -> None:
    """A workflow that raises gives a FAILED task whose error carries its message."""
    task = await on.mesh.run_task(
        APP, service_id="fails", session_id=None, input={"message": f"no {on.kind}"}
    )
    assert task.status is TaskStatus.FAILED
    assert task.error is not None
    assert (task.error.type, task.error.message) == ("ValueError", f"no {on.kind}")


async def test_what_does_not_fit_names_the_brokers_limit(on: OnBroker) -> None:
    """An input, or an event, larger than the broker takes in one message fails naming the
    broker's own limit, not NATS's: the input at once, the task on its first attempt."""
    big = "x" * 1000 * OVER_THE_LIMIT
    with pytest.raises(InvalidArgumentError, match=LIMITS[on.kind]):
        await on.mesh.create_task(APP, service_id="echo", session_id=None, input={"message": big})
    task = await on.mesh.run_task(
        APP,
        service_id="echo",
        session_id=None,
        input={"message": "x" * 1000, "repeat": OVER_THE_LIMIT, "as_event": True},
    )
    assert (task.status, task.attempts) == (TaskStatus.FAILED, 1)
    assert task.error is not None and task.error.type == "MessageTooLarge"
    assert LIMITS[on.kind] in task.error.message


async def test_a_running_task_is_on_the_broker_not_nats_and_cancels(on: OnBroker) -> None:
    """While a task runs, its queue and its event log exist on the broker server (seen by a
    client of its own), and the server's NATS holds neither; cancelling it stops it."""
    mesh = on.mesh
    task = await mesh.create_task(APP, service_id="slow", session_id=None, input={"seconds": 60})
    queue = subjects.task_queue(APP, "slow")
    events = subjects.events_topic(APP, task.task_id)
    async with asyncio.timeout(WAIT):
        async for event in mesh.stream_events(APP, task.task_id):
            if event.index == 0:
                assert await on.on_the_broker(queue, events)
                assert await on.server.broker.queue_depth(queue) == 0
                assert await on.server.broker.last_message(events) is None
                assert await on.broker.last_message(events) is not None
                await mesh.cancel_task(APP, task.task_id, f"off {on.kind}")
            last = event
    final = await mesh.get_task(APP, task.task_id)
    assert (last.kind, final.status) == (EventKind.CANCELLED, TaskStatus.CANCELLED)
    assert final.error is not None and final.error.message == f"off {on.kind}"


async def test_a_task_scheduled_twice_runs_once(on: OnBroker) -> None:
    """Publishing a task's message again while it is queued or running (the same task id,
    its msg_id) is dropped by the broker: the task runs once. A duplicate let through would
    reach the idle replica at once and run there too, writing a second tick to the task's
    event log before the first run ends."""
    mesh = on.mesh
    tags = await create_slow_tasks(mesh, ["twice"], seconds=1.0)
    (task_id,) = tags
    task = await mesh.get_task(APP, task_id)
    for _ in range(2):
        await mesh.orchestrator.schedule(task, new_session=True)
    (final,) = await wait_all(mesh, tags)
    assert (final.status, final.result["tag"], final.attempts) == (
        TaskStatus.SUCCEEDED,
        "twice",
        1,
    )
    log = on.broker.subscribe(subjects.events_topic(APP, task_id))
    try:
        await next_within(log, WAIT)  # the one run's tick
        await assert_nothing_within(log)
    finally:
        await aclose(log)

    async def drained() -> bool:
        return await on.broker.queue_depth(subjects.task_queue(APP, "slow")) == 0

    await assert_eventually(drained, timeout=WAIT)


async def test_a_killed_worker_task_finishes_on_the_other_replica(on: OnBroker) -> None:
    """SIGKILL of the replica running a task: the broker redelivers it and it succeeds on
    the other replica, once, with its own result."""
    mesh = on.mesh
    tags = await create_slow_tasks(mesh, ["survivor"], seconds=2.0)
    instance_id = await assert_eventually(
        lambda: running_on_some_instance(mesh, tags), timeout=WAIT
    )
    instances = await mesh.cp.list_instances(APP, "slow")
    victim = next(i.pid for i in instances if i.instance_id == instance_id)
    os.kill(victim, signal.SIGKILL)
    (final,) = await wait_all(mesh, tags)
    assert (final.status, final.result["tag"]) == (TaskStatus.SUCCEEDED, "survivor")
    assert final.result["pid"] != victim
    assert final.attempts == 2

    async def two_replicas_again() -> bool:
        pids = set(on.server.supervisor.pids(APP, "slow"))
        registered = {i.pid for i in await mesh.cp.list_instances(APP, "slow")}
        return len(pids) == 2 and victim not in pids and pids <= registered

    await assert_eventually(two_replicas_again, timeout=WAIT)


async def test_a_broker_restart_loses_no_accepted_task(on: OnBroker) -> None:
    """The broker server restarts while tasks are queued and running: the server and its
    workers reconnect, and every task accepted before (or after) ends once with its own
    result."""
    mesh = on.mesh
    tags = await create_slow_tasks(mesh, (f"{on.kind}{n}" for n in range(12)), seconds=1.0)
    await assert_eventually(functools.partial(running_on_some_instance, mesh, tags), WAIT)
    await on.restart_broker()
    tags.update(await create_slow_tasks(mesh, ["after"], seconds=0.1))
    finals = await wait_all(mesh, tags)
    lost = [(t.task_id, t.status, t.error) for t in finals if t.status is not TaskStatus.SUCCEEDED]
    wrong = [t.task_id for t in finals if t.result and t.result["tag"] != tags[t.task_id]]
    print(f"{on.kind} restart: {len(tags)} tasks, {len(lost)} lost, {len(wrong)} wrong")
    assert (lost, wrong) == ([], [])
