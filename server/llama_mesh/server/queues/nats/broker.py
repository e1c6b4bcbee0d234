"""The NATS JetStream broker: work queues and topics.

Layout on the server, for the connection's ``prefix="mesh"``:

* stream ``MESH_TASKS`` (subjects ``mesh.queued.>`` and ``mesh.tasks.>``, work-queue
  retention, file storage, two-minute duplicate window): a message of queue ``q`` published
  under ``msg_id`` is subject ``mesh.queued.q.<msg_id>``, one subject per message, so that it
  can be found, listed and removed by its id (a direct get by subject). Queue ``q`` has one
  durable pull consumer named after it (dots become ``_``), shared by every consumer of the
  queue, filtering ``mesh.queued.q.*`` and ``mesh.tasks.q``: the subject where earlier
  versions queued every message of ``q``, so that messages queued before an upgrade are still
  delivered, counted, listed and purged (not found by id). The ``queued`` root is apart from
  ``tasks`` because consumers of a work-queue stream must not overlap: ``mesh.tasks.a.*``
  would take queue ``a.b``'s ``mesh.tasks.a.b``.
* stream ``MESH_TOPICS`` (subjects ``mesh.topics.>``, limits retention, file storage, seven
  days max age): topic ``t`` is subject ``mesh.topics.t``; subscribers use an ordered push
  consumer from the first stored message.

Behaviour worth knowing:

* Iterators (``consume_tasks``, ``subscribe``) create their server-side consumer on the first
  ``__anext__``. Iterators have ``aclose()``; cancelling a pending ``__anext__`` loses
  nothing.
* ``consume_tasks`` holds at most ``max_in_flight`` unsettled deliveries: a background task
  keeps one pull request (with a server-side expiry) out for the free slots.
* ``find_task`` reads the message's subject (one request), ``remove_task`` then deletes it;
  ``queued_tasks`` reads one message per request. A message whose last delivery timed out
  (``max_deliver``) stays in the stream, never delivered again, and is still found and listed
  until the queue is purged. (The worker records a task's failure on its last delivery
  rather than running it, so only a replica dying or stopping before that write succeeds
  leaves one.)
* Settling (ack, nak, term, in_progress) waits for the server's confirmation. A nak of the
  last allowed delivery terminates the message (removes it), as the in-process broker drops
  it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import uuid
from typing import Final

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription
from nats.js import api

from llama_mesh.server.aio import cancel_and_wait, raise_if_cancelling
from llama_mesh.server.queues.broker import Broker, ConsumerOptions, Delivery, check_name
from llama_mesh.server.queues.errors import QueueError, QueueUnavailableError
from llama_mesh.server.queues.iterators import Subscription
from llama_mesh.server.queues.nats.connection import REQUEST_TIMEOUT, NatsConnection
from llama_mesh.server.queues.nats.errors import patiently, placement_unavailable, translated
from llama_mesh.server.queues.nats.feeds import Feed, NatsRole, PushFeed

logger = logging.getLogger(__name__)

_FETCH_TIMEOUT: Final = 5.0
"""How long one pull request waits on the server for messages (a long poll)."""
_FETCH_ERROR_BACKOFF: Final = 1.0
_MAX_ACK_PENDING: Final = 10_000
_DUPLICATE_WINDOW: Final = 120.0
_TOPICS_MAX_AGE: Final = 7 * 24 * 3600.0
_STREAM_NAME_IN_USE: Final = 10058
_TOKEN_RE: Final = re.compile(r"^[A-Za-z0-9_-]+$")


class _NatsDelivery(Delivery):
    def __init__(self, feed: _TaskFeed, msg: Msg) -> None:
        self._feed = feed
        self._msg = msg
        self._count = msg.metadata.num_delivered
        self._released = False
        self._settled = False

    @property
    def data(self) -> bytes:
        return self._msg.data

    @property
    def delivery_count(self) -> int:
        return self._count

    async def ack(self) -> None:
        await self._reply(Msg.Ack.Ack, settle=True)

    async def term(self) -> None:
        await self._reply(Msg.Ack.Term, settle=True)

    async def nak(self, delay: float = 0.0) -> None:
        if self._count >= self._feed.options.max_deliver:
            payload = Msg.Ack.Term  # the last delivery: drop it rather than leave it stranded
        elif delay > 0:
            payload = Msg.Ack.Nak + b" " + json.dumps({"delay": int(delay * 1e9)}).encode()
        else:
            payload = Msg.Ack.Nak
        await self._reply(payload, settle=True)

    async def in_progress(self) -> None:
        await self._reply(Msg.Ack.Progress, settle=False)

    async def give_back(self) -> None:
        """Nak a delivery that was fetched but never handed to a reader (best effort)."""
        self._settled = True
        if self._feed.owner.nc.is_connected:
            with contextlib.suppress(Exception):
                await self._feed.owner.nc.request(self._msg.reply, Msg.Ack.Nak, timeout=1.0)

    async def _reply(self, payload: bytes, *, settle: bool) -> None:
        """Send an acknowledgement and wait for the server to confirm it."""
        self._feed.owner.check_open()
        if self._settled:
            return
        if settle and not self._released:
            self._released = True
            self._feed.release()

        async def send() -> None:
            with translated():
                await self._feed.owner.nc.request(self._msg.reply, payload, timeout=REQUEST_TIMEOUT)

        # Tried again while NATS is unavailable (the consumer's leader moving): settling a
        # delivery twice is harmless, and a result already stored must not be redelivered.
        await patiently(self._feed.owner, send, "acknowledging a task message")
        if settle:
            self._settled = True


class _TaskFeed(Feed[Delivery]):
    """Deliveries of one queue, at most ``max_in_flight`` unsettled.

    One pull request at a time asks the server for as many messages as there are free
    slots; each message is handed out as it arrives, and the next request goes out once
    this one is used up or has expired. Each request gets a reply subject of its own
    (``<inbox>.<n>``), on which the server reports how it ended (408 expired, 409 ...): a
    report about an earlier request (one given up after a reconnect) is ignored. Messages
    carry their own subjects, so one that arrives for an earlier request counts against
    the current one; should it find every slot taken, it is given back.
    """

    def __init__(self, owner: NatsBroker, queue: str, options: ConsumerOptions) -> None:
        super().__init__(owner)
        self.broker = owner
        self.queue = queue
        self.options = options
        self._held = 0
        self._inbox = ""
        self._next_subject = ""
        self._sub: NatsSubscription | None = None
        self._consumer_ready = False
        self._request = 0
        """Number of the current pull request (its reply subject is ``<inbox>.<n>``)."""
        self._remaining = 0
        """Messages the current request may still bring; 0: none outstanding."""
        self._asked_at = 0.0
        self._ended_early = False
        """The current request ended with an error status soon after it was made."""
        self._wake = asyncio.Event()
        self._pump_task: asyncio.Task[None] | None = None

    def on_reconnected(self) -> None:
        # The outstanding request may have died with the old connection: ask again now
        # rather than when it would have expired.
        self._end_request()

    def release(self) -> None:
        self._held -= 1
        self._wake.set()

    def _end_request(self, *, early: bool = False) -> None:
        self._remaining = 0
        self._ended_early = early
        self._wake.set()

    async def _open(self) -> None:
        with translated():
            self._inbox = self.owner.nc.new_inbox()
            self._sub = await self.owner.nc.subscribe(self._inbox + ".*", cb=self._on_pulled)
        await self._ready_consumer()
        self._pump_task = self.owner.spawn(self._pump(), name=f"nats-consume-{self.queue}")

    async def _ready_consumer(self) -> None:
        name = await self.broker.ensure_consumer(self.queue, self.options)
        prefix = getattr(self.owner.js, "_prefix", api.DEFAULT_PREFIX)
        self._next_subject = f"{prefix}.CONSUMER.MSG.NEXT.{self.broker.tasks_stream}.{name}"
        self._consumer_ready = True

    async def _shutdown(self) -> None:
        if self._pump_task is not None:
            await cancel_and_wait(self._pump_task)
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        # Deliveries pulled but never handed out go back at once instead of after ack_wait.
        while not self.items.empty():
            item = self.items.get_nowait()
            if isinstance(item, _NatsDelivery):
                await item.give_back()
            else:
                self.items.put_nowait(item)
                break

    async def _on_pulled(self, msg: Msg) -> None:
        status = (msg.headers or {}).get(api.Header.STATUS)
        if status:
            current = msg.subject == f"{self._inbox}.{self._request}"
            if current and status != "100":  # 100: a heartbeat, which asks nothing
                # 408: the request expired; 409: the consumer's leader moved, the consumer
                # was deleted, too many requests wait, ...: ask again (soon, for a 409).
                early = status != "408" and time.monotonic() - self._asked_at < _FETCH_TIMEOUT / 10
                if (
                    status == "409"
                    and "deleted" in (msg.headers or {}).get(api.Header.DESCRIPTION, "").lower()
                ):
                    self._consumer_ready = False
                self._end_request(early=early)
            return
        if self._remaining > 0:
            self._remaining -= 1
            if self._remaining == 0:
                self._wake.set()
        if self._held >= self.options.max_in_flight:
            # For a request given up earlier, with every slot taken meanwhile.
            logger.debug("giving back a message pulled beyond max_in_flight")
            self.owner.spawn(_NatsDelivery(self, msg).give_back(), name="nats-give-back")
            return
        self._held += 1
        self.items.put_nowait(_NatsDelivery(self, msg))

    async def _pump(self) -> None:
        """Keep one pull request out for the free slots, renewed as it is used up, expires
        or dies (a request unanswered a second past its expiry counts as dead)."""
        while True:
            raise_if_cancelling()
            self._wake.clear()
            free = self.options.max_in_flight - self._held
            if self._remaining == 0 and free > 0:
                if self._ended_early:
                    self._ended_early = False
                    await asyncio.sleep(_FETCH_ERROR_BACKOFF)  # must not spin on a 409
                    continue
                try:
                    await self._ask(free)
                except nats.errors.ConnectionClosedError as exc:
                    if not self.owner.closed:
                        self.end(QueueUnavailableError(f"the NATS connection closed: {exc!r}"))
                    return
                except Exception as exc:
                    logger.warning("pulling from queue %r failed: %r; retrying", self.queue, exc)
                    self._consumer_ready = False  # the consumer may be gone: recreate it
                    await asyncio.sleep(_FETCH_ERROR_BACKOFF)
                    continue
            timeout = None
            if self._remaining > 0:
                timeout = max(0.0, self._asked_at + _FETCH_TIMEOUT + 1.0 - time.monotonic())
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                if self._remaining > 0:
                    # Lost with a connection, or its consumer is gone: make sure of that.
                    logger.debug("a pull request from queue %r went unanswered", self.queue)
                    self._remaining = 0
                    self._consumer_ready = False

    async def _ask(self, count: int) -> None:
        if not self._consumer_ready:
            await self._ready_consumer()
        self._request += 1
        self._remaining = count
        self._asked_at = time.monotonic()
        request = {"batch": count, "expires": int(_FETCH_TIMEOUT * 1e9)}
        with translated():
            await self.owner.nc.publish(
                self._next_subject,
                json.dumps(request).encode(),
                reply=f"{self._inbox}.{self._request}",
            )


class _TopicFeed(PushFeed[bytes]):
    def __init__(self, owner: NatsBroker, topic: str) -> None:
        super().__init__(owner, owner.topic_subject(topic), owner.topics_stream)

    def _first_config(self) -> api.ConsumerConfig:
        return api.ConsumerConfig(deliver_policy=api.DeliverPolicy.ALL)

    async def _on_msg(self, msg: Msg) -> None:
        self._received(msg)
        self.items.put_nowait(msg.data)


class NatsBroker(NatsRole, Broker):
    """A :class:`Broker` on NATS JetStream. Open it with :meth:`open`."""

    what = "NATS broker"
    finds_tasks = True

    def __init__(self, connection: NatsConnection) -> None:
        super().__init__(connection)
        self._prefix = connection.prefix
        self._replicas = connection.replicas
        self.tasks_stream = f"{self._prefix.upper()}_TASKS"
        self.topics_stream = f"{self._prefix.upper()}_TOPICS"

    @classmethod
    async def open(cls, connection: NatsConnection) -> NatsBroker:
        """The broker on ``connection``, its streams created (or updated) first."""
        broker = cls(connection)
        try:
            await broker.ensure_streams()
        except BaseException:
            await broker.close()
            raise
        return broker

    def task_subject(self, queue: str, msg_id: str) -> str:
        """The subject of the message of work queue ``queue`` published under ``msg_id``."""
        check_name("queue", queue)
        return f"{self._prefix}.queued.{queue}.{_subject_token(msg_id)}"

    def queued_subjects(self, queue: str) -> str:
        """The subjects (a wildcard) of every message of work queue ``queue``."""
        check_name("queue", queue)
        return f"{self._prefix}.queued.{queue}.*"

    def legacy_task_subject(self, queue: str) -> str:
        """The one subject where earlier versions queued every message of ``queue``."""
        check_name("queue", queue)
        return f"{self._prefix}.tasks.{queue}"

    def consumer_subjects(self, queue: str) -> list[str]:
        """What the durable consumer of ``queue`` filters: both of the above."""
        return [self.legacy_task_subject(queue), self.queued_subjects(queue)]

    def topic_subject(self, topic: str) -> str:
        """The subject of topic ``topic``."""
        check_name("topic", topic)
        return f"{self._prefix}.topics.{topic}"

    @staticmethod
    def consumer_name(queue: str) -> str:
        """The durable consumer of work queue ``queue``."""
        return queue.replace(".", "_")

    async def ensure_streams(self) -> None:
        """Create the tasks and topics streams, or update them to this configuration."""
        await self._ensure_stream(
            api.StreamConfig(
                name=self.tasks_stream,
                subjects=[f"{self._prefix}.tasks.>", f"{self._prefix}.queued.>"],
                retention=api.RetentionPolicy.WORK_QUEUE,
                storage=api.StorageType.FILE,
                duplicate_window=_DUPLICATE_WINDOW,
                num_replicas=self._replicas,
            )
        )
        await self._ensure_stream(
            api.StreamConfig(
                name=self.topics_stream,
                subjects=[f"{self._prefix}.topics.>"],
                retention=api.RetentionPolicy.LIMITS,
                storage=api.StorageType.FILE,
                max_age=_TOPICS_MAX_AGE,
                duplicate_window=_DUPLICATE_WINDOW,
                num_replicas=self._replicas,
            )
        )

    async def _ensure_stream(self, config: api.StreamConfig) -> None:
        await patiently(self, lambda: self._add_stream(config), f"creating stream {config.name}")

    async def _add_stream(self, config: api.StreamConfig) -> None:
        with translated(), placement_unavailable():
            try:
                await self.js.add_stream(config)
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code != _STREAM_NAME_IN_USE:
                    raise
                existing = await self.js.stream_info(config.name or "")
                # Keep the replication the stream was created with: a client connecting
                # with the default must not turn R3 streams into R1.
                config.num_replicas = existing.config.num_replicas
                if existing.config == config:
                    return
                logger.info("updating the configuration of stream %s", config.name)
                await self.js.update_stream(config)

    async def ensure_consumer(self, queue: str, options: ConsumerOptions) -> str:
        """Create (or update to ``options``) the durable consumer of ``queue``; its name.

        A consumer an earlier version created, filtering only the legacy subject of
        ``queue``, is updated to filter both; see :meth:`_requeue_passed`."""
        subjects = self.consumer_subjects(queue)
        name = self.consumer_name(queue)
        upgrading = False
        with translated():
            try:
                info = await self.js.consumer_info(self.tasks_stream, name)
            except nats.js.errors.NotFoundError:
                info = None
            if info is not None:
                current = info.config
                serves = current.filter_subjects or [current.filter_subject]
                if serves not in (subjects, [self.legacy_task_subject(queue)]):
                    raise QueueError(
                        f"queue {queue!r} maps to consumer {name!r}, which already serves "
                        f"{serves!r}"
                    )
                upgrading = serves != subjects
                if (
                    serves == subjects
                    and current.ack_wait == options.ack_wait
                    and current.max_deliver == options.max_deliver
                    and current.max_ack_pending == _MAX_ACK_PENDING
                ):
                    return name
            created = await self.js.add_consumer(
                self.tasks_stream,
                api.ConsumerConfig(
                    name=name,
                    durable_name=name,
                    filter_subjects=subjects,
                    deliver_policy=api.DeliverPolicy.ALL,
                    ack_policy=api.AckPolicy.EXPLICIT,
                    ack_wait=options.ack_wait,
                    max_deliver=options.max_deliver,
                    max_ack_pending=_MAX_ACK_PENDING,
                ),
            )
        if upgrading and created.delivered is not None and created.delivered.stream_seq:
            await self._requeue_passed(queue, created.delivered.stream_seq)
        return name

    async def _requeue_passed(self, queue: str, delivered: int) -> None:
        """Queue again the messages of ``queue`` published one per subject up to stream
        sequence ``delivered``: the consumer, just updated from the legacy subject alone,
        has passed them and would never deliver them. An API server of this version queues
        such messages while consumers of an earlier one still take the legacy subject (a
        rolling upgrade). Each goes to the end of the queue under the same subject; a
        message id made of its subject and old sequence keeps two upgrading consumers from
        queueing it twice."""
        for msg in await self._stored(self.queued_subjects(queue), until=delivered):
            if msg.subject is None or msg.seq is None:
                continue
            logger.info(
                "queueing %s again after the consumer of %r was updated", msg.subject, queue
            )
            await self._publishpatiently(
                msg.subject,
                msg.data or b"",
                f"{msg.subject}@{msg.seq}",
                f"requeueing {msg.subject}",
            )
            with translated(), contextlib.suppress(nats.js.errors.NotFoundError):
                await self.js.delete_msg(self.tasks_stream, msg.seq)

    # -- Broker

    async def publish_task(self, queue: str, data: bytes, *, msg_id: str) -> None:
        self.check_open()
        subject = self.task_subject(queue, msg_id)
        self.check_size(data, f"task message {msg_id!r}")
        ack = await self._publishpatiently(subject, data, msg_id, f"queueing task {msg_id!r}")
        if ack.duplicate:
            logger.debug("NATS dropped a duplicate of message %r on queue %r", msg_id, queue)

    def consume_tasks(self, queue: str, options: ConsumerOptions) -> Subscription[Delivery]:
        self.check_open()
        check_name("queue", queue)
        if options.max_in_flight < 1 or options.max_deliver < 1 or options.ack_wait <= 0:
            raise ValueError(f"invalid consumer options {options!r}")
        return self.iterate(_TaskFeed(self, queue, options))

    async def queue_depth(self, queue: str) -> int:
        self.check_open()
        subjects = self.consumer_subjects(queue)
        with translated():
            try:
                info = await self.js.consumer_info(self.tasks_stream, self.consumer_name(queue))
            except nats.js.errors.NotFoundError:
                # No consumer yet: count the stored messages, by subject (one per message).
                count = 0
                for subject in subjects:
                    stream = await self.js.stream_info(self.tasks_stream, subjects_filter=subject)
                    count += sum((stream.state.subjects or {}).values())
                return count
        pending: int = (info.num_pending or 0) + (info.num_ack_pending or 0)
        return pending

    async def purge_queue(self, queue: str) -> None:
        self.check_open()
        subjects = self.consumer_subjects(queue)
        with translated():
            for subject in subjects:
                await self.js.purge_stream(self.tasks_stream, subject=subject)

    async def find_task(self, queue: str, msg_id: str) -> bytes | None:
        self.check_open()
        found = await self._get_task(self.task_subject(queue, msg_id))
        return None if found is None else found.data or b""

    async def queued_tasks(self, queue: str) -> list[bytes]:
        self.check_open()
        found: list[api.RawStreamMsg] = []
        for subject in self.consumer_subjects(queue):
            found += await self._stored(subject)
        found.sort(key=lambda msg: msg.seq or 0)
        return [msg.data or b"" for msg in found]

    async def remove_task(self, queue: str, msg_id: str) -> bool:
        self.check_open()
        found = await self._get_task(self.task_subject(queue, msg_id))
        if found is None or found.seq is None:
            return False
        with translated():
            try:
                # A consumer holding a delivery of it skips it from now on; settling that
                # delivery later is harmless.
                await self.js.delete_msg(self.tasks_stream, found.seq)
            except nats.js.errors.NotFoundError:
                return False  # settled (or removed) meanwhile
        return True

    async def _get_task(self, subject: str) -> api.RawStreamMsg | None:
        """The message stored on the (literal) ``subject``, if any."""

        async def read() -> api.RawStreamMsg | None:
            with translated():
                try:
                    return await self.js.get_msg(self.tasks_stream, subject=subject)
                except nats.js.errors.NotFoundError:
                    return None

        return await patiently(self, read, f"looking up {subject!r}")

    async def _stored(self, subject: str, until: int | None = None) -> list[api.RawStreamMsg]:
        """Every message stored on ``subject`` (wildcards allowed), in sequence order, up to
        sequence ``until``: one request per message, each for the next one from a sequence
        on."""
        found: list[api.RawStreamMsg] = []
        seq = 1
        while True:

            async def read(at: int = seq) -> api.RawStreamMsg | None:
                with translated():
                    try:
                        return await self.js.get_msg(
                            self.tasks_stream, seq=at, subject=subject, next=True
                        )
                    except nats.js.errors.NotFoundError:
                        return None

            msg = await patiently(self, read, f"listing {subject!r}")
            if msg is None or msg.seq is None or (until is not None and msg.seq > until):
                return found
            found.append(msg)
            seq = msg.seq + 1

    async def publish(self, topic: str, data: bytes) -> None:
        self.check_open()
        subject = self.topic_subject(topic)
        self.check_size(data, f"a message to {topic!r}")
        # A failover must not fail a task at its next event.
        await self._publishpatiently(subject, data, uuid.uuid4().hex, f"publishing to {topic!r}")

    async def _publishpatiently(
        self, subject: str, data: bytes, msg_id: str, what: str
    ) -> api.PubAck:
        """Publish ``data`` under ``msg_id``, tried again while NATS is unavailable: should
        an attempt whose answer was lost have been stored, the stream drops the repeats
        (within :data:`_DUPLICATE_WINDOW`)."""
        headers: dict[str, str] = {api.Header.MSG_ID: msg_id}

        async def attempt() -> api.PubAck:
            with translated():
                return await self.js.publish(subject, data, headers=headers)

        return await patiently(self, attempt, what)

    def subscribe(self, topic: str) -> Subscription[bytes]:
        self.check_open()
        return self.iterate(_TopicFeed(self, topic))

    async def last_message(self, topic: str) -> bytes | None:
        self.check_open()
        subject = self.topic_subject(topic)

        async def read() -> bytes | None:
            with translated():
                try:
                    msg = await self.js.get_last_msg(self.topics_stream, subject)
                except nats.js.errors.NotFoundError:
                    return None
            return msg.data or b""

        return await patiently(self, read, f"reading the end of {topic!r}")

    async def delete_topic(self, topic: str) -> None:
        self.check_open()
        subject = self.topic_subject(topic)
        with translated():
            await self.js.purge_stream(self.topics_stream, subject=subject)


def _subject_token(msg_id: str) -> str:
    """``msg_id`` as one subject token: as is when it is ``[A-Za-z0-9_-]`` (a task id), else
    ``~`` and its UTF-8 hex, which no such id starts with (subjects cannot hold ``.``, ``*``,
    ``>`` or spaces)."""
    if _TOKEN_RE.match(msg_id):
        return msg_id
    return "~" + msg_id.encode().hex()
