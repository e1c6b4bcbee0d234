"""The Redis broker: work queues and topics on Redis streams (Redis 7.0 or later).

Layout on the server, for the key prefix ``P`` = ``llama-mesh:<namespace>`` (queue and topic
names carry the deployment's name, so several deployments share one Redis;
``redis-cli KEYS 'llama-mesh:*'`` shows them):

* ``P:queue:<q>``: the stream of work queue ``q``, with one consumer group (``workers``)
  shared by every consumer of the queue; each consumer is a group member of its own name.
  An entry has the payload (``d``) and how many deliveries it had before it was last
  appended (``n``); its delivery count is ``n`` plus the count in the group's pending list.
* ``P:queue:<q>:later``: a sorted set of nak'ed entries waiting out their delay (score: when
  they are due, in the server's clock).
* ``P:dead``: the dead letters of every queue (terminated, or past ``max_deliver``), capped
  at about :data:`_DEAD_LETTERS` entries, for an operator to look at; nothing reads them.
* ``P:topic:<t>``: the stream of topic ``t``.
* ``P:dedup:<msg_id>``: a published ``msg_id``, for two minutes.

How the work-queue rules map onto streams:

* Publishing is one script: ``SET P:dedup:<msg_id> NX EX 120``, and ``XADD`` only when that
  set the key, so a duplicate is dropped atomically.
* A consumer reads new entries with ``XREADGROUP ... BLOCK``. Before it blocks it runs one
  script that moves due delayed entries back onto the stream and answers how long until the
  next thing that needs it: the oldest pending entry's ``ack_wait`` deadline, the next
  delayed entry, and at most ``ack_wait`` (an entry delivered elsewhere after this look has
  its deadline no sooner). The block lasts that long, so a consumer wakes for work, never on
  a polling period; an idle consumer looks once per ``ack_wait``, capped at
  :data:`_LONG_POLL` seconds so that a silently dead connection is noticed.
* A delivery not settled within ``ack_wait`` is reclaimed (``XAUTOCLAIM``, min-idle
  ``ack_wait``) by a waiting consumer; one whose delivery count would pass ``max_deliver``
  becomes a dead letter instead. ``in_progress()`` resets the idle time (``XCLAIM`` to
  itself, ``JUSTID``).
* ``ack()`` is ``XACK`` + ``XDEL`` (so ``queue_depth``, the stream's length, counts waiting and
  unsettled entries); ``term()`` also writes a dead letter. ``nak(delay)`` removes the entry
  and appends it again, at once or through the delayed set: an appended entry wakes every
  blocked consumer, in any process; for a delay, consumers in this process are woken to
  set their timers, those in other processes find it at their next look (within ``ack_wait``,
  at most :data:`_LONG_POLL` seconds late).
  A nak of the ``max_deliver``-th delivery makes it a dead letter.
* A read interrupted on our side (a cancelled ``__anext__``, a lost connection) may leave
  entries delivered to the consumer that it never saw: the next read adopts them from the
  pending list, and ``aclose()`` gives them back to the queue. A consumer that dies without
  settling leaves its entries to be reclaimed by others after ``ack_wait``.

Topics: ``publish`` is ``XADD``; a subscriber reads from ``0`` and follows with ``XREAD
BLOCK`` from the last id it saw; ``last_message`` is ``XREVRANGE ... COUNT 1``;
``delete_topic`` is ``DEL``.

``ack_wait`` and ``max_deliver`` are each consumer's own (the ones it reclaims and
dead-letters with), not the queue's as with NATS's durable consumer.

Durability: what Redis acknowledged survives a crash of the machine only with ``appendonly
yes`` and ``appendfsync always``; with ``everysec`` (Redis's default) such a crash can lose
the last second of acknowledged publishes and settles (a crash of Redis alone loses nothing
either way: the append-only file is written before Redis replies). Redis Cluster is not
supported (a message's dedup key and its queue may live on different nodes).

All redis-py errors are translated by :func:`translate_error` into the ``QueueError`` tree.
Commands are retried a few times on a lost connection (redis-py ``Retry``): a task publish
retried after a lost reply is stored once (its ``msg_id``), a topic publish may be stored
twice. A consumer or subscriber keeps trying with a backoff until Redis is back, and
:meth:`on_availability` listeners hear when it goes and comes back.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import re
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Final, TypeVar, cast

import redis.exceptions
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from llama_mesh.server.aio import cancel_and_wait
from llama_mesh.server.queues.broker import Broker, ConsumerOptions, Delivery, check_name
from llama_mesh.server.queues.errors import (
    MessageTooLargeError,
    QueueError,
    QueueUnavailableError,
)
from llama_mesh.server.queues.iterators import Subscription

logger = logging.getLogger(__name__)

T = TypeVar("T")

_GROUP: Final = "workers"
_DEDUP_WINDOW: Final = 120
"""Seconds a ``msg_id`` is remembered (as long as NATS's duplicate window)."""
_LONG_POLL: Final = 5.0
"""The longest one blocking read lasts, so that a dead connection is noticed."""
_PENDING_SCAN: Final = 1000
"""Pending entries looked at for the next deadline (they are at most the consumers'
``max_in_flight`` together)."""
_DEAD_LETTERS: Final = 10_000
_TOPIC_BATCH: Final = 100
_BACKOFF: Final = (0.1, 2.0)
"""First and longest pause between attempts while Redis is unreachable."""
_CONNECT_TIMEOUT: Final = 5.0
_DEFAULT_MAX_BULK: Final = 512 * 1024 * 1024
"""Redis's default ``proto-max-bulk-len``, used when ``CONFIG GET`` is not allowed."""
_NAMESPACE_RE = re.compile(r"^[A-Za-z0-9_.-]+$")

# --------------------------------------------------------------------------------------------
# Scripts. Each runs atomically; under ``appendfsync always`` its effects are on disk before
# the reply. A delivery is named by its entry id and its delivery count, so a stale delivery
# (reclaimed since by another consumer, or by this one again) changes nothing.

_LUA_FIELDS: Final = """
local function fields(flat)
  local f = {}
  for i = 1, #flat, 2 do f[flat[i]] = flat[i + 1] end
  return f
end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function dead_letter(dead, queue, data, n, reason)
  redis.call('XADD', dead, 'MAXLEN', '~', DEAD_LETTERS, '*', 'queue', queue, 'd', data,
             'deliveries', n, 'reason', reason)
end
""".replace("DEAD_LETTERS", str(_DEAD_LETTERS))

_PUBLISH_TASK: Final = """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[2]) then
  redis.call('XADD', KEYS[2], '*', 'd', ARGV[1], 'n', '0')
  return 1
end
return 0
"""

_CLAIM: Final = (
    _LUA_FIELDS
    + """
-- KEYS: stream, dead. ARGV: group, consumer, min idle ms, count, max_deliver, queue.
local claimed, cursor, budget = {}, '0-0', tonumber(ARGV[4])
repeat
  local r = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], cursor,
                       'COUNT', budget)
  cursor = r[1]
  for _, e in ipairs(r[2]) do
    local id, f = e[1], fields(e[2])
    local p = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
    local total = tonumber(f.n) + tonumber(p[1][4])
    if total > tonumber(ARGV[5]) then
      redis.call('XACK', KEYS[1], ARGV[1], id)
      redis.call('XDEL', KEYS[1], id)
      dead_letter(KEYS[2], ARGV[6], f.d, total - 1, 'max_deliver')
    else
      claimed[#claimed + 1] = {id, f.d, total}
      budget = budget - 1
    end
  end
until cursor == '0-0' or budget == 0
return claimed
"""
)

_NEXT_WAKE: Final = (
    _LUA_FIELDS
    + """
-- KEYS: stream, later. ARGV: group, ack_wait ms, longest wait ms.
-- Appends the due delayed entries; answers the ms until the next deadline.
local now = now_ms()
for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 100)) do
  local _, n, data = cmsgpack.unpack(m)
  redis.call('XADD', KEYS[1], '*', 'd', data, 'n', n)
  redis.call('ZREM', KEYS[2], m)
end
local wait = tonumber(ARGV[3])
local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
if #first > 0 then wait = math.min(wait, tonumber(first[2]) - now) end
for _, e in ipairs(redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', PENDING_SCAN)) do
  wait = math.min(wait, tonumber(ARGV[2]) - tonumber(e[3]))
end
return math.max(wait, 0)
""".replace("PENDING_SCAN", str(_PENDING_SCAN))
)

_REQUEUE: Final = (
    _LUA_FIELDS
    + """
-- KEYS: stream, later, dead. ARGV: group, id, consumer, expected delivery count ('' for
-- any), consumed ('1': the delivery counts, '0': it never reached the caller), delay ms,
-- max_deliver, queue. Returns 1 when requeued, 2 when dead-lettered, 0 when not current.
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if #p == 0 or p[1][2] ~= ARGV[3] then return 0 end
local e = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2])
if #e == 0 then
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
  return 0
end
local f = fields(e[1][2])
local n = tonumber(f.n) + tonumber(p[1][4])
if ARGV[4] ~= '' and n ~= tonumber(ARGV[4]) then return 0 end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
if ARGV[5] == '0' then n = n - 1 end
if ARGV[5] == '1' and n >= tonumber(ARGV[7]) then
  dead_letter(KEYS[3], ARGV[8], f.d, n, 'max_deliver')
  return 2
end
local delay = tonumber(ARGV[6])
if delay <= 0 then
  redis.call('XADD', KEYS[1], '*', 'd', f.d, 'n', n)
else
  redis.call('ZADD', KEYS[2], now_ms() + delay, cmsgpack.pack(ARGV[2], n, f.d))
end
return 1
"""
)

_TERM: Final = (
    _LUA_FIELDS
    + """
-- KEYS: stream, dead. ARGV: group, id, queue.
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
local e = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
if #e > 0 then
  local f = fields(e[1][2])
  local count = 0
  if #p > 0 then count = tonumber(p[1][4]) end
  dead_letter(KEYS[2], ARGV[3], f.d, tonumber(f.n) + count, 'term')
end
return 1
"""
)

_TOUCH: Final = (
    _LUA_FIELDS
    + """
-- KEYS: stream. ARGV: group, id, consumer, expected delivery count.
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if #p == 0 or p[1][2] ~= ARGV[3] then return 0 end
local e = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2])
if #e == 0 or tonumber(fields(e[1][2]).n) + tonumber(p[1][4]) ~= tonumber(ARGV[4]) then
  return 0
end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, ARGV[2], 'JUSTID')
return 1
"""
)

_FORGET_CONSUMER: Final = """
-- KEYS: stream. ARGV: group, consumer. Deletes the group member unless it holds entries.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then return 0 end
return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
"""

# --------------------------------------------------------------------------------------------
# Error translation: the one place where redis-py errors become QueueErrors.

_UNAVAILABLE: Final[tuple[type[BaseException], ...]] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.ReadOnlyError,
    TimeoutError,
    OSError,
)


def translate_error(exc: BaseException) -> BaseException:
    """The ``QueueError`` for a redis-py (or socket) error; other exceptions come back as is.

    Connection, timeout and "still loading" errors become :class:`QueueUnavailableError`;
    any other Redis error a plain :class:`QueueError`. (A payload over Redis's
    ``proto-max-bulk-len`` is refused before it is sent, by :meth:`RedisBroker.check_size`:
    Redis itself would only drop the connection.)
    """
    if isinstance(exc, QueueError):
        return exc
    if isinstance(exc, _UNAVAILABLE):
        return QueueUnavailableError(f"Redis is unavailable: {_describe(exc)}")
    if isinstance(exc, redis.exceptions.RedisError):
        return QueueError(f"Redis error: {_describe(exc)}")
    return exc


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _is_nogroup(exc: BaseException) -> bool:
    return isinstance(exc, redis.exceptions.ResponseError) and "NOGROUP" in str(exc)


class _Waiters:
    """Wakes every coroutine waiting for "look again"; notify is synchronous."""

    def __init__(self) -> None:
        self._futures: set[asyncio.Future[None]] = set()
        self.generation = 0
        """Counts notifications: a caller that compares it before and after an await knows
        whether it missed one."""

    def notify_all(self) -> None:
        self.generation += 1
        for future in self._futures:
            if not future.done():
                future.set_result(None)
        self._futures.clear()

    def future(self) -> asyncio.Future[None]:
        """A future done at the next :meth:`notify_all`."""
        future = asyncio.get_running_loop().create_future()
        self._futures.add(future)
        future.add_done_callback(self._futures.discard)
        return future


async def _first(work: Awaitable[T], *wakes: asyncio.Future[Any]) -> tuple[bool, T | None]:
    """``(True, result)`` of ``work``, or ``(False, None)`` when a wake comes first (``work``
    is then cancelled). Cancelling the caller cancels ``work`` too."""
    working = asyncio.ensure_future(work)
    waiting: set[asyncio.Future[Any]] = {working, *wakes}
    try:
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wake in wakes:
            wake.cancel()
        if not working.done():
            await cancel_and_wait(working)
    if working.cancelled():
        return False, None
    return True, working.result()


# --------------------------------------------------------------------------------------------
# Work queues


class _RedisDelivery(Delivery):
    def __init__(self, consumer: _RedisConsumer, entry_id: str, data: bytes, count: int) -> None:
        self._consumer = consumer
        self.entry_id = entry_id
        self._data = data
        self._count = count
        self._settled = False
        self.released = False

    @property
    def data(self) -> bytes:
        return self._data

    @property
    def delivery_count(self) -> int:
        return self._count

    async def _settle(self, work: Callable[[], Awaitable[object]]) -> None:
        """Run ``work`` once; the consumer's slot is freed even when it fails (the entry is
        then reclaimed after ``ack_wait``), and a failed settle may be tried again."""
        self._consumer.broker.check_open()
        if self._settled:
            return
        try:
            await work()
            self._settled = True
        finally:
            self._consumer.release(self)

    async def ack(self) -> None:
        await self._settle(lambda: self._consumer.broker.ack(self._consumer.queue, self.entry_id))

    async def term(self) -> None:
        await self._settle(lambda: self._consumer.broker.term(self._consumer.queue, self.entry_id))

    async def nak(self, delay: float = 0.0) -> None:
        consumer = self._consumer
        await self._settle(
            lambda: consumer.broker.requeue(
                consumer, self.entry_id, expected=self._count, delay=delay
            )
        )

    async def in_progress(self) -> None:
        consumer = self._consumer
        consumer.broker.check_open()
        if not self._settled:
            await consumer.broker.touch(consumer, self.entry_id, self._count)


class _RedisConsumer(Subscription[Delivery]):
    """One member of a queue's consumer group; see the module docstring."""

    def __init__(self, broker: RedisBroker, queue: str, options: ConsumerOptions) -> None:
        self.broker = broker
        self.queue = queue
        self.options = options
        self.name = f"c-{uuid.uuid4().hex}"
        self._ready: collections.deque[_RedisDelivery] = collections.deque()
        self._held: list[_RedisDelivery] = []
        """Deliveries fetched and not settled, handed out or still in ``_ready``."""
        self._interrupted = True
        """Whether a read may have been delivered entries never seen (also at the start: the
        group may need creating)."""
        self._closed = False
        self.wakes = _Waiters()
        self._reading = asyncio.Lock()
        """Held while reading, so that :meth:`give_back` sees what an ending read took."""

    @property
    def closed(self) -> bool:
        return self._closed or self.broker.closing

    def release(self, delivery: _RedisDelivery) -> None:
        if not delivery.released:
            delivery.released = True
            self._held.remove(delivery)
            self.wakes.notify_all()

    def held_ids(self) -> set[str]:
        return {d.entry_id for d in self._held}

    def _keep(self, entry_id: str, data: bytes, count: int) -> None:
        delivery = _RedisDelivery(self, entry_id, data, count)
        self._held.append(delivery)
        self._ready.append(delivery)

    async def __anext__(self) -> Delivery:
        pause = _BACKOFF[0]
        while True:
            if self.closed:
                raise StopAsyncIteration
            if self._ready:
                return self._ready.popleft()
            free = self.options.max_in_flight - len(self._held)
            if free <= 0:
                await _first(self.wakes.future(), self.broker.stopping())
                continue
            try:
                async with self._reading:
                    await self._fetch(free)
                pause = _BACKOFF[0]
            except QueueUnavailableError as exc:
                logger.info("reading queue %r failed (%s); again in %.1f s", self.queue, exc, pause)
                await _first(asyncio.sleep(pause), self.broker.stopping())
                pause = min(pause * 2, _BACKOFF[1])

    async def _fetch(self, free: int) -> None:
        """Fill ``_ready`` with up to ``free`` deliveries, or wait until there may be some."""
        broker = self.broker
        if self._interrupted:
            await broker.ensure_group(self.queue)
            for entry_id, data, count in await broker.orphans(self):
                self._keep(entry_id, data, count)
            self._interrupted = False
            if self._ready:
                return
        self._interrupted = True
        for entry_id, data, count in await broker.reclaim(self, free):
            self._keep(entry_id, data, count)
        if not self._ready:
            seen = self.wakes.generation
            wait_ms = await broker.next_wake(self)
            if self.wakes.generation != seen:
                self._interrupted = False
                return  # something changed meanwhile (a nak with a delay): look again
            done, entries = await _first(
                broker.read_new(self, free, max(wait_ms, 1)),
                self.wakes.future(),
                broker.stopping(),
            )
            if not done:
                return  # interrupted: what the read took is adopted next time
            for entry_id, data, count in entries or []:
                self._keep(entry_id, data, count)
        self._interrupted = False

    async def aclose(self) -> None:
        """Stop consuming: entries fetched but never handed out go back to the queue at once;
        unsettled deliveries stay pending until settled or timed out."""
        if self._closed:
            return
        self._closed = True
        self.wakes.notify_all()
        self.broker.forget(self)
        if not self.broker.closing:
            with contextlib.suppress(QueueError):
                await self.give_back()

    async def give_back(self) -> None:
        """Requeue what this consumer took and never handed out (once a read it was doing
        has ended); forget it in its group."""
        async with self._reading:
            unseen = [d.entry_id for d in self._ready]
            self._ready.clear()
            for entry_id in unseen:
                await self.broker.requeue(self, entry_id, expected=None, delay=0.0)
            for entry_id, _, _ in await self.broker.orphans(self):
                await self.broker.requeue(self, entry_id, expected=None, delay=0.0)
            await self.broker.forget_consumer(self)


# --------------------------------------------------------------------------------------------
# Topics


class _TopicSubscription(Subscription[bytes]):
    def __init__(self, broker: RedisBroker, topic: str) -> None:
        self._broker = broker
        self._key = broker.topic_key(topic)
        self._last = b"0-0"
        self._ready: collections.deque[bytes] = collections.deque()
        self._closed = False
        self._wakes = _Waiters()

    async def __anext__(self) -> bytes:
        pause = _BACKOFF[0]
        while True:
            if self._closed or self._broker.closing:
                raise StopAsyncIteration
            if self._ready:
                return self._ready.popleft()
            try:
                _, entries = await _first(
                    self._broker.read_topic(self._key, self._last),
                    self._wakes.future(),
                    self._broker.stopping(),
                )
                pause = _BACKOFF[0]
            except QueueUnavailableError as exc:
                logger.info("reading topic %r failed (%s); again in %.1f s", self._key, exc, pause)
                await _first(asyncio.sleep(pause), self._broker.stopping())
                pause = min(pause * 2, _BACKOFF[1])
                continue
            for entry_id, data in entries or []:
                self._last = entry_id
                self._ready.append(data)

    async def aclose(self) -> None:
        """Stop the subscription; a pending ``__anext__`` ends."""
        self._closed = True
        self._wakes.notify_all()


# --------------------------------------------------------------------------------------------
# The broker


Entry = tuple[str, bytes, int]
"""A delivery as read: entry id, payload, delivery count."""


class RedisBroker(Broker):
    """A :class:`Broker` on Redis streams. Create it with :func:`connect_redis`."""

    def __init__(self, client: Redis, *, namespace: str, max_bulk: int) -> None:
        self.redis = client
        self.prefix = f"llama-mesh:{namespace}"
        self.closed = False
        self._max_bulk = max_bulk
        self._stop = asyncio.Event()
        self._consumers: set[_RedisConsumer] = set()
        self._available = True
        self._listeners: list[Callable[[str | None], None]] = []
        self._watch: asyncio.Task[None] | None = None
        self._publish_task = client.register_script(_PUBLISH_TASK)
        self._claim = client.register_script(_CLAIM)
        self._next_wake = client.register_script(_NEXT_WAKE)
        self._requeue = client.register_script(_REQUEUE)
        self._term = client.register_script(_TERM)
        self._touch = client.register_script(_TOUCH)
        self._forget_consumer = client.register_script(_FORGET_CONSUMER)

    # -- plumbing

    def check_open(self) -> None:
        """Raise :class:`QueueUnavailableError` when closed."""
        if self.closed:
            raise QueueUnavailableError("the Redis broker is closed")

    def check_size(self, data: bytes, what: str) -> None:
        """Refuse ``data`` over Redis's ``proto-max-bulk-len`` with an error naming both
        sizes (Redis would drop the connection)."""
        if len(data) > self._max_bulk:
            raise MessageTooLargeError(
                what, len(data), self._max_bulk, limit_name="Redis proto-max-bulk-len"
            )

    @property
    def closing(self) -> bool:
        """Whether :meth:`close` has begun: iterators end."""
        return self._stop.is_set()

    def stopping(self) -> asyncio.Future[Any]:
        """A future done when the broker closes."""
        return asyncio.ensure_future(self._stop.wait())

    @contextlib.contextmanager
    def _seam(self) -> Iterator[None]:
        """Translate errors; a connection failure marks Redis unavailable until a ping
        succeeds again."""
        self.check_open()
        try:
            yield
        except Exception as exc:
            translated = translate_error(exc)
            if translated is exc:
                raise
            if isinstance(translated, QueueUnavailableError):
                self._went_down(str(translated))
            raise translated from exc

    async def _run(self, work: Callable[[], Any]) -> Any:
        """Await ``work()`` through the error seam (not even started when closed). Replies
        are redis-py's untyped RESP2 structures."""
        with self._seam():
            return await work()

    def queue_key(self, queue: str) -> str:
        """The stream of work queue ``queue``."""
        check_name("queue", queue)
        return f"{self.prefix}:queue:{queue}"

    def topic_key(self, topic: str) -> str:
        """The stream of topic ``topic``."""
        check_name("topic", topic)
        return f"{self.prefix}:topic:{topic}"

    @property
    def dead_key(self) -> str:
        """The dead-letter stream."""
        return f"{self.prefix}:dead"

    def forget(self, consumer: _RedisConsumer) -> None:
        self._consumers.discard(consumer)

    # -- availability

    def on_availability(self, listener: Callable[[str | None], None]) -> None:
        self._listeners.append(listener)

    def _went_down(self, reason: str) -> None:
        if not self._available or self.closed:
            return
        self._available = False
        logger.warning("Redis is unavailable: %s", reason)
        for listener in self._listeners:
            listener(reason)
        self._watch = asyncio.create_task(self._until_back(), name="redis-availability")

    async def _until_back(self) -> None:
        pause = _BACKOFF[0]
        while not self.closed:
            with contextlib.suppress(*_UNAVAILABLE):
                await self.redis.ping()
                break
            await _first(asyncio.sleep(pause), self.stopping())
            pause = min(pause * 2, _BACKOFF[1])
        if self.closed:
            return
        self._available = True
        logger.info("Redis is reachable again")
        for listener in self._listeners:
            listener(None)

    # -- work queues: the consumers' side

    async def ensure_group(self, queue: str) -> None:
        """Create the queue's stream and consumer group unless they exist."""
        try:
            await self._run(
                lambda: self.redis.xgroup_create(
                    self.queue_key(queue), _GROUP, id="0", mkstream=True
                )
            )
        except QueueError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _script(self, script: Any, keys: list[str], args: list[object]) -> Any:
        """Run a script; a missing group (a purged or lost queue) is created and it runs
        again."""
        try:
            return await self._run(lambda: script(keys=keys, args=args))
        except QueueError as exc:
            if not _is_nogroup(exc.__cause__ or exc):
                raise
        await self.ensure_group(keys[0].removeprefix(f"{self.prefix}:queue:"))
        return await self._run(lambda: script(keys=keys, args=args))

    async def reclaim(self, consumer: _RedisConsumer, count: int) -> list[Entry]:
        """Entries idle past ``ack_wait``, now this consumer's (too often delivered ones
        become dead letters)."""
        options = consumer.options
        rows = await self._script(
            self._claim,
            [self.queue_key(consumer.queue), self.dead_key],
            [
                *(_GROUP, consumer.name, _ms(options.ack_wait), count),
                *(options.max_deliver, consumer.queue),
            ],
        )
        return [(_text(row[0]), bytes(row[1]), int(row[2])) for row in rows]

    async def next_wake(self, consumer: _RedisConsumer) -> int:
        """Milliseconds until the consumer should look for reclaimable or due entries."""
        key = self.queue_key(consumer.queue)
        ack_wait = _ms(consumer.options.ack_wait)
        longest = min(ack_wait, _ms(_LONG_POLL))
        wait = await self._script(
            self._next_wake, [key, f"{key}:later"], [_GROUP, ack_wait, longest]
        )
        return int(wait)

    async def read_new(self, consumer: _RedisConsumer, count: int, block_ms: int) -> list[Entry]:
        """Entries never delivered to the group, waiting up to ``block_ms`` for some."""
        key = self.queue_key(consumer.queue)
        try:
            reply = await self._run(
                lambda: self.redis.xreadgroup(
                    _GROUP, consumer.name, {key: ">"}, count=count, block=block_ms
                )
            )
        except QueueError as exc:
            if not _is_nogroup(exc.__cause__ or exc):
                raise
            await self.ensure_group(consumer.queue)  # the stream was deleted
            return []
        return [
            (_text(entry_id), bytes(f[b"d"]), int(f[b"n"]) + 1)
            for _, entries in reply or []
            for entry_id, f in entries
        ]

    async def orphans(self, consumer: _RedisConsumer) -> list[Entry]:
        """Entries delivered to ``consumer`` that it never handed out (an interrupted read)."""
        key = self.queue_key(consumer.queue)
        pending = await self._run(
            lambda: self.redis.xpending_range(
                key, _GROUP, "-", "+", _PENDING_SCAN, consumername=consumer.name
            )
        )
        held = consumer.held_ids()
        rows = [row for row in pending if _text(row["message_id"]) not in held]
        if not rows:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for row in rows:
                pipe.xrange(key, row["message_id"], row["message_id"])
            replies = await self._run(pipe.execute)
        found: list[Entry] = []
        gone: list[str] = []
        for row, entries in zip(rows, replies, strict=True):
            entry_id = _text(row["message_id"])
            if not entries:
                gone.append(entry_id)  # purged meanwhile
                continue
            f = entries[0][1]
            found.append((entry_id, bytes(f[b"d"]), int(f[b"n"]) + int(row["times_delivered"])))
        if gone:
            await self._run(lambda: self.redis.xack(key, _GROUP, *gone))
        return found

    async def forget_consumer(self, consumer: _RedisConsumer) -> None:
        """Remove the consumer from its group unless it still holds entries."""
        await self._run(
            lambda: self._forget_consumer(
                keys=[self.queue_key(consumer.queue)], args=[_GROUP, consumer.name]
            )
        )

    # -- work queues: settling

    async def ack(self, queue: str, entry_id: str) -> None:
        """Remove the entry (whoever holds it now)."""
        key = self.queue_key(queue)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(key, _GROUP, entry_id)
            pipe.xdel(key, entry_id)
            await self._run(pipe.execute)

    async def term(self, queue: str, entry_id: str) -> None:
        """Remove the entry as a dead letter."""
        await self._script(
            self._term, [self.queue_key(queue), self.dead_key], [_GROUP, entry_id, queue]
        )

    async def requeue(
        self, consumer: _RedisConsumer, entry_id: str, *, expected: int | None, delay: float
    ) -> None:
        """Put the consumer's entry back: a nak of delivery ``expected`` (a dead letter if
        that was the last allowed), or (``expected=None``) one it never handed out."""
        key = self.queue_key(consumer.queue)
        await self._script(
            self._requeue,
            [key, f"{key}:later", self.dead_key],
            [
                *(_GROUP, entry_id, consumer.name, "" if expected is None else expected),
                *("0" if expected is None else "1", _ms(delay), consumer.options.max_deliver),
                consumer.queue,
            ],
        )
        if delay > 0:
            for other in self._consumers:
                if other.queue == consumer.queue:
                    other.wakes.notify_all()

    async def touch(self, consumer: _RedisConsumer, entry_id: str, count: int) -> None:
        """Restart the ``ack_wait`` clock of the consumer's delivery ``count`` of the entry."""
        await self._script(
            self._touch,
            [self.queue_key(consumer.queue)],
            [_GROUP, entry_id, consumer.name, count],
        )

    # -- topics: the subscribers' side

    async def read_topic(self, key: str, after: bytes) -> list[tuple[bytes, bytes]]:
        """Entries of a topic after id ``after``, waiting up to :data:`_LONG_POLL` for some."""
        reply = await self._run(
            lambda: self.redis.xread({key: after}, count=_TOPIC_BATCH, block=_ms(_LONG_POLL))
        )
        return [(bytes(i), bytes(f[b"d"])) for _, entries in reply or [] for i, f in entries]

    # -- the Broker interface

    async def publish_task(self, queue: str, data: bytes, *, msg_id: str) -> None:
        self.check_size(data, "a task message")
        key = self.queue_key(queue)
        stored = await self._run(
            lambda: self._publish_task(
                keys=[f"{self.prefix}:dedup:{msg_id}", key], args=[data, _DEDUP_WINDOW]
            )
        )
        if not stored:
            logger.debug("dropping duplicate of message %r on queue %r", msg_id, queue)

    def consume_tasks(self, queue: str, options: ConsumerOptions) -> Subscription[Delivery]:
        self.check_open()
        if options.max_in_flight < 1 or options.max_deliver < 1 or options.ack_wait <= 0:
            raise ValueError(f"invalid consumer options {options!r}")
        consumer = _RedisConsumer(self, queue, options)
        self.queue_key(queue)
        self._consumers.add(consumer)
        return consumer

    async def queue_depth(self, queue: str) -> int:
        key = self.queue_key(queue)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xlen(key)
            pipe.zcard(f"{key}:later")
            waiting, later = await self._run(pipe.execute)
        return int(waiting) + int(later)

    async def purge_queue(self, queue: str) -> None:
        key = self.queue_key(queue)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xtrim(key, maxlen=0)
            pipe.delete(f"{key}:later")
            await self._run(pipe.execute)

    async def publish(self, topic: str, data: bytes) -> None:
        self.check_size(data, "a topic message")
        await self._run(lambda: self.redis.xadd(self.topic_key(topic), {"d": data}))

    def subscribe(self, topic: str) -> Subscription[bytes]:
        self.check_open()
        return _TopicSubscription(self, topic)

    async def last_message(self, topic: str) -> bytes | None:
        rows = await self._run(lambda: self.redis.xrevrange(self.topic_key(topic), count=1))
        return bytes(rows[0][1][b"d"]) if rows else None

    async def delete_topic(self, topic: str) -> None:
        await self._run(lambda: self.redis.delete(self.topic_key(topic)))

    async def close(self) -> None:
        if self.closing:
            return
        self._stop.set()
        consumers = list(self._consumers)
        for consumer in consumers:
            consumer.wakes.notify_all()
        with contextlib.suppress(QueueError, TimeoutError):
            async with asyncio.timeout(_CONNECT_TIMEOUT):
                for consumer in consumers:
                    await consumer.give_back()
        self.closed = True
        if self._watch is not None:
            await cancel_and_wait(self._watch)
        await self.redis.aclose()


def _ms(seconds: float) -> int:
    return max(int(seconds * 1000), 0)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


# --------------------------------------------------------------------------------------------
# Settings


_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off", ""})
_ENV_PREFIX: Final = "REDIS_"


@dataclass(frozen=True, slots=True)
class RedisSettings:
    """Where the Redis broker is: the ``message-queue: {type: redis, ...}`` fields of a
    deployment file, with Llama Deploy 0.8's meaning and ``REDIS_*`` variables as fallbacks.

    ``host`` (with ``port``, default 6379, ``db``, ``username``, ``password`` and ``ssl``)
    builds the URL ``redis[s]://[user[:password]@]host:port[/db]`` and wins over ``url``;
    without ``host``, ``url`` is used as given and those fields must be unset. (Llama Deploy
    0.8 ignores ``host`` without ``port`` and a password without a username; here both
    count.) ``exclusive_mode`` is accepted and has no effect: it chose between Pub/Sub
    delivery modes, and a stream consumer group gives each message to one consumer anyway.

    ``namespace`` is not a YAML field: deployments use ``default`` (their queue and topic
    names already carry the deployment's name); the tests give each test its own, so they
    share one redis-server (keys ``llama-mesh:<namespace>:...``).
    """

    url: str = "redis://localhost:6379"
    host: str | None = None
    port: int | None = None
    db: int | None = None
    username: str | None = None
    password: str | None = None
    ssl: bool | None = None
    exclusive_mode: bool = False
    namespace: str = "default"

    def __post_init__(self) -> None:
        scheme = urllib.parse.urlsplit(self.url).scheme
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"url: {self.url!r} is not a redis://, rediss:// or unix:// URL")
        if self.port is not None and not 0 < self.port < 65536:
            raise ValueError(f"port: {self.port} is not a TCP port (1-65535)")
        if self.db is not None and self.db < 0:
            raise ValueError(f"db: {self.db} is negative")
        if self.host is None:
            stray = [
                name
                for name in ("port", "db", "username", "password", "ssl")
                if getattr(self, name) is not None
            ]
            if stray:
                raise ValueError(
                    f"{', '.join(stray)}: only used with host; without host put them in url"
                )
        if not _NAMESPACE_RE.match(self.namespace):
            raise ValueError(f"namespace: {self.namespace!r} is not [A-Za-z0-9_.-]+")

    @classmethod
    def from_config(cls, fields: Mapping[str, object], environ: Mapping[str, str]) -> RedisSettings:
        """The settings of a ``message-queue`` section: each field from the YAML, else from
        ``REDIS_<FIELD>``, else its default. A bad value is a ``ValueError`` naming the field
        (and the variable it came from)."""
        known = {f.name for f in dataclasses.fields(cls)} - {"namespace"}
        unknown = sorted(set(fields) - known - {"type"})
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: not a Redis message-queue field")
        values: dict[str, Any] = {}
        from_environment: list[str] = []
        for name in sorted(known):
            variable = f"{_ENV_PREFIX}{name.upper()}"
            if fields.get(name) is not None:
                values[name] = _typed(name, fields[name], name)
            elif environ.get(variable):
                values[name] = _typed(name, environ[variable], variable)
                from_environment.append(variable)
        try:
            return cls(**values)
        except ValueError as exc:
            if not from_environment:
                raise
            raise ValueError(
                f"{exc} (from the environment: {', '.join(from_environment)})"
            ) from exc

    @property
    def effective_url(self) -> str:
        """The URL connected to: built from ``host`` when given, else ``url``."""
        if self.host is None:
            return self.url
        auth = ""
        if self.username is not None or self.password is not None:
            auth = urllib.parse.quote(self.username or "", safe="")
            if self.password is not None:
                auth += ":" + urllib.parse.quote(self.password, safe="")
            auth += "@"
        scheme = "rediss" if self.ssl else "redis"
        path = "" if self.db is None else f"/{self.db}"
        return f"{scheme}://{auth}{self.host}:{self.port or 6379}{path}"

    @property
    def redacted_url(self) -> str:
        """:attr:`effective_url` with the password replaced by ``***``, for logs."""
        parts = urllib.parse.urlsplit(self.effective_url)
        if parts.password is None:
            return self.effective_url
        netloc = f"{parts.username or ''}:***@{parts.hostname}"
        if parts.port is not None:
            netloc += f":{parts.port}"
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))

    def to_json(self) -> str:
        """These settings as JSON (password included: hand it only to trusted processes)."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RedisSettings:
        """The settings :meth:`to_json` wrote."""
        values = json.loads(text)
        if not isinstance(values, dict):
            raise ValueError("Redis settings JSON must be an object")
        return cls(**values)


def _typed(name: str, value: object, source: str) -> object:
    """``value`` as field ``name``'s type; strings (environment variables) are parsed."""
    kind = {"port": int, "db": int, "ssl": bool, "exclusive_mode": bool}.get(name, str)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().isdigit():
            return int(value)
    elif isinstance(value, str):
        return value
    raise ValueError(f"{source}: {value!r} is not {'an' if kind is int else 'a'} {kind.__name__}")


async def connect_redis(settings: RedisSettings) -> RedisBroker:
    """Connect to Redis; a :class:`RedisBroker`. The first connection must succeed within
    a few seconds, else :class:`QueueUnavailableError`; later losses are retried."""
    client: Redis = Redis.from_url(
        settings.effective_url,
        client_name=f"llama-mesh:{settings.namespace}",
        socket_connect_timeout=_CONNECT_TIMEOUT,
        socket_timeout=_LONG_POLL + 10.0,
        retry=Retry(ExponentialWithJitterBackoff(cap=1.0, base=0.05), 3),
        retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
    )
    try:
        await client.ping()
        max_bulk = await _max_bulk(client)
    except Exception as exc:
        await client.aclose()
        translated = translate_error(exc)
        if translated is exc:
            raise
        # The caller names the broker (kind and URL, password hidden), as for RabbitMQ.
        raise QueueUnavailableError(f"cannot connect to Redis: {_describe(exc)}") from exc
    return RedisBroker(client, namespace=settings.namespace, max_bulk=max_bulk)


async def _max_bulk(client: Redis) -> int:
    """Redis's ``proto-max-bulk-len`` (its default when ``CONFIG`` is not allowed)."""
    try:
        reply = cast(dict[Any, Any], await client.config_get("proto-max-bulk-len"))
    except redis.exceptions.ResponseError:
        return _DEFAULT_MAX_BULK
    value = reply.get("proto-max-bulk-len", reply.get(b"proto-max-bulk-len"))
    return int(value) if value is not None else _DEFAULT_MAX_BULK
