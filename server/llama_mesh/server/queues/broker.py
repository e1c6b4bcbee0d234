"""The broker role: work queues and retained, replayable topics.

What the mesh needs from a broker, and nothing else:

* **Work queues** (``publish_task`` / ``consume_tasks``): one durable queue per workflow
  service, shared by all of its replicas. A message is delivered to one consumer at a time,
  redelivered when it is not acknowledged within ``ack_wait`` (unless the consumer keeps it
  alive with ``in_progress()``), and never delivered more than ``max_deliver`` times.
  Publishing twice with the same ``msg_id`` stores the message once.
* **Finding queued messages** (``find_task`` / ``queued_tasks`` / ``remove_task``), on brokers
  whose ``finds_tasks`` is true: a message waiting in a queue, delivered or not, looked up by
  its ``msg_id``, listed, or removed. The API server then lets a task's message be the record
  that it was accepted; on the other brokers it stores the record before the message.
* **Topics** (``publish`` / ``subscribe`` / ``last_message``): ordered, retained logs (task
  events, human input sent to a running task). A subscriber first receives everything
  already stored, then new messages as they arrive, without polling.

Payloads are opaque bytes (serialized protobuf from ``llama_mesh.v1.messages_pb2``). Queue
and topic names are dot-separated tokens of ``[A-Za-z0-9_-]``. Errors are those of
:mod:`llama_mesh.server.queues.errors`. Every implementation passes
``tests/unit/test_broker_contract.py`` against a real server.
"""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass
from typing import ClassVar

from llama_mesh.server.queues.connected import Connected
from llama_mesh.server.queues.iterators import Subscription

_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")


def is_name(name: str) -> bool:
    """Whether ``name`` is dot-separated tokens of ``[A-Za-z0-9_-]``: the queue and topic
    names every broker takes."""
    return _NAME_RE.match(name) is not None


def check_name(kind: str, name: str) -> None:
    """Raise ``ValueError`` unless ``name`` (of a ``kind``: queue, topic) :func:`is_name`."""
    if not is_name(name):
        raise ValueError(f"invalid {kind} name {name!r}: dot-separated tokens of [A-Za-z0-9_-]")


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


class Broker(Connected):
    """A connection to a message broker. Use as an async context manager."""

    finds_tasks: ClassVar[bool] = False
    """Whether :meth:`find_task`, :meth:`queued_tasks` and :meth:`remove_task` see the
    messages waiting in a queue. Where it is false they find nothing, and the API server
    stores a task's record before its message."""

    @abc.abstractmethod
    async def publish_task(self, queue: str, data: bytes, *, msg_id: str) -> None:
        """Append a message to the work queue ``queue``; duplicates of ``msg_id`` are dropped."""

    @abc.abstractmethod
    def consume_tasks(self, queue: str, options: ConsumerOptions) -> Subscription[Delivery]:
        """Deliveries from ``queue``; consumers of the same queue share its messages."""

    @abc.abstractmethod
    async def queue_depth(self, queue: str) -> int:
        """How many messages wait in ``queue`` (delivered-but-unsettled ones included)."""

    @abc.abstractmethod
    async def purge_queue(self, queue: str) -> None:
        """Drop every message waiting in ``queue``."""

    async def find_task(self, queue: str, msg_id: str) -> bytes | None:
        """The message published to ``queue`` under ``msg_id`` while it is still in the queue:
        delivered-but-unsettled included; ``None`` once it is acknowledged, terminated,
        removed or purged (or when :attr:`finds_tasks` is false). A message dropped after
        its last delivery timed out (``max_deliver``) may still be found on a broker that
        keeps it (NATS)."""
        return None

    async def queued_tasks(self, queue: str) -> list[bytes]:
        """Every message still in ``queue`` (as :meth:`find_task` means it), in publish
        order; empty when :attr:`finds_tasks` is false."""
        return []

    async def remove_task(self, queue: str, msg_id: str) -> bool:
        """Remove the message published to ``queue`` under ``msg_id``, delivered or not;
        whether it was still there. A consumer holding a delivery of it may still settle
        that delivery afterwards, without an error; it is never delivered again."""
        return False

    @abc.abstractmethod
    async def publish(self, topic: str, data: bytes) -> None:
        """Append ``data`` to the retained log ``topic``."""

    @abc.abstractmethod
    def subscribe(self, topic: str) -> Subscription[bytes]:
        """Everything stored on ``topic`` in order, then new messages as they are published.

        Ends only when the consumer stops iterating or the broker closes.
        """

    @abc.abstractmethod
    async def last_message(self, topic: str) -> bytes | None:
        """The latest message stored on ``topic`` (``None`` when it has none): how far a
        log has come, without reading it all."""

    @abc.abstractmethod
    async def delete_topic(self, topic: str) -> None:
        """Forget every message of ``topic``."""
