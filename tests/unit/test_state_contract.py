"""The state-store contract (``llama_mesh.server.queues.state``), pinned for every store.

Each test runs against every state store through the parametrized ``store`` fixture
(``tests/fixtures/brokers.py``), each on a real server. Waiting is done on the watches
themselves (``next_within``) or with ``assert_eventually``.
"""

from __future__ import annotations

import asyncio

import pytest

from llama_mesh.server.queues.errors import (
    KeyExistsError,
    QueueUnavailableError,
    RevisionMismatchError,
)
from llama_mesh.server.queues.state import KeyValueEntry, StateStore
from tests.helpers import aclose, next_within
from tests.unit.contract import WAIT, assert_nothing_within, read_one

# --------------------------------------------------------------------------------------------
# Key-value buckets


async def test_kv_get_and_put(store: StateStore) -> None:
    """put returns increasing revisions; get returns the latest value, None when absent."""
    kv = await store.kv("state")
    assert await kv.get("a") is None
    r1 = await kv.put("a", b"1")
    assert await kv.get("a") == KeyValueEntry("a", b"1", r1)
    r2 = await kv.put("a", b"2")
    assert r2 > r1
    assert await kv.get("a") == KeyValueEntry("a", b"2", r2)
    assert await (await store.kv("state")).get("a") == KeyValueEntry("a", b"2", r2)
    assert await kv.put("empty", b"") > r2
    assert (await kv.get("empty")) == KeyValueEntry("empty", b"", r2 + 1)


async def test_kv_create_only_when_absent(store: StateStore) -> None:
    """create writes an absent (or deleted) key and raises KeyExistsError otherwise."""
    kv = await store.kv("state")
    revision = await kv.create("k", b"v1")
    with pytest.raises(KeyExistsError):
        await kv.create("k", b"v2")
    assert await kv.get("k") == KeyValueEntry("k", b"v1", revision)
    await kv.delete("k")
    again = await kv.create("k", b"v3")
    assert await kv.get("k") == KeyValueEntry("k", b"v3", again)


async def test_kv_update_compares_revisions(store: StateStore) -> None:
    """update succeeds with the latest revision and raises RevisionMismatchError otherwise."""
    kv = await store.kv("state")
    r1 = await kv.put("k", b"v1")
    r2 = await kv.update("k", b"v2", r1)
    assert r2 > r1
    with pytest.raises(RevisionMismatchError):
        await kv.update("k", b"v3", r1)
    assert await kv.get("k") == KeyValueEntry("k", b"v2", r2)
    with pytest.raises(RevisionMismatchError):
        await kv.update("absent", b"v", r2)


async def test_kv_delete(store: StateStore) -> None:
    """delete removes a key (get None, not in keys); deleting an absent key is fine."""
    kv = await store.kv("state")
    await kv.put("k", b"v")
    await kv.delete("k")
    assert await kv.get("k") is None
    assert await kv.keys() == []
    await kv.delete("k")
    await kv.delete("never")


async def test_kv_a_deleted_key_is_told_from_one_never_written(store: StateStore) -> None:
    """get/entries with deleted=True: a deleted key is an entry with value None (at its
    deletion's revision, after its writes), a key never written is absent; without it both
    are absent. Writing the key again replaces its deletion."""
    kv = await store.kv("deletions")
    written = await kv.put("a.gone", b"v")
    await kv.put("a.kept", b"k")
    await kv.delete("a.gone")
    gone = await kv.get("a.gone", deleted=True)
    assert gone is not None and gone.value is None and gone.revision > written
    assert await kv.get("a.gone") is None
    assert await kv.get("a.never", deleted=True) is None
    assert await kv.entries("a.", deleted=True) == [gone, await kv.get("a.kept")]
    assert [e.key for e in await kv.entries("a.")] == ["a.kept"]
    assert await kv.keys("a.") == ["a.kept"]
    again = await kv.create("a.gone", b"again")
    assert await kv.get("a.gone", deleted=True) == KeyValueEntry("a.gone", b"again", again)


async def test_kv_keys_by_prefix(store: StateStore) -> None:
    """keys(prefix) lists present keys starting with prefix (a string prefix), sorted."""
    kv = await store.kv("state")
    assert await kv.keys() == []
    for key in ("b.1", "a.2", "a.1", "ab", "a.1.x", "gone"):
        await kv.put(key, b"v")
    await kv.delete("gone")
    assert await kv.keys() == ["a.1", "a.1.x", "a.2", "ab", "b.1"]
    assert await kv.keys("a.") == ["a.1", "a.1.x", "a.2"]
    assert await kv.keys("a") == ["a.1", "a.1.x", "a.2", "ab"]
    assert await kv.keys("a.1") == ["a.1", "a.1.x"]
    assert await kv.keys("c") == []


async def test_kv_entries_are_the_present_values_by_prefix(store: StateStore) -> None:
    """entries(prefix): what get() returns for every present key under prefix (its latest
    value and revision), sorted by key; deleted keys left out, other prefixes too."""
    kv = await store.kv("entries")
    assert await kv.entries() == []
    for key, value in (("a.2", b"two"), ("a.1", b"one"), ("b.1", b"bee"), ("a.3", b"x")):
        await kv.put(key, value)
    await kv.put("a.1", b"one again")
    await kv.delete("a.3")
    listed = await kv.entries("a.")
    assert [(e.key, e.value) for e in listed] == [("a.1", b"one again"), ("a.2", b"two")]
    assert listed == [await kv.get("a.1"), await kv.get("a.2")]
    assert [e.key for e in await kv.entries()] == ["a.1", "a.2", "b.1"]
    assert await kv.entries("c.") == []


async def test_kv_buckets_are_separate(store: StateStore) -> None:
    """The same key in two buckets holds two values."""
    one, two = await store.kv("one"), await store.kv("two")
    await one.put("k", b"1")
    await two.put("k", b"2")
    first, second = await one.get("k"), await two.get("k")
    assert first is not None
    assert second is not None
    assert (first.value, second.value) == (b"1", b"2")


async def test_kv_watch_existing_then_changes(store: StateStore) -> None:
    """watch yields current entries under the prefix, then changes; deletions have value None."""
    kv = await store.kv("state")
    rx = await kv.put("p.x", b"1")
    ry = await kv.put("p.y", b"2")
    await kv.put("p.gone", b"3")
    await kv.delete("p.gone")
    await kv.put("q.z", b"other")
    watch = kv.watch("p.")
    existing = {await next_within(watch, WAIT) for _ in range(2)}
    assert existing == {KeyValueEntry("p.x", b"1", rx), KeyValueEntry("p.y", b"2", ry)}
    await kv.put("q.z", b"ignored")
    rx2 = await kv.put("p.x", b"4")
    assert await next_within(watch, WAIT) == KeyValueEntry("p.x", b"4", rx2)
    await kv.delete("p.y")
    deleted = await next_within(watch, WAIT)
    assert (deleted.key, deleted.value) == ("p.y", None)
    assert deleted.revision > rx2
    await assert_nothing_within(watch, 0.3)
    await aclose(watch)


async def test_kv_watch_without_existing(store: StateStore) -> None:
    """watch(include_existing=False) yields only changes made after the watch() call."""
    kv = await store.kv("state")
    await kv.put("k.old", b"old")
    watch = kv.watch("k.", include_existing=False)
    revision = await kv.put("k.new", b"new")
    assert await next_within(watch, WAIT) == KeyValueEntry("k.new", b"new", revision)
    await assert_nothing_within(watch, 0.3)
    await aclose(watch)


async def test_kv_ttl_expiry_reaches_watchers_as_a_deletion(store: StateStore) -> None:
    """In a ttl bucket, an entry not rewritten within ttl disappears; watchers see a deletion."""
    kv = await store.kv("heartbeats", ttl=1.0)
    await kv.put("w.stale", b"beat")
    await kv.put("w.fresh", b"beat")
    watch = kv.watch("w.")
    assert {(await next_within(watch, WAIT)).key for _ in range(2)} == {"w.stale", "w.fresh"}
    await asyncio.sleep(0.6)  # time passes; then only w.fresh is rewritten
    refreshed = await kv.put("w.fresh", b"beat")
    assert (await next_within(watch, WAIT)).revision == refreshed
    expired = await next_within(watch, WAIT)
    assert (expired.key, expired.value) == ("w.stale", None)
    assert await kv.get("w.stale") is None
    assert await kv.keys("w.") == ["w.fresh"]
    await aclose(watch)


async def test_kv_expired_key_can_be_created_again(store: StateStore) -> None:
    """After a ttl expiry the key counts as absent: create succeeds."""
    kv = await store.kv("leases", ttl=1.0)
    await kv.create("lease", b"a")
    watch = kv.watch("lease", include_existing=False)
    expired = await next_within(watch, WAIT)
    assert expired.value is None
    revision = await kv.create("lease", b"b")
    assert await kv.get("lease") == KeyValueEntry("lease", b"b", revision)
    await aclose(watch)


async def test_kv_watch_of_a_whole_key_sees_only_that_key(store: StateStore) -> None:
    """A watch of a whole key (no trailing '.') reports that key only, not its neighbours
    (one task's watch must not read every other task of its deployment)."""
    kv = await store.kv("exact")
    await kv.put("dep.t1", b"old")
    await kv.put("dep.t10", b"other")
    watch = kv.watch("dep.t1")
    first = await next_within(watch, WAIT)
    assert (first.key, first.value) == ("dep.t1", b"old")
    await kv.put("dep.t10", b"noise")
    await kv.put("dep.t1.sub", b"noise")
    await kv.put("dep.t1", b"new")
    second = await next_within(watch, WAIT)
    assert (second.key, second.value) == ("dep.t1", b"new")
    await aclose(watch)


async def test_kv_keys_lists_every_present_key_every_time(store: StateStore) -> None:
    """keys() never misses stored keys (nats-py's own listing could report none when its
    end marker raced the buffered messages); deleted keys are not listed."""
    kv = await store.kv("listing")
    for i in range(40):
        await kv.put(f"s.k{i:02d}", b"v")
    await kv.delete("s.k07")
    expected = sorted(f"s.k{i:02d}" for i in range(40) if i != 7)
    listings = await asyncio.gather(*(kv.keys("s.") for _ in range(25)))
    assert all(listing == expected for listing in listings)
    scans = await asyncio.gather(*(kv.entries("s.") for _ in range(25)))
    assert all([e.key for e in scan] == expected for scan in scans)
    assert await kv.keys("nothing.") == []


# --------------------------------------------------------------------------------------------
# Closing


async def test_close_is_idempotent_and_ends_watches(store: StateStore) -> None:
    """close ends a pending watch read; a second close is a no-op."""
    kv = await store.kv("state")
    watch = kv.watch("")
    read = asyncio.create_task(read_one(watch))
    await asyncio.sleep(0.2)  # let the read start waiting
    await store.close()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(read, WAIT)
    await store.close()


async def test_operations_after_close_raise_unavailable(store: StateStore) -> None:
    """After close, every operation raises QueueUnavailableError."""
    kv = await store.kv("state")
    await store.close()
    with pytest.raises(QueueUnavailableError):
        await kv.put("k", b"v")
    with pytest.raises(QueueUnavailableError):
        await store.kv("other")
