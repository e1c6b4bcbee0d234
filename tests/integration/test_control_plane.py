"""The control plane's listings and deletions over a real nats-server, with more keys than
it reads or deletes at once."""

from __future__ import annotations

import asyncio

from llama_mesh.server.control_plane.store import ControlPlane
from llama_mesh.server.domain import Task, new_id
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
