"""The in-process broker and state store: asyncio only, in memory, for one process and
fast tests.

They behave like the NATS ones (all pass ``tests/unit/test_broker_contract.py`` or
``test_state_contract.py``):

* Work queues: consumers of a queue share its messages; an unsettled delivery is redelivered
  after ``ack_wait`` (``in_progress()`` restarts that timer); ``nak(delay)`` redelivers after
  ``delay``; redeliveries go before messages never delivered; a message whose delivery number
  reached ``max_deliver`` is dropped when it is nak'ed or times out. ``ack_wait`` and
  ``max_deliver`` belong to the queue (the latest ``consume_tasks`` call sets them, like the
  durable NATS consumer); ``max_in_flight`` belongs to each consumer. ``find_task``,
  ``queued_tasks`` and ``remove_task`` see every message not yet acked, terminated, dropped,
  removed or purged, delivered or not.
* ``msg_id`` deduplication remembers ids for two minutes (NATS's ``duplicate_window``), across
  all queues (NATS deduplicates per stream and all queues share one stream).
* Topics keep every message until ``delete_topic`` (no age limit).
* Key-value buckets: one increasing revision counter per bucket; a deletion (or a TTL expiry)
  is a tombstone with its own revision, like a NATS delete marker; deleting an absent key
  changes nothing and tells no watcher. TTL timers restart on every write.
* Timers are ``loop.call_later`` handles and every wait is on a future or a queue: nothing
  polls. Iterators returned by ``consume_tasks``, ``subscribe`` and ``watch`` have
  ``aclose()``, and cancelling a pending ``__anext__`` loses nothing.

Create them with ``InProcessBroker()`` and ``InProcessStateStore()``; the two share nothing.
Everything must run on one event loop.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from llama_mesh.server.queues.broker import Broker, ConsumerOptions, Delivery, check_name
from llama_mesh.server.queues.errors import (
    KeyExistsError,
    QueueUnavailableError,
    RevisionMismatchError,
)
from llama_mesh.server.queues.iterators import Subscription
from llama_mesh.server.queues.state import (
    KeyValueEntry,
    KeyValueStore,
    StateStore,
    check_key,
    watches,
)

logger = logging.getLogger(__name__)

DEDUP_WINDOW: Final = 120.0
"""Seconds a ``msg_id`` is remembered (NATS ``duplicate_window`` of the tasks stream)."""

_BUCKET_RE = re.compile(r"^[A-Za-z0-9_-]+$")


class _Waiters:
    """Wakes every coroutine waiting for "something changed"; notify is synchronous.

    ``asyncio.Condition`` needs its lock to notify, which timer callbacks cannot take.
    Callers check their condition, then ``await wait()`` with no await in between, so a
    notification cannot be missed.
    """

    def __init__(self) -> None:
        self._futures: set[asyncio.Future[None]] = set()

    def notify_all(self) -> None:
        for future in self._futures:
            if not future.done():
                future.set_result(None)
        self._futures.clear()

    async def wait(self) -> None:
        future = asyncio.get_running_loop().create_future()
        self._futures.add(future)
        try:
            await future
        finally:
            self._futures.discard(future)


class _End:
    """Put into an item queue to end its iterator."""


_END: Final = _End()


# ---------------------------------------------------------------------------------------------
# Work queues


@dataclass(eq=False)
class _Task:
    seq: int
    msg_id: str
    data: bytes
    deliveries: int = 0
    removed: bool = False
    timer: asyncio.TimerHandle | None = None

    def cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class _WorkQueue:
    """The messages of one queue: never delivered, to redeliver, and delivered (pending)."""

    def __init__(self) -> None:
        self.fresh: collections.deque[_Task] = collections.deque()
        self.redeliver: collections.deque[_Task] = collections.deque()
        self.pending: dict[int, _Task] = {}
        self.by_id: dict[str, _Task] = {}
        """Every message still in the queue, by ``msg_id``."""
        self.waiters = _Waiters()
        defaults = ConsumerOptions()
        self.ack_wait = defaults.ack_wait
        self.max_deliver = defaults.max_deliver

    def depth(self) -> int:
        return len(self.fresh) + len(self.redeliver) + len(self.pending)

    def queued(self) -> list[_Task]:
        """Every message still in the queue, in publish order."""
        return sorted(
            [*self.fresh, *self.redeliver, *self.pending.values()], key=lambda task: task.seq
        )

    def append(self, task: _Task) -> None:
        self.fresh.append(task)
        self.by_id[task.msg_id] = task
        self.waiters.notify_all()

    def take(self) -> _Task | None:
        """The next message to deliver (redeliveries first), now pending with a timer."""
        source = self.redeliver or self.fresh
        if not source:
            return None
        task = source.popleft()
        task.deliveries += 1
        self.pending[task.seq] = task
        self._arm(task, self.ack_wait, self._expired)
        return task

    def remove(self, task: _Task) -> None:
        if task.removed:
            return
        task.removed = True
        task.cancel_timer()
        if self.by_id.get(task.msg_id) is task:
            del self.by_id[task.msg_id]
        if self.pending.pop(task.seq, None) is None:
            for source in (self.fresh, self.redeliver):
                if task in source:
                    source.remove(task)
        self.waiters.notify_all()

    def restart_timer(self, task: _Task) -> None:
        self._arm(task, self.ack_wait, self._expired)

    def nak(self, task: _Task, delay: float) -> None:
        task.cancel_timer()
        if task.deliveries >= self.max_deliver:
            logger.debug("dropping message %s: nak'ed on delivery %s", task.seq, task.deliveries)
            self.remove(task)
        elif delay > 0:
            self._arm(task, delay, self._ready_again)
        else:
            self._ready_again(task)

    def purge(self) -> None:
        for task in [*self.fresh, *self.redeliver, *self.pending.values()]:
            task.removed = True
            task.cancel_timer()
        self.fresh.clear()
        self.redeliver.clear()
        self.pending.clear()
        self.by_id.clear()
        self.waiters.notify_all()

    def _arm(self, task: _Task, delay: float, callback: Callable[[_Task], None]) -> None:
        task.cancel_timer()
        task.timer = asyncio.get_running_loop().call_later(delay, callback, task)

    def _expired(self, task: _Task) -> None:
        task.timer = None
        if task.removed:
            return
        if task.deliveries >= self.max_deliver:
            logger.debug("dropping message %s: delivery %s timed out", task.seq, task.deliveries)
            self.remove(task)
        else:
            self._ready_again(task)

    def _ready_again(self, task: _Task) -> None:
        task.timer = None
        if task.removed:
            return
        self.pending.pop(task.seq, None)
        self.redeliver.append(task)
        self.waiters.notify_all()


class _InProcessDelivery(Delivery):
    def __init__(self, consumer: _InProcessConsumer, task: _Task) -> None:
        self._consumer = consumer
        self._task = task
        self._number = task.deliveries
        self._settled = False

    @property
    def data(self) -> bytes:
        return self._task.data

    @property
    def delivery_count(self) -> int:
        return self._number

    def _current(self) -> bool:
        """Whether this delivery is still the message's latest, unsettled delivery."""
        task = self._task
        return (
            not task.removed
            and task.deliveries == self._number
            and task.seq in self._consumer.wq.pending
        )

    def _settle(self) -> bool:
        """Mark settled and free the consumer's slot; False when already settled."""
        self._consumer.owner.check_open()
        if self._settled:
            return False
        self._settled = True
        self._consumer.release()
        return True

    async def ack(self) -> None:
        if self._settle():
            self._consumer.wq.remove(self._task)

    async def term(self) -> None:
        if self._settle():
            self._consumer.wq.remove(self._task)

    async def nak(self, delay: float = 0.0) -> None:
        if self._settle() and self._current():
            self._consumer.wq.nak(self._task, delay)

    async def in_progress(self) -> None:
        self._consumer.owner.check_open()
        if not self._settled and self._current():
            self._consumer.wq.restart_timer(self._task)


class _InProcessConsumer(Subscription[Delivery]):
    def __init__(self, owner: InProcessBroker, wq: _WorkQueue, max_in_flight: int) -> None:
        self.owner = owner
        self.wq = wq
        self._max_in_flight = max_in_flight
        self._held = 0
        self._closed = False

    def release(self) -> None:
        self._held -= 1
        self.wq.waiters.notify_all()

    async def __anext__(self) -> Delivery:
        while True:
            if self._closed or self.owner.closed:
                raise StopAsyncIteration
            if self._held < self._max_in_flight:
                task = self.wq.take()
                if task is not None:
                    self._held += 1
                    return _InProcessDelivery(self, task)
            await self.wq.waiters.wait()

    async def aclose(self) -> None:
        """Stop consuming; unsettled deliveries stay pending until settled or timed out."""
        self._closed = True
        self.wq.waiters.notify_all()


# ---------------------------------------------------------------------------------------------
# Topics


@dataclass(eq=False)
class _Topic:
    first: int = 0
    """Absolute index of ``log[0]``; ``delete_topic`` moves it past the forgotten messages."""
    log: list[bytes] = field(default_factory=list)
    waiters: _Waiters = field(default_factory=_Waiters)


class _TopicSubscription(Subscription[bytes]):
    def __init__(self, owner: InProcessBroker, topic: _Topic) -> None:
        self._owner = owner
        self._topic = topic
        self._next = topic.first
        self._closed = False

    async def __anext__(self) -> bytes:
        topic = self._topic
        while True:
            if self._closed or self._owner.closed:
                raise StopAsyncIteration
            self._next = max(self._next, topic.first)
            if self._next < topic.first + len(topic.log):
                data = topic.log[self._next - topic.first]
                self._next += 1
                return data
            await topic.waiters.wait()

    async def aclose(self) -> None:
        """Stop the subscription; a pending ``__anext__`` ends."""
        self._closed = True
        self._topic.waiters.notify_all()


# ---------------------------------------------------------------------------------------------
# Key-value buckets


@dataclass(eq=False)
class _Slot:
    value: bytes | None
    """``None`` is a tombstone (deleted or expired)."""
    revision: int
    timer: asyncio.TimerHandle | None = None

    def cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class _KeyWatch(Subscription[KeyValueEntry]):
    def __init__(self, store: InProcessKeyValueStore, prefix: str) -> None:
        self._store = store
        self.prefix = prefix
        self.items: asyncio.Queue[KeyValueEntry | _End] = asyncio.Queue()
        self._ended = False

    def end(self) -> None:
        self.items.put_nowait(_END)

    async def __anext__(self) -> KeyValueEntry:
        if self._ended:
            raise StopAsyncIteration
        item = await self.items.get()
        if isinstance(item, _End):
            self._ended = True
            raise StopAsyncIteration
        return item

    async def aclose(self) -> None:
        """Stop watching; a pending ``__anext__`` ends."""
        self._store.forget(self)
        self.end()


class InProcessKeyValueStore(KeyValueStore):
    """One in-memory bucket of :class:`InProcessStateStore`."""

    def __init__(self, owner: _InProcessRole, ttl: float | None) -> None:
        self._owner = owner
        self._ttl = ttl
        self._slots: dict[str, _Slot] = {}
        self._revision = 0
        self._watches: weakref.WeakSet[_KeyWatch] = weakref.WeakSet()

    async def get(self, key: str, *, deleted: bool = False) -> KeyValueEntry | None:
        self._owner.check_open()
        check_key(key)
        slot = self._slots.get(key)
        if slot is None or (slot.value is None and not deleted):
            return None
        return KeyValueEntry(key, slot.value, slot.revision)

    async def put(self, key: str, value: bytes) -> int:
        self._owner.check_open()
        check_key(key)
        return self._write(key, value)

    async def create(self, key: str, value: bytes) -> int:
        self._owner.check_open()
        check_key(key)
        slot = self._slots.get(key)
        if slot is not None and slot.value is not None:
            raise KeyExistsError(f"key {key!r} exists (revision {slot.revision})")
        return self._write(key, value)

    async def update(self, key: str, value: bytes, last_revision: int) -> int:
        self._owner.check_open()
        check_key(key)
        slot = self._slots.get(key)
        current = 0 if slot is None else slot.revision
        if current != last_revision:
            raise RevisionMismatchError(
                f"key {key!r} is at revision {current}, not {last_revision}"
            )
        return self._write(key, value)

    async def delete(self, key: str) -> None:
        self._owner.check_open()
        check_key(key)
        slot = self._slots.get(key)
        if slot is not None and slot.value is not None:
            self._write(key, None)

    async def keys(self, prefix: str = "") -> list[str]:
        return [entry.key for entry in await self.entries(prefix)]

    async def entries(self, prefix: str = "", *, deleted: bool = False) -> list[KeyValueEntry]:
        self._owner.check_open()
        return [
            KeyValueEntry(key, slot.value, slot.revision)
            for key, slot in sorted(self._slots.items())
            if (deleted or slot.value is not None) and key.startswith(prefix)
        ]

    def watch(
        self, prefix: str = "", *, include_existing: bool = True
    ) -> Subscription[KeyValueEntry]:
        self._owner.check_open()
        watch = _KeyWatch(self, prefix)
        if include_existing:
            for key in sorted(self._slots):
                slot = self._slots[key]
                if slot.value is not None and watches(prefix, key):
                    watch.items.put_nowait(KeyValueEntry(key, slot.value, slot.revision))
        self._watches.add(watch)
        return watch

    def forget(self, watch: _KeyWatch) -> None:
        self._watches.discard(watch)

    def close(self) -> None:
        for slot in self._slots.values():
            slot.cancel_timer()
        for watch in list(self._watches):
            watch.end()
        self._watches.clear()

    def _write(self, key: str, value: bytes | None) -> int:
        self._revision += 1
        old = self._slots.get(key)
        if old is not None:
            old.cancel_timer()
        slot = _Slot(value, self._revision)
        self._slots[key] = slot
        if self._ttl is not None:
            loop = asyncio.get_running_loop()
            slot.timer = loop.call_later(self._ttl, self._expire, key, slot)
        entry = KeyValueEntry(key, value, slot.revision)
        for watch in list(self._watches):
            if watches(watch.prefix, key):
                watch.items.put_nowait(entry)
        return slot.revision

    def _expire(self, key: str, slot: _Slot) -> None:
        slot.timer = None
        if self._slots.get(key) is not slot:
            return
        if slot.value is None:
            del self._slots[key]  # an old tombstone goes silently, like a NATS marker
        else:
            logger.debug("key %r expired (ttl %ss)", key, self._ttl)
            self._write(key, None)


# ---------------------------------------------------------------------------------------------
# The broker and the state store


class _InProcessRole:
    """What both in-process roles share: being open or closed."""

    what = "in-process queue"

    def __init__(self) -> None:
        self._closed = False

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def check_open(self) -> None:
        """Raise :class:`QueueUnavailableError` when closed."""
        if self._closed:
            raise QueueUnavailableError(f"the {self.what} is closed")


class InProcessBroker(_InProcessRole, Broker):
    """A :class:`Broker` held in this process's memory; see the module docstring."""

    what = "in-process broker"
    finds_tasks = True

    def __init__(self) -> None:
        super().__init__()
        self._seq = 0
        self._work_queues: dict[str, _WorkQueue] = {}
        self._seen_ids: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._topics: dict[str, _Topic] = {}

    def _work_queue(self, queue: str) -> _WorkQueue:
        check_name("queue", queue)
        wq = self._work_queues.get(queue)
        if wq is None:
            wq = self._work_queues[queue] = _WorkQueue()
        return wq

    def _topic(self, topic: str) -> _Topic:
        check_name("topic", topic)
        found = self._topics.get(topic)
        if found is None:
            found = self._topics[topic] = _Topic()
        return found

    def _is_duplicate(self, msg_id: str) -> bool:
        now = asyncio.get_running_loop().time()
        seen = self._seen_ids
        while seen:
            oldest, at = next(iter(seen.items()))
            if now - at < DEDUP_WINDOW:
                break
            del seen[oldest]
        if msg_id in seen:
            return True
        seen[msg_id] = now
        return False

    async def publish_task(self, queue: str, data: bytes, *, msg_id: str) -> None:
        self.check_open()
        wq = self._work_queue(queue)
        if self._is_duplicate(msg_id):
            logger.debug("dropping duplicate of message %r on queue %r", msg_id, queue)
            return
        self._seq += 1
        wq.append(_Task(self._seq, msg_id, bytes(data)))

    def consume_tasks(self, queue: str, options: ConsumerOptions) -> Subscription[Delivery]:
        self.check_open()
        if options.max_in_flight < 1 or options.max_deliver < 1 or options.ack_wait <= 0:
            raise ValueError(f"invalid consumer options {options!r}")
        wq = self._work_queue(queue)
        wq.ack_wait = options.ack_wait
        wq.max_deliver = options.max_deliver
        consumer = _InProcessConsumer(self, wq, options.max_in_flight)
        return consumer

    async def queue_depth(self, queue: str) -> int:
        self.check_open()
        return self._work_queue(queue).depth()

    async def purge_queue(self, queue: str) -> None:
        self.check_open()
        self._work_queue(queue).purge()

    async def find_task(self, queue: str, msg_id: str) -> bytes | None:
        self.check_open()
        task = self._work_queue(queue).by_id.get(msg_id)
        return None if task is None else task.data

    async def queued_tasks(self, queue: str) -> list[bytes]:
        self.check_open()
        return [task.data for task in self._work_queue(queue).queued()]

    async def remove_task(self, queue: str, msg_id: str) -> bool:
        self.check_open()
        wq = self._work_queue(queue)
        task = wq.by_id.get(msg_id)
        if task is None:
            return False
        wq.remove(task)
        return True

    async def publish(self, topic: str, data: bytes) -> None:
        self.check_open()
        found = self._topic(topic)
        found.log.append(bytes(data))
        found.waiters.notify_all()

    def subscribe(self, topic: str) -> Subscription[bytes]:
        self.check_open()
        return _TopicSubscription(self, self._topic(topic))

    async def last_message(self, topic: str) -> bytes | None:
        self.check_open()
        found = self._topic(topic)
        return found.log[-1] if found.log else None

    async def delete_topic(self, topic: str) -> None:
        self.check_open()
        found = self._topic(topic)
        found.first += len(found.log)
        found.log.clear()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for wq in self._work_queues.values():
            for task in [*wq.pending.values(), *wq.redeliver]:
                task.cancel_timer()
            wq.waiters.notify_all()
        for topic in self._topics.values():
            topic.waiters.notify_all()


class InProcessStateStore(_InProcessRole, StateStore):
    """A :class:`StateStore` held in this process's memory; see the module docstring."""

    what = "in-process state store"

    def __init__(self) -> None:
        super().__init__()
        self._buckets: dict[str, InProcessKeyValueStore] = {}

    async def kv(self, bucket: str, *, ttl: float | None = None) -> KeyValueStore:
        self.check_open()
        if not _BUCKET_RE.match(bucket):
            raise ValueError(f"invalid bucket name {bucket!r}: [A-Za-z0-9_-]")
        if ttl is not None and ttl <= 0:
            raise ValueError(f"invalid ttl {ttl!r}")
        store = self._buckets.get(bucket)
        if store is None:
            store = self._buckets[bucket] = InProcessKeyValueStore(self, ttl)
        return store

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for store in self._buckets.values():
            store.close()
