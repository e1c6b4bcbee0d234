"""TaskWatcher: one watch of the task records, shared by every caller waiting on a task."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator

import pytest

from llama_mesh.server.control_plane.store import ControlPlane, StoredTask, TaskChange
from llama_mesh.server.control_plane.watcher import TaskWatcher
from llama_mesh.server.domain import Task, TaskStatus, new_id
from llama_mesh.server.errors import NotFoundError, UnavailableError
from llama_mesh.server.queues.errors import QueueUnavailableError
from llama_mesh.server.queues.inprocess import InProcessStateStore
from tests.helpers import assert_eventually

APP = "app"


class BreakableControlPlane(ControlPlane):
    """A control plane whose task watch fails with a broker error when told to."""

    BREAK = "break-the-watch"

    def __init__(self) -> None:
        super().__init__()
        self.watches = 0

    async def break_watch(self) -> None:
        """Write the task whose change the watch answers with a broker error."""
        await self.record_task(
            Task(task_id=self.BREAK, deployment=APP, service_id="-", session_id="-", input={})
        )

    def watch_task_changes(self) -> AsyncGenerator[TaskChange, None]:
        self.watches += 1
        return self._breakable(super().watch_task_changes())

    async def _breakable(
        self, inner: AsyncGenerator[TaskChange, None]
    ) -> AsyncGenerator[TaskChange, None]:
        try:
            async for change in inner:
                if change.task_id == self.BREAK:
                    raise QueueUnavailableError("NATS is unavailable: the node died")
                yield change
        finally:
            await inner.aclose()


@pytest.fixture
async def cp() -> AsyncIterator[BreakableControlPlane]:
    async with InProcessStateStore() as state_store:
        yield await BreakableControlPlane.open(state_store)


@pytest.fixture
async def watcher(cp: ControlPlane) -> AsyncIterator[TaskWatcher]:
    watcher = TaskWatcher(cp, retry_delay=0.05)
    watcher.start()
    yield watcher
    await watcher.close()


async def new_task(cp: ControlPlane) -> Task:
    task = Task(task_id=new_id(), deployment=APP, service_id="svc", session_id="s", input={})
    await cp.record_task(task)
    return task


async def set_status(cp: ControlPlane, task: Task, status: TaskStatus) -> None:
    def change(t: Task) -> Task:
        t.status = status
        t.result = {"done": True} if status is TaskStatus.SUCCEEDED else None
        return t

    await cp.update_task(APP, task.task_id, change)


async def test_follow_yields_the_task_then_each_change_until_final(
    cp: ControlPlane, watcher: TaskWatcher
) -> None:
    task = await new_task(cp)
    seen: list[TaskStatus] = []

    async def follow() -> None:
        async for t in watcher.follow(APP, task.task_id):
            seen.append(t.status)

    following = asyncio.ensure_future(follow())
    await assert_eventually(lambda: seen == [TaskStatus.QUEUED])
    await set_status(cp, task, TaskStatus.RUNNING)
    await set_status(cp, task, TaskStatus.SUCCEEDED)
    await asyncio.wait_for(following, 5)
    assert seen == [TaskStatus.QUEUED, TaskStatus.RUNNING, TaskStatus.SUCCEEDED]
    assert watcher.following == 0


async def test_a_finished_task_is_returned_at_once(cp: ControlPlane, watcher: TaskWatcher) -> None:
    task = await new_task(cp)
    await set_status(cp, task, TaskStatus.SUCCEEDED)
    final = await asyncio.wait_for(watcher.wait_final(APP, task.task_id), 5)
    assert (final.status, final.result) == (TaskStatus.SUCCEEDED, {"done": True})


async def test_many_callers_wait_on_one_watch(
    cp: BreakableControlPlane, watcher: TaskWatcher
) -> None:
    tasks = [await new_task(cp) for _ in range(20)]
    waits = [asyncio.ensure_future(watcher.wait_final(APP, t.task_id)) for t in tasks * 2]
    await assert_eventually(lambda: watcher.following == 40)
    for task in tasks:
        await set_status(cp, task, TaskStatus.SUCCEEDED)
    finals = await asyncio.wait_for(asyncio.gather(*waits), 5)
    assert [f.task_id for f in finals] == [t.task_id for t in tasks * 2]
    assert cp.watches == 1 and watcher.following == 0


async def test_an_unknown_task_is_not_found(watcher: TaskWatcher) -> None:
    with pytest.raises(NotFoundError):
        await watcher.wait_final(APP, "nope")
    assert watcher.following == 0


async def test_a_task_deleted_while_followed_is_not_found(
    cp: ControlPlane, watcher: TaskWatcher
) -> None:
    task = await new_task(cp)
    waiting = asyncio.ensure_future(watcher.wait_final(APP, task.task_id))
    await assert_eventually(lambda: watcher.following == 1)
    await cp.delete_deployment(APP)
    with pytest.raises(NotFoundError, match="deleted"):
        await asyncio.wait_for(waiting, 5)


async def test_a_change_made_while_the_watch_was_down_is_not_missed(
    cp: BreakableControlPlane, watcher: TaskWatcher
) -> None:
    """The watch fails (a broker error); the task finishes before it is watched again;
    the waiting caller still gets the result, from the re-read after the new watch."""
    task = await new_task(cp)
    waiting = asyncio.ensure_future(watcher.wait_final(APP, task.task_id))
    await assert_eventually(lambda: watcher.following == 1)
    await cp.break_watch()
    await set_status(cp, task, TaskStatus.SUCCEEDED)
    final = await asyncio.wait_for(waiting, 5)
    assert final.status is TaskStatus.SUCCEEDED
    assert cp.watches == 2


async def test_listeners_see_every_change(cp: ControlPlane, watcher: TaskWatcher) -> None:
    changes: list[tuple[str, TaskStatus | None]] = []
    watcher.add_listener(lambda c: changes.append((c.task_id, c.task.status if c.task else None)))
    task = await new_task(cp)
    await set_status(cp, task, TaskStatus.RUNNING)
    await set_status(cp, task, TaskStatus.FAILED)
    expected = [(task.task_id, s) for s in (TaskStatus.QUEUED, TaskStatus.RUNNING)]
    expected.append((task.task_id, TaskStatus.FAILED))
    await assert_eventually(lambda: changes == expected)


async def test_closing_fails_waiting_callers(cp: ControlPlane) -> None:
    watcher = TaskWatcher(cp)
    task = await new_task(cp)
    waiting = asyncio.ensure_future(watcher.wait_final(APP, task.task_id))
    await assert_eventually(lambda: watcher.following == 1)
    await watcher.close()
    with pytest.raises(UnavailableError):
        await asyncio.wait_for(waiting, 5)
    with pytest.raises(UnavailableError):
        await watcher.wait_final(APP, task.task_id)


async def test_a_listener_from_before_the_write_waits_without_reading(
    cp: BreakableControlPlane, watcher: TaskWatcher
) -> None:
    """A creator listens before writing its task and waits from the revision it wrote:
    every later change is heard, and the watch failing while the task is not yet written
    (the re-read finds nothing) does not end the wait."""
    task = Task(task_id=new_id(), deployment=APP, service_id="svc", session_id="s", input={})
    with watcher.listen(APP, task.task_id) as listening:
        assert watcher.following == 1
        await cp.break_watch()
        await assert_eventually(lambda: cp.watches == 2)
        # The re-read after the new watch found nothing: its "not found" is waiting.
        await assert_eventually(lambda: not listening._inbox.empty())
        stored = await cp.record_task(task)
        waiting = asyncio.ensure_future(listening.final(stored))
        await set_status(cp, task, TaskStatus.RUNNING)
        await set_status(cp, task, TaskStatus.SUCCEEDED)
        final = await asyncio.wait_for(waiting, 5)
    assert (final.status, final.result) == (TaskStatus.SUCCEEDED, {"done": True})
    assert watcher.following == 0


async def test_a_listener_given_a_final_task_returns_it(
    cp: ControlPlane, watcher: TaskWatcher
) -> None:
    task = await new_task(cp)
    task.status = TaskStatus.CANCELLED
    with watcher.listen(APP, task.task_id) as listening:
        final = await asyncio.wait_for(listening.final(StoredTask(task, 1)), 5)
    assert final.status is TaskStatus.CANCELLED


async def test_a_deployment_watch_gives_the_snapshot_then_changes_of_that_deployment_only(
    cp: BreakableControlPlane, watcher: TaskWatcher
) -> None:
    """watch_deployment: the deployment's tasks now, then None, then each later change of
    its tasks (not another deployment's), each revision once; a change made while the
    shared watch was down (a broker error) still arrives, from the re-read after it."""
    mine = Task(task_id=new_id(), deployment="mine", service_id="s", session_id="s", input={})
    await cp.record_task(mine)
    changes = watcher.watch_deployment("mine")
    first = await asyncio.wait_for(anext(changes), 5)
    assert first is not None and first.task is not None
    assert (first.task_id, first.task.status) == (mine.task_id, TaskStatus.QUEUED)
    assert await asyncio.wait_for(anext(changes), 5) is None
    assert watcher.watching == 1

    await new_task(cp)  # another deployment's
    later = Task(task_id=new_id(), deployment="mine", service_id="s", session_id="s", input={})
    await cp.record_task(later)
    change = await asyncio.wait_for(anext(changes), 5)
    assert change is not None and change.task_id == later.task_id

    await cp.break_watch()

    def running(t: Task) -> Task:
        t.status = TaskStatus.RUNNING
        return t

    await cp.update_task("mine", mine.task_id, running)
    change = await asyncio.wait_for(anext(changes), 5)
    assert change is not None and change.task is not None
    assert (change.task_id, change.task.status) == (mine.task_id, TaskStatus.RUNNING)
    await assert_eventually(lambda: cp.watches == 2)

    await cp.delete_deployment("mine")
    gone = [await asyncio.wait_for(anext(changes), 5) for _ in range(2)]
    assert {(c.task_id, c.task) for c in gone if c is not None} == {
        (mine.task_id, None),
        (later.task_id, None),
    }
    await changes.aclose()
    assert watcher.watching == 0


async def test_closing_ends_deployment_watches(cp: ControlPlane) -> None:
    """A deployment watch open when the watcher closes ends with UnavailableError; a new
    one is refused the same way."""
    watcher = TaskWatcher(cp)
    changes = watcher.watch_deployment(APP)
    assert await asyncio.wait_for(anext(changes), 5) is None
    await watcher.close()
    with pytest.raises(UnavailableError):
        await asyncio.wait_for(anext(changes), 5)
    with pytest.raises(UnavailableError):
        await anext(watcher.watch_deployment(APP))


class Queues:
    """Tasks waiting in a queue without a record, as the API server's broker lookup sees
    them: a message leaves the queue once its task's record is stored (the worker's ack)."""

    def __init__(self) -> None:
        self.waiting: dict[str, Task] = {}

    async def find(self, deployment: str, task_id: str) -> Task | None:
        task = self.waiting.get(task_id)
        return task if task is not None and task.deployment == deployment else None

    async def in_queues(self, deployment: str) -> list[Task]:
        return [t for t in self.waiting.values() if t.deployment == deployment]


async def test_a_task_without_a_record_is_followed_from_its_message(
    cp: BreakableControlPlane, watcher: TaskWatcher
) -> None:
    """A task accepted by its message alone: following it starts from the message (QUEUED,
    revision 0); its first change creates the record and is heard, also when the watch
    failed meanwhile (the re-read finds it queued again); a deployment watch lists it."""
    queues = Queues()
    cp.queued = queues
    task = Task(task_id=new_id(), deployment=APP, service_id="svc", session_id="s", input={})
    queues.waiting[task.task_id] = task
    seen: list[tuple[TaskStatus, bool]] = []

    async def follow() -> None:
        async for t in watcher.follow(APP, task.task_id):
            seen.append((t.status, task.task_id in queues.waiting))

    following = asyncio.ensure_future(follow())
    await assert_eventually(lambda: seen == [(TaskStatus.QUEUED, True)])
    snapshot = watcher.watch_deployment(APP)
    first = await asyncio.wait_for(anext(snapshot), 5)
    assert first is not None and (first.task_id, first.revision) == (task.task_id, 0)
    await snapshot.aclose()
    await cp.break_watch()
    await assert_eventually(lambda: cp.watches == 2)

    def running(t: Task) -> Task:
        t.status = TaskStatus.RUNNING
        return t

    started = await cp.change_task(APP, task.task_id, running, known=StoredTask(task, 0))
    assert started.revision > 0
    del queues.waiting[task.task_id]
    await set_status(cp, task, TaskStatus.SUCCEEDED)
    await asyncio.wait_for(following, 5)
    assert [status for status, _ in seen] == [
        TaskStatus.QUEUED,
        TaskStatus.RUNNING,
        TaskStatus.SUCCEEDED,
    ]


async def test_the_first_change_of_a_task_cancelled_meanwhile_finds_it_cancelled(
    cp: ControlPlane,
) -> None:
    """Two first changes of a task without a record (a replica starting it, a caller
    cancelling it): one creates the record, the other applies to it — a start never
    overwrites a cancellation."""
    task = Task(task_id=new_id(), deployment=APP, service_id="svc", session_id="s", input={})

    def cancel(t: Task) -> Task | None:
        if t.status is not TaskStatus.QUEUED:
            return None
        t.status = TaskStatus.CANCELLED
        return t

    def start(t: Task) -> Task | None:
        if t.status.is_final:
            return None
        t.status = TaskStatus.RUNNING
        return t

    await cp.change_task(APP, task.task_id, cancel, known=StoredTask(task, 0))
    after = await cp.change_task(APP, task.task_id, start, known=StoredTask(task, 0))
    assert after.task.status is TaskStatus.CANCELLED and after.revision > 0
    assert (await cp.get_task(APP, task.task_id)).status is TaskStatus.CANCELLED
