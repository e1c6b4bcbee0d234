"""The RabbitMQ broker (message-queue type ``rabbitmq``), on aio-pika over AMQP 0.9.1.

Layout on the server, every name prefixed with the settings' ``exchange_name`` (Llama Deploy
0.8's default ``llama-deploy``), so deployments sharing a vhost keep apart:

* work queue ``q`` is the durable **quorum** queue ``<exchange_name>.tasks.q``; messages are
  persistent and carry the publisher's ``msg_id`` as their AMQP ``message_id``.
* topic ``t`` is the **stream** ``<exchange_name>.topics.t``, read over AMQP from offset
  ``first`` (replay, then follow).

What RabbitMQ does not do by itself, the adapter does:

* **msg_id deduplication**, in two steps, both in the ``dedup`` key-value bucket (its TTL is
  the deduplication window). A publish first claims its id (``KeyValueStore.create``) and
  marks the claim done once the broker confirmed the message; a later publish of a done id
  is dropped, so the queue's depth counts one message per id. A claim whose publish never
  confirmed (the publisher died, the broker failed, or a concurrent publish of the id is
  still under way) does not block a retry: that retry publishes again, so a failure may
  duplicate a message but never loses one (a publish the lost connection cut off before
  its confirm is retried so, at once). Such a duplicate is dropped on delivery: each
  message carries a publish id of its own (header ``llama-mesh-publish-id``), and a
  consumer claims the message id for the first publish id it receives; a delivery whose
  message id is claimed for another publish id is a duplicate and is acked unrun. A
  redelivery (after a timeout, a ``nak`` or a dead consumer) has the claimed publish id and
  goes through, whatever its ``x-delivery-count``.
* **ack_wait**: RabbitMQ has no per-message ack timeout a consumer can renew, so each
  delivery has a timer: when it fires, the message is requeued (``basic.nack``, requeue);
  ``in_progress()`` restarts it. A consumer that dies without settling loses nothing: its
  channel closes and RabbitMQ requeues what it held.
  RabbitMQ's own ``consumer_timeout`` (30 minutes by default) still closes the channel of
  a consumer holding a delivery longer, ``in_progress()`` or not: for longer tasks, raise
  it in ``rabbitmq.conf``.
* **nak(delay)**: the delivery is kept (unsettled) for ``delay`` seconds, then requeued. A
  timer rather than a delayed retry queue (TTL plus dead-lettering) because a requeue keeps
  the message in its queue with RabbitMQ's own ``x-delivery-count``, where a retry queue
  would republish it as a new message; the cost is that the delivery keeps its consumer's
  ``max_in_flight`` slot during the delay (and comes back at once if that consumer dies).
* **max_deliver**: quorum queues count returns in the ``x-delivery-count`` header, so
  ``delivery_count`` is that plus one. The delivery numbered ``max_deliver`` is dropped
  (acked) instead of requeued when it times out or is nak'ed, and a delivery beyond it (a
  message a dead consumer held on its last delivery) is dropped on arrival. Not
  ``x-delivery-limit``: queue arguments are fixed when the queue is declared, and the
  publisher declares it before any consumer says its ``max_deliver``.
* **queue_depth** is the quorum queue's ready count (``queue.declare``) plus the messages the
  consumers of this broker hold unsettled. RabbitMQ reports unacknowledged messages only
  through its management plugin, so consumers in other processes are not counted.
* **last_message** consumes the stream from offset ``last`` (its last chunk) and cancels at
  once: RabbitMQ sends the chunk's messages before its ``basic.cancel-ok``, and the one with
  the highest ``x-stream-offset`` is the latest.
* **streams still starting**: RabbitMQ 3.10 crashes the channel of a publish or consume on a
  stream that another client's declare is still creating, closing the whole connection.
  The first publish to a stream and each subscription wait until a brief consume of it
  starts on a side connection (:meth:`RabbitMqBroker.stream_started`), which takes such
  crashes instead; ``last_message`` reads there too.

Iterators start their server-side consumer on the first ``__anext__``, have ``aclose()``,
and lose nothing when a pending ``__anext__`` is cancelled. ``aclose()`` of a work-queue
consumer cancels it and requeues what it received but did not hand out; deliveries already
handed out can still be settled. The connection is aio-pika's robust one: it reconnects by
itself, restores consumers (a subscription resumes after the last offset it delivered) and
tells :meth:`RabbitMqBroker.on_availability` listeners. Every aio-pika/aiormq error is
translated by :func:`translate_error` into the ``QueueError`` tree.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import contextlib
import hashlib
import json
import logging
import re
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Generic, TypeVar

import aio_pika
import aio_pika.abc
import aiormq.abc
import aiormq.exceptions

from llama_mesh.server.aio import discard
from llama_mesh.server.queues.broker import Broker, ConsumerOptions, Delivery, check_name, is_name
from llama_mesh.server.queues.errors import (
    KeyExistsError,
    MessageTooLargeError,
    QueueError,
    QueueUnavailableError,
)
from llama_mesh.server.queues.iterators import Subscription
from llama_mesh.server.queues.state import KeyValueStore

logger = logging.getLogger(__name__)

T = TypeVar("T")
Q = TypeVar("Q")
R = TypeVar("R")

DEFAULT_URL: Final = "amqp://guest:guest@localhost/"
DEFAULT_EXCHANGE_NAME: Final = "llama-deploy"
ENV_PREFIX: Final = "RABBITMQ_"
"""Environment variables ``RABBITMQ_<FIELD>`` fill fields the deployment file leaves out."""
_FIELDS: Final = ("url", "exchange_name", "username", "password", "host", "port", "vhost")
_BOOL_FIELDS: Final = ("secure",)
_SCHEMES: Final = ("amqp", "amqps")
_TRUE: Final = frozenset({"1", "true", "t", "yes", "y", "on"})
_FALSE: Final = frozenset({"0", "false", "f", "no", "n", "off"})

_CONNECT_TIMEOUT: Final = 10.0
_PATIENCE: Final = 20.0
"""How long a declare or publish is tried again while RabbitMQ refuses it without storing
anything (see ``_not_stored``)."""
_RETRY_PAUSES: Final = (0.05, 1.0)
"""First and longest pause between those tries."""
_FLUSH_TIMEOUT: Final = 5.0
"""How long ``close`` waits for settles still being sent."""
_RECONNECT_INTERVAL: Final = 1.0
"""Seconds between attempts to reconnect a lost connection (aio-pika's default is 5)."""
_TOPIC_PREFETCH: Final = 256
"""Stream messages a subscription receives ahead of its reader (streams need a prefetch)."""
_MAX_PREFETCH: Final = 65535
"""The largest AMQP prefetch count: ``last_message`` takes a whole last chunk."""
_MAX_SHORTSTR: Final = 255
_QUORUM: Final = {"x-queue-type": "quorum"}
_STREAM: Final = {"x-queue-type": "stream"}
_PENDING: Final = b"pending"
_PUBLISHED: Final = b"published"
PUBLISH_ID_HEADER: Final = "llama-mesh-publish-id"
"""The header naming one publish of a task message: duplicates of a msg_id differ in it."""
_CONSUMED: Final = "=consumed"
"""Suffix of a msg_id's consumption claim (``=``: a queue name cannot make it up)."""
_NODE_DOWN: Final = "down or inaccessible"
"""In RabbitMQ's NOT_FOUND for a durable queue whose node is still starting it."""
_NOT_READY: Final = (_NODE_DOWN, "does not have a replica on the local node")
"""What RabbitMQ says of a queue it is still starting: after a restart, and for a stream
just declared (its member on this node starts a moment later)."""
_TOO_LARGE_RE = re.compile(r"message size (\d+) is larger than configured max size (\d+)")

# --------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True, slots=True)
class RabbitMqSettings:
    """Where the RabbitMQ broker is and how its objects are named.

    Attributes:
        url: the AMQP URL (``amqp://`` or ``amqps://``), credentials and vhost included.
        exchange_name: the prefix of every queue and stream (see the module docstring).
    """

    url: str = field(default=DEFAULT_URL, repr=False)
    exchange_name: str = DEFAULT_EXCHANGE_NAME

    def __post_init__(self) -> None:
        _check_url(self.url)
        if not is_name(self.exchange_name) or self.exchange_name.startswith("amq."):
            raise ValueError(
                f"exchange_name: {self.exchange_name!r} is not a valid prefix: dot-separated "
                "tokens of [A-Za-z0-9_-], not starting with 'amq.'"
            )

    @classmethod
    def from_config(
        cls, fields: Mapping[str, object], environ: Mapping[str, str]
    ) -> RabbitMqSettings:
        """Settings from a deployment file's ``message-queue`` fields (Llama Deploy 0.8's
        ``RabbitMQMessageQueueConfig``), each missing one from ``RABBITMQ_<FIELD>`` in
        ``environ`` (names in any case), then the default.

        When ``username``, ``password`` and ``host`` are all set, the URL is built from them
        with ``port``, ``vhost`` and ``secure`` (``amqps``) and replaces ``url``. Raises
        ``ValueError`` naming the field (or variable) of a bad value.
        """
        unknown = sorted(set(fields) - {*_FIELDS, *_BOOL_FIELDS})
        if unknown:
            raise ValueError(f"unknown rabbitmq message-queue field(s): {', '.join(unknown)}")
        env = {name.upper(): value for name, value in environ.items()}
        source = _Source(fields, env)
        username, password, host = (source.text(n) for n in ("username", "password", "host"))
        port, vhost, secure = source.port(), source.text("vhost"), source.flag("secure")
        url = source.text("url") or DEFAULT_URL
        if username and password and host:
            url = _build_url(username, password, host, port, vhost, secure=bool(secure))
        return cls(url=url, exchange_name=source.text("exchange_name") or DEFAULT_EXCHANGE_NAME)

    @property
    def redacted_url(self) -> str:
        """:attr:`url` with its password replaced by ``***`` (for logs and status)."""
        parts = urllib.parse.urlsplit(self.url)
        if parts.password is None:
            return self.url
        user = parts.username or ""
        host = parts.netloc.rpartition("@")[2]
        return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))

    def to_json(self) -> str:
        """These settings as JSON (password included: for a child process, not a log)."""
        return json.dumps({"url": self.url, "exchange_name": self.exchange_name})

    @classmethod
    def from_json(cls, text: str) -> RabbitMqSettings:
        """The settings :meth:`to_json` wrote; ``ValueError`` for anything else."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"rabbitmq settings are not JSON: {exc}") from None
        if not isinstance(data, dict) or set(data) != {"url", "exchange_name"}:
            raise ValueError("rabbitmq settings JSON must have exactly url and exchange_name")
        if not all(isinstance(value, str) for value in data.values()):
            raise ValueError("rabbitmq settings JSON: url and exchange_name must be strings")
        return cls(url=data["url"], exchange_name=data["exchange_name"])


@dataclass(frozen=True, slots=True)
class _Source:
    """A field's value: the deployment file's, else ``RABBITMQ_<FIELD>``, else ``None``."""

    fields: Mapping[str, object]
    env: Mapping[str, str]

    def raw(self, name: str) -> tuple[object, str]:
        """The value and where it came from (for error messages)."""
        value = self.fields.get(name)
        if value is not None:
            return value, name
        variable = f"{ENV_PREFIX}{name.upper()}"
        return self.env.get(variable), variable

    def text(self, name: str) -> str | None:
        value, where = self.raw(name)
        if value is None or isinstance(value, str):
            return value or None
        raise ValueError(f"{where}: expected a string, got {value!r}")

    def port(self) -> int | None:
        value, where = self.raw("port")
        if value is None or value == "":
            return None
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536:
            return value
        raise ValueError(f"{where}: expected a port number (1-65535), got {value!r}")

    def flag(self, name: str) -> bool | None:
        value, where = self.raw(name)
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ValueError(f"{where}: expected true or false, got {value!r}")


def _build_url(
    username: str, password: str, host: str, port: int | None, vhost: str | None, *, secure: bool
) -> str:
    """``amqp[s]://user:password@host[:port][/vhost]``, each part percent-encoded."""
    quote = urllib.parse.quote
    url = f"{'amqps' if secure else 'amqp'}://{quote(username, safe='')}:"
    url += f"{quote(password, safe='')}@{host}"
    if port is not None:
        url += f":{port}"
    return url + (f"/{quote(vhost, safe='')}" if vhost else "/")


def _check_url(url: str) -> None:
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a port that is not a number
    except ValueError as exc:
        raise ValueError(f"url: not a valid AMQP URL ({exc})") from None
    if parts.scheme not in _SCHEMES:
        raise ValueError(f"url: unknown scheme {parts.scheme!r} (expected amqp or amqps)")
    if not parts.hostname:
        raise ValueError("url: has no host")


# --------------------------------------------------------------------------------------------
# Error translation: the one place where aio-pika/aiormq errors become QueueErrors.

_UNAVAILABLE: Final[tuple[type[BaseException], ...]] = (
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
    aiormq.exceptions.DeliveryError,
    aio_pika.exceptions.ChannelClosed,
    ConnectionError,
    TimeoutError,
    OSError,
)


def translate_error(exc: BaseException, what: str = "a message") -> BaseException:
    """The ``QueueError`` for an aio-pika/aiormq (or socket) error; others come back as is.

    RabbitMQ's refusal of a message over its ``max_message_size`` becomes
    :class:`MessageTooLargeError` (``what`` names the message); a lost connection or
    channel, an unconfirmed publish and a timeout become :class:`QueueUnavailableError`;
    any other AMQP error a plain :class:`QueueError`.
    """
    if isinstance(exc, QueueError):
        return exc
    too_large = _TOO_LARGE_RE.search(str(exc))
    if too_large is not None:
        size, limit = int(too_large[1]), int(too_large[2])
        return MessageTooLargeError(what, size, limit, limit_name="RabbitMQ max_message_size")
    if isinstance(exc, _UNAVAILABLE) or _closed_connection(exc) or _rejected(exc):
        return QueueUnavailableError(f"RabbitMQ is unavailable: {exc!r}")
    if isinstance(exc, aiormq.exceptions.AMQPError):
        return QueueError(f"RabbitMQ error: {exc!r}")
    return exc


def _closed_connection(exc: BaseException) -> bool:
    """Whether ``exc`` is the plain ``RuntimeError`` aiormq and aio-pika raise for a channel
    asked of a closed connection (``<Connection ...> closed``): a lost connection, like the
    others; a worker must give its task back, not fail it as the workflow's error."""
    return type(exc) is RuntimeError and str(exc).endswith(" closed")


def _rejected(exc: BaseException) -> bool:
    """Whether ``exc`` is the bare ``Exception`` aiormq fails the operations still waiting on
    a channel with when the channel closes without a reason (its connection was lost)."""
    return type(exc) is Exception and not exc.args


@contextlib.contextmanager
def _translated(what: str = "a message") -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        translated = translate_error(exc, what)
        if translated is exc:
            raise
        raise translated from exc


class _Crashed(QueueUnavailableError):
    """RabbitMQ crashed an operation that stores nothing: a look at a stream it is still
    creating (see :meth:`RabbitMqBroker.stream_started`), a declare (see
    :meth:`RabbitMqBroker.declare`) or a consume (see :meth:`_Consumer.start`)."""


class _Unconfirmed(QueueUnavailableError):
    """A task message's publish that RabbitMQ did not confirm before the channel or its
    connection was lost: it may be stored or not. Publishing it again under a new publish id
    is safe (see :meth:`RabbitMqBroker.publish_task`)."""


@contextlib.contextmanager
def _crashes_retried(what: str) -> Iterator[None]:
    """Raise :class:`_Crashed` (tried again) for ``what``, an operation that stores nothing,
    when RabbitMQ crashed its channel, closing the connection with INTERNAL_ERROR.

    RabbitMQ 3.10 now and then does so on a loaded machine for a quorum queue whose leader
    is still starting: a declare (another client declaring it too), a consume (``badmatch``
    ``noproc`` in ``rabbit_quorum_queue:consume/3``). A crash of another channel of the
    connection fails the operation just the same."""
    try:
        yield
    except QueueUnavailableError as exc:
        crash = exc.__cause__
        if isinstance(crash, aiormq.exceptions.ConnectionInternalError):
            raise _Crashed(f"RabbitMQ crashed {what}: {crash!r}") from crash
        raise


_STREAM_CRASHES: Final = (
    aiormq.exceptions.ConnectionInternalError,
    aiormq.exceptions.ConnectionResourceError,
)
"""How RabbitMQ 3.10 closes a connection when a channel crashed on a starting stream:
INTERNAL_ERROR, or RESOURCE_ERROR "Stream not found"."""


def _not_stored(exc: QueueError) -> bool:
    """Whether ``exc``'s operation stored nothing, and trying again can help: the message was
    returned as unroutable or nacked (a quorum queue with no leader yet, just after a
    restart, refuses to take responsibility for it), the queue is not ready (see
    :data:`_NOT_READY` and :class:`_Crashed`), or the channel or its connection was
    closed before anything was sent (the connection is down: a restarted node is not
    reconnected to yet, and the robust connection reopens the channel when it is)."""
    cause = exc.__cause__
    return (
        isinstance(exc, _Crashed)
        or isinstance(cause, aiormq.exceptions.DeliveryError)  # returned or nacked
        or (
            isinstance(cause, aiormq.exceptions.ChannelClosed)
            and any(text in str(cause) for text in _NOT_READY)
        )
        or (
            isinstance(cause, aiormq.exceptions.ChannelInvalidStateError)
            and str(cause).endswith(" closed")
        )
        or (cause is not None and _closed_connection(cause))
    )


async def _patiently(operation: Callable[[], Awaitable[T]]) -> T:
    """Run ``operation`` (a declare, or a publish with its declare), again after a pause
    while RabbitMQ refused it without storing anything (:func:`_not_stored`) or did not
    confirm a task message (:class:`_Unconfirmed`), for up to :data:`_PATIENCE` seconds: a
    restarted node must not fail every caller meanwhile."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _PATIENCE
    pause = _RETRY_PAUSES[0]
    while True:
        try:
            return await operation()
        except QueueError as exc:
            retry = _not_stored(exc) or isinstance(exc, _Unconfirmed)
            if not retry or loop.time() + pause > deadline:
                raise
            logger.debug("RabbitMQ refused, trying again in %ss: %s", pause, exc)
        await asyncio.sleep(pause)
        pause = min(pause * 2, _RETRY_PAUSES[1])


async def _ignore(_message: aiormq.abc.DeliveredMessage) -> None:
    """A consumer callback that keeps nothing."""


def _succeeded(task: asyncio.Task[None]) -> bool:
    return not task.cancelled() and task.exception() is None


def _delivery_count(message: aio_pika.abc.AbstractIncomingMessage) -> int:
    """1 + the quorum queue's count of earlier returns of ``message``."""
    returned = (message.headers or {}).get("x-delivery-count", 0)
    return 1 + returned if isinstance(returned, int) else 1


# --------------------------------------------------------------------------------------------
# The broker


class RabbitMqBroker(Broker):
    """A :class:`Broker` on RabbitMQ. Create it with :func:`connect_rabbitmq`."""

    def __init__(
        self,
        connection: aio_pika.abc.AbstractRobustConnection,
        channel: aio_pika.abc.AbstractRobustChannel,
        settings: RabbitMqSettings,
        dedup: KeyValueStore,
    ) -> None:
        self.connection = connection
        self.channel = channel
        """Publishes (with confirms) and declarations; iterators have channels of their own."""
        self._prefix = settings.exchange_name
        self._url = settings.url
        self._side: aio_pika.abc.AbstractConnection | None = None
        """A plain connection for brief looks at streams that RabbitMQ may crash (see
        :meth:`stream_started`); opened when first needed, again after it is lost."""
        self._side_lock = asyncio.Lock()
        self._dedup = dedup
        self.closed = False
        self._declared: set[str] = set()
        self.unsettled: collections.Counter[str] = collections.Counter()
        """Per queue, the deliveries this broker's consumers hold unsettled."""
        self._iterators: set[_Iterator[Any, Any]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._availability: list[Callable[[str | None], None]] = []
        connection.close_callbacks.add(self._on_connection_lost)
        connection.reconnect_callbacks.add(self._on_reconnected)

    # -- plumbing shared with the iterators

    def check_open(self) -> None:
        """Raise :class:`QueueUnavailableError` when closed."""
        if self.closed:
            raise QueueUnavailableError("the RabbitMQ broker is closed")

    def spawn(self, work: Awaitable[Any], *, name: str) -> None:
        """Run ``work`` in a task that :meth:`close` waits for (a while, then cancels); its
        errors are logged."""
        task = asyncio.create_task(self._logged(work, name), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _logged(work: Awaitable[Any], name: str) -> None:
        try:
            await work
        except Exception as exc:  # a settle on a lost channel: RabbitMQ requeued the message
            logger.debug("%s failed: %r", name, translate_error(exc))

    def forget(self, iterator: _Iterator[Any, Any]) -> None:
        """Stop tracking an iterator that shut down."""
        self._iterators.discard(iterator)

    def _on_connection_lost(self, _sender: object, exc: BaseException | None) -> None:
        if self.closed:
            return
        reason = f"the connection to RabbitMQ is lost ({exc!r}); reconnecting"
        for listener in self._availability:
            listener(reason)

    def _on_reconnected(self, _sender: object) -> None:
        self._declared.clear()  # the broker may have lost non-durable state; declare again
        for listener in self._availability:
            listener(None)

    def on_availability(self, listener: Callable[[str | None], None]) -> None:
        self._availability.append(listener)

    def queue_name(self, queue: str) -> str:
        """The quorum queue of work queue ``queue``."""
        check_name("queue", queue)
        return f"{self._prefix}.tasks.{queue}"

    def stream_name(self, topic: str) -> str:
        """The stream of topic ``topic``."""
        check_name("topic", topic)
        return f"{self._prefix}.topics.{topic}"

    @contextlib.asynccontextmanager
    async def using(
        self, channel: aio_pika.abc.AbstractRobustChannel | None = None, what: str = "a message"
    ) -> AsyncIterator[aio_pika.abc.AbstractRobustChannel]:
        """``channel`` (default: the broker's own) for one operation, errors translated.

        RabbitMQ closes a channel on a channel error (a message over its size limit, a
        queue declared with other arguments); then the broker's own channel is replaced, so
        the next operation does not find it closed.
        """
        own = channel is None
        current = self.channel if channel is None else channel
        try:
            with _translated(what):
                yield current
        except QueueError as exc:
            channel_error = isinstance(exc.__cause__, aiormq.exceptions.ChannelClosed)
            if own and channel_error and current is self.channel:
                with contextlib.suppress(QueueError):  # the connection is down: it recovers
                    self.channel = await _open_publishing_channel(self.connection)
                    self.spawn(current.close(), name="rabbitmq-close-failed-channel")
            raise

    async def declare(
        self,
        name: str,
        arguments: Mapping[str, str],
        *,
        channel: aio_pika.abc.AbstractRobustChannel | None = None,
        robust: bool = False,
    ) -> aio_pika.abc.AbstractQueue:
        """Declare the durable queue or stream ``name`` (idempotent) on ``channel`` (default:
        the broker's own); ``robust``: declare it again, with its consumers, when the
        connection comes back. A declare RabbitMQ crashed is made again once the robust
        connection is back (see :func:`_crashes_retried`): it stores nothing a second one
        would not.
        """

        async def declare() -> aio_pika.abc.AbstractQueue:
            with _crashes_retried(f"the declare of {name!r}"):
                async with self.using(channel) as current:
                    return await current.declare_queue(
                        name, durable=True, arguments=dict(arguments), robust=robust
                    )

        return await _patiently(declare)

    async def _publish_once(
        self, name: str, arguments: Mapping[str, str], message: aio_pika.Message, what: str
    ) -> None:
        """Publish to queue/stream ``name`` and wait for the broker's confirm, declaring it
        first (once; a stream, until it runs: see :meth:`stream_started`). A publish that
        failed unavailable forgets the declare: a message returned as unroutable (the queue
        was deleted since it was declared here) is declared again when tried again (see
        :func:`_patiently`)."""
        if name not in self._declared:
            await self.declare(name, arguments)
            if arguments is _STREAM:
                await self.stream_started(name)
            self._declared.add(name)
        try:
            async with self.using(what=what) as channel:
                await channel.default_exchange.publish(message, routing_key=name, mandatory=True)
        except QueueUnavailableError:
            self._declared.discard(name)
            raise

    # -- work queues

    async def publish_task(self, queue: str, data: bytes, *, msg_id: str) -> None:
        self.check_open()
        name = self.queue_name(queue)
        if not msg_id or len(msg_id.encode()) > _MAX_SHORTSTR:
            raise ValueError(f"invalid msg_id {msg_id!r}: 1 to {_MAX_SHORTSTR} bytes")
        claim = self._claim_key(queue, msg_id)
        if not await self._claim(claim):
            logger.debug("dropped a duplicate of message %r on queue %r", msg_id, queue)
            return
        what = f"task message {msg_id!r}"

        async def publish() -> None:
            self.check_open()  # closed meanwhile: no more tries
            # Each try has a publish id of its own: if a try the connection cut off stored
            # its copy after all, the first copy delivered claims the msg_id and the other
            # one is dropped on delivery as a duplicate (see is_duplicate).
            message = aio_pika.Message(
                data,
                message_id=msg_id,
                headers={PUBLISH_ID_HEADER: uuid.uuid4().hex},
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            )
            try:
                await self._publish_once(name, _QUORUM, message, what)
            except QueueUnavailableError as exc:
                raise _Unconfirmed(f"{what} was not confirmed: {exc}") from exc.__cause__

        await _patiently(publish)
        await self._dedup.put(claim, _PUBLISHED)

    def _claim_key(self, queue: str, msg_id: str) -> str:
        """The dedup key of ``msg_id``'s publish claim on ``queue``."""
        return f"{self._prefix}.{queue}.{hashlib.sha256(msg_id.encode()).hexdigest()}"

    async def is_duplicate(self, queue: str, message: aio_pika.abc.AbstractIncomingMessage) -> bool:
        """Whether ``message`` (delivered from work queue ``queue``) is a duplicate: another
        publish of its msg_id was delivered first. The first delivery claims the id for its
        publish id; redeliveries of that publish find their own claim. When the bucket
        cannot be read, the message counts as new: a duplicate may run, nothing is lost."""
        publish_id = (message.headers or {}).get(PUBLISH_ID_HEADER)
        if not message.message_id or not isinstance(publish_id, str | bytes):
            return False  # published without a publish id: nothing to tell it apart by
        mine = publish_id.encode() if isinstance(publish_id, str) else publish_id
        key = self._claim_key(queue, message.message_id) + _CONSUMED
        try:
            try:
                await self._dedup.create(key, mine)
            except KeyExistsError:
                entry = await self._dedup.get(key)
                return entry is not None and entry.value != mine
        except QueueError as exc:
            logger.warning(
                "cannot tell whether message %r of queue %r is a duplicate, running it: %s",
                message.message_id,
                queue,
                exc,
            )
        return False

    async def _claim(self, claim: str) -> bool:
        """Whether a message whose id has the dedup key ``claim`` is to be published: no
        earlier publish of it was confirmed within the bucket's TTL."""
        try:
            await self._dedup.create(claim, _PENDING)
        except KeyExistsError:
            entry = await self._dedup.get(claim)
            return entry is None or entry.value != _PUBLISHED
        return True

    def consume_tasks(self, queue: str, options: ConsumerOptions) -> Subscription[Delivery]:
        self.check_open()
        if not 0 < options.max_in_flight <= _MAX_PREFETCH:
            raise ValueError(f"max_in_flight must be 1 to {_MAX_PREFETCH}")
        if options.ack_wait <= 0 or options.max_deliver < 1:
            raise ValueError("ack_wait must be positive and max_deliver at least 1")
        consumer = _Consumer(self, queue, options)
        self._iterators.add(consumer)
        return consumer

    async def queue_depth(self, queue: str) -> int:
        self.check_open()
        name = self.queue_name(queue)
        declared = await self.declare(name, _QUORUM)
        ready = declared.declaration_result.message_count or 0
        return ready + self.unsettled[name]

    async def purge_queue(self, queue: str) -> None:
        self.check_open()
        declared = await self.declare(self.queue_name(queue), _QUORUM)
        async with self.using():
            await declared.purge()

    # -- topics

    async def publish(self, topic: str, data: bytes) -> None:
        self.check_open()
        message = aio_pika.Message(data, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        name, what = self.stream_name(topic), f"message on {topic!r}"
        await _patiently(lambda: self._publish_once(name, _STREAM, message, what))

    def subscribe(self, topic: str) -> Subscription[bytes]:
        self.check_open()
        subscription = _TopicSubscription(self, self.stream_name(topic))
        self._iterators.add(subscription)
        return subscription

    async def last_message(self, topic: str) -> bytes | None:
        self.check_open()
        name = self.stream_name(topic)
        latest: list[tuple[int, bytes]] = []

        async def collect(message: aiormq.abc.DeliveredMessage) -> None:
            # No await before the append: aiormq runs this in a task it creates when the
            # delivery arrives, so every delivery sent before cancel-ok is in by then.
            offset = (message.header.properties.headers or {}).get("x-stream-offset")
            latest.append((offset if isinstance(offset, int) else -1, message.body))

        try:
            await _patiently(lambda: self._consume_and_cancel(name, "last", _MAX_PREFETCH, collect))
        except QueueError as exc:
            missing = exc.__cause__
            if isinstance(missing, aiormq.exceptions.ChannelNotFoundEntity) and (
                _NODE_DOWN not in str(missing)
            ):
                return None  # never published to, or deleted
            raise
        return max(latest)[1] if latest else None

    async def _consume_and_cancel(
        self,
        name: str,
        offset: str,
        prefetch: int,
        on_message: aiormq.abc.ConsumerCallback,
    ) -> None:
        """Consume stream ``name`` from ``offset`` and cancel at once, on a channel of its own
        (RabbitMQ closes the channel of a consume it refuses) of the side connection: a
        stream still starting crashes that connection, not the one of the broker's
        publishes and consumers. That crash raises :class:`_Crashed`."""
        side = await self._side_connection()
        try:
            with _translated():
                async with side.channel() as channel:
                    await channel.set_qos(prefetch_count=prefetch)
                    amqp = await channel.get_underlay_channel()
                    consuming = await amqp.basic_consume(
                        name, on_message, arguments={"x-stream-offset": offset}
                    )
                    if consuming.consumer_tag is not None:
                        await amqp.basic_cancel(consuming.consumer_tag)
        except (QueueUnavailableError, RuntimeError) as exc:
            # Crashed by this look, or by a concurrent one: then aio-pika raises RuntimeError
            # ("closed") or the crash, maybe before the connection says it is closed.
            cause = exc.__cause__
            crashed = isinstance(exc, RuntimeError) or isinstance(cause, _STREAM_CRASHES)
            # A RuntimeError ("closed") comes translated (see _closed_connection):
            crashed = crashed or (cause is not None and _closed_connection(cause))
            if not crashed and not side.is_closed:
                raise
            if self._side is side:  # the next look opens a new one
                self._side = None
                self.spawn(side.close(), name="rabbitmq-close-side-connection")
            raise _Crashed(f"RabbitMQ is starting stream {name!r}: {exc!r}") from exc

    async def _side_connection(self) -> aio_pika.abc.AbstractConnection:
        """The side connection (see :meth:`_consume_and_cancel`), (re)opened if needed."""
        async with self._side_lock:
            if self._side is None or self._side.is_closed:
                with _translated():
                    self._side = await aio_pika.connect(self._url, timeout=_CONNECT_TIMEOUT)
            return self._side

    async def stream_started(self, name: str) -> None:
        """Return once RabbitMQ runs stream ``name`` on this node (else raise the refusal
        :func:`_not_stored` tells to try again).

        A declare of a stream that another client is creating at that moment returns before
        the stream's writer runs, and RabbitMQ 3.10 crashes the channel of a publish to it
        then (``function_clause`` in ``osiris_writer:write(none, ...)``, fixed in 4.0.x);
        the crash closes the whole connection with INTERNAL_ERROR. A consume starts only on
        a running member (else RabbitMQ refuses it: "does not have a replica on the local
        node"), so one that starts shows the stream ready for publishes.
        """
        await self._consume_and_cancel(name, "next", 1, _ignore)

    async def delete_topic(self, topic: str) -> None:
        self.check_open()
        name = self.stream_name(topic)
        self._declared.discard(name)
        async with self.using() as channel:
            await channel.queue_delete(name)

    # -- closing

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        iterators = list(self._iterators)
        for iterator in iterators:
            iterator.shutdown()
        await asyncio.gather(*(it.stopped() for it in iterators), return_exceptions=True)
        if self._tasks:  # flush: settles and channel closes still under way
            await asyncio.wait(set(self._tasks), timeout=_FLUSH_TIMEOUT)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(Exception):  # a connection already lost is closed anyway
            await self.connection.close()
        if self._side is not None:
            with contextlib.suppress(Exception):
                await self._side.close()


async def connect_rabbitmq(settings: RabbitMqSettings, *, dedup: KeyValueStore) -> Broker:
    """Connect to RabbitMQ (a robust connection: it reconnects by itself).

    ``dedup`` is the key-value bucket holding ``msg_id`` claims; its TTL is the window in
    which a second publish of an id is dropped. Raises :class:`QueueUnavailableError` when
    the broker cannot be reached or refuses the credentials.
    """
    with _translated():
        connection = await aio_pika.connect_robust(
            settings.url, timeout=_CONNECT_TIMEOUT, reconnect_interval=_RECONNECT_INTERVAL
        )
    try:
        channel = await _open_publishing_channel(connection)
    except BaseException:
        await connection.close()
        raise
    logger.info("connected to RabbitMQ at %s", settings.redacted_url)
    return RabbitMqBroker(connection, channel, settings, dedup)


async def _open_publishing_channel(
    connection: aio_pika.abc.AbstractRobustConnection,
) -> aio_pika.abc.AbstractRobustChannel:
    """A channel whose publishes wait for the broker's confirm and fail when unroutable."""
    with _translated():
        return await connection.channel(publisher_confirms=True, on_return_raises=True)


# --------------------------------------------------------------------------------------------
# Iterators


class _Iterator(abc.ABC, Generic[Q, R]):
    """What consumers and subscriptions share: a lazily started server-side consumer on a
    channel of their own, a local buffer of what it received (``Q``) that ``__anext__``
    hands out (as ``R``; a cancelled read loses nothing) and shutting down."""

    def __init__(self, owner: RabbitMqBroker, name: str) -> None:
        self.owner = owner
        self.name = name
        self.closed = False
        self.channel: aio_pika.abc.AbstractRobustChannel | None = None
        self.queue: aio_pika.abc.AbstractQueue | None = None
        self.tag: str | None = None
        self._starting: asyncio.Task[None] | None = None
        self.ready: collections.deque[Q] = collections.deque()
        self._wakeup = asyncio.Event()

    @abc.abstractmethod
    async def start(self) -> None:
        """Open the channel and start consuming."""

    @abc.abstractmethod
    def hand_out(self, item: Q) -> R | None:
        """What ``__anext__`` returns for ``item``; ``None`` skips it."""

    def received(self, item: Q) -> None:
        """Buffer ``item`` for ``__anext__``."""
        self.ready.append(item)
        self._wakeup.set()

    async def __anext__(self) -> R:
        while True:
            if self.closed or self.owner.closed:
                raise StopAsyncIteration
            await self.started()
            while self.ready:
                result = self.hand_out(self.ready.popleft())
                if result is not None:
                    return result
            self._wakeup.clear()
            await self._wakeup.wait()

    async def started(self) -> None:
        """Wait until consuming started; a cancelled wait leaves the start running, and the
        next read after a failed start tries again. A start that :meth:`shutdown` cancelled
        ends the read (``StopAsyncIteration``), not with the start's ``CancelledError``:
        only a cancelled caller sees that."""
        starting = self._starting
        if starting is None or (starting.done() and not _succeeded(starting)):
            starting = asyncio.create_task(_patiently(self._start_once), name=self.name)
            self._starting = starting
        try:
            await asyncio.shield(starting)
        except asyncio.CancelledError:
            caller = asyncio.current_task()
            if self.closed and starting.cancelled() and not (caller and caller.cancelling()):
                raise StopAsyncIteration from None
            raise

    async def _start_once(self) -> None:
        try:
            await self.start()
        except QueueError:
            with contextlib.suppress(Exception):  # already closed by the broker's refusal
                await self.close_channel()
            raise

    async def open_channel(self, prefetch: int) -> aio_pika.abc.AbstractRobustChannel:
        with _translated():
            # After a lost connection: once it is back (unavailable if it stays away).
            await asyncio.wait_for(self.owner.connection.ready(), _PATIENCE)
            channel = await self.owner.connection.channel()
            await channel.set_qos(prefetch_count=prefetch)
        self.channel = channel
        return channel

    def shutdown(self) -> None:
        """End pending and later reads, and a start still under way."""
        if self.closed:
            return
        self.closed = True
        self._wakeup.set()
        self.owner.forget(self)
        if self._starting is not None:
            self._starting.cancel()

    async def stopped(self) -> None:
        """After :meth:`shutdown`: wait until a start under way has ended, so no consumer
        begins on a closed iterator."""
        await discard(self._starting)  # a failed start matters to no one now

    async def close_channel(self) -> None:
        channel, self.channel = self.channel, None
        if channel is not None and not channel.is_closed:
            await channel.close()


class _Consumer(_Iterator["_RabbitDelivery", Delivery], Subscription[Delivery]):
    def __init__(self, owner: RabbitMqBroker, queue: str, options: ConsumerOptions) -> None:
        super().__init__(owner, owner.queue_name(queue))
        self.work_queue = queue
        self.options = options
        self.held: set[_RabbitDelivery] = set()
        """Deliveries received and not yet settled (being checked, handed out or in
        :attr:`ready`)."""
        self._checking = asyncio.Lock()
        """Duplicate checks one at a time (a fair lock): deliveries keep their order."""

    async def start(self) -> None:
        channel = await self.open_channel(self.options.max_in_flight)
        self.queue = await self.owner.declare(self.name, _QUORUM, channel=channel, robust=True)
        with _crashes_retried(f"the consume of {self.name!r}"), _translated():
            self.tag = await self.queue.consume(self._on_message)

    async def _on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        count = _delivery_count(message)
        delivery = _RabbitDelivery(self, message, count)
        self.held.add(delivery)
        self.owner.unsettled[self.name] += 1
        if self.closed:
            delivery.finish(requeue=True)
        elif count > self.options.max_deliver:
            logger.warning(
                "dropping message %r of %s: delivery %d is past max_deliver %d",
                message.message_id,
                self.name,
                count,
                self.options.max_deliver,
            )
            delivery.finish(requeue=False)
        else:
            delivery.arm(self.options.ack_wait)
            await self._check(delivery)

    async def _check(self, delivery: _RabbitDelivery) -> None:
        """Hand ``delivery`` out unless it is a duplicate (then drop it) or was settled (its
        ack_wait ran out) or the consumer closed (then requeue it) meanwhile."""
        async with self._checking:
            duplicate = await self.owner.is_duplicate(self.work_queue, delivery.message)
        if delivery.settled:
            return
        if duplicate:
            logger.info(
                "dropping a duplicate of message %r of %s: another publish of it was delivered",
                delivery.message.message_id,
                self.name,
            )
            delivery.finish(requeue=False)
        elif self.closed:
            delivery.finish(requeue=True)
        else:
            self.received(delivery)

    def hand_out(self, item: _RabbitDelivery) -> Delivery | None:
        return None if item.settled else item  # settled: its ack_wait ran out meanwhile

    def settled(self, delivery: _RabbitDelivery) -> None:
        """Forget a settled delivery; the last one of a closed consumer closes its channel."""
        if delivery in self.held:
            self.held.discard(delivery)
            self.owner.unsettled[self.name] -= 1
        if self.closed and not self.held:
            self.owner.spawn(self.close_channel(), name=f"rabbitmq-close-{self.name}")

    async def aclose(self) -> None:
        """Stop consuming and requeue what was received but not handed out; deliveries
        handed out can still be settled (or time out)."""
        if self.closed:
            return
        self.shutdown()
        await self.stopped()
        if self.queue is not None and self.tag is not None and not self.owner.closed:
            with contextlib.suppress(Exception):  # a lost channel delivers nothing more
                await self.queue.cancel(self.tag)
        while self.ready:
            self.ready.popleft().finish(requeue=True)
        if not self.held:
            with contextlib.suppress(Exception):
                await self.close_channel()


class _RabbitDelivery(Delivery):
    def __init__(
        self, consumer: _Consumer, message: aio_pika.abc.AbstractIncomingMessage, count: int
    ) -> None:
        self._consumer = consumer
        self.message = message
        self._count = count
        self.settled = False
        """The caller settled it, or its ack_wait ran out."""
        self._timer: asyncio.TimerHandle | None = None

    @property
    def data(self) -> bytes:
        return self.message.body

    @property
    def delivery_count(self) -> int:
        return self._count

    @property
    def _last(self) -> bool:
        return self._count >= self._consumer.options.max_deliver

    def arm(self, seconds: float, *, requeue: bool = True) -> None:
        """(Re)start the timer that requeues this delivery (drops it when it was the last)."""
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(seconds, self.finish, requeue and not self._last)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def finish(self, requeue: bool) -> None:
        """Settle on the broker, in the background: requeue, or ack (drop)."""
        self.settled = True
        self._disarm()
        owner = self._consumer.owner
        if not owner.closed:  # else the closing connection gives the message back
            owner.spawn(self._send(requeue=requeue), name=f"rabbitmq-settle-{self._count}")

    async def _send(self, *, requeue: bool) -> None:
        """Requeue or ack on the broker (errors as QueueErrors); either way it is settled."""
        try:
            with _translated():
                if requeue:
                    await self.message.nack(requeue=True)
                else:
                    await self.message.ack()
        finally:
            self._consumer.settled(self)

    def _take(self) -> bool:
        """Claim the caller's one settle; False when already settled (or timed out)."""
        self._consumer.owner.check_open()
        if self.settled:
            return False
        self.settled = True
        return True

    async def ack(self) -> None:
        if self._take():
            await self._done(requeue=False)

    async def term(self) -> None:
        if self._take():
            await self._done(requeue=False)

    async def nak(self, delay: float = 0.0) -> None:
        if not self._take():
            return
        if self._last or delay <= 0:
            await self._done(requeue=not self._last)
        else:
            self.arm(delay)

    async def _done(self, *, requeue: bool) -> None:
        """Settle now, waiting until the frame is written."""
        self._disarm()
        await self._send(requeue=requeue)

    async def in_progress(self) -> None:
        self._consumer.owner.check_open()
        if not self.settled:
            self.arm(self._consumer.options.ack_wait)


class _TopicSubscription(
    _Iterator[aio_pika.abc.AbstractIncomingMessage, bytes], Subscription[bytes]
):
    def __init__(self, owner: RabbitMqBroker, name: str) -> None:
        super().__init__(owner, name)
        self._arguments: dict[str, Any] = {"x-stream-offset": "first"}
        """The consume arguments; the robust queue re-consumes with them after a reconnect,
        so the offset is kept just past the last message handed out."""

    async def start(self) -> None:
        channel = await self.open_channel(_TOPIC_PREFETCH)
        self.queue = await self.owner.declare(self.name, _STREAM, channel=channel, robust=True)
        await self.owner.stream_started(self.name)
        with _translated():
            self.tag = await self.queue.consume(self._on_message, arguments=self._arguments)

    async def _on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        self.received(message)

    def hand_out(self, item: aio_pika.abc.AbstractIncomingMessage) -> bytes:
        offset = item.headers.get("x-stream-offset")
        if isinstance(offset, int):
            self._arguments["x-stream-offset"] = offset + 1
        # Stream consumers acknowledge to get more (the prefetch); nothing is removed.
        self.owner.spawn(item.ack(), name=f"rabbitmq-credit-{self.name}")
        return item.body

    async def aclose(self) -> None:
        """End the subscription and close its channel."""
        if self.closed:
            return
        self.shutdown()
        await self.stopped()
        with contextlib.suppress(Exception):  # a lost channel is closed already
            await self.close_channel()
