"""The message-queue interface every adapter implements.

The mesh needs three things from a message queue, and nothing else:

* **Work queues** (``publish_task`` / ``consume_tasks``): one durable queue per workflow
  service, shared by all of its replicas. A message is delivered to one consumer at a time,
  redelivered when it is not acknowledged within ``ack_wait`` (unless the consumer keeps it
  alive with ``in_progress()``), and never delivered more than ``max_deliver`` times.
  Publishing twice with the same ``msg_id`` stores the message once.
* **Topics** (``publish`` / ``subscribe`` / ``last_message``): ordered, retained logs (task
  events, human input sent to a running task). A subscriber first receives everything
  already stored, then new messages as they arrive, without polling.
* **Key-value buckets** (``kv``): the control plane's state, with compare-and-set and watches.

Payloads are opaque bytes (serialized protobuf from ``llama_mesh.v1.messages_pb2``).

Names: queue names and topic names are dot-separated tokens of ``[A-Za-z0-9_-]``; keys are
``[A-Za-z0-9_=./-]`` and must not start or end with ``.``.

Exceptions, all below :class:`QueueError`::

    QueueError
    ├── QueueUnavailableError   the broker cannot be reached / closed
    ├── MessageTooLargeError    a message or value over the broker's size limit
    ├── KeyExistsError          KeyValueStore.create on an existing key
    └── RevisionMismatchError   KeyValueStore.update with a stale revision
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Self


class QueueError(Exception):
    """Base class of every message-queue error."""


class QueueUnavailableError(QueueError):
    """The broker cannot be reached, or the adapter is closed."""


class MessageTooLargeError(QueueError):
    """A message or value larger than the broker takes in one message (NATS: its
    ``max_payload``); nothing was written. Trying again cannot help."""

    def __init__(self, what: str, size: int, limit: int) -> None:
        super().__init__(
            f"{what} is {size} bytes, more than the message queue's limit of {limit} bytes "
            "(NATS max_payload)"
        )
        self.size = size
        self.limit = limit


class KeyExistsError(QueueError):
    """``KeyValueStore.create`` found the key already present."""


class RevisionMismatchError(QueueError):
    """``KeyValueStore.update`` was given a revision that is no longer the latest."""


@dataclass(frozen=True, slots=True)
class ConsumerOptions:
    """How a work-queue consumer receives messages.

    Attributes:
        max_in_flight: how many delivered, not yet settled messages this consumer holds at
            most; ``consume_tasks`` does not fetch more until one is settled.
        ack_wait: seconds after which an unsettled message is redelivered (to any consumer),
            unless ``in_progress()`` was called within that time.
        max_deliver: how many times a message is delivered at most. The delivery whose
            ``delivery_count == max_deliver`` is the last one.
    """

    max_in_flight: int = 1
    ack_wait: float = 30.0
    max_deliver: int = 3


class Delivery(abc.ABC):
    """One delivery of a work-queue message. Settle it exactly once."""

    @property
    @abc.abstractmethod
    def data(self) -> bytes:
        """The message payload."""

    @property
    @abc.abstractmethod
    def delivery_count(self) -> int:
        """1 for the first delivery, 2 for the first redelivery, and so on."""

    @abc.abstractmethod
    async def ack(self) -> None:
        """Done: the message is removed and never delivered again."""

    @abc.abstractmethod
    async def nak(self, delay: float = 0.0) -> None:
        """Not done: deliver it again (to any consumer) after ``delay`` seconds."""

    @abc.abstractmethod
    async def term(self) -> None:
        """Give up: the message is removed and never delivered again (a dead letter)."""

    @abc.abstractmethod
    async def in_progress(self) -> None:
        """Still working: restart the ``ack_wait`` timer of this delivery."""


@dataclass(frozen=True, slots=True)
class KeyValueEntry:
    """One value of a key-value bucket; ``value is None`` marks a deletion in a watch."""

    key: str
    value: bytes | None
    revision: int


def watches(prefix: str, key: str) -> bool:
    """Whether a watch of ``prefix`` (see :meth:`KeyValueStore.watch`) covers ``key``."""
    if prefix and not prefix.endswith("."):
        return key == prefix
    return key.startswith(prefix)


class KeyValueStore(abc.ABC):
    """A bucket of keys; every write gets a new, increasing revision."""

    @abc.abstractmethod
    async def get(self, key: str) -> KeyValueEntry | None:
        """The current entry of ``key``, or ``None`` when absent or deleted."""

    @abc.abstractmethod
    async def put(self, key: str, value: bytes) -> int:
        """Write ``value`` unconditionally; returns the new revision."""

    @abc.abstractmethod
    async def create(self, key: str, value: bytes) -> int:
        """Write only if ``key`` is absent (or deleted); else raise :class:`KeyExistsError`."""

    @abc.abstractmethod
    async def update(self, key: str, value: bytes, last_revision: int) -> int:
        """Write only if the key's revision is ``last_revision``; else
        raise :class:`RevisionMismatchError`."""

    @abc.abstractmethod
    async def delete(self, key: str) -> None:
        """Delete ``key``; deleting an absent key is not an error."""

    @abc.abstractmethod
    async def keys(self, prefix: str = "") -> list[str]:
        """The present keys that start with ``prefix``, sorted."""

    @abc.abstractmethod
    async def entries(self, prefix: str = "") -> list[KeyValueEntry]:
        """The present entries whose keys start with ``prefix``, sorted by key: one pass
        over the bucket, where :meth:`keys` then :meth:`get` would read key by key."""

    @abc.abstractmethod
    def watch(
        self, prefix: str = "", *, include_existing: bool = True
    ) -> AsyncIterator[KeyValueEntry]:
        """Entries as they change under ``prefix`` (deletions have ``value None``).

        ``prefix`` is ``""`` (every key), a prefix ending with ``.`` (every key below it), or
        a whole key (that key only: a watch of one task must not read its neighbours).

        With ``include_existing`` the current entries come first. The iterator ends only
        when the consumer stops iterating (``aclose()``) or the adapter closes.
        """


class MessageQueue(abc.ABC):
    """A connection to a message broker. Use as an async context manager."""

    @abc.abstractmethod
    async def publish_task(self, queue: str, data: bytes, *, msg_id: str) -> None:
        """Append a message to the work queue ``queue``; duplicates of ``msg_id`` are dropped."""

    @abc.abstractmethod
    def consume_tasks(self, queue: str, options: ConsumerOptions) -> AsyncIterator[Delivery]:
        """Deliveries from ``queue``; consumers of the same queue share its messages."""

    @abc.abstractmethod
    async def queue_depth(self, queue: str) -> int:
        """How many messages wait in ``queue`` (delivered-but-unsettled ones included)."""

    @abc.abstractmethod
    async def purge_queue(self, queue: str) -> None:
        """Drop every message waiting in ``queue``."""

    @abc.abstractmethod
    async def publish(self, topic: str, data: bytes) -> None:
        """Append ``data`` to the retained log ``topic``."""

    @abc.abstractmethod
    def subscribe(self, topic: str) -> AsyncIterator[bytes]:
        """Everything stored on ``topic`` in order, then new messages as they are published.

        Ends only when the consumer stops iterating or the adapter closes.
        """

    @abc.abstractmethod
    async def last_message(self, topic: str) -> bytes | None:
        """The latest message stored on ``topic`` (``None`` when it has none): how far a
        log has come, without reading it all."""

    @abc.abstractmethod
    async def delete_topic(self, topic: str) -> None:
        """Forget every message of ``topic``."""

    @abc.abstractmethod
    async def kv(self, bucket: str, *, ttl: float | None = None) -> KeyValueStore:
        """The key-value bucket ``bucket``, created on first use.

        ``ttl`` (seconds) makes entries expire that are not rewritten in time (used for
        heartbeats); it is fixed when the bucket is created.
        """

    def on_availability(self, listener: Callable[[str | None], None]) -> None:
        """Call ``listener(reason)`` when the broker becomes unreachable and
        ``listener(None)`` when it is back (a broker in this process never goes away)."""
        del listener

    @abc.abstractmethod
    async def close(self) -> None:
        """Flush and disconnect; idempotent. Open iterators end."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
