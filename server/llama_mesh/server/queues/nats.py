"""The NATS JetStream message queue (the default broker).

Layout on the server, for ``prefix="mesh"``:

* stream ``MESH_TASKS`` (subjects ``mesh.tasks.>``, work-queue retention, file storage,
  two-minute duplicate window): queue ``q`` is subject ``mesh.tasks.q`` with one durable pull
  consumer named after the queue (dots become ``_``), shared by every consumer of the queue.
* stream ``MESH_TOPICS`` (subjects ``mesh.topics.>``, limits retention, file storage, seven
  days max age): topic ``t`` is subject ``mesh.topics.t``; subscribers use an ordered push
  consumer from the first stored message.
* bucket ``b`` is the key-value bucket ``mesh_b`` (stream ``KV_mesh_b``, history 1). A bucket
  with a TTL also gets server delete markers (``subject_delete_marker_ttl``), so an expiry
  reaches watchers as a deletion.

Behaviour worth knowing:

* Iterators (``consume_tasks``, ``subscribe``, ``watch``) create their server-side consumer on
  the first ``__anext__``; a ``watch(include_existing=False)`` nevertheless reports every change
  stored after the ``watch()`` call (it starts from that wall-clock time on the server, so
  clocks must agree). Iterators have ``aclose()``; cancelling a pending ``__anext__`` loses
  nothing.
* ``consume_tasks`` holds at most ``max_in_flight`` unsettled deliveries: a background task
  long-polls (``fetch`` with a server-side expiry) only for the free slots.
* Settling (ack, nak, term, in_progress) waits for the server's confirmation. A nak of the
  last allowed delivery terminates the message (removes it), as the in-process queue drops it.
* ``KeyValueStore.delete`` of an absent key writes nothing.

All nats-py errors are translated by :func:`translate_error` into the ``QueueError`` tree.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import logging
import os
import re
import ssl
import time
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Final, Generic, TypeVar

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.kv import KeyValue

from llama_mesh.server.aio import cancel_and_wait, raise_if_cancelling
from llama_mesh.server.queues.base import (
    ConsumerOptions,
    Delivery,
    KeyExistsError,
    KeyValueEntry,
    KeyValueStore,
    MessageQueue,
    MessageTooLargeError,
    QueueError,
    QueueUnavailableError,
    RevisionMismatchError,
    Subscription,
    watches,
)

logger = logging.getLogger(__name__)

_REQUEST_TIMEOUT: Final = 5.0
_FETCH_TIMEOUT: Final = 5.0
"""How long one pull request waits on the server for messages (a long poll)."""
_CONSUMER_INACTIVE: Final = 1.0
_KEYS_TIMEOUT: Final = 5.0
_FETCH_ERROR_BACKOFF: Final = 1.0
_RESUME_BACKOFF: Final = (0.1, 5.0)
"""First and longest pause between attempts to resume a subscription."""
_LIVENESS_INTERVAL: Final = 5.0
"""How long a subscription may stay silent before its consumer is looked up."""
_PATIENCE: Final = 20.0
"""How long a read (a key, opening a subscription), a write or an acknowledgement is tried
again while NATS answers "unavailable", as a cluster does while it elects leaders after
losing a node."""
_DRAIN_TIMEOUT: Final = 5.0
_MAX_ACK_PENDING: Final = 10_000
_DUPLICATE_WINDOW: Final = 120.0
_TOPICS_MAX_AGE: Final = 7 * 24 * 3600.0
_DELETE_RETRIES: Final = 10
_HEADER_ROOM: Final = 1024
"""Bytes of a message's ``max_payload`` left for its headers (message id, expected
revision): NATS counts them too."""

_KV_OPERATION: Final = "KV-Operation"
_KV_DELETIONS: Final = frozenset({"DEL", "PURGE"})
_MARKER_REASON: Final = "Nats-Marker-Reason"
_WRONG_LAST_SEQUENCE: Final = frozenset({10071, 10164})
_STREAM_NAME_IN_USE: Final = 10058
_NO_PEERS_FOR_PLACEMENT: Final = 10005
"""A replicated stream cannot be placed yet: a cluster still forming, or a node down."""

_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
_KEY_RE = re.compile(r"^[A-Za-z0-9_=./-]+$")
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]+$")

T = TypeVar("T")
R = TypeVar("R")

# --------------------------------------------------------------------------------------------
# Error translation: the one place where nats-py errors become QueueErrors.

_UNAVAILABLE: Final[tuple[type[BaseException], ...]] = (
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionDrainingError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.NoServersError,
    nats.errors.StaleConnectionError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.NoRespondersError,
    nats.errors.TimeoutError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
    TimeoutError,
    OSError,
)


def translate_error(
    exc: BaseException, *, conflict: type[QueueError] = RevisionMismatchError
) -> BaseException:
    """The ``QueueError`` for a nats-py (or socket) error; other exceptions come back as is.

    A write whose expected revision did not match becomes ``conflict``
    (:class:`RevisionMismatchError`, or :class:`KeyExistsError` for ``create``); connection
    and timeout errors become :class:`QueueUnavailableError`; any other NATS error becomes a
    plain :class:`QueueError`.
    """
    if isinstance(exc, QueueError):
        return exc
    if isinstance(exc, nats.js.errors.KeyWrongLastSequenceError) or (
        isinstance(exc, nats.js.errors.APIError) and exc.err_code in _WRONG_LAST_SEQUENCE
    ):
        return conflict(str(exc))
    if isinstance(exc, _UNAVAILABLE):
        return QueueUnavailableError(f"NATS is unavailable: {exc!r}")
    if isinstance(exc, nats.errors.Error):
        return QueueError(f"NATS error: {exc!r}")
    return exc


@contextlib.contextmanager
def _translated(*, conflict: type[QueueError] = RevisionMismatchError) -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        translated = translate_error(exc, conflict=conflict)
        if translated is exc:
            raise
        raise translated from exc


async def _patiently(owner: NatsQueue, read: Callable[[], Awaitable[R]], what: str) -> R:
    """Run ``read`` (safe to repeat: a read, a compare-and-set, an acknowledgement, or a
    write under a message id the stream de-duplicates), again after a pause while NATS is
    unavailable, for up to :data:`_PATIENCE` seconds: a failover must not fail every caller
    meanwhile."""
    pause, longest = _RESUME_BACKOFF
    deadline = time.monotonic() + _PATIENCE
    while True:
        try:
            return await read()
        except QueueUnavailableError as exc:
            if owner.closed or time.monotonic() + pause > deadline:
                raise
            logger.info("%s failed (%r); again in %.1f s", what, exc, pause)
        raise_if_cancelling()
        await asyncio.sleep(pause)
        pause = min(pause * 2, longest)


@contextlib.contextmanager
def _placement_unavailable() -> Iterator[None]:
    """ "No suitable peers for placement" is the cluster being unavailable for now."""
    try:
        yield
    except nats.js.errors.BadRequestError as exc:
        if exc.err_code != _NO_PEERS_FOR_PLACEMENT:
            raise
        raise QueueUnavailableError(f"NATS cannot place a replicated stream yet: {exc}") from exc


def _check_name(kind: str, name: str) -> None:
    if not _NAME_RE.match(name):
        raise ValueError(f"invalid {kind} name {name!r}: dot-separated tokens of [A-Za-z0-9_-]")


def _check_key(key: str) -> None:
    if not _KEY_RE.match(key) or key.startswith(".") or key.endswith("."):
        raise ValueError(f"invalid key {key!r}: [A-Za-z0-9_=./-], not starting or ending with '.'")


def _is_deletion(headers: dict[str, str] | None) -> bool:
    """Whether a KV message is a delete/purge marker, including server (TTL) markers."""
    if not headers:
        return False
    return headers.get(_KV_OPERATION) in _KV_DELETIONS or _MARKER_REASON in headers


def _msg_id(headers: dict[str, str] | None) -> str | None:
    return headers.get(api.Header.MSG_ID) if headers else None


# --------------------------------------------------------------------------------------------
# Iterators


class _End:
    """Put into an item queue to end its iterator (with ``error`` raised, if set)."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error


class _Feed(Generic[T]):
    """What an iterator reads from: an asyncio queue filled by a nats callback or a pump task.

    The server-side consumer is created by ``_open`` on the first ``next()``. Callbacks and
    tasks hold the feed, never the iterator (:class:`_FeedIterator`) the user holds, so an
    iterator dropped without ``aclose()`` is garbage-collected, which shuts its feed down.
    """

    def __init__(self, owner: NatsQueue) -> None:
        self.owner = owner
        self.items: asyncio.Queue[T | _End] = asyncio.Queue()
        self._open_lock = asyncio.Lock()
        self._opened = False
        self.ended = False
        self.shut = False

    async def next(self) -> T:
        if not self._opened and not self.ended:
            async with self._open_lock:
                if not self._opened and not self.ended:
                    await _patiently(self.owner, self._open, "opening a subscription")
                    self._opened = True
                    if self.shut:  # shut down while opening
                        await self._shutdown()
            raise_if_cancelling()  # a cancel during _open may have been lost (gh-86296)
        item = await self.items.get()
        if isinstance(item, _End):
            self.items.put_nowait(item)  # every later call ends too
            if item.error is not None:
                raise item.error
            raise StopAsyncIteration
        return item

    def end(self, error: BaseException | None = None) -> None:
        """Let readers finish (raising ``error``, if given) without releasing anything."""
        if not self.ended:
            self.ended = True
            self.items.put_nowait(_End(error))

    async def shutdown(self) -> None:
        """End the feed and release its server-side consumer; idempotent."""
        self.owner.forget(self)
        if self.shut:
            return
        self.shut = True
        self.end()
        await self._shutdown()

    def on_reconnected(self) -> None:
        """The connection was re-established (the server may have lost our consumer)."""

    async def _open(self) -> None:
        raise NotImplementedError

    async def _shutdown(self) -> None:
        raise NotImplementedError


class _FeedIterator(Subscription[T]):
    """The iterator handed out: cancelling a pending ``__anext__`` loses nothing."""

    def __init__(self, feed: _Feed[T]) -> None:
        self._feed = feed

    async def __anext__(self) -> T:
        return await self._feed.next()

    async def aclose(self) -> None:
        """Stop iterating and release the server-side consumer; idempotent."""
        await self._feed.shutdown()

    def __del__(self) -> None:
        self._feed.owner.shutdown_soon(self._feed)


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
            with _translated():
                await self._feed.owner.nc.request(
                    self._msg.reply, payload, timeout=_REQUEST_TIMEOUT
                )

        # Tried again while NATS is unavailable (the consumer's leader moving): settling a
        # delivery twice is harmless, and a result already stored must not be redelivered.
        await _patiently(self._feed.owner, send, "acknowledging a task message")
        if settle:
            self._settled = True


class _TaskFeed(_Feed[Delivery]):
    def __init__(self, owner: NatsQueue, queue: str, options: ConsumerOptions) -> None:
        super().__init__(owner)
        self.queue = queue
        self.options = options
        self._held = 0
        self._capacity = asyncio.Event()
        self._psub: JetStreamContext.PullSubscription | None = None
        self._pump_task: asyncio.Task[None] | None = None
        self._fetching: asyncio.Task[list[Msg]] | None = None

    def on_reconnected(self) -> None:
        # The pending pull request may have died with the old connection: pull again now
        # rather than when it would have expired.
        if self._fetching is not None:
            self._fetching.cancel()

    def release(self) -> None:
        self._held -= 1
        self._capacity.set()

    async def _open(self) -> None:
        await self._subscribe()
        self._pump_task = self.owner.spawn(self._pump(), name=f"nats-consume-{self.queue}")

    async def _subscribe(self) -> None:
        name = await self.owner.ensure_consumer(self.queue, self.options)
        with _translated():
            self._psub = await self.owner.js.pull_subscribe_bind(
                durable=name, stream=self.owner.tasks_stream
            )

    async def _shutdown(self) -> None:
        if self._pump_task is not None:
            await cancel_and_wait(self._pump_task)
        await self._drop_subscription()
        # Deliveries fetched but never handed out go back at once instead of after ack_wait.
        while not self.items.empty():
            item = self.items.get_nowait()
            if isinstance(item, _NatsDelivery):
                await item.give_back()
            else:
                self.items.put_nowait(item)
                break

    async def _pump(self) -> None:
        """Fetch as many messages as there are free slots, with a long server-side poll."""
        while True:
            raise_if_cancelling()  # a fetch or settle may have swallowed it (gh-86296)
            while self._held >= self.options.max_in_flight:
                self._capacity.clear()
                await self._capacity.wait()
            want = self.options.max_in_flight - self._held
            started = time.monotonic()
            try:
                if self._psub is None:
                    await self._subscribe()
                assert self._psub is not None
                # One message per pull: with more, nats-py holds a message it has until the
                # whole batch arrives or the pull expires, while other replicas could run it.
                self._fetching = asyncio.ensure_future(self._psub.fetch(1, timeout=_FETCH_TIMEOUT))
                try:
                    msgs = await self._fetching
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if task is not None and task.cancelling():
                        raise  # the pump itself is being cancelled
                    continue  # on_reconnected() aborted the fetch
                finally:
                    self._fetching = None
            except TimeoutError:
                # No message within the poll: poll again, unless the server answered at once
                # (a 409 status, e.g. after a leadership change), which must not spin.
                if time.monotonic() - started < _FETCH_TIMEOUT / 10:
                    await asyncio.sleep(_FETCH_ERROR_BACKOFF)
                continue
            except nats.errors.ConnectionClosedError as exc:
                if not self.owner.closed:
                    self.end(QueueUnavailableError(f"the NATS connection closed: {exc!r}"))
                return
            except Exception as exc:
                logger.warning("fetching from queue %r failed: %r; retrying", self.queue, exc)
                if isinstance(exc, nats.js.errors.NotFoundError | QueueError):
                    await self._drop_subscription()  # the consumer may be gone: recreate it
                await asyncio.sleep(_FETCH_ERROR_BACKOFF)
                continue
            for msg in msgs[:want]:
                self._held += 1
                self.items.put_nowait(_NatsDelivery(self, msg))
            for msg in msgs[want:]:
                # Late arrivals for an aborted fetch, which nats-py hands out with the next
                # one: more than the free slots, so they go back.
                logger.debug("giving back a message fetched beyond max_in_flight")
                await _NatsDelivery(self, msg).give_back()

    async def _drop_subscription(self) -> None:
        psub, self._psub = self._psub, None
        if psub is not None:
            with contextlib.suppress(Exception):
                await psub.unsubscribe()


class _PushFeed(_Feed[T]):
    """A feed from an ordered push consumer, resumed after the last message on reconnect."""

    def __init__(self, owner: NatsQueue, subject: str, stream: str) -> None:
        super().__init__(owner)
        self._subject = subject
        self._stream = stream
        self._sub: JetStreamContext.PushSubscription | None = None
        self._resume_lock = asyncio.Lock()
        self._last_seq = 0
        """Stream sequence of the last message received."""
        self._heard = False
        """Whether a message arrived since the watchdog last looked."""
        self._watchdog_task: asyncio.Task[None] | None = None

    def _first_config(self) -> api.ConsumerConfig:
        raise NotImplementedError

    def _received(self, msg: Msg) -> None:
        self._last_seq = msg.metadata.sequence.stream
        self._heard = True

    async def _on_msg(self, msg: Msg) -> None:
        raise NotImplementedError

    async def _open(self) -> None:
        await self._subscribe()

    async def _subscribe(self) -> None:
        if self._last_seq:
            config = api.ConsumerConfig(
                deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=self._last_seq + 1,
            )
        else:
            config = self._first_config()
        with _translated():
            self._sub = await self.owner.js.subscribe(
                self._subject,
                stream=self._stream,
                cb=self._on_msg,
                ordered_consumer=True,
                config=config,
                # Closing a feed does not delete its consumer; let the server drop it soon
                # rather than after 5 s, or busy streams reach the 1,000-consumer limit.
                inactive_threshold=_CONSUMER_INACTIVE,
            )
        if self._watchdog_task is None:
            self._watchdog_task = self.owner.spawn(
                self._watchdog(), name=f"nats-watchdog-{self._subject}"
            )

    async def _watchdog(self) -> None:
        """Resume when the consumer is gone while the connection stays up.

        When the cluster node holding our consumer dies but our connection is to another
        node, nats-py notices only by missed heartbeats, and stops trying if recreating the
        consumer fails then (as it does while the cluster elects leaders): the feed would
        fall silent for good. So a feed silent for a while looks its consumer up.
        """
        while not self.shut and not self.owner.closed:
            await asyncio.sleep(_LIVENESS_INTERVAL)
            if self._heard:
                self._heard = False
                continue
            sub = self._sub
            if sub is None or self._resume_lock.locked():
                continue  # being resumed already
            try:
                await sub.consumer_info()
            except Exception as exc:
                raise_if_cancelling()
                if self.shut or self.owner.closed:
                    return
                logger.info("the consumer of %s is lost (%r); resuming", self._subject, exc)
                await self._resume()
            raise_if_cancelling()

    def on_reconnected(self) -> None:
        # A restarted server forgot our (in-memory) ordered consumer; nats-py would notice
        # only after missing two idle heartbeats (10 s), so resume at once.
        if self._sub is not None and not self.shut:
            self.owner.spawn(self._resume(), name=f"nats-resume-{self._subject}")

    async def _resume(self) -> None:
        """Subscribe again after the last message received, trying until it works: right
        after a cluster node dies, creating a consumer fails until leaders are elected
        again, and readers waiting on this feed must not fail for that."""
        pause, longest = _RESUME_BACKOFF
        async with self._resume_lock:
            while not self.shut and not self.owner.closed:
                await self._unsubscribe()
                try:
                    await self._subscribe()
                    break
                except Exception as exc:
                    logger.warning(
                        "resuming the subscription to %s failed: %r; again in %.1f s",
                        self._subject,
                        exc,
                        pause,
                    )
                raise_if_cancelling()
                await asyncio.sleep(pause)
                pause = min(pause * 2, longest)
            if self.shut:
                await self._unsubscribe()

    async def _unsubscribe(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _shutdown(self) -> None:
        if self._watchdog_task is not None and self._watchdog_task is not asyncio.current_task():
            await cancel_and_wait(self._watchdog_task)
        await self._unsubscribe()


class _TopicFeed(_PushFeed[bytes]):
    def __init__(self, owner: NatsQueue, topic: str) -> None:
        super().__init__(owner, owner.topic_subject(topic), owner.topics_stream)

    def _first_config(self) -> api.ConsumerConfig:
        return api.ConsumerConfig(deliver_policy=api.DeliverPolicy.ALL)

    async def _on_msg(self, msg: Msg) -> None:
        self._received(msg)
        self.items.put_nowait(msg.data)


class _WatchFeed(_PushFeed[KeyValueEntry]):
    def __init__(self, store: NatsKeyValueStore, prefix: str, include_existing: bool) -> None:
        subject = store.subject_prefix + prefix if prefix and not prefix.endswith(".") else None
        super().__init__(store.owner, subject or store.subject_filter(prefix), store.stream)
        self._store = store
        self._prefix = prefix
        self._include_existing = include_existing
        self._since = datetime.datetime.now(datetime.UTC)
        self._replayed_up_to = 0
        self._deleted: set[str] = set()
        """Keys whose deletion was reported and whose delete marker may still age out."""

    async def _open(self) -> None:
        if self._include_existing:
            with _translated():
                info = await self.owner.js.stream_info(self._store.stream)
            self._replayed_up_to = info.state.last_seq
        await self._subscribe()

    def _first_config(self) -> api.ConsumerConfig:
        if self._include_existing:
            return api.ConsumerConfig(deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT)
        # Changes stored since watch() was called, even before this first __anext__.
        return api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_TIME, opt_start_time=self._since
        )

    async def _on_msg(self, msg: Msg) -> None:
        self._received(msg)
        revision = self._last_seq
        key = msg.subject[len(self._store.subject_prefix) :]
        if not watches(self._prefix, key):
            return
        if not _is_deletion(msg.headers):
            self._deleted.discard(key)
            self.items.put_nowait(KeyValueEntry(key, msg.data, revision))
            return
        aged_out = _MARKER_REASON in (msg.headers or {})
        if key in self._deleted:
            # Already reported: this is the server's marker for an aged-out delete marker.
            if aged_out:
                self._deleted.discard(key)
            return
        if self._store.ttl is not None and not aged_out:
            self._deleted.add(key)
        if revision > self._replayed_up_to:
            self.items.put_nowait(KeyValueEntry(key, None, revision))


# --------------------------------------------------------------------------------------------
# Key-value


class NatsKeyValueStore(KeyValueStore):
    """A JetStream key-value bucket of :class:`NatsQueue`."""

    def __init__(self, owner: NatsQueue, kv: KeyValue, bucket: str, ttl: float | None) -> None:
        self.owner = owner
        self._kv = kv
        self.ttl = ttl
        self.stream = f"KV_{bucket}"
        self.subject_prefix = f"$KV.{bucket}."

    def subject_filter(self, prefix: str) -> str:
        """The narrowest subject filter holding every key that starts with ``prefix``."""
        head, dot, _ = prefix.rpartition(".")
        return f"{self.subject_prefix}{head}{dot}>"

    async def get(self, key: str) -> KeyValueEntry | None:
        self.owner.check_open()
        _check_key(key)
        return await _patiently(self.owner, lambda: self._get(key), f"reading key {key!r}")

    async def _get(self, key: str) -> KeyValueEntry | None:
        with _translated():
            try:
                msg = await self.owner.js.get_msg(
                    self.stream, subject=self.subject_prefix + key, direct=False
                )
            except nats.js.errors.NotFoundError:
                return None
        if _is_deletion(msg.headers) or msg.seq is None:
            return None
        return KeyValueEntry(key, msg.data or b"", msg.seq)

    async def put(self, key: str, value: bytes) -> int:
        self.owner.check_open()
        _check_key(key)
        # Tried again while NATS is unavailable, under one message id: should an attempt
        # whose answer was lost have been stored, the stream drops the repeat (it does not
        # overwrite a newer value written meanwhile).
        headers: dict[str, str] = {api.Header.MSG_ID: uuid.uuid4().hex}
        return await _patiently(
            self.owner,
            lambda: self._publish(key, value, headers=headers),
            f"writing key {key!r}",
        )

    async def create(self, key: str, value: bytes) -> int:
        self.owner.check_open()
        _check_key(key)
        # Tried again while NATS is unavailable. The stream checks the expected revision
        # before it looks for duplicates, so a repeat of an attempt that was stored (its
        # answer lost) finds the key taken: by this very write when the key's latest
        # message carries its (fresh, so nobody else's) message id.
        msg_id = uuid.uuid4().hex
        headers: dict[str, str] = {api.Header.MSG_ID: msg_id}

        async def attempt() -> int:
            try:
                return await self._publish(
                    key, value, last_revision=0, headers=headers, conflict=KeyExistsError
                )
            except KeyExistsError:
                latest = await self._latest(key)
                if latest is not None and _msg_id(latest.headers) == msg_id:
                    return latest.seq or 0
                # The key has a history; its latest message may be a deletion (or expiry)
                # marker.
                if latest is not None and not _is_deletion(latest.headers):
                    raise
                last_revision = 0 if latest is None else (latest.seq or 0)
                return await self._publish(
                    key,
                    value,
                    last_revision=last_revision,
                    headers=headers,
                    conflict=KeyExistsError,
                )

        return await _patiently(self.owner, attempt, f"creating key {key!r}")

    async def _latest(self, key: str) -> api.RawStreamMsg | None:
        """The key's latest message, a deletion marker included; ``None`` when it has none."""
        with _translated():
            try:
                return await self.owner.js.get_msg(
                    self.stream, subject=self.subject_prefix + key, direct=False
                )
            except nats.js.errors.NotFoundError:
                return None

    async def update(self, key: str, value: bytes, last_revision: int) -> int:
        self.owner.check_open()
        _check_key(key)
        # Tried again while NATS is unavailable, like reads: a compare-and-set is safe to
        # repeat (should a first attempt have landed, the next one is a revision conflict,
        # which callers resolve by reading again).
        return await _patiently(
            self.owner,
            lambda: self._publish(key, value, last_revision=last_revision),
            f"updating key {key!r}",
        )

    async def delete(self, key: str) -> None:
        self.owner.check_open()
        _check_key(key)
        for _ in range(_DELETE_RETRIES):
            current = await self.get(key)
            if current is None:
                return
            try:
                await self._publish(
                    key, b"", last_revision=current.revision, headers={_KV_OPERATION: "DEL"}
                )
                return
            except RevisionMismatchError:
                continue  # written meanwhile: look again
        raise QueueError(f"key {key!r} kept changing; not deleted")

    async def keys(self, prefix: str = "") -> list[str]:
        return [entry.key for entry in await self._scan(prefix, values=False)]

    async def entries(self, prefix: str = "") -> list[KeyValueEntry]:
        return await self._scan(prefix, values=True)

    async def _scan(self, prefix: str, *, values: bool) -> list[KeyValueEntry]:
        """The last message of every key under ``prefix`` (headers only unless ``values``;
        the entries' values are then ``b""``), sorted by key.

        Not nats-py's kv.keys()/watch(): its end-of-keys marker races with messages still
        in the client's buffer and can report no keys at all under load. Instead: ask the
        stream how many subjects match, then read the last message of each until the
        server says none is pending (a per-message count, immune to that race).
        """
        self.owner.check_open()
        subject = self.subject_filter(prefix)
        with _translated():
            info = await self.owner.js.stream_info(self.stream, subjects_filter=subject)
            if not (info.state.subjects or {}):
                return []
            sub = await self.owner.js.subscribe(
                subject,
                stream=self.stream,
                ordered_consumer=True,
                deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT,
                headers_only=not values,
                inactive_threshold=_CONSUMER_INACTIVE,
            )
            found: dict[str, KeyValueEntry] = {}
            try:
                while True:
                    msg = await sub.next_msg(timeout=_KEYS_TIMEOUT)
                    key = msg.subject[len(self.subject_prefix) :]
                    revision = msg.metadata.sequence.stream
                    if key.startswith(prefix) and not _is_deletion(msg.headers):
                        found[key] = KeyValueEntry(key, msg.data if values else b"", revision)
                    else:
                        found.pop(key, None)
                    if msg.metadata.num_pending == 0:
                        break
            except nats.errors.TimeoutError:
                pass  # the matching subjects were purged meanwhile
            finally:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        return [found[key] for key in sorted(found)]

    def watch(
        self, prefix: str = "", *, include_existing: bool = True
    ) -> Subscription[KeyValueEntry]:
        self.owner.check_open()
        return self.owner.iterate(_WatchFeed(self, prefix, include_existing))

    async def _publish(
        self,
        key: str,
        value: bytes,
        *,
        last_revision: int | None = None,
        headers: dict[str, str] | None = None,
        conflict: type[QueueError] = RevisionMismatchError,
    ) -> int:
        self.owner.check_size(value, f"the value of key {key!r}")
        headers = dict(headers or {})
        if last_revision is not None:
            headers[api.Header.EXPECTED_LAST_SUBJECT_SEQUENCE] = str(last_revision)
        with _translated(conflict=conflict):
            ack = await self.owner.js.publish(
                self.subject_prefix + key, value, headers=headers or None
            )
        return ack.seq


# --------------------------------------------------------------------------------------------
# The adapter


class NatsQueue(MessageQueue):
    """A :class:`MessageQueue` on NATS JetStream. Create it with :func:`connect_nats`."""

    def __init__(self, nc: NATS, *, prefix: str = "mesh", replicas: int = 1) -> None:
        if not _TOKEN_RE.match(prefix):
            raise ValueError(f"invalid prefix {prefix!r}: one token of [A-Za-z0-9_-]")
        self.nc = nc
        self.js = nc.jetstream(timeout=_REQUEST_TIMEOUT)
        self._prefix = prefix
        self._replicas = replicas
        self.tasks_stream = f"{prefix.upper()}_TASKS"
        self.topics_stream = f"{prefix.upper()}_TOPICS"
        self.closed = False
        self._feeds: set[_Feed[Any]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._buckets: dict[str, NatsKeyValueStore] = {}
        self._bucket_lock = asyncio.Lock()
        self._availability: list[Callable[[str | None], None]] = []

    # -- plumbing shared with the iterators and stores

    def check_open(self) -> None:
        """Raise :class:`QueueUnavailableError` when closed."""
        if self.closed:
            raise QueueUnavailableError("the NATS queue is closed")

    def check_size(self, data: bytes, what: str) -> None:
        """Refuse ``data`` larger than NATS takes in one message (the server's
        ``max_payload``, less room for headers) with an error naming both sizes; NATS itself
        would refuse it with no sizes, or close the connection."""
        limit = self.nc.max_payload - _HEADER_ROOM
        if len(data) > limit:
            raise MessageTooLargeError(what, len(data), limit)

    def iterate(self, feed: _Feed[T]) -> _FeedIterator[T]:
        """An iterator over ``feed``, which :meth:`close` shuts down."""
        self._feeds.add(feed)
        return _FeedIterator(feed)

    def forget(self, feed: _Feed[Any]) -> None:
        """Stop tracking a feed that shut down."""
        self._feeds.discard(feed)

    def shutdown_soon(self, feed: _Feed[Any]) -> None:
        """Shut ``feed`` down in a task (its iterator was dropped without ``aclose()``)."""
        if feed.shut or self.closed:
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (interpreter shutdown): nothing to release any more
        self.spawn(feed.shutdown(), name="nats-feed-shutdown")

    def on_availability(self, listener: Callable[[str | None], None]) -> None:
        self._availability.append(listener)

    def on_disconnected(self) -> None:
        """Called by the connection when it is lost (it then reconnects by itself)."""
        for listener in self._availability:
            listener("the connection to NATS is lost; reconnecting")

    def on_reconnected(self) -> None:
        """Called by the connection after a reconnect: let every feed recover at once."""
        for feed in list(self._feeds):
            feed.on_reconnected()
        for listener in self._availability:
            listener(None)

    def spawn(self, coro: Coroutine[Any, Any, None], *, name: str) -> asyncio.Task[None]:
        """Run ``coro`` in a task that :meth:`close` cancels and awaits."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def task_subject(self, queue: str) -> str:
        """The subject of work queue ``queue``."""
        _check_name("queue", queue)
        return f"{self._prefix}.tasks.{queue}"

    def topic_subject(self, topic: str) -> str:
        """The subject of topic ``topic``."""
        _check_name("topic", topic)
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
                subjects=[f"{self._prefix}.tasks.>"],
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
        await _patiently(self, lambda: self._add_stream(config), f"creating stream {config.name}")

    async def _add_stream(self, config: api.StreamConfig) -> None:
        with _translated(), _placement_unavailable():
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
        """Create (or update to ``options``) the durable consumer of ``queue``; its name."""
        subject = self.task_subject(queue)
        name = self.consumer_name(queue)
        with _translated():
            try:
                info = await self.js.consumer_info(self.tasks_stream, name)
            except nats.js.errors.NotFoundError:
                info = None
            if info is not None:
                current = info.config
                if current.filter_subject != subject:
                    raise QueueError(
                        f"queue {queue!r} maps to consumer {name!r}, which already serves "
                        f"{current.filter_subject!r}"
                    )
                if (
                    current.ack_wait == options.ack_wait
                    and current.max_deliver == options.max_deliver
                    and current.max_ack_pending == _MAX_ACK_PENDING
                ):
                    return name
            await self.js.add_consumer(
                self.tasks_stream,
                api.ConsumerConfig(
                    name=name,
                    durable_name=name,
                    filter_subject=subject,
                    deliver_policy=api.DeliverPolicy.ALL,
                    ack_policy=api.AckPolicy.EXPLICIT,
                    ack_wait=options.ack_wait,
                    max_deliver=options.max_deliver,
                    max_ack_pending=_MAX_ACK_PENDING,
                ),
            )
        return name

    # -- MessageQueue

    async def publish_task(self, queue: str, data: bytes, *, msg_id: str) -> None:
        self.check_open()
        subject = self.task_subject(queue)
        self.check_size(data, f"task message {msg_id!r}")
        ack = await self._publish_patiently(subject, data, msg_id, f"queueing task {msg_id!r}")
        if ack.duplicate:
            logger.debug("NATS dropped a duplicate of message %r on queue %r", msg_id, queue)

    def consume_tasks(self, queue: str, options: ConsumerOptions) -> Subscription[Delivery]:
        self.check_open()
        _check_name("queue", queue)
        if options.max_in_flight < 1 or options.max_deliver < 1 or options.ack_wait <= 0:
            raise ValueError(f"invalid consumer options {options!r}")
        return self.iterate(_TaskFeed(self, queue, options))

    async def queue_depth(self, queue: str) -> int:
        self.check_open()
        subject = self.task_subject(queue)
        with _translated():
            try:
                info = await self.js.consumer_info(self.tasks_stream, self.consumer_name(queue))
            except nats.js.errors.NotFoundError:
                stream = await self.js.stream_info(self.tasks_stream, subjects_filter=subject)
                return (stream.state.subjects or {}).get(subject, 0)
        pending: int = (info.num_pending or 0) + (info.num_ack_pending or 0)
        return pending

    async def purge_queue(self, queue: str) -> None:
        self.check_open()
        subject = self.task_subject(queue)
        with _translated():
            await self.js.purge_stream(self.tasks_stream, subject=subject)

    async def publish(self, topic: str, data: bytes) -> None:
        self.check_open()
        subject = self.topic_subject(topic)
        self.check_size(data, f"a message to {topic!r}")
        # A failover must not fail a task at its next event.
        await self._publish_patiently(subject, data, uuid.uuid4().hex, f"publishing to {topic!r}")

    async def _publish_patiently(
        self, subject: str, data: bytes, msg_id: str, what: str
    ) -> api.PubAck:
        """Publish ``data`` under ``msg_id``, tried again while NATS is unavailable: should
        an attempt whose answer was lost have been stored, the stream drops the repeats
        (within :data:`_DUPLICATE_WINDOW`)."""
        headers: dict[str, str] = {api.Header.MSG_ID: msg_id}

        async def attempt() -> api.PubAck:
            with _translated():
                return await self.js.publish(subject, data, headers=headers)

        return await _patiently(self, attempt, what)

    def subscribe(self, topic: str) -> Subscription[bytes]:
        self.check_open()
        return self.iterate(_TopicFeed(self, topic))

    async def last_message(self, topic: str) -> bytes | None:
        self.check_open()
        subject = self.topic_subject(topic)

        async def read() -> bytes | None:
            with _translated():
                try:
                    msg = await self.js.get_last_msg(self.topics_stream, subject)
                except nats.js.errors.NotFoundError:
                    return None
            return msg.data or b""

        return await _patiently(self, read, f"reading the end of {topic!r}")

    async def delete_topic(self, topic: str) -> None:
        self.check_open()
        subject = self.topic_subject(topic)
        with _translated():
            await self.js.purge_stream(self.topics_stream, subject=subject)

    async def kv(self, bucket: str, *, ttl: float | None = None) -> KeyValueStore:
        self.check_open()
        if not _TOKEN_RE.match(bucket):
            raise ValueError(f"invalid bucket name {bucket!r}: [A-Za-z0-9_-]")
        if ttl is not None and ttl <= 0:
            raise ValueError(f"invalid ttl {ttl!r}")
        async with self._bucket_lock:
            store = self._buckets.get(bucket)
            if store is None:
                store = self._buckets[bucket] = await _patiently(
                    self, lambda: self._open_bucket(bucket, ttl), f"opening bucket {bucket}"
                )
        return store

    async def _open_bucket(self, bucket: str, ttl: float | None) -> NatsKeyValueStore:
        name = f"{self._prefix}_{bucket}"
        with _translated(), _placement_unavailable():
            try:
                kv = await self.js.key_value(name)
                status = await kv.status()
                ttl = status.ttl or None
            except nats.js.errors.BucketNotFoundError:
                kv = await self.js.create_key_value(
                    api.KeyValueConfig(
                        bucket=name,
                        history=1,
                        ttl=ttl,
                        storage=api.StorageType.FILE,
                        replicas=self._replicas,
                        # Markers for expired entries, so that watchers see the deletion.
                        limit_marker_ttl=ttl,
                    )
                )
        return NatsKeyValueStore(self, kv, name, ttl)

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for feed in list(self._feeds):
            await feed.shutdown()
        self._feeds.clear()
        for task in list(self._tasks):
            await cancel_and_wait(task)
        nc = self.nc
        if nc.is_connected:
            try:
                await asyncio.wait_for(nc.drain(), _DRAIN_TIMEOUT)
            except Exception as exc:
                logger.debug("draining the NATS connection failed: %r", exc)
        elif not nc.is_closed:
            # nats-py flushes commands buffered while disconnected into the dead socket on
            # close, and skips the rest of its cleanup when that fails: drop them first.
            nc._pending.clear()
            nc._pending_data_size = 0
        if not nc.is_closed:
            try:
                await nc.close()
            except Exception as exc:
                logger.debug("closing the NATS connection failed: %r", exc)


async def _unless(stop: asyncio.Event, work: Coroutine[Any, Any, None]) -> None:
    """Await ``work``, unless ``stop`` is set first: then cancel it and raise
    ``TimeoutError`` (what giving up on a connection looks like)."""
    working = asyncio.ensure_future(work)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({working, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        if not working.done():
            await cancel_and_wait(working)
    if not working.cancelled():
        working.result()
        return
    raise TimeoutError


NATS_URL_VARIABLE: Final = "LLAMA_MESH_NATS_URL"
"""The environment variable that gives a worker process the NATS URL(s)."""


@dataclass(frozen=True, slots=True)
class NatsLogin:
    """How to reach NATS besides its URL: a user credentials file (JWT and seed), the CA
    to trust for TLS, and a client certificate for a server that requires one (mTLS).

    A user and password go in the URL itself (``nats://user:password@host:port``).
    """

    creds: Path | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError(
                "nats_tls_cert, nats_tls_key (--nats-tls-cert, --nats-tls-key): set both or neither"
            )

    VARIABLES: ClassVar[dict[str, str]] = {
        "creds": "LLAMA_MESH_NATS_CREDS",
        "tls_ca": "LLAMA_MESH_NATS_TLS_CA",
        "tls_cert": "LLAMA_MESH_NATS_TLS_CERT",
        "tls_key": "LLAMA_MESH_NATS_TLS_KEY",
    }
    """The environment variable of each field: read by ``serve`` and the worker command,
    set for the worker processes a server starts."""

    @classmethod
    def setting(cls, name: str) -> str | None:
        """The value of field ``name``'s variable; an empty one counts as unset."""
        return os.environ.get(cls.VARIABLES[name]) or None

    _OPTION_HELP: ClassVar[dict[str, str]] = {
        "creds": "user credentials file (JWT and seed)",
        "tls_ca": "CA to trust for TLS",
        "tls_cert": "client certificate, for a NATS that requires one (mTLS)",
        "tls_key": "client certificate's key",
    }

    @classmethod
    def add_options(cls, parser: argparse.ArgumentParser) -> None:
        """``--nats-creds`` and ``--nats-tls-*`` (defaults from :attr:`VARIABLES`), for
        :meth:`from_options`."""
        for name, what in cls._OPTION_HELP.items():
            parser.add_argument(
                f"--nats-{name.replace('_', '-')}",
                type=Path,
                default=cls.setting(name),
                help=f"NATS {what} (default: ${cls.VARIABLES[name]})",
            )

    @classmethod
    def from_options(cls, args: argparse.Namespace) -> NatsLogin:
        """The login :meth:`add_options` parsed."""
        return cls(args.nats_creds, args.nats_tls_ca, args.nats_tls_cert, args.nats_tls_key)

    def environment(self) -> dict[str, str]:
        """The variables that hand this login to a worker process."""
        return {
            variable: str(getattr(self, name))
            for name, variable in self.VARIABLES.items()
            if getattr(self, name) is not None
        }

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> NatsLogin:
        """The login :meth:`environment` described."""
        values = {name: environ.get(variable) for name, variable in cls.VARIABLES.items()}
        return cls(**{name: Path(v) for name, v in values.items() if v})

    def tls_context(self) -> ssl.SSLContext | None:
        """The TLS settings for the connection, or ``None`` to leave them to the URL."""
        if self.tls_ca is None and self.tls_cert is None:
            return None
        context = ssl.create_default_context(cafile=str(self.tls_ca) if self.tls_ca else None)
        if self.tls_cert is not None and self.tls_key is not None:
            context.load_cert_chain(self.tls_cert, self.tls_key)
        return context


def redact_url(urls: str) -> str:
    """``urls`` (comma-separated) with any password replaced by ``***``, for logs."""

    def redact(url: str) -> str:
        parts = urllib.parse.urlsplit(url)
        if parts.password is None:
            return url
        netloc = f"{parts.username}:***@{parts.hostname}"
        if parts.port is not None:
            netloc += f":{parts.port}"
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))

    return ",".join(redact(url) for url in urls.split(","))


async def connect_nats(
    servers: str | list[str],
    *,
    name: str = "llama-mesh",
    login: NatsLogin | None = None,
    token: str | None = None,
    replicas: int = 1,
    prefix: str = "mesh",
    connect_timeout: float = 10.0,
) -> NatsQueue:
    """Connect to NATS and create (or update) the streams; a :class:`NatsQueue`.

    The connection reconnects forever once established (a restarted server is picked up);
    the first connection must succeed within ``connect_timeout`` seconds, else
    :class:`QueueUnavailableError`.
    """

    errors: list[Exception] = []
    refused = asyncio.Event()

    async def on_error(exc: Exception) -> None:
        logger.warning("NATS connection error: %r", exc)
        if queue is None:
            errors.append(exc)
            if "authorization violation" in str(exc).lower():
                refused.set()  # trying again with the same login cannot help

    async def on_disconnected() -> None:
        if queue is not None and queue.closed:
            logger.debug("disconnected from NATS (closing)")
        else:
            logger.warning("disconnected from NATS; reconnecting")
            if queue is not None:
                queue.on_disconnected()

    async def on_reconnected() -> None:
        url = nc.connected_url
        logger.info("reconnected to NATS at %s", redact_url(url.geturl()) if url else "?")
        if queue is not None:
            queue.on_reconnected()

    queue: NatsQueue | None = None
    nc = NATS()
    try:
        async with asyncio.timeout(connect_timeout):
            await _unless(
                refused,
                nc.connect(
                    servers,
                    name=name,
                    user_credentials=str(login.creds) if login and login.creds else None,
                    tls=login.tls_context() if login else None,
                    token=token,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=1,
                    connect_timeout=2,
                    error_cb=on_error,
                    disconnected_cb=on_disconnected,
                    reconnected_cb=on_reconnected,
                ),
            )
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        with contextlib.suppress(Exception):
            await nc.close()
        where = redact_url(servers if isinstance(servers, str) else ",".join(servers))
        cause = f"{errors[-1]!r}" if errors else repr(exc)
        if refused.is_set():
            cause = f"NATS refused the login (check the user, password or credentials): {cause}"
        raise QueueUnavailableError(f"cannot connect to NATS at {where}: {cause}") from exc
    queue = NatsQueue(nc, prefix=prefix, replicas=replicas)
    try:
        await queue.ensure_streams()
    except BaseException:
        await queue.close()
        raise
    return queue
