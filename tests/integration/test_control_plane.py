"""The control plane's listings and deletions over a real nats-server, with more keys than
it reads or deletes at once."""

from __future__ import annotations

import asyncio

import pytest

from llama_mesh.server.control_plane.store import ControlPlane
from llama_mesh.server.domain import Task, new_id
from llama_mesh.server.errors import NotFoundError
from llama_mesh.server.nats_server import NatsServer
from llama_mesh.server.queues.nats import NatsStateStore, connect_nats

TASKS = 150
"""Per deployment: more than one batch of keys."""


async def fill(cp: ControlPlane, deployment: str) -> tuple[list[str], list[Task]]:
    """Two sessions with ``TASKS`` tasks between them and one stored context."""
    sessions = [(await cp.create_session(deployment)).session_id for _ in range(2)]
    tasks = [
        Task(
            task_id=new_id(),
            deployment=deployment,
            service_id="svc",
            session_id=sessions[i % 2],
            input={"i": i},
            created_at=1_000_000.0 + i,
        )
        for i in range(TASKS)
    ]
    await asyncio.gather(*(cp.record_task(task) for task in tasks))
    await cp.put_session_state(deployment, sessions[0], b"{}", task_id=tasks[0].task_id)
    return sessions, tasks


async def test_listings_and_deleting_a_deployment(nats_server: NatsServer) -> None:
    """Listings return every task (newest first, by session too) and session; deleting a
    deployment removes all of its keys and none of another's."""
    connection = await connect_nats(nats_server.url)
    try:
        cp = await ControlPlane.open(NatsStateStore(connection))
        gone_sessions, _ = await fill(cp, "gone")
        kept_sessions, kept_tasks = await fill(cp, "kept")

        listed = await cp.list_tasks("kept")
        assert [t.task_id for t in listed] == [t.task_id for t in reversed(kept_tasks)]
        first = await cp.list_tasks("kept", kept_sessions[0])
        assert [t.task_id for t in first] == [t.task_id for t in reversed(kept_tasks[::2])]
        assert await cp.session_task_ids("kept", kept_sessions[1]) == [
            t.task_id for t in kept_tasks[1::2]
        ]
        assert sorted(s.session_id for s in await cp.list_sessions("kept")) == sorted(kept_sessions)

        await cp.delete_deployment("gone")
        assert await cp.list_tasks("gone") == []
        assert await cp.list_sessions("gone") == []
        assert await cp.session_task_ids("gone", gone_sessions[0]) == []
        assert await cp.get_session_state("gone", gone_sessions[0]) is None

        assert len(await cp.list_tasks("kept")) == TASKS
        assert len(await cp.list_sessions("kept")) == 2
        assert await cp.get_session_state("kept", kept_sessions[0]) == b"{}"
    finally:
        await connection.close()


def _task(deployment: str, session_id: str | None = None, *, at: float) -> Task:
    """A task of ``session_id``, or else one that implies its session (the same id)."""
    task_id = new_id()
    return Task(
        task_id=task_id,
        deployment=deployment,
        service_id="svc",
        session_id=session_id or task_id,
        input={},
        created_at=at,
    )


async def test_a_session_implied_by_its_task(nats_server: NatsServer) -> None:
    """A task whose session id is its own implies its session, which has no record: it is
    read, listed (among stored sessions, by id) and lists its later tasks after it.
    Deleted, it stays deleted while its task lives on; deleting the deployment forgets
    every session."""
    connection = await connect_nats(nats_server.url)
    try:
        state = NatsStateStore(connection)
        cp = await ControlPlane.open(state)
        stored = await cp.create_session("d")
        first = _task("d", at=1_000_000.0)
        later = _task("d", first.session_id, at=1_000_001.0)
        other = _task("d", at=1_000_002.0)
        await cp.record_task(first, index=False)
        await cp.record_task(later)
        await cp.record_task(other, index=False)
        # Only the session created as such has a record.
        assert await (await state.kv("sessions")).keys("d.") == [f"d.{stored.session_id}"]

        session = await cp.get_session("d", first.task_id)
        assert session.task_ids == [first.task_id, later.task_id]
        assert session.created_at == first.created_at
        assert await cp.session_task_ids("d", first.task_id) == session.task_ids
        listed = await cp.list_sessions("d")
        ids = sorted([stored.session_id, first.task_id, other.task_id])
        assert [s.session_id for s in listed] == ids
        assert all(s.task_ids == [] for s in listed)
        # A task in a stored session or another's implies nothing.
        with pytest.raises(NotFoundError):
            await cp.get_session("d", later.task_id)

        await cp.delete_session("d", first.task_id)
        with pytest.raises(NotFoundError):
            await cp.get_session("d", first.task_id)
        assert await cp.session_task_ids("d", first.task_id) == []
        assert await cp.list_tasks("d", first.task_id) == []
        assert first.task_id not in [s.session_id for s in await cp.list_sessions("d")]
        assert (await cp.get_task("d", first.task_id)).session_id == first.task_id
        with pytest.raises(NotFoundError):
            await cp.delete_session("d", first.task_id)

        await cp.delete_deployment("d")
        assert await cp.list_sessions("d") == []
        for session_id in ids:
            with pytest.raises(NotFoundError):
                await cp.get_session("d", session_id)
    finally:
        await connection.close()
