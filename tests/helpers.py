"""Small, generic helpers for asynchronous tests: wait for a condition, read with a deadline."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar, overload

T = TypeVar("T")


@overload
async def assert_eventually(
    predicate: Callable[[], Awaitable[T]], timeout: float = ..., interval: float = ...
) -> T: ...


@overload
async def assert_eventually(
    predicate: Callable[[], T], timeout: float = ..., interval: float = ...
) -> T: ...


async def assert_eventually(
    predicate: Callable[[], Any],
    timeout: float = 5.0,
    interval: float = 0.02,
) -> Any:
    """Wait until ``predicate()`` (sync or async) is truthy and return that value; fail
    after ``timeout`` seconds.

    For state that nothing announces (a counter on a server, a file). When there is an
    iterator or an event to wait on, await that instead (see :func:`next_within`).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if loop.time() >= deadline:
            raise AssertionError(f"condition not met within {timeout}s: {predicate!r}")
        await asyncio.sleep(interval)


async def next_within(iterator: AsyncIterator[T], timeout: float) -> T:
    """The next item of ``iterator``, or ``TimeoutError`` after ``timeout`` seconds.

    The iterator must tolerate a cancelled ``__anext__`` (the queue adapters' iterators do;
    an async generator would end).
    """
    return await asyncio.wait_for(anext(iterator), timeout)


async def aclose(iterator: AsyncIterator[Any]) -> None:
    """Call ``iterator.aclose()`` when it has one (``AsyncIterator`` does not declare it)."""
    close = getattr(iterator, "aclose", None)
    if close is not None:
        await close()
