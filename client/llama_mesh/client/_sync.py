"""``Client``: the blocking SDK, a facade over :class:`AsyncClient`.

The async client lives on an event loop of its own in a daemon thread (the "portal"); every
method submits a coroutine there and blocks until it is done, and async iterators become
plain iterators. So ``Client`` works in scripts and from code that runs inside an event loop
(where it blocks that loop while it waits, as any blocking call does).
"""

from __future__ import annotations

import asyncio
import builtins
import threading
from collections.abc import AsyncIterator, Awaitable, Coroutine, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from llama_mesh.client._client import AsyncClient
from llama_mesh.client._config import ConnectionSettings
from llama_mesh.client._models import (
    Deployment,
    ServerStatus,
    Service,
    Session,
    Task,
    TaskEvent,
    TaskStatus,
)

T = TypeVar("T")


class _Portal:
    """An event loop running in a daemon thread, and ways to use it from other threads."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="llama-mesh-client", daemon=True
        )
        self._thread.start()

    def call(self, awaitable: Awaitable[T]) -> T:
        """Run ``awaitable`` on the portal's loop and wait for its outcome."""
        if self._loop.is_closed() and isinstance(awaitable, Coroutine):
            awaitable.close()

        async def wrapper() -> T:
            return await awaitable

        return self.run(wrapper())

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the portal's loop and wait for its outcome."""
        if self._loop.is_closed():
            coro.close()
            raise RuntimeError("the client is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # e.g. KeyboardInterrupt while waiting: stop the call too
            raise

    def iterate(self, iterator: AsyncIterator[T]) -> Iterator[T]:
        """A blocking iterator over an async iterator living on the portal's loop."""
        try:
            while True:
                try:
                    yield self.call(iterator.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None and not self._loop.is_closed():
                self.call(aclose())

    @property
    def closed(self) -> bool:
        return self._loop.is_closed()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


class Client:
    """The blocking client; same arguments and methods as :class:`AsyncClient`.

    ::

        with Client("127.0.0.1:4501") as client:
            print(client.run("quickstart", message="hi"))
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        api_key: str | None = None,
        tls: bool | None = None,
        root_certificates: bytes | None = None,
        tls_ca: str | Path | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        timeout: float | None = None,
        profile: str | None = None,
        config_path: Path | None = None,
    ) -> None:
        self._portal = _Portal()

        async def make() -> AsyncClient:
            return AsyncClient(
                address,
                api_key=api_key,
                tls=tls,
                root_certificates=root_certificates,
                tls_ca=tls_ca,
                tls_cert=tls_cert,
                tls_key=tls_key,
                timeout=timeout,
                profile=profile,
                config_path=config_path,
            )

        try:
            self._async = self._portal.run(make())
        except BaseException:
            self._portal.close()
            raise
        self.deployments = SyncDeployments(self._portal, self._async)
        """Create, inspect, reload and delete deployments."""
        self.services = SyncServices(self._portal, self._async)
        """The workflow services of a deployment."""
        self.tasks = SyncTasks(self._portal, self._async)
        """Create, inspect, cancel and follow tasks."""
        self.sessions = SyncSessions(self._portal, self._async)
        """Create, list, inspect and delete sessions."""

    @property
    def settings(self) -> ConnectionSettings:
        """Where and how this client connects."""
        return self._async.settings

    def status(self) -> ServerStatus:
        """The server's health, version and deployments."""
        return self._portal.call(self._async.status())

    def wait_ready(self, timeout: float) -> ServerStatus:
        """``status()`` once the server accepts connections, waiting up to ``timeout``."""
        return self._portal.call(self._async.wait_ready(timeout))

    def run(
        self,
        deployment: str,
        *,
        service: str | None = None,
        session: str | None = None,
        **input: Any,
    ) -> Any:
        """Run a task and return its result (:class:`TaskFailedError` when it failed)."""
        return self._portal.call(
            self._async.run(deployment, service=service, session=session, **input)
        )

    def run_task(
        self,
        deployment: str,
        input: dict[str, Any] | None = None,
        *,
        service: str | None = None,
        session: str | None = None,
    ) -> Task:
        """Run a task and return it once finished, whatever its outcome."""
        return self._portal.call(
            self._async.run_task(deployment, input, service=service, session=session)
        )

    def close(self) -> None:
        """Close the connection and stop the background loop (idempotent)."""
        if not self._portal.closed:
            self._portal.call(self._async.close())
        self._portal.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _Namespace:
    def __init__(self, portal: _Portal, client: AsyncClient) -> None:
        self._portal = portal
        self._client = client


class SyncDeployments(_Namespace):
    """Blocking ``client.deployments`` (see :class:`~llama_mesh.client._resources.Deployments`)."""

    def create(
        self,
        config: str | Path,
        *,
        base_path: str | Path | None = None,
        reload: bool = False,
        local: bool = False,
    ) -> Deployment:
        """Deploy YAML text or a YAML file."""
        return self._portal.call(
            self._client.deployments.create(config, base_path=base_path, reload=reload, local=local)
        )

    def list(self) -> builtins.list[Deployment]:
        """Every deployment."""
        return self._portal.call(self._client.deployments.list())

    def get(self, name: str) -> Deployment:
        """One deployment."""
        return self._portal.call(self._client.deployments.get(name))

    def delete(self, name: str) -> None:
        """Delete a deployment."""
        self._portal.call(self._client.deployments.delete(name))

    def reload(self, name: str) -> Deployment:
        """Reload a deployment."""
        return self._portal.call(self._client.deployments.reload(name))

    def progress(self, name: str) -> Iterator[str]:
        """Progress lines of the latest (re)deploy."""
        return self._portal.iterate(self._client.deployments.progress(name))


class SyncServices(_Namespace):
    """Blocking ``client.services``."""

    def list(self, deployment: str) -> builtins.list[Service]:
        """A deployment's services."""
        return self._portal.call(self._client.services.list(deployment))


class SyncTasks(_Namespace):
    """Blocking ``client.tasks`` (see :class:`~llama_mesh.client._resources.Tasks`)."""

    def create(
        self,
        deployment: str,
        input: Mapping[str, Any] | None = None,
        *,
        service: str | None = None,
        session: str | None = None,
    ) -> Task:
        """Queue a task."""
        return self._portal.call(
            self._client.tasks.create(deployment, input, service=service, session=session)
        )

    def get(self, deployment: str, task_id: str) -> Task:
        """One task."""
        return self._portal.call(self._client.tasks.get(deployment, task_id))

    def list(
        self, deployment: str, *, session: str | None = None, status: TaskStatus | str | None = None
    ) -> builtins.list[Task]:
        """A deployment's tasks, newest first."""
        return self._portal.call(
            self._client.tasks.list(deployment, session=session, status=status)
        )

    def cancel(self, deployment: str, task_id: str, *, reason: str = "") -> Task:
        """Cancel a task; returns it as it is afterwards (see AsyncClient's tasks.cancel)."""
        return self._portal.call(self._client.tasks.cancel(deployment, task_id, reason=reason))

    def send_event(
        self, deployment: str, task_id: str, type: str, data: Mapping[str, Any] | None = None
    ) -> None:
        """Send an event into a running task."""
        self._portal.call(self._client.tasks.send_event(deployment, task_id, type, data))

    def events(self, deployment: str, task_id: str, *, from_index: int = 0) -> Iterator[TaskEvent]:
        """The task's events, resumed after a disconnect, ending with the final event."""
        return self._portal.iterate(
            self._client.tasks.events(deployment, task_id, from_index=from_index)
        )

    def result(self, deployment: str, task_id: str) -> Any:
        """Wait for a task's result."""
        return self._portal.call(self._client.tasks.result(deployment, task_id))


class SyncSessions(_Namespace):
    """Blocking ``client.sessions``."""

    def create(self, deployment: str) -> Session:
        """A new session."""
        return self._portal.call(self._client.sessions.create(deployment))

    def list(self, deployment: str) -> builtins.list[Session]:
        """Every session of a deployment."""
        return self._portal.call(self._client.sessions.list(deployment))

    def get(self, deployment: str, session_id: str) -> Session:
        """One session."""
        return self._portal.call(self._client.sessions.get(deployment, session_id))

    def delete(self, deployment: str, session_id: str) -> None:
        """Delete a session."""
        self._portal.call(self._client.sessions.delete(deployment, session_id))
