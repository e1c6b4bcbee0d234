"""The iterator type brokers and state stores hand out: closable, typed."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from typing import TypeVar

T_co = TypeVar("T_co", covariant=True)


class Subscription(AsyncIterator[T_co], abc.ABC):
    """An endless iterator (deliveries, a topic, a watch) holding broker resources.

    Close it with :meth:`aclose` when done; it also ends when its broker or store closes.
    Cancelling a pending ``__anext__`` loses nothing.
    """

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release the subscription; idempotent. A pending ``__anext__`` ends."""
