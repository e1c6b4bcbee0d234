"""What brokers and state stores have in common: a connection that can go away and closes."""

from __future__ import annotations

import abc
from collections.abc import Callable
from types import TracebackType
from typing import Self


class Connected(abc.ABC):
    """A connection to a server (or an in-process stand-in). Use as an async context
    manager."""

    def on_availability(self, listener: Callable[[str | None], None]) -> None:
        """Call ``listener(reason)`` when the server becomes unreachable and
        ``listener(None)`` when it is back (one in this process never goes away)."""
        del listener

    @abc.abstractmethod
    async def close(self) -> None:
        """Flush and disconnect; idempotent. Open iterators end."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
