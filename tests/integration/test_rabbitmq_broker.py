"""What the RabbitMQ broker adds to the broker contract, on a real rabbitmq-server: a message
over the server's size limit is refused clearly, racing publishes of one msg_id run once, a
dead consumer's messages come back (and are not taken for duplicates), publishes racing a
stream's creation do not crash the connection, a crashed channel is recovered from (a declare,
consume or task publish it cut off is made again), and a restart of the server loses no
confirmed task or topic message (the adapter reconnects).

Cost: about 18 s: the server's boot (5 s), its restart (7 s), four rabbitmqctl calls (4 s).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import aiormq.exceptions
import pytest

from llama_mesh.server.ports import free_port
from llama_mesh.server.queues.broker import Broker, ConsumerOptions, Delivery
from llama_mesh.server.queues.errors import MessageTooLargeError, QueueUnavailableError
from llama_mesh.server.queues.inprocess import InProcessStateStore
from llama_mesh.server.queues.iterators import Subscription
from llama_mesh.server.queues.rabbitmq import RabbitMqBroker, RabbitMqSettings, connect_rabbitmq
from llama_mesh.server.queues.state import KeyValueStore
from tests.fixtures.rabbitmq import MAX_MESSAGE_SIZE, RabbitMqServer
from tests.helpers import aclose, assert_eventually, next_within
from tests.unit.contract import (
    QUIET,
    WAIT,
    assert_depth,
    assert_nothing_within,
    read_one,
    take,
)

EVENTS = [f"event{i}".encode() for i in range(4)]
RACING_TOPICS = 12
"""New topics two connections publish to at once, one after the other (without the fix,
the first one already crashed the connection in every run)."""
RESTART_WAIT = 60.0
"""Seconds a reconnect may take after the server restarted (a loaded machine)."""


@pytest.fixture
async def dedup() -> AsyncIterator[KeyValueStore]:
    """A bucket for msg_id claims, as the server gives a RabbitMQ broker."""
    async with InProcessStateStore() as state:
        yield await state.kv("dedup", ttl=120.0)


def settings_for(server: RabbitMqServer) -> RabbitMqSettings:
    """Settings with an exchange_name (object prefix) of their own."""
    return RabbitMqSettings(url=server.url, exchange_name=f"it-{uuid.uuid4().hex}")


async def test_a_message_over_the_size_limit_is_refused_clearly(
    rabbitmq: RabbitMqServer, dedup: KeyValueStore
) -> None:
    """RabbitMQ's max_message_size refusal is a MessageTooLargeError with both sizes; the
    broker goes on working."""
    async with await connect_rabbitmq(settings_for(rabbitmq), dedup=dedup) as broker:
        size = MAX_MESSAGE_SIZE + 1
        with pytest.raises(MessageTooLargeError, match="max_message_size") as caught:
            await broker.publish("ev.big", b"x" * size)
        assert (caught.value.size, caught.value.limit) == (size, MAX_MESSAGE_SIZE)
        await broker.publish("ev.big", b"small")
        assert await broker.last_message("ev.big") == b"small"


async def test_concurrent_publishes_of_a_msg_id_run_once(
    rabbitmq: RabbitMqServer, dedup: KeyValueStore
) -> None:
    """Publishes of one msg_id racing each other all reach the queue (none saw another's
    confirm), yet consumers on two connections receive one of them, once; the others are
    acked unrun."""
    settings = settings_for(rabbitmq)
    options = ConsumerOptions(max_in_flight=10)
    async with (
        await connect_rabbitmq(settings, dedup=dedup) as one,
        await connect_rabbitmq(settings, dedup=dedup) as other,
    ):
        copies = [f"copy{i}".encode() for i in range(6)]
        publishers = (one, other)
        await asyncio.gather(
            *(
                publishers[i % 2].publish_task("work", data, msg_id="same")
                for i, data in enumerate(copies)
            )
        )
        assert await one.queue_depth("work") == len(copies)
        consumers = [broker.consume_tasks("work", options) for broker in publishers]
        received = asyncio.Queue[Delivery]()
        readers = [asyncio.create_task(_read_into(it, received)) for it in consumers]
        delivery = await asyncio.wait_for(received.get(), WAIT)
        assert delivery.data in copies
        await asyncio.sleep(QUIET)  # no second copy shows up
        assert received.empty()
        await delivery.ack()
        for broker in publishers:  # the copies were acked, not left waiting or held
            await assert_depth(broker, "work", 0)
        for it in consumers:
            await aclose(it)
        await asyncio.gather(*readers)


async def _read_into(it: Subscription[Delivery], received: asyncio.Queue[Delivery]) -> None:
    async for delivery in it:
        received.put_nowait(delivery)


async def test_a_dead_consumers_unsettled_message_is_redelivered(
    rabbitmq: RabbitMqServer, dedup: KeyValueStore
) -> None:
    """A consumer whose connection closes without settling gives its message back at once
    (long before ack_wait), to a consumer on another connection: a redelivery, not taken for
    a duplicate (RabbitMQ 3.10 counts the return in x-delivery-count), while a duplicate
    of it published meanwhile is dropped."""
    settings = settings_for(rabbitmq)
    options = ConsumerOptions(ack_wait=300.0, max_in_flight=1)
    async with await connect_rabbitmq(settings, dedup=dedup) as survivor:
        await asyncio.gather(
            survivor.publish_task("work", b"job", msg_id="job-1"),
            survivor.publish_task("work", b"copy", msg_id="job-1"),
        )
        assert await survivor.queue_depth("work") == 2  # both went out: neither saw a confirm
        worker = await connect_rabbitmq(settings, dedup=dedup)
        first = await next_within(worker.consume_tasks("work", options), WAIT)
        assert first.delivery_count == 1
        await worker.close()  # the worker dies holding the message
        it = survivor.consume_tasks("work", options)
        again = await next_within(it, WAIT)
        assert (again.data, again.delivery_count) == (first.data, 2)
        await assert_nothing_within(it)
        await again.ack()
        await assert_depth(survivor, "work", 0)
        await aclose(it)


async def test_publishes_racing_the_creation_of_their_streams_go_through(
    rabbitmq: RabbitMqServer, dedup: KeyValueStore
) -> None:
    """Two connections publishing to the same new topics at once: one creates each stream,
    the other finds it before it runs (RabbitMQ 3.10 crashed the channel of such a publish,
    closing the connection with INTERNAL_ERROR); every publish is confirmed, and neither
    connection is lost."""
    settings = settings_for(rabbitmq)
    topics = [f"ev.new{i}" for i in range(RACING_TOPICS)]
    async with (
        await connect_rabbitmq(settings, dedup=dedup) as one,
        await connect_rabbitmq(settings, dedup=dedup) as other,
    ):
        events: list[str | None] = []
        for broker in (one, other):
            broker.on_availability(events.append)
        for topic in topics:  # one at a time: a publish finds its stream at once
            await asyncio.gather(one.publish(topic, b"x"), other.publish(topic, b"x"))
        assert events == []
        for topic in topics[:3]:  # both messages are stored (a sample: reading is slow)
            sub = one.subscribe(topic)
            assert [await next_within(sub, WAIT) for _ in range(2)] == [b"x", b"x"]
            await aclose(sub)


async def test_aclose_during_a_consumers_start_ends_its_pending_read(
    rabbitmq: RabbitMqServer, dedup: KeyValueStore
) -> None:
    """A consumer closed while its start (channel, declare, consume) is under way ends the
    read waiting on it, rather than raising the cancelled start's CancelledError."""
    async with await connect_rabbitmq(settings_for(rabbitmq), dedup=dedup) as broker:
        consumer = broker.consume_tasks("work", ConsumerOptions())
        pending = asyncio.create_task(read_one(consumer))
        await asyncio.sleep(0)  # the read begins the start, which waits for RabbitMQ
        await aclose(consumer)
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(pending, WAIT)


async def test_a_crashed_channel_is_reported_and_recovered(
    rabbitmq: RabbitMqServer, dedup: KeyValueStore
) -> None:
    """When RabbitMQ crashes a channel (and so closes the connection with INTERNAL_ERROR),
    the broker reports the loss, reconnects, publishes again, and its subscription goes on
    after the last message it delivered."""
    async with await connect_rabbitmq(settings_for(rabbitmq), dedup=dedup) as broker:
        events: list[str | None] = []
        broker.on_availability(events.append)
        following = broker.subscribe("ev.log")
        await broker.publish("ev.log", b"before")
        assert await next_within(following, WAIT) == b"before"
        await _assert_recovers(broker, events, following, rabbitmq.crash_channels, "INTERNAL_ERROR")


class _CrashOnce:
    """``target`` (a channel, an exchange, a queue), but the first call of its method
    ``method`` crashes every channel on the node for real and then fails as aiormq fails an
    operation whose channel RabbitMQ crashed (the connection closed with INTERNAL_ERROR).
    ``stored``: the call is made before the crash, so what it sent is stored."""

    def __init__(
        self, target: Any, method: str, crash: Callable[[], None], *, stored: bool = False
    ) -> None:
        self._target = target
        self._method = method
        self.crash: Callable[[], None] | None = crash
        self._stored = stored

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if name != self._method or self.crash is None:
            return value

        async def crashing(*args: Any, **kwargs: Any) -> Any:
            assert self.crash is not None
            crash, self.crash = self.crash, None
            if self._stored:
                await value(*args, **kwargs)
            await asyncio.to_thread(crash)
            raise aiormq.exceptions.ConnectionInternalError("INTERNAL_ERROR")

        return crashing


async def test_a_declare_whose_channel_crashed_is_tried_again(
    rabbitmq: RabbitMqServer, dedup: KeyValueStore
) -> None:
    """RabbitMQ 3.10 now and then crashes the channel of a quorum queue's declare on a loaded
    machine (closing the connection with INTERNAL_ERROR): the declare is made again once the
    connection is back, and a task published then is there."""
    async with await connect_rabbitmq(settings_for(rabbitmq), dedup=dedup) as broker:
        assert isinstance(broker, RabbitMqBroker)
        crashing = cast(Any, _CrashOnce(broker.channel, "declare_queue", rabbitmq.crash_channels))
        name = broker.queue_name("crashed")
        queue = await broker.declare(name, {"x-queue-type": "quorum"}, channel=crashing)
        assert queue.name == name
        await broker.publish_task("crashed", b"job", msg_id="job")
        await assert_depth(broker, "crashed", 1)


class _CrashingPublishes:
    """The broker's channel, but the first publish to its default exchange is stored, then
    crashes every channel on the node (see :class:`_CrashOnce`)."""

    def __init__(self, channel: Any, crash: Callable[[], None]) -> None:
        self._channel = channel
        self._exchange = _CrashOnce(channel.default_exchange, "publish", crash, stored=True)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._channel, name)

    @property
    def default_exchange(self) -> Any:
        crashed = self._exchange.crash is None
        return self._channel.default_exchange if crashed else self._exchange


async def test_a_task_publish_cut_off_before_its_confirm_is_made_again_and_runs_once(
    rabbitmq: RabbitMqServer, dedup: KeyValueStore
) -> None:
    """A task message whose publish lost its connection before the confirm (here: stored,
    and a crash of another channel closed the connection with INTERNAL_ERROR) is published
    again once the connection is back, rather than failing its caller; of the two copies
    stored, one is handed out and the other dropped on delivery."""
    async with await connect_rabbitmq(settings_for(rabbitmq), dedup=dedup) as broker:
        assert isinstance(broker, RabbitMqBroker)
        await broker.declare(broker.queue_name("cut"), {"x-queue-type": "quorum"})
        channel = broker.channel
        broker.channel = cast(Any, _CrashingPublishes(channel, rabbitmq.crash_channels))
        try:
            await broker.publish_task("cut", b"job", msg_id="job")
        finally:
            broker.channel = channel
        await assert_depth(broker, "cut", 2)
        it = broker.consume_tasks("cut", ConsumerOptions())
        delivery = await next_within(it, WAIT)
        assert (delivery.data, delivery.delivery_count) == (b"job", 1)
        await assert_nothing_within(it)
        await delivery.ack()
        await assert_depth(broker, "cut", 0)
        await aclose(it)


async def test_a_consume_whose_channel_crashed_is_started_again(
    rabbitmq: RabbitMqServer, dedup: KeyValueStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RabbitMQ 3.10 now and then crashes the channel of a consume on a quorum queue whose
    leader is still starting (closing the connection with INTERNAL_ERROR): the consumer
    starts again once the connection is back, and its task is delivered."""
    async with await connect_rabbitmq(settings_for(rabbitmq), dedup=dedup) as broker:
        assert isinstance(broker, RabbitMqBroker)
        await broker.publish_task("crashed", b"job", msg_id="job")
        declare = broker.declare
        crashing: list[_CrashOnce] = []

        async def declare_crashing_the_first_consume(*args: Any, **kwargs: Any) -> Any:
            queue = await declare(*args, **kwargs)
            if crashing:
                return queue
            crashing.append(_CrashOnce(queue, "consume", rabbitmq.crash_channels))
            return crashing[0]

        monkeypatch.setattr(broker, "declare", declare_crashing_the_first_consume)
        it = broker.consume_tasks("crashed", ConsumerOptions())
        delivery = await next_within(it, RESTART_WAIT)
        assert [queue.crash for queue in crashing] == [None]  # it crashed, then started again
        assert (delivery.data, delivery.delivery_count) == (b"job", 1)
        await delivery.ack()
        await aclose(it)


async def test_a_server_restart_loses_nothing_confirmed(
    rabbitmq: RabbitMqServer, dedup: KeyValueStore
) -> None:
    """After the server is stopped and started again: every confirmed, unacknowledged task
    message is still queued (an acknowledged one is not), every topic message is still
    stored, and the broker reported the outage, reconnected and publishes again; a
    subscription open meanwhile goes on after the last message it had delivered."""
    settings = settings_for(rabbitmq)
    async with await connect_rabbitmq(settings, dedup=dedup) as broker:
        events: list[str | None] = []
        broker.on_availability(events.append)
        for i in range(4):
            await broker.publish_task("jobs", f"job{i}".encode(), msg_id=f"job{i}")
            await broker.publish("ev.log", EVENTS[i])
        it = broker.consume_tasks("jobs", ConsumerOptions())
        done = await next_within(it, WAIT)
        await done.ack()
        await aclose(it)
        await assert_depth(broker, "jobs", 3)
        following = broker.subscribe("ev.log")
        assert [await next_within(following, WAIT) for _ in range(4)] == EVENTS

        await _assert_recovers(broker, events, following, rabbitmq.restart, "lost")
        async with await connect_rabbitmq(settings, dedup=dedup) as fresh:
            await _assert_survived(fresh, done.data)


async def _assert_recovers(
    broker: Broker,
    events: list[str | None],
    following: Subscription[bytes],
    outage: Callable[[], None],
    told: str,
) -> None:
    """Run ``outage`` (in a thread): the broker tells its listeners (``told`` in the first
    event), then that it is back; it publishes again, and ``following`` (a subscription of
    ``ev.log``) goes on with the next message."""
    await asyncio.to_thread(outage)
    await assert_eventually(lambda: events and events[-1] is None, RESTART_WAIT)
    assert isinstance(events[0], str) and told in events[0]
    await broker.publish("ev.log", b"after")
    assert await next_within(following, RESTART_WAIT) == b"after"
    await aclose(following)


async def _assert_survived(broker: Broker, acked: bytes) -> None:
    it = broker.consume_tasks("jobs", ConsumerOptions(max_in_flight=5))
    left = await take(it, 3)
    await assert_nothing_within(it)
    expected = {f"job{i}".encode() for i in range(4)} - {acked}
    assert {d.data for d in left} == expected
    await aclose(it)
    sub = broker.subscribe("ev.log")
    stored = [await next_within(sub, WAIT) for _ in range(5)]
    assert stored == [*EVENTS, b"after"]
    await aclose(sub)


async def test_an_unreachable_or_refusing_server_is_unavailable(
    rabbitmq: RabbitMqServer, dedup: KeyValueStore
) -> None:
    """Connecting to a port nobody listens on, or with a wrong password, raises
    QueueUnavailableError naming the cause."""
    nobody = RabbitMqSettings(url=f"amqp://mesh:x@127.0.0.1:{free_port()}/")
    with pytest.raises(QueueUnavailableError, match="RabbitMQ is unavailable"):
        await connect_rabbitmq(nobody, dedup=dedup)
    wrong = RabbitMqSettings(url=rabbitmq.url.replace(rabbitmq.password, "wrong"))
    with pytest.raises(QueueUnavailableError, match=r"(?i)auth|access refused"):
        await connect_rabbitmq(wrong, dedup=dedup)
