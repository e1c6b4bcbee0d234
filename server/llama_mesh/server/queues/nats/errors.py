"""The error seam: the one place where nats-py errors become ``QueueError``s, and how an
operation is tried again while NATS is briefly unavailable (a failover)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Final, Protocol, TypeVar

import nats.errors
import nats.js.errors

from llama_mesh.server.aio import raise_if_cancelling
from llama_mesh.server.queues.errors import (
    QueueError,
    QueueUnavailableError,
    RevisionMismatchError,
)

logger = logging.getLogger(__name__)

RESUME_BACKOFF: Final = (0.1, 5.0)
"""First and longest pause between attempts to resume a subscription."""
_PATIENCE: Final = 20.0
"""How long a read (a key, opening a subscription), a write or an acknowledgement is tried
again while NATS answers "unavailable", as a cluster does while it elects leaders after
losing a node."""
_WRONG_LAST_SEQUENCE: Final = frozenset({10071, 10164})
_NO_PEERS_FOR_PLACEMENT: Final = 10005
"""A replicated stream cannot be placed yet: a cluster still forming, or a node down."""
_OUT_OF_STORAGE: Final = frozenset({10023, 10047})
"""JetStream refuses a write for want of space: "insufficient resources" (its store limit
or the disk is full) and "insufficient storage resources available"."""

R = TypeVar("R")


class Closable(Protocol):
    """What :func:`patiently` asks of its owner: whether it closed (then it stops trying)."""

    @property
    def closed(self) -> bool: ...


_UNAVAILABLE: Final[tuple[type[BaseException], ...]] = (
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionDrainingError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.NoServersError,
    nats.errors.StaleConnectionError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.NoRespondersError,
    nats.errors.TimeoutError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
    TimeoutError,
    OSError,
)


def translate_error(
    exc: BaseException, *, conflict: type[QueueError] = RevisionMismatchError
) -> BaseException:
    """The ``QueueError`` for a nats-py (or socket) error; other exceptions come back as is.

    A write whose expected revision did not match becomes ``conflict``
    (:class:`RevisionMismatchError`, or :class:`KeyExistsError` for ``create``); connection
    and timeout errors become :class:`QueueUnavailableError`; any other NATS error becomes a
    plain :class:`QueueError`.
    """
    if isinstance(exc, QueueError):
        return exc
    if isinstance(exc, nats.js.errors.KeyWrongLastSequenceError) or (
        isinstance(exc, nats.js.errors.APIError) and exc.err_code in _WRONG_LAST_SEQUENCE
    ):
        return conflict(str(exc))
    if isinstance(exc, nats.js.errors.APIError) and exc.err_code is not None:
        # JetStream's own answer: its description says what went wrong (the repr does not).
        detail = f"{exc.description or type(exc).__name__} (error {exc.err_code})"
        if exc.err_code in _OUT_OF_STORAGE:
            # Unavailable until space is freed: a write tried again later may succeed.
            return QueueUnavailableError(
                f"NATS JetStream is out of storage ({exc.description}, error {exc.err_code}): "
                "free disk space or raise its store limit (max_file_store)"
            )
        if isinstance(exc, _UNAVAILABLE):
            return QueueUnavailableError(f"NATS is unavailable: {detail}")
        return QueueError(f"NATS error: {detail}")
    if isinstance(exc, _UNAVAILABLE):
        return QueueUnavailableError(f"NATS is unavailable: {exc!r}")
    if isinstance(exc, nats.errors.Error):
        return QueueError(f"NATS error: {exc!r}")
    return exc


@contextlib.contextmanager
def translated(*, conflict: type[QueueError] = RevisionMismatchError) -> Iterator[None]:
    """Raise what :func:`translate_error` makes of an error in the block."""
    try:
        yield
    except Exception as exc:
        result = translate_error(exc, conflict=conflict)
        if result is exc:
            raise
        raise result from exc


async def patiently(owner: Closable, read: Callable[[], Awaitable[R]], what: str) -> R:
    """Run ``read`` (safe to repeat: a read, a compare-and-set, an acknowledgement, or a
    write under a message id the stream de-duplicates), again after a pause while NATS is
    unavailable, for up to :data:`_PATIENCE` seconds: a failover must not fail every caller
    meanwhile."""
    pause, longest = RESUME_BACKOFF
    deadline = time.monotonic() + _PATIENCE
    while True:
        try:
            return await read()
        except QueueUnavailableError as exc:
            if owner.closed or time.monotonic() + pause > deadline:
                raise
            logger.info("%s failed (%r); again in %.1f s", what, exc, pause)
        raise_if_cancelling()
        await asyncio.sleep(pause)
        pause = min(pause * 2, longest)


@contextlib.contextmanager
def placement_unavailable() -> Iterator[None]:
    """ "No suitable peers for placement" is the cluster being unavailable for now."""
    try:
        yield
    except nats.js.errors.BadRequestError as exc:
        if exc.err_code != _NO_PEERS_FOR_PLACEMENT:
            raise
        raise QueueUnavailableError(f"NATS cannot place a replicated stream yet: {exc}") from exc
