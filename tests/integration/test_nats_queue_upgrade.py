"""The NATS tasks layout across an upgrade: messages queued and consumers created by an
earlier version, which used one subject per queue (``<prefix>.tasks.<queue>``), keep working
with the layout of one subject per message (``<prefix>.queued.<queue>.<msg_id>``)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from nats.js import api

from llama_mesh.server.nats_server import NatsServer
from llama_mesh.server.queues.broker import ConsumerOptions
from llama_mesh.server.queues.errors import QueueError
from llama_mesh.server.queues.nats import NatsBroker, NatsConnection, connect_nats
from tests.helpers import aclose, next_within
from tests.unit.contract import assert_nothing_within

WAIT = 10.0


@pytest.fixture
async def connection(nats_server: NatsServer) -> AsyncIterator[NatsConnection]:
    """A connection holding the tasks stream as an earlier version created it."""
    conn = await connect_nats(nats_server.url)
    try:
        await conn.js.add_stream(
            api.StreamConfig(
                name="MESH_TASKS",
                subjects=["mesh.tasks.>"],
                retention=api.RetentionPolicy.WORK_QUEUE,
                storage=api.StorageType.FILE,
                duplicate_window=120.0,
            )
        )
        yield conn
    finally:
        await conn.close()


async def _old_consumer(conn: NatsConnection, queue: str) -> None:
    """The durable consumer of ``queue`` as an earlier version created it."""
    name = NatsBroker.consumer_name(queue)
    await conn.js.add_consumer(
        "MESH_TASKS",
        api.ConsumerConfig(
            name=name,
            durable_name=name,
            filter_subject=f"mesh.tasks.{queue}",
            deliver_policy=api.DeliverPolicy.ALL,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=30.0,
            max_deliver=3,
            max_ack_pending=10_000,
        ),
    )


async def test_messages_queued_the_old_way_are_still_served(connection: NatsConnection) -> None:
    """A message published straight to the old subject is counted, listed in publish order
    among new ones, delivered and purged; it cannot be found by its id."""
    await connection.js.publish("mesh.tasks.svc", b"old", headers={"Nats-Msg-Id": "old"})
    broker = await NatsBroker.open(connection)
    await broker.publish_task("svc", b"new", msg_id="new")
    assert await broker.queue_depth("svc") == 2
    assert await broker.queued_tasks("svc") == [b"old", b"new"]
    assert await broker.find_task("svc", "old") is None
    assert await broker.queued_tasks("svc.sub") == []
    it = broker.consume_tasks("svc", ConsumerOptions(max_in_flight=2))
    deliveries = [await next_within(it, WAIT) for _ in range(2)]
    assert [d.data for d in deliveries] == [b"old", b"new"]
    assert await broker.queue_depth("svc") == 2
    for delivery in deliveries:
        await delivery.ack()
    await aclose(it)
    await connection.js.publish("mesh.tasks.svc", b"stale", headers={"Nats-Msg-Id": "stale"})
    await broker.publish_task("svc", b"fresh", msg_id="fresh")
    await broker.purge_queue("svc")
    assert await broker.queue_depth("svc") == 0
    assert await broker.queued_tasks("svc") == []


async def test_an_old_consumer_is_updated(connection: NatsConnection) -> None:
    """A durable consumer that filters only the old subject is updated to filter both; it
    goes on with messages of either layout; a consumer serving another queue is refused."""
    await _old_consumer(connection, "svc")
    await connection.js.publish("mesh.tasks.svc", b"old", headers={"Nats-Msg-Id": "old"})
    broker = await NatsBroker.open(connection)
    await broker.publish_task("svc", b"new", msg_id="new")
    it = broker.consume_tasks("svc", ConsumerOptions(max_in_flight=2))
    deliveries = [await next_within(it, WAIT) for _ in range(2)]
    assert [d.data for d in deliveries] == [b"old", b"new"]
    for delivery in deliveries:
        await delivery.ack()
    info = await connection.js.consumer_info("MESH_TASKS", "svc")
    assert info.config.filter_subjects == ["mesh.tasks.svc", "mesh.queued.svc.*"]
    assert not info.config.filter_subject
    await broker.publish_task("svc", b"later", msg_id="later")
    assert (await next_within(it, WAIT)).data == b"later"
    await aclose(it)

    # Queue "a.b" and queue "a_b" share a consumer name: the second is refused.
    await broker.ensure_consumer("a.b", ConsumerOptions())
    with pytest.raises(QueueError, match="already serves"):
        await broker.ensure_consumer("a_b", ConsumerOptions())


async def test_new_messages_published_before_the_consumer_is_updated(
    connection: NatsConnection,
) -> None:
    """A message queued by an upgraded API server while workers of the earlier version still
    consume (and ack later messages of the old layout) is delivered once the consumer is
    updated."""
    await _old_consumer(connection, "svc")
    broker = await NatsBroker.open(connection)
    await broker.publish_task("svc", b"new", msg_id="new")
    await connection.js.publish("mesh.tasks.svc", b"old", headers={"Nats-Msg-Id": "old"})
    old_worker = await connection.js.pull_subscribe_bind(durable="svc", stream="MESH_TASKS")
    [msg] = await old_worker.fetch(1, timeout=WAIT)
    assert msg.data == b"old"
    await msg.ack_sync()
    await old_worker.unsubscribe()
    it = broker.consume_tasks("svc", ConsumerOptions())
    delivery = await next_within(it, WAIT)
    assert delivery.data == b"new"
    await delivery.ack()
    await assert_nothing_within(it)
    await aclose(it)
