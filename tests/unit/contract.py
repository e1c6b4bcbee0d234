"""Waiting helpers shared by the broker and state-store contract suites."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TypeVar

import pytest

from llama_mesh.server.queues.broker import Broker, Delivery
from tests.helpers import assert_eventually, next_within

T = TypeVar("T")

WAIT = 5.0
"""Seconds to wait for something that must happen."""
QUIET = 0.3
"""Seconds during which something must NOT happen."""

"""Seconds to wait for something that must happen."""
QUIET = 0.3
"""Seconds during which something must NOT happen."""


async def read_one(it: AsyncIterator[T]) -> T:
    """The next item of ``it`` (a coroutine, for ``asyncio.create_task``)."""
    return await anext(it)


async def take(it: AsyncIterator[Delivery], n: int, timeout: float = WAIT) -> list[Delivery]:
    """The next ``n`` deliveries of ``it``."""
    return [await next_within(it, timeout) for _ in range(n)]


async def assert_nothing_within(it: AsyncIterator[object], seconds: float = QUIET) -> None:
    """``it`` yields nothing for ``seconds``."""
    with pytest.raises(TimeoutError):
        await next_within(it, seconds)


async def assert_depth(broker: Broker, name: str, expected: int) -> None:
    """``queue_depth(name)`` reaches ``expected`` (brokers update their counters async)."""

    async def depth_is_expected() -> bool:
        return await broker.queue_depth(name) == expected

    await assert_eventually(depth_is_expected)
