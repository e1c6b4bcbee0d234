"""The message-queue contract (``llama_mesh.server.queues.base``), pinned for every adapter.

Each test runs against the in-process queue and against NATS JetStream (a fresh real
nats-server per test), through the parametrized ``queue`` fixture. Waiting is done on the
iterators themselves (``next_within``) or with ``assert_eventually``; ``asyncio.sleep`` only
lets time pass to show that something does NOT happen within a window.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TypeVar

import nats.errors
import nats.js.errors
import pytest

from llama_mesh.server.queues.base import (
    ConsumerOptions,
    Delivery,
    KeyExistsError,
    KeyValueEntry,
    MessageQueue,
    QueueError,
    QueueUnavailableError,
    RevisionMismatchError,
)
from llama_mesh.server.queues.nats import translate_error
from tests.helpers import aclose, assert_eventually, next_within

T = TypeVar("T")

WAIT = 5.0
"""Seconds to wait for something that must happen."""
QUIET = 0.3
"""Seconds during which something must NOT happen."""


async def read_one(it: AsyncIterator[T]) -> T:
    """The next item of ``it`` (a coroutine, for ``asyncio.create_task``)."""
    return await anext(it)


async def take(it: AsyncIterator[Delivery], n: int, timeout: float = WAIT) -> list[Delivery]:
    """The next ``n`` deliveries of ``it``."""
    return [await next_within(it, timeout) for _ in range(n)]


async def assert_nothing_within(it: AsyncIterator[object], seconds: float = QUIET) -> None:
    """``it`` yields nothing for ``seconds``."""
    with pytest.raises(TimeoutError):
        await next_within(it, seconds)


async def assert_depth(queue: MessageQueue, name: str, expected: int) -> None:
    """``queue_depth(name)`` reaches ``expected`` (brokers update their counters async)."""

    async def depth_is_expected() -> bool:
        return await queue.queue_depth(name) == expected

    await assert_eventually(depth_is_expected)


# --------------------------------------------------------------------------------------------
# Work queues


async def test_publish_consume_ack(queue: MessageQueue) -> None:
    """A published message is delivered once with its payload; an ack removes it."""
    await queue.publish_task("svc.work", b"hello", msg_id="m1")
    it = queue.consume_tasks("svc.work", ConsumerOptions())
    delivery = await next_within(it, WAIT)
    assert delivery.data == b"hello"
    assert delivery.delivery_count == 1
    await delivery.ack()
    await assert_depth(queue, "svc.work", 0)
    await aclose(it)


async def test_consumers_of_a_queue_share_its_messages(queue: MessageQueue) -> None:
    """Two consumers of one queue together receive every message exactly once."""
    sent = [f"m{i}".encode() for i in range(10)]
    for i, data in enumerate(sent):
        await queue.publish_task("shared", data, msg_id=f"id{i}")
    options = ConsumerOptions(max_in_flight=4)
    consumers = [queue.consume_tasks("shared", options) for _ in range(2)]
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


async def test_msg_id_deduplicates_publishes(queue: MessageQueue) -> None:
    """A second publish with the same msg_id is dropped; the first payload is kept."""
    await queue.publish_task("dedup", b"first", msg_id="task-1")
    await queue.publish_task("dedup", b"second", msg_id="task-1")
    await queue.publish_task("dedup", b"other", msg_id="task-2")
    assert await queue.queue_depth("dedup") == 2
    it = queue.consume_tasks("dedup", ConsumerOptions(max_in_flight=5))
    deliveries = await take(it, 2)
    assert [d.data for d in deliveries] == [b"first", b"other"]
    await assert_nothing_within(it)
    await aclose(it)


async def test_unsettled_message_is_redelivered_after_ack_wait(queue: MessageQueue) -> None:
    """Without a settle, a message comes back after ack_wait with a growing delivery_count."""
    await queue.publish_task("slow", b"job", msg_id="j")
    options = ConsumerOptions(max_in_flight=3, ack_wait=0.5, max_deliver=3)
    it = queue.consume_tasks("slow", options)
    loop = asyncio.get_running_loop()
    first = await next_within(it, WAIT)
    delivered_at = loop.time()
    second = await next_within(it, WAIT)
    assert loop.time() - delivered_at >= 0.4
    third = await next_within(it, WAIT)
    assert [d.delivery_count for d in (first, second, third)] == [1, 2, 3]
    assert {d.data for d in (first, second, third)} == {b"job"}
    await third.ack()
    await assert_depth(queue, "slow", 0)
    await aclose(it)


async def test_in_progress_keeps_a_message_from_redelivery(queue: MessageQueue) -> None:
    """``in_progress()`` restarts the ack_wait timer, so a busy message is not redelivered."""
    await queue.publish_task("busy", b"long job", msg_id="j")
    it = queue.consume_tasks("busy", ConsumerOptions(max_in_flight=2, ack_wait=0.5))
    delivery = await next_within(it, WAIT)

    async def heartbeat() -> None:
        for _ in range(7):
            await delivery.in_progress()
            await asyncio.sleep(0.2)  # pacing the heartbeats, well inside ack_wait

    beating = asyncio.create_task(heartbeat())
    await assert_nothing_within(it, 1.2)  # more than twice ack_wait
    await beating
    await delivery.ack()
    await assert_depth(queue, "busy", 0)
    await aclose(it)


async def test_nak_redelivers_after_the_delay(queue: MessageQueue) -> None:
    """``nak(delay)`` brings the message back after ``delay``; ``nak()`` at once."""
    await queue.publish_task("retry", b"job", msg_id="j")
    it = queue.consume_tasks("retry", ConsumerOptions(max_in_flight=1, ack_wait=30.0))
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


async def test_max_deliver_stops_redelivery_after_timeouts(queue: MessageQueue) -> None:
    """A message is delivered at most max_deliver times; then it is gone from the queue."""
    await queue.publish_task("capped", b"poison", msg_id="p")
    options = ConsumerOptions(max_in_flight=5, ack_wait=0.5, max_deliver=2)
    it = queue.consume_tasks("capped", options)
    deliveries = await take(it, 2)
    assert [d.delivery_count for d in deliveries] == [1, 2]
    await assert_nothing_within(it, 0.8)
    await assert_depth(queue, "capped", 0)
    await aclose(it)


async def test_max_deliver_drops_a_message_nakked_on_its_last_delivery(
    queue: MessageQueue,
) -> None:
    """A nak of the delivery numbered max_deliver does not bring the message back."""
    await queue.publish_task("capped-nak", b"poison", msg_id="p")
    options = ConsumerOptions(max_in_flight=1, ack_wait=30.0, max_deliver=2)
    it = queue.consume_tasks("capped-nak", options)
    first = await next_within(it, WAIT)
    await first.nak()
    last = await next_within(it, WAIT)
    assert last.delivery_count == 2
    await last.nak()
    await assert_nothing_within(it)
    await assert_depth(queue, "capped-nak", 0)
    await aclose(it)


async def test_term_removes_a_message(queue: MessageQueue) -> None:
    """``term()`` removes the message for good, even with deliveries left."""
    await queue.publish_task("dead", b"bad", msg_id="b")
    it = queue.consume_tasks("dead", ConsumerOptions(ack_wait=0.5, max_deliver=5))
    delivery = await next_within(it, WAIT)
    await delivery.term()
    await assert_nothing_within(it, 0.8)
    await assert_depth(queue, "dead", 0)
    await aclose(it)


async def test_max_in_flight_limits_unsettled_deliveries(queue: MessageQueue) -> None:
    """A consumer holds at most max_in_flight unsettled messages; the rest stay available."""
    for i in range(5):
        await queue.publish_task("limited", f"m{i}".encode(), msg_id=f"m{i}")
    narrow = queue.consume_tasks("limited", ConsumerOptions(max_in_flight=2))
    held = await take(narrow, 2)
    await assert_nothing_within(narrow)
    await held[0].ack()
    third = await next_within(narrow, WAIT)
    # The two messages the narrow consumer does not hold go to another consumer.
    wide = queue.consume_tasks("limited", ConsumerOptions(max_in_flight=5))
    rest = await take(wide, 2)
    await assert_nothing_within(wide)
    data = {d.data for d in [*held, third, *rest]}
    assert data == {f"m{i}".encode() for i in range(5)}
    await aclose(narrow)
    await aclose(wide)


async def test_queue_depth_counts_waiting_and_unsettled(queue: MessageQueue) -> None:
    """queue_depth counts waiting and delivered-but-unsettled messages, not acked ones."""
    assert await queue.queue_depth("depth") == 0
    for i in range(3):
        await queue.publish_task("depth", b"x", msg_id=f"d{i}")
    assert await queue.queue_depth("depth") == 3
    it = queue.consume_tasks("depth", ConsumerOptions(max_in_flight=1))
    delivery = await next_within(it, WAIT)
    await assert_depth(queue, "depth", 3)
    await delivery.ack()
    await assert_depth(queue, "depth", 2)
    await aclose(it)


async def test_purge_drops_waiting_messages(queue: MessageQueue) -> None:
    """purge_queue empties one queue; later publishes are delivered; other queues untouched."""
    for i in range(3):
        await queue.publish_task("purged", b"old", msg_id=f"old{i}")
    await queue.publish_task("kept", b"keep", msg_id="keep")
    await queue.purge_queue("purged")
    assert await queue.queue_depth("purged") == 0
    assert await queue.queue_depth("kept") == 1
    it = queue.consume_tasks("purged", ConsumerOptions(max_in_flight=5))
    await assert_nothing_within(it)
    await queue.publish_task("purged", b"new", msg_id="new")
    assert (await next_within(it, WAIT)).data == b"new"
    await aclose(it)


async def test_cancelled_next_loses_nothing(queue: MessageQueue) -> None:
    """Cancelling a pending ``__anext__`` (a timeout) keeps the iterator usable."""
    it = queue.consume_tasks("patient", ConsumerOptions())
    await assert_nothing_within(it, 0.2)
    await queue.publish_task("patient", b"late", msg_id="late")
    delivery = await next_within(it, WAIT)
    assert (delivery.data, delivery.delivery_count) == (b"late", 1)
    await delivery.ack()
    await aclose(it)


async def test_aclose_ends_a_consumer_and_frees_its_messages(queue: MessageQueue) -> None:
    """``aclose()`` ends a pending read; messages go to the remaining consumers at once."""
    first = queue.consume_tasks("handover", ConsumerOptions(max_in_flight=3, ack_wait=30.0))
    pending = asyncio.create_task(read_one(first))
    await asyncio.sleep(0.2)  # let the first read start waiting (no message exists yet)
    await aclose(first)
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(pending, WAIT)
    await queue.publish_task("handover", b"job", msg_id="job")
    second = queue.consume_tasks("handover", ConsumerOptions())
    delivery = await next_within(second, WAIT)
    assert delivery.data == b"job"
    await delivery.ack()
    await aclose(second)


# --------------------------------------------------------------------------------------------
# Topics


async def test_subscribe_replays_then_follows(queue: MessageQueue) -> None:
    """A subscriber gets the stored messages in order, then new ones as published."""
    for data in (b"a", b"b", b"c"):
        await queue.publish("ev.task1", data)
    sub = queue.subscribe("ev.task1")
    assert [await next_within(sub, WAIT) for _ in range(3)] == [b"a", b"b", b"c"]
    await queue.publish("ev.task1", b"d")
    assert await next_within(sub, WAIT) == b"d"
    await assert_nothing_within(sub, 0.2)
    await aclose(sub)


async def test_subscriber_started_before_publishes(queue: MessageQueue) -> None:
    """A subscriber waiting on an empty topic receives each later message, in order."""
    sub = queue.subscribe("ev.task2")
    first = asyncio.create_task(read_one(sub))
    sent = [f"e{i}".encode() for i in range(5)]
    for data in sent:
        await queue.publish("ev.task2", data)
    got = [await asyncio.wait_for(first, WAIT)]
    got += [await next_within(sub, WAIT) for _ in range(4)]
    assert got == sent
    await aclose(sub)


async def test_topics_are_separate(queue: MessageQueue) -> None:
    """A subscriber sees only its topic, not topics sharing a name prefix."""
    await queue.publish("ev.a", b"a")
    await queue.publish("ev.a.b", b"ab")
    await queue.publish("ev.ab", b"x")
    sub = queue.subscribe("ev.a")
    assert await next_within(sub, WAIT) == b"a"
    await assert_nothing_within(sub, 0.3)
    await aclose(sub)


async def test_delete_topic_forgets_its_messages(queue: MessageQueue) -> None:
    """After delete_topic, new subscribers see only later messages; other topics keep theirs."""
    await queue.publish("ev.gone", b"old1")
    await queue.publish("ev.gone", b"old2")
    await queue.publish("ev.stay", b"stay")
    await queue.delete_topic("ev.gone")
    await queue.publish("ev.gone", b"new")
    sub = queue.subscribe("ev.gone")
    assert await next_within(sub, WAIT) == b"new"
    await assert_nothing_within(sub, 0.3)
    other = queue.subscribe("ev.stay")
    assert await next_within(other, WAIT) == b"stay"
    await aclose(sub)
    await aclose(other)


async def test_last_message_of_a_topic(queue: MessageQueue) -> None:
    """``last_message`` gives the latest message of its topic only (``None`` for one with
    none, or once deleted), without subscribing."""
    assert await queue.last_message("ev.last") is None
    await queue.publish("ev.last", b"first")
    await queue.publish("ev.last", b"second")
    await queue.publish("ev.last.b", b"neighbour")
    assert await queue.last_message("ev.last") == b"second"
    await queue.delete_topic("ev.last")
    assert await queue.last_message("ev.last") is None


# --------------------------------------------------------------------------------------------
# Key-value buckets


async def test_kv_get_and_put(queue: MessageQueue) -> None:
    """put returns increasing revisions; get returns the latest value, None when absent."""
    kv = await queue.kv("state")
    assert await kv.get("a") is None
    r1 = await kv.put("a", b"1")
    assert await kv.get("a") == KeyValueEntry("a", b"1", r1)
    r2 = await kv.put("a", b"2")
    assert r2 > r1
    assert await kv.get("a") == KeyValueEntry("a", b"2", r2)
    assert await (await queue.kv("state")).get("a") == KeyValueEntry("a", b"2", r2)
    assert await kv.put("empty", b"") > r2
    assert (await kv.get("empty")) == KeyValueEntry("empty", b"", r2 + 1)


async def test_kv_create_only_when_absent(queue: MessageQueue) -> None:
    """create writes an absent (or deleted) key and raises KeyExistsError otherwise."""
    kv = await queue.kv("state")
    revision = await kv.create("k", b"v1")
    with pytest.raises(KeyExistsError):
        await kv.create("k", b"v2")
    assert await kv.get("k") == KeyValueEntry("k", b"v1", revision)
    await kv.delete("k")
    again = await kv.create("k", b"v3")
    assert await kv.get("k") == KeyValueEntry("k", b"v3", again)


async def test_kv_update_compares_revisions(queue: MessageQueue) -> None:
    """update succeeds with the latest revision and raises RevisionMismatchError otherwise."""
    kv = await queue.kv("state")
    r1 = await kv.put("k", b"v1")
    r2 = await kv.update("k", b"v2", r1)
    assert r2 > r1
    with pytest.raises(RevisionMismatchError):
        await kv.update("k", b"v3", r1)
    assert await kv.get("k") == KeyValueEntry("k", b"v2", r2)
    with pytest.raises(RevisionMismatchError):
        await kv.update("absent", b"v", r2)


async def test_kv_delete(queue: MessageQueue) -> None:
    """delete removes a key (get None, not in keys); deleting an absent key is fine."""
    kv = await queue.kv("state")
    await kv.put("k", b"v")
    await kv.delete("k")
    assert await kv.get("k") is None
    assert await kv.keys() == []
    await kv.delete("k")
    await kv.delete("never")


async def test_kv_keys_by_prefix(queue: MessageQueue) -> None:
    """keys(prefix) lists present keys starting with prefix (a string prefix), sorted."""
    kv = await queue.kv("state")
    assert await kv.keys() == []
    for key in ("b.1", "a.2", "a.1", "ab", "a.1.x", "gone"):
        await kv.put(key, b"v")
    await kv.delete("gone")
    assert await kv.keys() == ["a.1", "a.1.x", "a.2", "ab", "b.1"]
    assert await kv.keys("a.") == ["a.1", "a.1.x", "a.2"]
    assert await kv.keys("a") == ["a.1", "a.1.x", "a.2", "ab"]
    assert await kv.keys("a.1") == ["a.1", "a.1.x"]
    assert await kv.keys("c") == []


async def test_kv_entries_are_the_present_values_by_prefix(queue: MessageQueue) -> None:
    """entries(prefix): what get() returns for every present key under prefix (its latest
    value and revision), sorted by key; deleted keys left out, other prefixes too."""
    kv = await queue.kv("entries")
    assert await kv.entries() == []
    for key, value in (("a.2", b"two"), ("a.1", b"one"), ("b.1", b"bee"), ("a.3", b"x")):
        await kv.put(key, value)
    await kv.put("a.1", b"one again")
    await kv.delete("a.3")
    listed = await kv.entries("a.")
    assert [(e.key, e.value) for e in listed] == [("a.1", b"one again"), ("a.2", b"two")]
    assert listed == [await kv.get("a.1"), await kv.get("a.2")]
    assert [e.key for e in await kv.entries()] == ["a.1", "a.2", "b.1"]
    assert await kv.entries("c.") == []


async def test_kv_buckets_are_separate(queue: MessageQueue) -> None:
    """The same key in two buckets holds two values."""
    one, two = await queue.kv("one"), await queue.kv("two")
    await one.put("k", b"1")
    await two.put("k", b"2")
    first, second = await one.get("k"), await two.get("k")
    assert first is not None
    assert second is not None
    assert (first.value, second.value) == (b"1", b"2")


async def test_kv_watch_existing_then_changes(queue: MessageQueue) -> None:
    """watch yields current entries under the prefix, then changes; deletions have value None."""
    kv = await queue.kv("state")
    rx = await kv.put("p.x", b"1")
    ry = await kv.put("p.y", b"2")
    await kv.put("p.gone", b"3")
    await kv.delete("p.gone")
    await kv.put("q.z", b"other")
    watch = kv.watch("p.")
    existing = {await next_within(watch, WAIT) for _ in range(2)}
    assert existing == {KeyValueEntry("p.x", b"1", rx), KeyValueEntry("p.y", b"2", ry)}
    await kv.put("q.z", b"ignored")
    rx2 = await kv.put("p.x", b"4")
    assert await next_within(watch, WAIT) == KeyValueEntry("p.x", b"4", rx2)
    await kv.delete("p.y")
    deleted = await next_within(watch, WAIT)
    assert (deleted.key, deleted.value) == ("p.y", None)
    assert deleted.revision > rx2
    await assert_nothing_within(watch, 0.3)
    await aclose(watch)


async def test_kv_watch_without_existing(queue: MessageQueue) -> None:
    """watch(include_existing=False) yields only changes made after the watch() call."""
    kv = await queue.kv("state")
    await kv.put("k.old", b"old")
    watch = kv.watch("k.", include_existing=False)
    revision = await kv.put("k.new", b"new")
    assert await next_within(watch, WAIT) == KeyValueEntry("k.new", b"new", revision)
    await assert_nothing_within(watch, 0.3)
    await aclose(watch)


async def test_kv_ttl_expiry_reaches_watchers_as_a_deletion(queue: MessageQueue) -> None:
    """In a ttl bucket, an entry not rewritten within ttl disappears; watchers see a deletion."""
    kv = await queue.kv("heartbeats", ttl=1.0)
    await kv.put("w.stale", b"beat")
    await kv.put("w.fresh", b"beat")
    watch = kv.watch("w.")
    assert {(await next_within(watch, WAIT)).key for _ in range(2)} == {"w.stale", "w.fresh"}
    await asyncio.sleep(0.6)  # time passes; then only w.fresh is rewritten
    refreshed = await kv.put("w.fresh", b"beat")
    assert (await next_within(watch, WAIT)).revision == refreshed
    expired = await next_within(watch, WAIT)
    assert (expired.key, expired.value) == ("w.stale", None)
    assert await kv.get("w.stale") is None
    assert await kv.keys("w.") == ["w.fresh"]
    await aclose(watch)


async def test_kv_expired_key_can_be_created_again(queue: MessageQueue) -> None:
    """After a ttl expiry the key counts as absent: create succeeds."""
    kv = await queue.kv("leases", ttl=1.0)
    await kv.create("lease", b"a")
    watch = kv.watch("lease", include_existing=False)
    expired = await next_within(watch, WAIT)
    assert expired.value is None
    revision = await kv.create("lease", b"b")
    assert await kv.get("lease") == KeyValueEntry("lease", b"b", revision)
    await aclose(watch)


# --------------------------------------------------------------------------------------------
# Closing


async def test_close_is_idempotent_and_ends_iterators(queue: MessageQueue) -> None:
    """close ends pending reads of every iterator kind; a second close is a no-op."""
    kv = await queue.kv("state")
    iterators: list[AsyncIterator[object]] = [
        queue.consume_tasks("q", ConsumerOptions()),
        queue.subscribe("t"),
        kv.watch(""),
    ]
    reads = [asyncio.create_task(read_one(it)) for it in iterators]
    await asyncio.sleep(0.2)  # let the reads start waiting
    await queue.close()
    for read in reads:
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(read, WAIT)
    await queue.close()
    with pytest.raises(StopAsyncIteration):
        await next_within(iterators[1], WAIT)


async def test_operations_after_close_raise_unavailable(queue: MessageQueue) -> None:
    """After close, every operation raises QueueUnavailableError."""
    kv = await queue.kv("state")
    await queue.close()
    with pytest.raises(QueueUnavailableError):
        await queue.publish_task("q", b"x", msg_id="x")
    with pytest.raises(QueueUnavailableError):
        await queue.publish("t", b"x")
    with pytest.raises(QueueUnavailableError):
        await kv.put("k", b"v")
    with pytest.raises(QueueUnavailableError):
        await queue.kv("other")


# --------------------------------------------------------------------------------------------
# NATS adapter: its one error-translation seam


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (nats.js.errors.KeyWrongLastSequenceError(), RevisionMismatchError),
        (nats.js.errors.APIError(code=400, err_code=10071), RevisionMismatchError),
        (nats.errors.ConnectionClosedError(), QueueUnavailableError),
        (nats.errors.NoServersError(), QueueUnavailableError),
        (nats.errors.TimeoutError(), QueueUnavailableError),
        (nats.errors.NoRespondersError(), QueueUnavailableError),
        (nats.js.errors.ServiceUnavailableError(), QueueUnavailableError),
        (ConnectionRefusedError(), QueueUnavailableError),
        (nats.js.errors.BadRequestError(), QueueError),
        (nats.errors.MaxPayloadError(), QueueError),
    ],
)
def test_nats_errors_translate_into_the_queue_error_tree(
    error: Exception, expected: type[QueueError]
) -> None:
    """Every nats-py error maps into QueueError; revision conflicts honour ``conflict``."""
    translated = translate_error(error)
    assert type(translated) is expected
    if expected is RevisionMismatchError:
        assert type(translate_error(error, conflict=KeyExistsError)) is KeyExistsError
    assert translate_error(ValueError("mine")).__class__ is ValueError


async def test_kv_watch_of_a_whole_key_sees_only_that_key(queue: MessageQueue) -> None:
    """A watch of a whole key (no trailing '.') reports that key only, not its neighbours
    (one task's watch must not read every other task of its deployment)."""
    kv = await queue.kv("exact")
    await kv.put("dep.t1", b"old")
    await kv.put("dep.t10", b"other")
    watch = kv.watch("dep.t1")
    first = await next_within(watch, WAIT)
    assert (first.key, first.value) == ("dep.t1", b"old")
    await kv.put("dep.t10", b"noise")
    await kv.put("dep.t1.sub", b"noise")
    await kv.put("dep.t1", b"new")
    second = await next_within(watch, WAIT)
    assert (second.key, second.value) == ("dep.t1", b"new")
    await aclose(watch)


async def test_kv_keys_lists_every_present_key_every_time(queue: MessageQueue) -> None:
    """keys() never misses stored keys (nats-py's own listing could report none when its
    end marker raced the buffered messages); deleted keys are not listed."""
    kv = await queue.kv("listing")
    for i in range(40):
        await kv.put(f"s.k{i:02d}", b"v")
    await kv.delete("s.k07")
    expected = sorted(f"s.k{i:02d}" for i in range(40) if i != 7)
    listings = await asyncio.gather(*(kv.keys("s.") for _ in range(25)))
    assert all(listing == expected for listing in listings)
    scans = await asyncio.gather(*(kv.entries("s.") for _ in range(25)))
    assert all([e.key for e in scan] == expected for scan in scans)
    assert await kv.keys("nothing.") == []
