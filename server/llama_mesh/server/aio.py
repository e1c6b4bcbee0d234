"""asyncio helpers for cancellation that Python 3.11 can lose.

On Python 3.11, ``asyncio.wait_for`` returns its result instead of raising when the awaited
future completes in the same loop iteration as the cancellation (CPython gh-86296).
nats-py's requests use it, so a task cancelled while it awaits a NATS request may carry on
as if nothing happened. Loops that await NATS call :func:`raise_if_cancelling` after each
such await, and owners stop such tasks with :func:`cancel_and_wait`.
"""

from __future__ import annotations

import asyncio
from typing import Any


def raise_if_cancelling() -> None:
    """Raise ``CancelledError`` if the current task was asked to cancel and carried on."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def cancel_and_wait(task: asyncio.Task[Any], *, retry_every: float = 1.0) -> None:
    """Cancel ``task`` and wait until it is done, cancelling again if one was lost.

    The task's own exception, if any, is left on it (retrieve it with ``task.exception()``).
    """
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=retry_every)


async def discard(task: asyncio.Task[Any] | None) -> None:
    """Stop a task whose outcome no one wants any more (:func:`cancel_and_wait`), retrieving
    its exception if it had one, so that asyncio does not report it as never retrieved."""
    if task is None:
        return
    await cancel_and_wait(task)
    if not task.cancelled():
        task.exception()
