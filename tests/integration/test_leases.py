"""Deployment leases on a real NATS key-value bucket with a short TTL: one holder at a time.

The lease protocol of ``apiserver/cluster.py`` (create to acquire, update with the held
revision to renew, expiry to hand over) with two supervisors' ``Leases`` on one bucket.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from llama_mesh.server.apiserver.cluster import Leases
from llama_mesh.server.queues.state import KeyValueStore
from tests.fixtures.brokers import nats_roles
from tests.helpers import assert_eventually

TTL = 2.0
"""Short enough to wait for, long enough that a loaded machine renews in time."""


@pytest.fixture
async def bucket(nats_url: str) -> AsyncIterator[KeyValueStore]:
    connection, _, state_store = await nats_roles(nats_url)
    try:
        yield await state_store.kv("test_leases", ttl=TTL)
    finally:
        await connection.close()


async def test_one_holder_renews_and_releases(bucket: KeyValueStore) -> None:
    """The first to acquire holds the lease and keeps it by renewing; the other cannot
    take it meanwhile, and takes it at once when it is released."""
    a, b = Leases(bucket, "a"), Leases(bucket, "b")
    assert await a.acquire("app") and a.holds("app")
    assert not await b.acquire("app") and not b.holds("app")
    assert await a.renew() == []
    assert not await b.acquire("app")
    assert (await bucket.get("app") or pytest.fail("no lease")).value == b"a"

    await a.release("app")
    assert not a.holds("app") and a.held() == []
    assert await b.acquire("app") and b.held() == ["app"]


async def test_an_expired_lease_goes_to_another_and_its_holder_learns_it(
    bucket: KeyValueStore,
) -> None:
    """A holder that stops renewing loses the lease after the TTL: another acquires it,
    and the old holder's next renewal reports it lost (its revision is stale), never
    overwriting the new holder's; its release then leaves the new holder's lease alone."""
    a, b = Leases(bucket, "a"), Leases(bucket, "b")
    assert await a.acquire("app")
    await assert_eventually(lambda: b.acquire("app"), timeout=30, interval=0.2)

    assert await a.renew() == ["app"]
    assert not a.holds("app")
    await a.release("app")
    assert (await bucket.get("app") or pytest.fail("no lease")).value == b"b"
    assert await b.renew() == [] and b.holds("app")
