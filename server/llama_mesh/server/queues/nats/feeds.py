"""The feed machinery every NATS iterator (work-queue deliveries, topics, watches) runs on,
and :class:`NatsRole`, what the broker and the state store share: the connection, the feeds
and background tasks each of them closes with itself."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Final, Generic, TypeVar

from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from llama_mesh.server.aio import cancel_and_wait, raise_if_cancelling
from llama_mesh.server.queues.errors import QueueUnavailableError
from llama_mesh.server.queues.iterators import Subscription
from llama_mesh.server.queues.nats.errors import RESUME_BACKOFF, patiently, translated

if TYPE_CHECKING:
    from llama_mesh.server.queues.nats.connection import NatsConnection

logger = logging.getLogger(__name__)

CONSUMER_INACTIVE: Final = 1.0
"""Seconds after which the server drops a consumer nobody listens to any more."""
_LIVENESS_INTERVAL: Final = 5.0
"""How long a subscription may stay silent before its consumer is looked up."""

T = TypeVar("T")


class NatsRole:
    """One role (broker or state store) played on a :class:`NatsConnection`.

    It tracks its own feeds and background tasks, so that closing it releases them and
    leaves the other role on the same connection running; the connection closes with the
    last role opened on it.
    """

    what = "NATS"
    """How errors name this role."""

    def __init__(self, connection: NatsConnection) -> None:
        self.connection = connection
        self.nc = connection.nc
        self.js = connection.js
        self._closed = False
        self._feeds: set[Feed[Any]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        connection.attach(self)

    @property
    def closed(self) -> bool:
        """Whether this role (or its connection) is closed."""
        return self._closed or self.connection.closed

    def check_open(self) -> None:
        """Raise :class:`QueueUnavailableError` when closed."""
        if self.closed:
            raise QueueUnavailableError(f"the {self.what} is closed")

    def check_size(self, data: bytes, what: str) -> None:
        """See :meth:`NatsConnection.check_size`."""
        self.connection.check_size(data, what)

    def iterate(self, feed: Feed[T]) -> FeedIterator[T]:
        """An iterator over ``feed``, which :meth:`close` shuts down."""
        self._feeds.add(feed)
        return FeedIterator(feed)

    def forget(self, feed: Feed[Any]) -> None:
        """Stop tracking a feed that shut down."""
        self._feeds.discard(feed)

    def shutdown_soon(self, feed: Feed[Any]) -> None:
        """Shut ``feed`` down in a task (its iterator was dropped without ``aclose()``)."""
        if feed.shut or self.closed:
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (interpreter shutdown): nothing to release any more
        self.spawn(feed.shutdown(), name="nats-feed-shutdown")

    def spawn(self, coro: Coroutine[Any, Any, None], *, name: str) -> asyncio.Task[None]:
        """Run ``coro`` in a task that :meth:`close` cancels and awaits."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def on_availability(self, listener: Callable[[str | None], None]) -> None:
        self.connection.on_availability(listener)

    def on_reconnected(self) -> None:
        """Called by the connection after a reconnect: let every feed recover at once."""
        for feed in list(self._feeds):
            feed.on_reconnected()

    async def close(self) -> None:
        """Release this role's feeds and tasks; the connection closes with its last role."""
        if self._closed:
            return
        self._closed = True
        for feed in list(self._feeds):
            await feed.shutdown()
        self._feeds.clear()
        for task in list(self._tasks):
            await cancel_and_wait(task)
        await self.connection.detach(self)


class End:
    """Put into an item queue to end its iterator (with ``error`` raised, if set)."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error


class Feed(Generic[T]):
    """What an iterator reads from: an asyncio queue filled by a nats callback or a pump task.

    The server-side consumer is created by ``_open`` on the first ``next()``. Callbacks and
    tasks hold the feed, never the iterator (:class:`FeedIterator`) the user holds, so an
    iterator dropped without ``aclose()`` is garbage-collected, which shuts its feed down.
    """

    def __init__(self, owner: NatsRole) -> None:
        self.owner = owner
        self.items: asyncio.Queue[T | End] = asyncio.Queue()
        self._open_lock = asyncio.Lock()
        self._opened = False
        self.ended = False
        self.shut = False

    async def next(self) -> T:
        if not self._opened and not self.ended:
            async with self._open_lock:
                if not self._opened and not self.ended:
                    await patiently(self.owner, self._open, "opening a subscription")
                    self._opened = True
                    if self.shut:  # shut down while opening
                        await self._shutdown()
            raise_if_cancelling()  # a cancel during _open may have been lost (gh-86296)
        item = await self.items.get()
        if isinstance(item, End):
            self.items.put_nowait(item)  # every later call ends too
            if item.error is not None:
                raise item.error
            raise StopAsyncIteration
        return item

    def end(self, error: BaseException | None = None) -> None:
        """Let readers finish (raising ``error``, if given) without releasing anything."""
        if not self.ended:
            self.ended = True
            self.items.put_nowait(End(error))

    async def shutdown(self) -> None:
        """End the feed and release its server-side consumer; idempotent."""
        self.owner.forget(self)
        if self.shut:
            return
        self.shut = True
        self.end()
        await self._shutdown()

    def on_reconnected(self) -> None:
        """The connection was re-established (the server may have lost our consumer)."""

    async def _open(self) -> None:
        raise NotImplementedError

    async def _shutdown(self) -> None:
        raise NotImplementedError


class FeedIterator(Subscription[T]):
    """The iterator handed out: cancelling a pending ``__anext__`` loses nothing."""

    def __init__(self, feed: Feed[T]) -> None:
        self._feed = feed

    async def __anext__(self) -> T:
        return await self._feed.next()

    async def aclose(self) -> None:
        """Stop iterating and release the server-side consumer; idempotent."""
        await self._feed.shutdown()

    def __del__(self) -> None:
        self._feed.owner.shutdown_soon(self._feed)


class PushFeed(Feed[T]):
    """A feed from an ordered push consumer, resumed after the last message on reconnect."""

    def __init__(self, owner: NatsRole, subject: str, stream: str) -> None:
        super().__init__(owner)
        self._subject = subject
        self._stream = stream
        self._sub: JetStreamContext.PushSubscription | None = None
        self._resume_lock = asyncio.Lock()
        self._last_seq = 0
        """Stream sequence of the last message received."""
        self._heard = False
        """Whether a message arrived since the watchdog last looked."""
        self._watchdog_task: asyncio.Task[None] | None = None

    def _first_config(self) -> api.ConsumerConfig:
        raise NotImplementedError

    def _received(self, msg: Msg) -> None:
        self._last_seq = msg.metadata.sequence.stream
        self._heard = True

    async def _on_msg(self, msg: Msg) -> None:
        raise NotImplementedError

    async def _open(self) -> None:
        await self._subscribe()

    async def _subscribe(self) -> None:
        if self._last_seq:
            config = api.ConsumerConfig(
                deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=self._last_seq + 1,
            )
        else:
            config = self._first_config()
        with translated():
            self._sub = await self.owner.js.subscribe(
                self._subject,
                stream=self._stream,
                cb=self._on_msg,
                ordered_consumer=True,
                config=config,
                # Closing a feed does not delete its consumer; let the server drop it soon
                # rather than after 5 s, or busy streams reach the 1,000-consumer limit.
                inactive_threshold=CONSUMER_INACTIVE,
            )
        if self._watchdog_task is None:
            self._watchdog_task = self.owner.spawn(
                self._watchdog(), name=f"nats-watchdog-{self._subject}"
            )

    async def _watchdog(self) -> None:
        """Resume when the consumer is gone while the connection stays up.

        When the cluster node holding our consumer dies but our connection is to another
        node, nats-py notices only by missed heartbeats, and stops trying if recreating the
        consumer fails then (as it does while the cluster elects leaders): the feed would
        fall silent for good. So a feed silent for a while looks its consumer up.
        """
        while not self.shut and not self.owner.closed:
            await asyncio.sleep(_LIVENESS_INTERVAL)
            if self._heard:
                self._heard = False
                continue
            sub = self._sub
            if sub is None or self._resume_lock.locked():
                continue  # being resumed already
            try:
                await sub.consumer_info()
            except Exception as exc:
                raise_if_cancelling()
                if self.shut or self.owner.closed:
                    return
                logger.info("the consumer of %s is lost (%r); resuming", self._subject, exc)
                await self._resume()
            raise_if_cancelling()

    def on_reconnected(self) -> None:
        # A restarted server forgot our (in-memory) ordered consumer; nats-py would notice
        # only after missing two idle heartbeats (10 s), so resume at once.
        if self._sub is not None and not self.shut:
            self.owner.spawn(self._resume(), name=f"nats-resume-{self._subject}")

    async def _resume(self) -> None:
        """Subscribe again after the last message received, trying until it works: right
        after a cluster node dies, creating a consumer fails until leaders are elected
        again, and readers waiting on this feed must not fail for that."""
        pause, longest = RESUME_BACKOFF
        async with self._resume_lock:
            while not self.shut and not self.owner.closed:
                await self._unsubscribe()
                try:
                    await self._subscribe()
                    break
                except Exception as exc:
                    logger.warning(
                        "resuming the subscription to %s failed: %r; again in %.1f s",
                        self._subject,
                        exc,
                        pause,
                    )
                raise_if_cancelling()
                await asyncio.sleep(pause)
                pause = min(pause * 2, longest)
            if self.shut:
                await self._unsubscribe()

    async def _unsubscribe(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _shutdown(self) -> None:
        if self._watchdog_task is not None and self._watchdog_task is not asyncio.current_task():
            await cancel_and_wait(self._watchdog_task)
        await self._unsubscribe()
