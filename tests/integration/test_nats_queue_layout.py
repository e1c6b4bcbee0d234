"""The NATS work-queue layout (``llama_mesh.server.queues.nats.broker``): settled messages
leave the queue stream by trims, one purge for many; messages an earlier version left in its
work-queue stream (``MESH_TASKS``, one subject per queue and later one per message) are
moved over when the broker opens, then that stream is deleted."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import nats.js.errors
import pytest
from nats.js import api

from llama_mesh.server.nats_server import NatsServer
from llama_mesh.server.queues.broker import ConsumerOptions
from llama_mesh.server.queues.errors import QueueError
from llama_mesh.server.queues.nats import NatsBroker, NatsConnection, connect_nats
from tests.helpers import aclose, assert_eventually, next_within
from tests.unit.contract import assert_nothing_within

WAIT = 10.0


@pytest.fixture
async def connection(nats_server: NatsServer) -> AsyncIterator[NatsConnection]:
    conn = await connect_nats(nats_server.url)
    try:
        yield conn
    finally:
        await conn.close()


def stored(broker: NatsBroker, count: int) -> Callable[[], Awaitable[bool]]:
    """Whether the queue stream stores ``count`` messages."""

    async def check() -> bool:
        info = await broker.js.stream_info(broker.queue_stream)
        return info.state.messages == count

    return check


async def test_settled_messages_are_trimmed_below_the_ack_floor(
    connection: NatsConnection,
) -> None:
    """Acknowledged and terminated messages leave the stream once every earlier one is
    settled too; an unsettled one keeps those after it, and stays queued."""
    broker = await NatsBroker.open(connection)
    for name in ("one", "two", "three", "four"):
        await broker.publish_task("svc", name.encode(), msg_id=name)
    it = broker.consume_tasks("svc", ConsumerOptions(max_in_flight=4))
    one, two, three, four = [await next_within(it, WAIT) for _ in range(4)]
    await one.ack()
    await three.term()
    await four.ack()
    await assert_eventually(stored(broker, 3), WAIT)
    assert await broker.find_task("svc", "two") == b"two"
    assert await broker.queue_depth("svc") == 1
    await two.ack()
    await assert_eventually(stored(broker, 0), WAIT)
    assert await broker.queued_tasks("svc") == []
    assert await broker.find_task("svc", "two") is None
    await assert_nothing_within(it)
    await aclose(it)


async def _old_stream(conn: NatsConnection) -> None:
    """The work-queue stream of the previous version, with the consumer of queue ``svc``."""
    await conn.js.add_stream(
        api.StreamConfig(
            name="MESH_TASKS",
            subjects=["mesh.tasks.>", "mesh.queued.>"],
            retention=api.RetentionPolicy.WORK_QUEUE,
            storage=api.StorageType.FILE,
            duplicate_window=120.0,
        )
    )
    await conn.js.add_consumer(
        "MESH_TASKS",
        api.ConsumerConfig(
            name="svc",
            durable_name="svc",
            filter_subjects=["mesh.tasks.svc", "mesh.queued.svc.*"],
            ack_policy=api.AckPolicy.EXPLICIT,
        ),
    )


async def test_messages_an_earlier_version_queued_are_moved(connection: NatsConnection) -> None:
    """Messages of both earlier layouts (one delivered by an old worker and not settled)
    are moved in their order, found by their ids, delivered as redeliveries (a worker reads
    the task's record first), then trimmed; the old stream is gone."""
    await _old_stream(connection)
    js = connection.js
    await js.publish("mesh.tasks.svc", b"oldest", headers={"Nats-Msg-Id": "t1"})
    await js.publish("mesh.queued.svc.t2", b"older", headers={"Nats-Msg-Id": "t2"})
    await js.publish("mesh.queued.a.b.t3", b"dotted", headers={"Nats-Msg-Id": "t3"})
    old_worker = await js.pull_subscribe_bind(durable="svc", stream="MESH_TASKS")
    [running] = await old_worker.fetch(1, timeout=WAIT)
    assert running.data == b"oldest"
    await old_worker.unsubscribe()

    broker = await NatsBroker.open(connection)
    with pytest.raises(nats.js.errors.NotFoundError):
        await js.stream_info("MESH_TASKS")
    await broker.publish_task("svc", b"new", msg_id="t4")
    assert await broker.queued_tasks("svc") == [b"oldest", b"older", b"new"]
    assert await broker.find_task("svc", "t1") == b"oldest"
    assert await broker.find_task("a.b", "t3") == b"dotted"
    it = broker.consume_tasks("svc", ConsumerOptions(max_in_flight=3))
    deliveries = [await next_within(it, WAIT) for _ in range(3)]
    assert [(d.data, d.delivery_count) for d in deliveries] == [
        (b"oldest", 2),
        (b"older", 2),
        (b"new", 1),
    ]
    for delivery in deliveries:
        await delivery.ack()
    await assert_eventually(stored(broker, 1), WAIT)  # queue a.b's message
    await aclose(it)


async def test_a_move_cut_off_is_finished_without_duplicates(
    connection: NatsConnection,
) -> None:
    """A message moved by one opening and left in the old stream (the mover stopped before
    deleting it) is not queued twice by the next opening."""
    await _old_stream(connection)
    await connection.js.publish("mesh.queued.svc.t1", b"task", headers={"Nats-Msg-Id": "t1"})
    broker = await NatsBroker.open(connection)
    await _old_stream(connection)
    await connection.js.publish("mesh.queued.svc.t1", b"task", headers={"Nats-Msg-Id": "t1"})
    again = await NatsBroker.open(connection)
    await again.close()
    assert await broker.queued_tasks("svc") == [b"task"]
    assert await broker.queue_depth("svc") == 1


async def test_queues_that_share_a_consumer_name_are_refused(connection: NatsConnection) -> None:
    """Queue ``a.b`` and queue ``a_b`` map to one consumer name: the second is refused."""
    broker = await NatsBroker.open(connection)
    await broker.ensure_consumer("a.b", ConsumerOptions())
    with pytest.raises(QueueError, match="already serves"):
        await broker.ensure_consumer("a_b", ConsumerOptions())
