"""Transitional: the broker and state-store roles in one class, for code not yet split.

New code imports :mod:`.broker`, :mod:`.state` and :mod:`.errors` directly.
"""

from __future__ import annotations

from llama_mesh.server.queues.broker import Broker, ConsumerOptions, Delivery
from llama_mesh.server.queues.errors import (
    KeyExistsError,
    MessageTooLargeError,
    QueueError,
    QueueUnavailableError,
    RevisionMismatchError,
)
from llama_mesh.server.queues.iterators import Subscription
from llama_mesh.server.queues.state import KeyValueEntry, KeyValueStore, StateStore, watches

__all__ = [
    "Broker",
    "ConsumerOptions",
    "Delivery",
    "KeyExistsError",
    "KeyValueEntry",
    "KeyValueStore",
    "MessageQueue",
    "MessageTooLargeError",
    "QueueError",
    "QueueUnavailableError",
    "RevisionMismatchError",
    "StateStore",
    "Subscription",
    "watches",
]


class MessageQueue(Broker, StateStore):
    """One connection playing both roles (NATS JetStream, the in-process queue)."""
