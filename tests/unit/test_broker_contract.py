"""The broker contract (``llama_mesh.server.queues.broker``), pinned for every broker.

Each test runs against every broker through the parametrized ``broker`` fixture
(``tests/fixtures/brokers.py``), each on a real server. Waiting is done on the iterators
themselves (``next_within``) or with ``assert_eventually``; ``asyncio.sleep`` only lets time
pass to show that something does NOT happen within a window.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from llama_mesh.server.queues.broker import Broker, ConsumerOptions, Delivery
from llama_mesh.server.queues.errors import QueueUnavailableError
from tests.helpers import aclose, assert_eventually, next_within
from tests.unit.contract import QUIET, WAIT, assert_depth, assert_nothing_within, read_one, take

# --------------------------------------------------------------------------------------------
# Work queues


async def test_publish_consume_ack(broker: Broker) -> None:
    """A published message is delivered once with its payload; an ack removes it."""
    await broker.publish_task("svc.work", b"hello", msg_id="m1")
    it = broker.consume_tasks("svc.work", ConsumerOptions())
    delivery = await next_within(it, WAIT)
    assert delivery.data == b"hello"
    assert delivery.delivery_count == 1
    await delivery.ack()
    await assert_depth(broker, "svc.work", 0)
    await aclose(it)


async def test_consumers_of_a_queue_share_its_messages(broker: Broker) -> None:
    """Two consumers of one queue together receive every message exactly once."""
    sent = [f"m{i}".encode() for i in range(10)]
    for i, data in enumerate(sent):
        await broker.publish_task("shared", data, msg_id=f"id{i}")
    options = ConsumerOptions(max_in_flight=4)
    consumers = [broker.consume_tasks("shared", options) for _ in range(2)]
    received: list[tuple[int, bytes]] = []

    async def read(index: int, it: AsyncIterator[Delivery]) -> None:
        async for delivery in it:
            received.append((index, delivery.data))
            await delivery.ack()

    readers = [asyncio.create_task(read(i, it)) for i, it in enumerate(consumers)]
    await assert_eventually(lambda: len(received) >= len(sent))
    await asyncio.sleep(QUIET)  # no duplicate shows up
    assert sorted(data for _, data in received) == sorted(sent)
    for it in consumers:
        await aclose(it)
    await asyncio.gather(*readers)


async def test_msg_id_deduplicates_publishes(broker: Broker) -> None:
    """A second publish with the same msg_id is dropped; the first payload is kept."""
    await broker.publish_task("dedup", b"first", msg_id="task-1")
    await broker.publish_task("dedup", b"second", msg_id="task-1")
    await broker.publish_task("dedup", b"other", msg_id="task-2")
    assert await broker.queue_depth("dedup") == 2
    it = broker.consume_tasks("dedup", ConsumerOptions(max_in_flight=5))
    deliveries = await take(it, 2)
    assert [d.data for d in deliveries] == [b"first", b"other"]
    await assert_nothing_within(it)
    await aclose(it)


async def test_unsettled_message_is_redelivered_after_ack_wait(broker: Broker) -> None:
    """Without a settle, a message comes back after ack_wait with a growing delivery_count."""
    await broker.publish_task("slow", b"job", msg_id="j")
    options = ConsumerOptions(max_in_flight=3, ack_wait=0.5, max_deliver=3)
    it = broker.consume_tasks("slow", options)
    loop = asyncio.get_running_loop()
    first = await next_within(it, WAIT)
    delivered_at = loop.time()
    second = await next_within(it, WAIT)
    assert loop.time() - delivered_at >= 0.4
    third = await next_within(it, WAIT)
    assert [d.delivery_count for d in (first, second, third)] == [1, 2, 3]
    assert {d.data for d in (first, second, third)} == {b"job"}
    await third.ack()
    await assert_depth(broker, "slow", 0)
    await aclose(it)


async def test_in_progress_keeps_a_message_from_redelivery(broker: Broker) -> None:
    """``in_progress()`` restarts the ack_wait timer, so a busy message is not redelivered."""
    await broker.publish_task("busy", b"long job", msg_id="j")
    it = broker.consume_tasks("busy", ConsumerOptions(max_in_flight=2, ack_wait=0.5))
    delivery = await next_within(it, WAIT)

    async def heartbeat() -> None:
        for _ in range(7):
            await delivery.in_progress()
            await asyncio.sleep(0.2)  # pacing the heartbeats, well inside ack_wait

    beating = asyncio.create_task(heartbeat())
    await assert_nothing_within(it, 1.2)  # more than twice ack_wait
    await beating
    await delivery.ack()
    await assert_depth(broker, "busy", 0)
    await aclose(it)


async def test_nak_redelivers_after_the_delay(broker: Broker) -> None:
    """``nak(delay)`` brings the message back after ``delay``; ``nak()`` at once."""
    await broker.publish_task("retry", b"job", msg_id="j")
    it = broker.consume_tasks("retry", ConsumerOptions(max_in_flight=1, ack_wait=30.0))
    first = await next_within(it, WAIT)
    await first.nak()
    second = await next_within(it, 2.0)  # far sooner than ack_wait
    assert (second.data, second.delivery_count) == (b"job", 2)
    loop = asyncio.get_running_loop()
    nak_at = loop.time()
    await second.nak(delay=0.8)
    third = await next_within(it, WAIT)
    assert loop.time() - nak_at >= 0.6
    assert third.delivery_count == 3
    await third.ack()
    await aclose(it)


async def test_max_deliver_stops_redelivery_after_timeouts(broker: Broker) -> None:
    """A message is delivered at most max_deliver times; then it is gone from the broker."""
    await broker.publish_task("capped", b"poison", msg_id="p")
    options = ConsumerOptions(max_in_flight=5, ack_wait=0.5, max_deliver=2)
    it = broker.consume_tasks("capped", options)
    deliveries = await take(it, 2)
    assert [d.delivery_count for d in deliveries] == [1, 2]
    await assert_nothing_within(it, 0.8)
    await assert_depth(broker, "capped", 0)
    await aclose(it)


async def test_max_deliver_drops_a_message_nakked_on_its_last_delivery(
    broker: Broker,
) -> None:
    """A nak of the delivery numbered max_deliver does not bring the message back."""
    await broker.publish_task("capped-nak", b"poison", msg_id="p")
    options = ConsumerOptions(max_in_flight=1, ack_wait=30.0, max_deliver=2)
    it = broker.consume_tasks("capped-nak", options)
    first = await next_within(it, WAIT)
    await first.nak()
    last = await next_within(it, WAIT)
    assert last.delivery_count == 2
    await last.nak()
    await assert_nothing_within(it)
    await assert_depth(broker, "capped-nak", 0)
    await aclose(it)


async def test_term_removes_a_message(broker: Broker) -> None:
    """``term()`` removes the message for good, even with deliveries left."""
    await broker.publish_task("dead", b"bad", msg_id="b")
    it = broker.consume_tasks("dead", ConsumerOptions(ack_wait=0.5, max_deliver=5))
    delivery = await next_within(it, WAIT)
    await delivery.term()
    await assert_nothing_within(it, 0.8)
    await assert_depth(broker, "dead", 0)
    await aclose(it)


async def test_max_in_flight_limits_unsettled_deliveries(broker: Broker) -> None:
    """A consumer holds at most max_in_flight unsettled messages; the rest stay available."""
    for i in range(5):
        await broker.publish_task("limited", f"m{i}".encode(), msg_id=f"m{i}")
    narrow = broker.consume_tasks("limited", ConsumerOptions(max_in_flight=2))
    held = await take(narrow, 2)
    await assert_nothing_within(narrow)
    await held[0].ack()
    third = await next_within(narrow, WAIT)
    # The two messages the narrow consumer does not hold go to another consumer.
    wide = broker.consume_tasks("limited", ConsumerOptions(max_in_flight=5))
    rest = await take(wide, 2)
    await assert_nothing_within(wide)
    data = {d.data for d in [*held, third, *rest]}
    assert data == {f"m{i}".encode() for i in range(5)}
    await aclose(narrow)
    await aclose(wide)


async def test_queue_depth_counts_waiting_and_unsettled(broker: Broker) -> None:
    """queue_depth counts waiting and delivered-but-unsettled messages, not acked ones."""
    assert await broker.queue_depth("depth") == 0
    for i in range(3):
        await broker.publish_task("depth", b"x", msg_id=f"d{i}")
    assert await broker.queue_depth("depth") == 3
    it = broker.consume_tasks("depth", ConsumerOptions(max_in_flight=1))
    delivery = await next_within(it, WAIT)
    await assert_depth(broker, "depth", 3)
    await delivery.ack()
    await assert_depth(broker, "depth", 2)
    await aclose(it)


async def test_purge_drops_waiting_messages(broker: Broker) -> None:
    """purge_queue empties one queue; later publishes are delivered; other queues untouched."""
    for i in range(3):
        await broker.publish_task("purged", b"old", msg_id=f"old{i}")
    await broker.publish_task("kept", b"keep", msg_id="keep")
    await broker.purge_queue("purged")
    assert await broker.queue_depth("purged") == 0
    assert await broker.queue_depth("kept") == 1
    it = broker.consume_tasks("purged", ConsumerOptions(max_in_flight=5))
    await assert_nothing_within(it)
    await broker.publish_task("purged", b"new", msg_id="new")
    assert (await next_within(it, WAIT)).data == b"new"
    await aclose(it)


async def test_cancelled_next_loses_nothing(broker: Broker) -> None:
    """Cancelling a pending ``__anext__`` (a timeout) keeps the iterator usable."""
    it = broker.consume_tasks("patient", ConsumerOptions())
    await assert_nothing_within(it, 0.2)
    await broker.publish_task("patient", b"late", msg_id="late")
    delivery = await next_within(it, WAIT)
    assert (delivery.data, delivery.delivery_count) == (b"late", 1)
    await delivery.ack()
    await aclose(it)


async def test_aclose_ends_a_consumer_and_frees_its_messages(broker: Broker) -> None:
    """``aclose()`` ends a pending read; messages go to the remaining consumers at once."""
    first = broker.consume_tasks("handover", ConsumerOptions(max_in_flight=3, ack_wait=30.0))
    pending = asyncio.create_task(read_one(first))
    await asyncio.sleep(0.2)  # let the first read start waiting (no message exists yet)
    await aclose(first)
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(pending, WAIT)
    await broker.publish_task("handover", b"job", msg_id="job")
    second = broker.consume_tasks("handover", ConsumerOptions())
    delivery = await next_within(second, WAIT)
    assert delivery.data == b"job"
    await delivery.ack()
    await aclose(second)


# --------------------------------------------------------------------------------------------
# Finding queued messages

FINDS_TASKS = ["inprocess", "nats"]
"""The brokers whose ``finds_tasks`` is true; the others keep the base class's defaults."""
finders = pytest.mark.parametrize("broker", FINDS_TASKS, indirect=True)


@finders
async def test_find_task_sees_waiting_and_unsettled_messages(broker: Broker) -> None:
    """find_task finds a message before its delivery, while a delivery is unsettled and
    while it waits to be delivered again; not once it is acked."""
    assert broker.finds_tasks
    await broker.publish_task("find", b"job", msg_id="t1")
    assert await broker.find_task("find", "t1") == b"job"
    it = broker.consume_tasks("find", ConsumerOptions())
    delivery = await next_within(it, WAIT)
    assert await broker.find_task("find", "t1") == b"job"
    await delivery.nak(delay=0.5)
    assert await broker.find_task("find", "t1") == b"job"
    assert await broker.queued_tasks("find") == [b"job"]
    delivery = await next_within(it, WAIT)
    assert delivery.delivery_count == 2
    await delivery.ack()

    async def gone() -> bool:
        return await broker.find_task("find", "t1") is None

    await assert_eventually(gone)
    await aclose(it)


@finders
async def test_find_task_not_after_term_remove_or_purge(broker: Broker) -> None:
    """A terminated, removed or purged message is found no more; remove_task says whether
    the message was there; any msg_id can be looked up."""
    await broker.publish_task("ended", b"term", msg_id="t1")
    await broker.publish_task("ended", b"remove", msg_id="t2")
    await broker.publish_task("ended", b"purge", msg_id="t3.with dots*")
    assert await broker.find_task("ended", "t3.with dots*") == b"purge"
    it = broker.consume_tasks("ended", ConsumerOptions())
    delivery = await next_within(it, WAIT)
    assert delivery.data == b"term"
    await delivery.term()

    async def terminated() -> bool:
        return await broker.find_task("ended", "t1") is None

    await assert_eventually(terminated)
    await aclose(it)
    assert await broker.remove_task("ended", "t2")
    assert await broker.find_task("ended", "t2") is None
    assert not await broker.remove_task("ended", "t2")
    assert not await broker.remove_task("ended", "unknown")
    assert await broker.find_task("ended", "unknown") is None
    await broker.purge_queue("ended")
    assert await broker.find_task("ended", "t3.with dots*") is None
    assert await broker.queued_tasks("ended") == []


@finders
async def test_queued_tasks_lists_one_queue_in_publish_order(broker: Broker) -> None:
    """queued_tasks lists a queue's messages in publish order, delivered ones included;
    queue ``a`` and queue ``a.b`` see nothing of each other."""
    for i in range(3):
        await broker.publish_task("a", f"a{i}".encode(), msg_id=f"a{i}")
        await broker.publish_task("a.b", f"ab{i}".encode(), msg_id=f"ab{i}")
    assert await broker.queued_tasks("a") == [b"a0", b"a1", b"a2"]
    assert await broker.queued_tasks("a.b") == [b"ab0", b"ab1", b"ab2"]
    assert await broker.find_task("a", "ab0") is None
    assert not await broker.remove_task("a.b", "a0")
    it = broker.consume_tasks("a", ConsumerOptions())
    first = await next_within(it, WAIT)
    assert first.data == b"a0"
    assert await broker.queued_tasks("a") == [b"a0", b"a1", b"a2"]
    await first.ack()

    async def acked() -> bool:
        return await broker.queued_tasks("a") == [b"a1", b"a2"]

    await assert_eventually(acked)
    assert await broker.queued_tasks("a.b") == [b"ab0", b"ab1", b"ab2"]
    assert await broker.queued_tasks("empty") == []
    await aclose(it)


@finders
async def test_remove_task_of_a_delivered_message(broker: Broker) -> None:
    """A message removed while delivered is gone: settling that delivery later raises
    nothing, and it is never delivered again (not even after ack_wait)."""
    await broker.publish_task("held", b"job", msg_id="t1")
    it = broker.consume_tasks("held", ConsumerOptions(max_in_flight=2, ack_wait=0.5))
    delivery = await next_within(it, WAIT)
    assert await broker.remove_task("held", "t1")
    assert await broker.find_task("held", "t1") is None
    assert await broker.queued_tasks("held") == []
    await assert_nothing_within(it, 0.8)  # more than ack_wait
    await delivery.ack()
    await assert_depth(broker, "held", 0)
    await broker.publish_task("held", b"next", msg_id="t2")
    assert (await next_within(it, WAIT)).data == b"next"
    await aclose(it)


@pytest.mark.parametrize("broker", ["rabbitmq", "redis"], indirect=True)
async def test_brokers_that_cannot_find_tasks(broker: Broker) -> None:
    """A broker whose finds_tasks is false finds, lists and removes nothing: its messages
    stay queued."""
    assert not broker.finds_tasks
    await broker.publish_task("blind", b"job", msg_id="t1")
    assert await broker.find_task("blind", "t1") is None
    assert await broker.queued_tasks("blind") == []
    assert not await broker.remove_task("blind", "t1")
    assert await broker.queue_depth("blind") == 1


# --------------------------------------------------------------------------------------------
# Topics


async def test_subscribe_replays_then_follows(broker: Broker) -> None:
    """A subscriber gets the stored messages in order, then new ones as published."""
    for data in (b"a", b"b", b"c"):
        await broker.publish("ev.task1", data)
    sub = broker.subscribe("ev.task1")
    assert [await next_within(sub, WAIT) for _ in range(3)] == [b"a", b"b", b"c"]
    await broker.publish("ev.task1", b"d")
    assert await next_within(sub, WAIT) == b"d"
    await assert_nothing_within(sub, 0.2)
    await aclose(sub)


async def test_subscriber_started_before_publishes(broker: Broker) -> None:
    """A subscriber waiting on an empty topic receives each later message, in order."""
    sub = broker.subscribe("ev.task2")
    first = asyncio.create_task(read_one(sub))
    sent = [f"e{i}".encode() for i in range(5)]
    for data in sent:
        await broker.publish("ev.task2", data)
    got = [await asyncio.wait_for(first, WAIT)]
    got += [await next_within(sub, WAIT) for _ in range(4)]
    assert got == sent
    await aclose(sub)


async def test_topics_are_separate(broker: Broker) -> None:
    """A subscriber sees only its topic, not topics sharing a name prefix."""
    await broker.publish("ev.a", b"a")
    await broker.publish("ev.a.b", b"ab")
    await broker.publish("ev.ab", b"x")
    sub = broker.subscribe("ev.a")
    assert await next_within(sub, WAIT) == b"a"
    await assert_nothing_within(sub, 0.3)
    await aclose(sub)


async def test_delete_topic_forgets_its_messages(broker: Broker) -> None:
    """After delete_topic, new subscribers see only later messages; other topics keep theirs."""
    await broker.publish("ev.gone", b"old1")
    await broker.publish("ev.gone", b"old2")
    await broker.publish("ev.stay", b"stay")
    await broker.delete_topic("ev.gone")
    await broker.publish("ev.gone", b"new")
    sub = broker.subscribe("ev.gone")
    assert await next_within(sub, WAIT) == b"new"
    await assert_nothing_within(sub, 0.3)
    other = broker.subscribe("ev.stay")
    assert await next_within(other, WAIT) == b"stay"
    await aclose(sub)
    await aclose(other)


async def test_last_message_of_a_topic(broker: Broker) -> None:
    """``last_message`` gives the latest message of its topic only (``None`` for one with
    none, or once deleted), without subscribing."""
    assert await broker.last_message("ev.last") is None
    await broker.publish("ev.last", b"first")
    await broker.publish("ev.last", b"second")
    await broker.publish("ev.last.b", b"neighbour")
    assert await broker.last_message("ev.last") == b"second"
    await broker.delete_topic("ev.last")
    assert await broker.last_message("ev.last") is None


# --------------------------------------------------------------------------------------------
# Closing


async def test_close_is_idempotent_and_ends_iterators(broker: Broker) -> None:
    """close ends pending reads of every iterator kind; a second close is a no-op."""
    iterators: list[AsyncIterator[object]] = [
        broker.consume_tasks("q", ConsumerOptions()),
        broker.subscribe("t"),
    ]
    reads = [asyncio.create_task(read_one(it)) for it in iterators]
    await asyncio.sleep(0.2)  # let the reads start waiting
    await broker.close()
    for read in reads:
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(read, WAIT)
    await broker.close()
    with pytest.raises(StopAsyncIteration):
        await next_within(iterators[1], WAIT)


async def test_operations_after_close_raise_unavailable(broker: Broker) -> None:
    """After close, every operation raises QueueUnavailableError."""
    await broker.close()
    with pytest.raises(QueueUnavailableError):
        await broker.publish_task("q", b"x", msg_id="x")
    with pytest.raises(QueueUnavailableError):
        await broker.publish("t", b"x")
