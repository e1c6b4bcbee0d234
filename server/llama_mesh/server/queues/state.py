"""The state-store role: key-value buckets with revisions, TTL and ordered watches.

The control plane keeps deployments, tasks, sessions and replica heartbeats here. Every
write gets a new, increasing revision per bucket; ``create``/``update`` are
compare-and-set; a watch delivers every change in revision order and never misses one
(a reconnecting watch resumes after the last revision it delivered). Keys are
``[A-Za-z0-9_=./-]`` and must not start or end with ``.``. Errors are those of
:mod:`llama_mesh.server.queues.errors`. Every implementation passes
``tests/unit/test_state_contract.py`` against a real server.
"""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass

from llama_mesh.server.queues.connected import Connected
from llama_mesh.server.queues.iterators import Subscription

_KEY_RE = re.compile(r"^[A-Za-z0-9_=./-]+$")


def check_key(key: str) -> None:
    """Raise ``ValueError`` unless ``key`` is ``[A-Za-z0-9_=./-]`` and neither starts nor
    ends with ``.``: every state store takes exactly these keys."""
    if not _KEY_RE.match(key) or key.startswith(".") or key.endswith("."):
        raise ValueError(f"invalid key {key!r}: [A-Za-z0-9_=./-], not starting or ending with '.'")


@dataclass(frozen=True, slots=True)
class KeyValueEntry:
    """One value of a key-value bucket; ``value is None`` marks a deletion (in a watch, or
    read with ``deleted=True``)."""

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
    async def get(self, key: str, *, deleted: bool = False) -> KeyValueEntry | None:
        """The current entry of ``key``, or ``None`` when absent or deleted.

        With ``deleted``, a deleted key is an entry with ``value None`` (its deletion's
        revision): a key that was written and deleted is told from one never written
        (until the bucket's TTL, if any, forgets the deletion).
        """

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
    async def entries(self, prefix: str = "", *, deleted: bool = False) -> list[KeyValueEntry]:
        """The present entries whose keys start with ``prefix``, sorted by key: one pass
        over the bucket, where :meth:`keys` then :meth:`get` would read key by key. With
        ``deleted``, the deleted keys too, as in :meth:`get`."""

    @abc.abstractmethod
    def watch(
        self, prefix: str = "", *, include_existing: bool = True
    ) -> Subscription[KeyValueEntry]:
        """Entries as they change under ``prefix`` (deletions have ``value None``).

        ``prefix`` is ``""`` (every key), a prefix ending with ``.`` (every key below it), or
        a whole key (that key only: a watch of one task must not read its neighbours).

        With ``include_existing`` the current entries come first. The iterator ends only
        when the consumer stops iterating (``aclose()``) or the adapter closes.
        """


class StateStore(Connected):
    """A connection to the store holding the control plane's buckets. Use as an async
    context manager."""

    @abc.abstractmethod
    async def kv(self, bucket: str, *, ttl: float | None = None) -> KeyValueStore:
        """The key-value bucket ``bucket``, created on first use.

        ``ttl`` (seconds) makes entries expire that are not rewritten in time (used for
        heartbeats); it is fixed when the bucket is created.
        """
