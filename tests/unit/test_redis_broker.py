"""What the Redis broker promises beyond the broker contract, against a real redis-server:
a crash loses nothing acknowledged, a vanished consumer's message goes to another one, dead
letters are kept, keys are named per deployment, and oversized payloads are refused."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from llama_mesh.server.queues.broker import ConsumerOptions
from llama_mesh.server.queues.errors import MessageTooLargeError, QueueUnavailableError
from llama_mesh.server.queues.redis import (
    RedisBroker,
    RedisSettings,
    _RedisConsumer,
    connect_redis,
)
from tests.fixtures.redis import RedisServer
from tests.helpers import aclose, assert_eventually, next_within
from tests.unit.contract import WAIT, assert_nothing_within, take


async def test_a_crash_loses_nothing_acknowledged(tmp_path: Path) -> None:
    """After SIGKILL and a restart on the same directory, every published task and topic
    message is there and an acked task stays gone; subscribers carry on, and availability
    listeners hear down and up."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        broker = await connect_redis(RedisSettings(url=server.url, namespace="crash"))
        events: list[str | None] = []
        broker.on_availability(events.append)
        async with broker:
            sent = [f"task-{i}".encode() for i in range(20)]
            for i, data in enumerate(sent):
                await broker.publish_task("svc.work", data, msg_id=f"t{i}")
            logged = [f"event-{i}".encode() for i in range(20)]
            for data in logged:
                await broker.publish("ev.task", data)
            sub = broker.subscribe("ev.task")
            assert [await next_within(sub, WAIT) for _ in logged] == logged
            first = broker.consume_tasks("svc.work", ConsumerOptions())
            done = await next_within(first, WAIT)
            await done.ack()  # acknowledged: must not come back
            await aclose(first)
            sent.remove(done.data)

            server.kill()
            with pytest.raises(QueueUnavailableError):
                await broker.publish("ev.task", b"while down")
            assert events and events[-1] is not None
            server.start()
            await assert_eventually(lambda: events[-1] is None, timeout=15.0)

            await broker.publish("ev.task", b"after")
            assert await next_within(sub, WAIT) == b"after"
            assert await broker.queue_depth("svc.work") == len(sent)
            it = broker.consume_tasks("svc.work", ConsumerOptions(max_in_flight=len(sent)))
            deliveries = await take(it, len(sent))
            assert sorted(d.data for d in deliveries) == sorted(sent)
            for delivery in deliveries:
                await delivery.ack()
            assert await broker.queue_depth("svc.work") == 0
            await aclose(it)
            await aclose(sub)
    finally:
        server.stop()


async def test_a_vanished_consumer_s_message_goes_to_another(
    redis_settings: RedisSettings,
) -> None:
    """A replica that disappears without settling (its connection closed) loses its message
    to a replica already waiting, after ack_wait, as a redelivery."""
    options = ConsumerOptions(ack_wait=0.5)
    async with await connect_redis(redis_settings) as survivor:
        waiting = survivor.consume_tasks("svc.work", options)
        vanishing = await connect_redis(redis_settings)
        doomed = vanishing.consume_tasks("svc.work", options)
        await vanishing.publish_task("svc.work", b"job", msg_id="job")
        first = await next_within(doomed, WAIT)
        loop = asyncio.get_running_loop()
        delivered_at = loop.time()
        await vanishing.close()
        again = await next_within(waiting, WAIT)
        assert loop.time() - delivered_at >= 0.4
        assert (again.data, again.delivery_count) == (first.data, 2)
        await again.ack()
        assert await survivor.queue_depth("svc.work") == 0
        await aclose(waiting)


async def _dead_letters(broker: RedisBroker) -> list[dict[bytes | str, bytes | str]]:
    return [fields or {} for _, fields in await broker.redis.xrange(broker.dead_key) or []]


async def test_dead_letters_keep_terminated_and_exhausted_messages(
    redis_settings: RedisSettings,
) -> None:
    """``term()`` and a nak of the last allowed delivery leave the message in the dead-letter
    stream, with its queue, delivery count and reason, for an operator to look at."""
    async with await connect_redis(redis_settings) as broker:
        await broker.publish_task("svc.a", b"bad", msg_id="bad")
        await broker.publish_task("svc.b", b"poison", msg_id="poison")
        a = broker.consume_tasks("svc.a", ConsumerOptions())
        await (await next_within(a, WAIT)).term()
        b = broker.consume_tasks("svc.b", ConsumerOptions(max_deliver=1))
        await (await next_within(b, WAIT)).nak()
        assert await _dead_letters(broker) == [
            {b"queue": b"svc.a", b"d": b"bad", b"deliveries": b"1", b"reason": b"term"},
            {b"queue": b"svc.b", b"d": b"poison", b"deliveries": b"1", b"reason": b"max_deliver"},
        ]
        await aclose(a)
        await aclose(b)


async def test_keys_are_named_per_deployment(redis_settings: RedisSettings) -> None:
    """Every key a broker writes starts with ``llama-mesh:<namespace>:``, so deployments
    sharing one Redis neither collide nor hide from ``redis-cli KEYS``."""
    async with await connect_redis(redis_settings) as broker:
        await broker.publish_task("svc.work", b"x", msg_id="m")
        await broker.publish("ev.task", b"e")
        prefix = f"llama-mesh:{redis_settings.namespace}:"
        found = await broker.redis.keys(f"{prefix}*")
        keys = {key.decode() if isinstance(key, bytes) else key for key in found}
        assert keys == {f"{prefix}queue:svc.work", f"{prefix}topic:ev.task", f"{prefix}dedup:m"}


async def test_oversized_payloads_are_refused(redis_settings: RedisSettings) -> None:
    """A payload over Redis's proto-max-bulk-len (1 MiB in the fixture) is refused with
    both sizes named, and nothing is written."""
    too_big = bytes(1024 * 1024 + 1)
    async with await connect_redis(redis_settings) as broker:
        with pytest.raises(MessageTooLargeError, match="proto-max-bulk-len") as raised:
            await broker.publish_task("svc.work", too_big, msg_id="big")
        assert (raised.value.size, raised.value.limit) == (len(too_big), 1024 * 1024)
        with pytest.raises(MessageTooLargeError):
            await broker.publish("ev.task", too_big)
        assert await broker.queue_depth("svc.work") == 0
        assert await broker.last_message("ev.task") is None


async def test_entries_a_cancelled_read_took_are_not_lost(redis_settings: RedisSettings) -> None:
    """An entry Redis delivered to a consumer whose read was cancelled (the reply never
    arrived) is handed out by its next read, or back to the queue by ``aclose()``: at once
    and as a first delivery, not after ack_wait as a redelivery. A closed consumer holding
    nothing leaves the group."""
    options = ConsumerOptions(ack_wait=30.0)
    async with await connect_redis(redis_settings) as broker:
        it = broker.consume_tasks("svc.work", options)
        assert isinstance(it, _RedisConsumer)
        await assert_nothing_within(it, 0.2)  # a cancelled read; the group exists now
        key = broker.queue_key("svc.work")

        async def lose_a_reply(data: bytes) -> None:
            """Publish ``data`` and let Redis deliver it to ``it`` without ``it`` seeing it."""
            await broker.publish_task("svc.work", data, msg_id=data.decode())
            taken = await broker.redis.xreadgroup("workers", it.name, {key: ">"}, count=1)
            assert taken

        await lose_a_reply(b"first")
        adopted = await next_within(it, WAIT)
        assert (adopted.data, adopted.delivery_count) == (b"first", 1)
        await adopted.ack()

        await lose_a_reply(b"second")
        await aclose(it)
        other = broker.consume_tasks("svc.work", options)
        handed_back = await next_within(other, WAIT)
        assert (handed_back.data, handed_back.delivery_count) == (b"second", 1)
        await handed_back.ack()
        await aclose(other)
        assert await broker.redis.xinfo_consumers(key, "workers") == []  # closed, forgotten
