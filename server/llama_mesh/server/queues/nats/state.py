"""The NATS JetStream state store: key-value buckets.

Bucket ``b`` is the key-value bucket ``mesh_b`` (for the connection's ``prefix="mesh"``;
stream ``KV_mesh_b``, history 1). A bucket with a TTL also gets server delete markers
(``subject_delete_marker_ttl``), so an expiry reaches watchers as a deletion.

* A ``watch`` creates its server-side consumer on the first ``__anext__``; a
  ``watch(include_existing=False)`` nevertheless reports every change stored after the
  ``watch()`` call (it starts from that wall-clock time on the server, so clocks must agree).
* ``KeyValueStore.delete`` of an absent key writes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import uuid
from typing import Final

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import api
from nats.js.kv import KeyValue

from llama_mesh.server.queues.errors import KeyExistsError, QueueError, RevisionMismatchError
from llama_mesh.server.queues.iterators import Subscription
from llama_mesh.server.queues.nats.connection import TOKEN_RE, NatsConnection
from llama_mesh.server.queues.nats.errors import patiently, placement_unavailable, translated
from llama_mesh.server.queues.nats.feeds import CONSUMER_INACTIVE, NatsRole, PushFeed
from llama_mesh.server.queues.state import (
    KeyValueEntry,
    KeyValueStore,
    StateStore,
    check_key,
    watches,
)

_KEYS_TIMEOUT: Final = 5.0
_DELETE_RETRIES: Final = 10
_KV_OPERATION: Final = "KV-Operation"
_KV_DELETIONS: Final = frozenset({"DEL", "PURGE"})
_MARKER_REASON: Final = "Nats-Marker-Reason"


def _is_deletion(headers: dict[str, str] | None) -> bool:
    """Whether a KV message is a delete/purge marker, including server (TTL) markers."""
    if not headers:
        return False
    return headers.get(_KV_OPERATION) in _KV_DELETIONS or _MARKER_REASON in headers


def _msg_id(headers: dict[str, str] | None) -> str | None:
    return headers.get(api.Header.MSG_ID) if headers else None


class _WatchFeed(PushFeed[KeyValueEntry]):
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
            with translated():
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


class NatsKeyValueStore(KeyValueStore):
    """A JetStream key-value bucket of :class:`NatsStateStore`."""

    def __init__(self, owner: NatsRole, kv: KeyValue, bucket: str, ttl: float | None) -> None:
        self.owner = owner
        self._kv = kv
        self.ttl = ttl
        self.stream = f"KV_{bucket}"
        self.subject_prefix = f"$KV.{bucket}."

    def subject_filter(self, prefix: str) -> str:
        """The narrowest subject filter holding every key that starts with ``prefix``."""
        head, dot, _ = prefix.rpartition(".")
        return f"{self.subject_prefix}{head}{dot}>"

    async def get(self, key: str, *, deleted: bool = False) -> KeyValueEntry | None:
        self.owner.check_open()
        check_key(key)
        return await patiently(
            self.owner, lambda: self._get(key, deleted=deleted), f"reading key {key!r}"
        )

    async def _get(self, key: str, *, deleted: bool = False) -> KeyValueEntry | None:
        with translated():
            try:
                msg = await self.owner.js.get_msg(
                    self.stream, subject=self.subject_prefix + key, direct=False
                )
            except nats.js.errors.NotFoundError:
                return None
        if msg.seq is None:
            return None
        if _is_deletion(msg.headers):
            return KeyValueEntry(key, None, msg.seq) if deleted else None
        return KeyValueEntry(key, msg.data or b"", msg.seq)

    async def put(self, key: str, value: bytes) -> int:
        self.owner.check_open()
        check_key(key)
        # Tried again while NATS is unavailable, under one message id: should an attempt
        # whose answer was lost have been stored, the stream drops the repeat (it does not
        # overwrite a newer value written meanwhile).
        headers: dict[str, str] = {api.Header.MSG_ID: uuid.uuid4().hex}
        return await patiently(
            self.owner,
            lambda: self._publish(key, value, headers=headers),
            f"writing key {key!r}",
        )

    async def create(self, key: str, value: bytes) -> int:
        self.owner.check_open()
        check_key(key)
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

        return await patiently(self.owner, attempt, f"creating key {key!r}")

    async def _latest(self, key: str) -> api.RawStreamMsg | None:
        """The key's latest message, a deletion marker included; ``None`` when it has none."""
        with translated():
            try:
                return await self.owner.js.get_msg(
                    self.stream, subject=self.subject_prefix + key, direct=False
                )
            except nats.js.errors.NotFoundError:
                return None

    async def update(self, key: str, value: bytes, last_revision: int) -> int:
        self.owner.check_open()
        check_key(key)
        # Tried again while NATS is unavailable, like reads: a compare-and-set is safe to
        # repeat (should a first attempt have landed, the next one is a revision conflict,
        # which callers resolve by reading again).
        return await patiently(
            self.owner,
            lambda: self._publish(key, value, last_revision=last_revision),
            f"updating key {key!r}",
        )

    async def delete(self, key: str) -> None:
        self.owner.check_open()
        check_key(key)
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

    async def entries(self, prefix: str = "", *, deleted: bool = False) -> list[KeyValueEntry]:
        return await self._scan(prefix, values=True, deleted=deleted)

    async def _scan(
        self, prefix: str, *, values: bool, deleted: bool = False
    ) -> list[KeyValueEntry]:
        """The last message of every key under ``prefix`` (headers only unless ``values``;
        the entries' values are then ``b""``; with ``deleted``, a deleted key's is
        ``None``), sorted by key.

        Not nats-py's kv.keys()/watch(): its end-of-keys marker races with messages still
        in the client's buffer and can report no keys at all under load. Instead: ask the
        stream how many subjects match, then read the last message of each until the
        server says none is pending (a per-message count, immune to that race).
        """
        self.owner.check_open()
        subject = self.subject_filter(prefix)
        with translated():
            info = await self.owner.js.stream_info(self.stream, subjects_filter=subject)
            if not (info.state.subjects or {}):
                return []
            sub = await self.owner.js.subscribe(
                subject,
                stream=self.stream,
                ordered_consumer=True,
                deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT,
                headers_only=not values,
                inactive_threshold=CONSUMER_INACTIVE,
            )
            found: dict[str, KeyValueEntry] = {}
            try:
                while True:
                    msg = await sub.next_msg(timeout=_KEYS_TIMEOUT)
                    key = msg.subject[len(self.subject_prefix) :]
                    revision = msg.metadata.sequence.stream
                    here = key.startswith(prefix)
                    if here and not _is_deletion(msg.headers):
                        found[key] = KeyValueEntry(key, msg.data if values else b"", revision)
                    elif here and deleted:
                        found[key] = KeyValueEntry(key, None, revision)
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
        with translated(conflict=conflict):
            ack = await self.owner.js.publish(
                self.subject_prefix + key, value, headers=headers or None
            )
        return ack.seq


class NatsStateStore(NatsRole, StateStore):
    """A :class:`StateStore` on NATS JetStream key-value buckets."""

    what = "NATS state store"

    def __init__(self, connection: NatsConnection) -> None:
        super().__init__(connection)
        self._prefix = connection.prefix
        self._replicas = connection.replicas
        self._buckets: dict[str, NatsKeyValueStore] = {}
        self._bucket_lock = asyncio.Lock()

    async def kv(self, bucket: str, *, ttl: float | None = None) -> KeyValueStore:
        self.check_open()
        if not TOKEN_RE.match(bucket):
            raise ValueError(f"invalid bucket name {bucket!r}: [A-Za-z0-9_-]")
        if ttl is not None and ttl <= 0:
            raise ValueError(f"invalid ttl {ttl!r}")
        async with self._bucket_lock:
            store = self._buckets.get(bucket)
            if store is None:
                store = self._buckets[bucket] = await patiently(
                    self, lambda: self._open_bucket(bucket, ttl), f"opening bucket {bucket}"
                )
        return store

    async def _open_bucket(self, bucket: str, ttl: float | None) -> NatsKeyValueStore:
        name = f"{self._prefix}_{bucket}"
        with translated(), placement_unavailable():
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
