"""The errors every broker and state store raises, one hierarchy for both roles::

    QueueError
    ├── QueueUnavailableError   the broker or store cannot be reached / is closed
    ├── MessageTooLargeError    a message or value over the server's size limit
    ├── KeyExistsError          KeyValueStore.create on an existing key
    └── RevisionMismatchError   KeyValueStore.update with a stale revision

Each implementation turns its client library's exceptions into these in one place (its
error seam); nothing above ``queues`` sees a library exception.
"""

from __future__ import annotations


class QueueError(Exception):
    """Base class of every message-queue error."""


class QueueUnavailableError(QueueError):
    """The broker cannot be reached, or the adapter is closed."""


class MessageTooLargeError(QueueError):
    """A message or value larger than the broker takes in one message (NATS: its
    ``max_payload``, Redis: its ``proto-max-bulk-len``, RabbitMQ: its ``max_message_size``);
    nothing was written. Trying again cannot help."""

    def __init__(
        self, what: str, size: int, limit: int, *, limit_name: str = "NATS max_payload"
    ) -> None:
        super().__init__(
            f"{what} is {size} bytes, more than the message queue's limit of {limit} bytes "
            f"({limit_name})"
        )
        self.size = size
        self.limit = limit
        self.limit_name = limit_name


class KeyExistsError(QueueError):
    """``KeyValueStore.create`` found the key already present."""


class RevisionMismatchError(QueueError):
    """``KeyValueStore.update`` was given a revision that is no longer the latest."""
