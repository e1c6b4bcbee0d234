"""One watch of every task record per API server, shared by everyone waiting on a task.

A caller waiting for a result used to open a watch (a server-side consumer) of its task's
key: three broker round trips before the wait could even begin, and one consumer per
waiting caller for the broker to keep. Instead, :class:`TaskWatcher` keeps one watch of the
whole ``tasks`` bucket and hands each change to the callers following that task, to the
callers watching that task's deployment, and to listeners (the metrics) that want every
change.

The watch outlives broker trouble: when it fails it is opened again after a pause, and every
task someone follows is read again, so a change made while it was down is not missed.
Followers see a task's revisions in increasing order, each at most once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator

from llama_mesh.server.aio import cancel_and_wait, raise_if_cancelling
from llama_mesh.server.control_plane.store import ControlPlane, StoredTask, TaskChange
from llama_mesh.server.domain import Task
from llama_mesh.server.errors import NotFoundError, UnavailableError
from llama_mesh.server.queues.errors import QueueError

logger = logging.getLogger(__name__)


class DeploymentDeletedError(NotFoundError):
    """What :meth:`TaskWatcher.deployment_deleted` ends waits and watches with."""

    def __init__(self, deployment: str) -> None:
        super().__init__(f"Deployment '{deployment}' was deleted", reason="DEPLOYMENT_NOT_FOUND")


_Key = tuple[str, str]
_Inbox = asyncio.Queue[TaskChange | BaseException]


class TaskWatcher:
    """Follow tasks through one shared watch; :meth:`start` (or first use), :meth:`close`."""

    def __init__(self, control_plane: ControlPlane, *, retry_delay: float = 0.5) -> None:
        self._cp = control_plane
        self._retry_delay = retry_delay
        self._inboxes: dict[_Key, set[_Inbox]] = {}
        self._deployment_inboxes: dict[str, set[_Inbox]] = {}
        self._listeners: list[Callable[[TaskChange], None]] = []
        self._pump: asyncio.Task[None] | None = None
        self._closed = False

    def add_listener(self, listener: Callable[[TaskChange], None]) -> None:
        """Call ``listener`` with every change of every task from now on (it must not block)."""
        self._listeners.append(listener)

    def accepted(self, task: Task) -> None:
        """Pass on a task this server accepted without a record (its message is its record,
        see ``TaskMessage.recorded``) as its QUEUED change at revision 0: the shared watch
        carries none for it. Watchers of its deployment on this server and listeners (the
        metrics) hear it; another API server's hear of the task at its first change."""
        self._dispatch(TaskChange(task.deployment, task.task_id, task, 0))

    def start(self) -> None:
        """Begin watching (idempotent); changes written from now on reach followers."""
        if self._pump is None and not self._closed:
            self._pump = asyncio.create_task(self._run(), name="task-watcher")

    async def close(self) -> None:
        """Stop watching; current followers get :class:`UnavailableError`."""
        self._closed = True
        if self._pump is not None:
            await cancel_and_wait(self._pump)
        self._fail_all(UnavailableError("the API server is shutting down"))

    async def follow(self, deployment: str, task_id: str) -> AsyncIterator[Task]:
        """The task now and after each change; ends after it reaches a final status.

        :class:`NotFoundError` when it does not exist or is deleted meanwhile.
        """
        # Listen before reading: a change written after the read is then heard.
        with self.listen(deployment, task_id) as listening:
            stored = await self._cp.read_task(deployment, task_id)
            yield stored.task
            async for task in listening.changes(stored):
                yield task

    async def wait_final(self, deployment: str, task_id: str) -> Task:
        """The task once it is final (succeeded, failed or cancelled)."""
        async for task in self.follow(deployment, task_id):
            if task.status.is_final:
                return task
        raise AssertionError("follow() ends with the final task")

    async def watch_deployment(self, deployment: str) -> AsyncGenerator[TaskChange | None, None]:
        """The deployment's tasks now, then ``None``, then each change of its tasks.

        Each task's revisions come in increasing order, each at most once; a deleted task
        comes as a change whose ``task`` is ``None``. Runs until the caller stops iterating,
        :class:`NotFoundError` once the deployment is deleted (see
        :meth:`deployment_deleted`), or :class:`UnavailableError` when the watcher closes.
        """
        if self._closed:
            raise UnavailableError("the API server is shutting down")
        self.start()
        inbox: _Inbox = asyncio.Queue()
        self._deployment_inboxes.setdefault(deployment, set()).add(inbox)
        try:
            # Listening before the read: a change written after it is then heard.
            seen: dict[str, int] = {}
            gone: set[str] = set()
            for stored in await self._cp.list_stored_tasks(deployment):
                seen[stored.task.task_id] = stored.revision
                yield TaskChange(deployment, stored.task.task_id, stored.task, stored.revision)
            yield None
            while True:
                item = await inbox.get()
                if isinstance(item, DeploymentDeletedError):
                    # The deployment was deleted, with its tasks: those whose deletion has
                    # not come through the watch yet (or never will: queued ones had no
                    # record) are reported deleted before the end.
                    for task_id in seen.keys() - gone:
                        yield TaskChange(deployment, task_id, None, seen[task_id] + 1)
                    raise item
                if isinstance(item, BaseException):
                    raise item
                if item.revision <= seen.get(item.task_id, -1):
                    continue  # in the snapshot already, or seen
                seen[item.task_id] = item.revision
                if item.task is None:
                    gone.add(item.task_id)
                else:
                    gone.discard(item.task_id)
                yield item
        finally:
            inboxes = self._deployment_inboxes.get(deployment)
            if inboxes is not None:
                inboxes.discard(inbox)
                if not inboxes:
                    del self._deployment_inboxes[deployment]

    @contextlib.contextmanager
    def listen(self, deployment: str, task_id: str) -> Iterator[Listening]:
        """Hear the task's changes from now on, before it is even written.

        For a caller that creates the task itself and so knows its first revision: waiting
        then needs no read of the record (see :meth:`Listening.final`).
        """
        if self._closed:
            raise UnavailableError("the API server is shutting down")
        self.start()
        key = (deployment, task_id)
        inbox: _Inbox = asyncio.Queue()
        self._inboxes.setdefault(key, set()).add(inbox)
        try:
            yield Listening(self._cp, deployment, task_id, inbox)
        finally:
            self._forget(key, inbox)

    def _forget(self, key: _Key, inbox: _Inbox) -> None:
        inboxes = self._inboxes.get(key)
        if inboxes is not None:
            inboxes.discard(inbox)
            if not inboxes:
                del self._inboxes[key]

    @property
    def following(self) -> int:
        """How many callers follow a task now."""
        return sum(len(inboxes) for inboxes in self._inboxes.values())

    @property
    def watching(self) -> int:
        """How many callers watch a deployment's tasks now."""
        return sum(len(inboxes) for inboxes in self._deployment_inboxes.values())

    # -- the shared watch ----------------------------------------------------------------

    def _dispatch(self, change: TaskChange) -> None:
        for inbox in self._inboxes.get((change.deployment, change.task_id), ()):
            inbox.put_nowait(change)
        for inbox in self._deployment_inboxes.get(change.deployment, ()):
            inbox.put_nowait(change)
        for listener in self._listeners:
            try:
                listener(change)
            except Exception:
                logger.exception("a task listener failed on %s", change.task_id)

    def deployment_deleted(self, deployment: str) -> None:
        """End every watch of ``deployment`` and every wait for one of its tasks with
        :class:`NotFoundError`: a task still queued when its deployment goes has no record
        whose deletion would tell its waiters, and a deployment's watch has nothing left to
        watch."""
        error = DeploymentDeletedError(deployment)
        for (of, _), inboxes in self._inboxes.items():
            if of == deployment:
                for inbox in inboxes:
                    inbox.put_nowait(error)
        for inbox in self._deployment_inboxes.get(deployment, ()):
            inbox.put_nowait(error)

    def _fail_all(self, error: BaseException) -> None:
        for inboxes in (*self._inboxes.values(), *self._deployment_inboxes.values()):
            for inbox in inboxes:
                inbox.put_nowait(error)

    async def _run(self) -> None:
        first = True
        while True:
            changes = self._cp.watch_task_changes()
            try:
                if not first:
                    await self._read_followed()
                first = False
                async for change in changes:
                    self._dispatch(change)
                # The watch ends only when the message queue closes.
                self._closed = True
                self._fail_all(UnavailableError("the message queue closed"))
                return
            except QueueError as exc:
                logger.warning("the task watch failed (%s); watching again", exc)
            finally:
                await changes.aclose()
            raise_if_cancelling()
            await asyncio.sleep(self._retry_delay)

    async def _read_followed(self) -> None:
        """Read every followed task again: changes while the watch was down were missed.

        Called after the new watch was created, whose changes start from its creation, so
        a change is either read here or delivered by the watch (or both: followers skip
        revisions they have seen). A deployment's watchers get each of its tasks again; a
        task deleted while the watch was down is not reported to them.
        """
        for deployment, inboxes in list(self._deployment_inboxes.items()):
            for stored in await self._cp.list_stored_tasks(deployment):
                change = TaskChange(deployment, stored.task.task_id, stored.task, stored.revision)
                for inbox in inboxes:
                    inbox.put_nowait(change)
        for deployment, task_id in list(self._inboxes):
            try:
                stored = await self._cp.read_task(deployment, task_id)
            except NotFoundError as exc:
                for inbox in self._inboxes.get((deployment, task_id), ()):
                    inbox.put_nowait(exc)
                continue
            self._dispatch(TaskChange(deployment, task_id, stored.task, stored.revision))


class Listening:
    """A task's changes as :meth:`TaskWatcher.listen` hears them."""

    def __init__(self, cp: ControlPlane, deployment: str, task_id: str, inbox: _Inbox) -> None:
        self._cp = cp
        self._deployment = deployment
        self._task_id = task_id
        self._inbox = inbox

    async def final(self, known: StoredTask) -> Task:
        """The task once it is final, starting from ``known`` (as its creator wrote it)."""
        final = known.task
        async for changed in self.changes(known):
            final = changed
        return final

    async def changes(self, known: StoredTask) -> AsyncIterator[Task]:
        """The task after each change newer than ``known``, until it is final."""
        current = known
        while not current.task.status.is_final:
            item = await self._inbox.get()
            if isinstance(item, NotFoundError) and not isinstance(item, DeploymentDeletedError):
                # After a watch failure every followed task is read again; that read may
                # have come before this task was written. Look again rather than give up.
                stored = await self._cp.read_task(self._deployment, self._task_id)
                item = TaskChange(self._deployment, self._task_id, stored.task, stored.revision)
            if isinstance(item, BaseException):
                raise item
            if item.revision <= current.revision:
                continue  # written before the known revision, or seen already
            if item.task is None:
                raise NotFoundError(f"Task '{self._task_id}' was deleted", reason="TASK_NOT_FOUND")
            current = StoredTask(item.task, item.revision)
            yield current.task
