"""What the API does, in domain terms: both gRPC surfaces (v1 and 0.8) call into this.

Waiting is push-based everywhere: a caller waiting for a result follows the task's record
through the API server's one shared watch of task records (:class:`TaskWatcher`), a caller
streaming events subscribes to the task's event topic.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from typing import Any

from google.protobuf.message import DecodeError

from llama_mesh.server import convert, subjects
from llama_mesh.server.aio import cancel_and_wait, discard
from llama_mesh.server.apiserver.deployments import DeploymentManager
from llama_mesh.server.apiserver.queued import BrokerQueues
from llama_mesh.server.control_plane.store import ControlPlane, StoredTask, TaskChange
from llama_mesh.server.control_plane.watcher import TaskWatcher
from llama_mesh.server.domain import (
    ID_PATTERN,
    EventKind,
    HumanEvent,
    JsonValue,
    Session,
    Task,
    TaskError,
    TaskEvent,
    TaskStatus,
    new_id,
    now,
)
from llama_mesh.server.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from llama_mesh.server.health import Health
from llama_mesh.server.orchestrator import Orchestrator, choose_service
from llama_mesh.server.queues.errors import MessageTooLargeError, QueueError
from llama_mesh.v1 import messages_pb2

MAX_INPUT_BYTES = 4 * 1024 * 1024
"""The largest task input or event payload accepted, as JSON text."""


def check_id(kind: str, value: str) -> str:
    """Reject ids that could not be ours (they become key and subject tokens)."""
    if not ID_PATTERN.fullmatch(value):
        raise InvalidArgumentError(
            f"invalid {kind} {value!r}: use letters, digits, '-' and '_' (at most 128)",
            reason="INVALID_ID",
        )
    return value


def json_within_limit(what: str, value: JsonValue) -> bytes:
    """``value`` as JSON text, the form it travels in; payloads over
    :data:`MAX_INPUT_BYTES` are rejected, naming the limit."""
    text = json.dumps(value).encode()
    if len(text) > MAX_INPUT_BYTES:
        raise InvalidArgumentError(
            f"{what} is {len(text)} bytes of JSON; the limit is {MAX_INPUT_BYTES}",
            reason="PAYLOAD_TOO_LARGE",
        )
    return text


def final_event(task: Task) -> TaskEvent:
    """The event that ends a finished task's stream, stamped with the time the task
    finished (stored with its result), so that every read gives the same event."""
    if task.status is TaskStatus.SUCCEEDED:
        kind, data = EventKind.RESULT, {"result": task.result}
    elif task.status is TaskStatus.CANCELLED:
        kind = EventKind.CANCELLED
        data = {"reason": task.error.message if task.error else "cancelled"}
    else:
        kind = EventKind.FAILED
        error = task.error or TaskError("Unknown", "the task failed")
        data = {"error": error.message, "error_type": error.type}
    return TaskEvent(
        task_id=task.task_id,
        index=task.event_count,
        kind=kind,
        type=kind.name.lower(),
        data=data,
        timestamp=task.finished_at if task.finished_at is not None else task.created_at,
    )


def _final_event_at(task: Task, expected: int) -> TaskEvent:
    """``task``'s final event, never indexed before ``expected``, the next index a stream
    passes on: past the record's count only when the task was cancelled while its run was
    starting (see the worker), and the final event still comes last."""
    final = final_event(task)
    return dataclasses.replace(final, index=max(final.index, expected))


def _first_failure(outcomes: list[object]) -> BaseException | None:
    """The first exception among ``asyncio.gather(..., return_exceptions=True)``'s outcomes."""
    return next((o for o in outcomes if isinstance(o, BaseException)), None)


class Mesh:
    """Tasks, sessions and events of the deployments a :class:`DeploymentManager` runs."""

    def __init__(
        self,
        control_plane: ControlPlane,
        deployments: DeploymentManager,
        orchestrator: Orchestrator,
    ) -> None:
        self.cp = control_plane
        self.queues = BrokerQueues(deployments)
        """Tasks whose message is their only record so far (given to the control plane, so
        that every read of a task finds them)."""
        control_plane.queued = self.queues
        self.brokers = deployments.brokers
        """Each deployment's broker: its task events and input go over it."""
        self.deployments = deployments
        self.orchestrator = orchestrator
        self.watcher = TaskWatcher(control_plane)
        deployments.on_deleted.append(self.watcher.deployment_deleted)
        self.health = Health()
        """What is down now (the server reports it; the status routes read it)."""

    # -- tasks -------------------------------------------------------------------------

    async def create_task(
        self,
        deployment: str,
        *,
        service_id: str | None,
        session_id: str | None,
        input: dict[str, JsonValue],
    ) -> Task:
        """Record a task and queue it; without a session, it starts one (implied by it, see
        :mod:`llama_mesh.server.control_plane.store`)."""
        stored = await self._create_task(
            deployment, new_id(), service_id=service_id, session_id=session_id, input=input
        )
        return stored.task

    async def _create_task(
        self,
        deployment: str,
        task_id: str,
        *,
        service_id: str | None,
        session_id: str | None,
        input: dict[str, JsonValue],
        ends_session: bool = False,
    ) -> StoredTask:
        config = self.deployments.config(deployment)
        service = choose_service(config, service_id)
        input_json = json_within_limit("the task input", input)
        new_session = not session_id
        if session_id:
            check_id("session id", session_id)
            await self.cp.get_session(deployment, session_id, task_ids=False)
        else:
            session_id = task_id  # a session implied by its task: no write of its own
        task = Task(
            task_id=task_id,
            deployment=deployment,
            service_id=service,
            session_id=session_id,
            input=input,
            ends_session=ends_session and new_session,
        )
        generation = self.deployments.generation(deployment)
        stored = StoredTask(task, 0)
        if self.brokers.of(deployment).finds_tasks:
            # One durable write accepts the task: its message, which is its record until
            # its first change (see the worker). A task in an existing session also has its
            # index entry written at the same time: one round trip.
            writes: list[Awaitable[object]] = [
                self.orchestrator.schedule(
                    task, generation=generation, new_session=new_session, input_json=input_json
                )
            ]
            if not new_session:
                writes.append(self.cp.index_task(task))
            failure = _first_failure(await asyncio.gather(*writes, return_exceptions=True))
        else:
            # A broker that cannot find the message by the task's id: the record first,
            # so that the task can be read while it waits in the queue.
            failure = None
            try:
                stored = await self.cp.record_task(task, index=not new_session)
                await self.orchestrator.schedule(
                    task,
                    generation=generation,
                    new_session=new_session,
                    recorded=True,
                    input_json=input_json,
                )
            except Exception as exc:
                failure = exc
        if failure is None:
            if not stored.revision:
                self.watcher.accepted(task)
            return stored
        # Not recorded, queued or filed in its session: fail it rather than leave it QUEUED
        # forever (a worker that got it finds it final).
        reason = f"the task could not be created: {failure}"

        def failed(t: Task) -> Task | None:
            if t.status is not TaskStatus.QUEUED:
                return None
            t.status, t.finished_at = TaskStatus.FAILED, now()
            t.error = TaskError("Unavailable", reason)
            return t

        with contextlib.suppress(NotFoundError, QueueError):
            await self.cp.change_task(deployment, task.task_id, failed, known=stored)
        with contextlib.suppress(QueueError):
            await self.queues.remove(task)
        if isinstance(failure, MessageTooLargeError):
            raise InvalidArgumentError(
                f"the task with its input is {failure.size} bytes, more than the message "
                f"queue's limit of {failure.limit} bytes ({failure.limit_name})",
                reason="PAYLOAD_TOO_LARGE",
            ) from failure
        if isinstance(failure, QueueError):
            raise UnavailableError(reason) from failure
        raise failure

    async def wait_task(self, deployment: str, task_id: str) -> Task:
        """The task once it is final (succeeded, failed or cancelled)."""
        return await self.watcher.wait_final(deployment, task_id)

    async def run_task(
        self,
        deployment: str,
        *,
        service_id: str | None,
        session_id: str | None,
        input: dict[str, JsonValue],
        ends_session: bool = False,
    ) -> Task:
        """Create a task and wait for it to be final. ``ends_session``: a task without a
        session does not keep the one it implies (see ``Task.ends_session``).

        The wait listens before the task is written, so it starts from the record as
        written here: no read of the record on the way to the result.
        """
        task_id = new_id()
        with self.watcher.listen(deployment, task_id) as listening:
            stored = await self._create_task(
                deployment,
                task_id,
                service_id=service_id,
                session_id=session_id,
                input=input,
                ends_session=ends_session,
            )
            return await listening.final(stored)

    async def get_task(self, deployment: str, task_id: str) -> Task:
        """A task of a deployment."""
        self.deployments.check_exists(deployment)  # readable while deploying or failed
        return await self.cp.get_task(deployment, check_id("task id", task_id))

    async def task_so_far(self, deployment: str, task_id: str) -> Task:
        """A task as :meth:`get_task` gives it, but while it has not finished its
        ``event_count`` counts the workflow events published so far (its record counts
        them only once it finishes): what a reader of the events up to now needs."""
        task = await self.get_task(deployment, task_id)
        if task.status.is_final:
            return task
        raw = await self.brokers.of(deployment).last_message(
            subjects.events_topic(deployment, task_id)
        )
        if raw is not None:
            try:
                last = messages_pb2.EventMessage.FromString(raw)
            except DecodeError:
                return task
            task.event_count = max(task.event_count, last.index + 1)
        return task

    async def list_tasks(self, deployment: str, session_id: str | None = None) -> list[Task]:
        """A deployment's tasks, newest first."""
        self.deployments.check_exists(deployment)  # readable while deploying or failed
        if session_id:
            check_id("session id", session_id)
        return await self.cp.list_tasks(deployment, session_id or None)

    async def watch_tasks(self, deployment: str) -> AsyncGenerator[TaskChange | None, None]:
        """A deployment's tasks now, ``None``, then their changes (see
        :meth:`TaskWatcher.watch_deployment`)."""
        self.deployments.check_exists(deployment)
        async for change in self.watcher.watch_deployment(deployment):
            yield change

    cancel_wait = 10.0
    """Seconds :meth:`cancel_task` waits for the replica running a task to stop it (or
    for whatever final state it reaches first) before answering with the task as it is."""

    async def cancel_task(self, deployment: str, task_id: str, reason: str = "") -> Task:
        """Cancel a task: at once when queued, via its replica when running; the task as
        it is afterwards (final, unless its replica did not stop it within
        :attr:`cancel_wait`)."""
        task = await self.get_task(deployment, task_id)
        if task.status.is_final:
            return task
        reason = reason or "cancelled by request"
        cancelled_queued = False

        def cancel_queued(t: Task) -> Task | None:
            nonlocal cancelled_queued
            cancelled_queued = t.status is TaskStatus.QUEUED
            if not cancelled_queued:
                return None
            t.status, t.error, t.finished_at = (
                TaskStatus.CANCELLED,
                TaskError("Cancelled", reason),
                now(),
            )
            return t

        task = await self.cp.update_task(deployment, task_id, cancel_queued)
        if task.status.is_final:
            if cancelled_queued:
                # No replica need see it; one that got it already finds it cancelled.
                with contextlib.suppress(QueueError):
                    await self.queues.remove(task)
            return task
        msg = messages_pb2.TaskInputMessage(cancel=messages_pb2.CancelMessage(reason=reason))
        msg.cancel.requested_at.CopyFrom(convert.to_timestamp(now()))
        await self.brokers.of(deployment).publish(
            subjects.inputs_topic(deployment, task_id), msg.SerializeToString()
        )
        try:
            async with asyncio.timeout(self.cancel_wait):
                return await self.watcher.wait_final(deployment, task_id)
        except TimeoutError:
            return await self.task_so_far(deployment, task_id)

    async def send_event(self, deployment: str, task_id: str, event: HumanEvent) -> None:
        """Send an event into a task (queued ones receive it when they start)."""
        task = await self.get_task(deployment, task_id)
        if task.status.is_final:
            raise FailedPreconditionError(
                f"Task '{task_id}' has finished ({task.status.name.lower()}); "
                "it takes no more events",
                reason="TASK_FINISHED",
            )
        if not event.type:
            raise InvalidArgumentError("the event needs a type", reason="INVALID_EVENT")
        data_json = json_within_limit("the event", event.data)
        msg = messages_pb2.TaskInputMessage(
            human_event=messages_pb2.HumanEventMessage(type=event.type, data_json=data_json)
        )
        msg.human_event.sent_at.CopyFrom(convert.to_timestamp(now()))
        await self.brokers.of(deployment).publish(
            subjects.inputs_topic(deployment, task_id), msg.SerializeToString()
        )

    final_event_grace = 30.0
    """Seconds a stream of a finished task waits for workflow events still missing before
    it ends with the final event anyway (see :meth:`stream_events`). A final record counts
    only events the broker stored (a worker's publish waits out a failover, and one that
    fails fails the delivery), so missing ones are late: this reader's subscription is
    resuming after a failover (noticed within 5 s, then resubscribed once leaders are
    elected), which takes longer than a few seconds."""

    async def stream_events(
        self, deployment: str, task_id: str, *, from_index: int = 0
    ) -> AsyncIterator[TaskEvent]:
        """The task's events from ``from_index`` on, each once, ending with the final event.

        Workflow events come from the task's event topic. A task redelivered after a worker
        died publishes its events again from index 0; indexes already passed on are
        skipped. The final event (result, failure or cancellation) is made from the task's
        record, which says how many workflow events came before it: once the record is
        final and those have been passed on, the stream ends with it. Should some never
        arrive, it ends :attr:`final_event_grace` seconds after the last one anyway.
        """
        task = await self.get_task(deployment, task_id)
        if from_index < 0:
            raise InvalidArgumentError("from_index must be >= 0", reason="INVALID_INDEX")
        if task.status.is_final and from_index > task.event_count:
            return
        expected = from_index
        stream = self.brokers.of(deployment).subscribe(subjects.events_topic(deployment, task_id))
        record = asyncio.ensure_future(self._final(task))
        try:
            while True:
                try:
                    raw = await self._next_or_final(stream, record, expected)
                except StopAsyncIteration:
                    # The deployment's broker closed: the deployment was deleted, or the
                    # server is stopping. The task's record says how the stream ends.
                    await asyncio.wait({record}, timeout=self.final_event_grace)
                    if not record.done() or record.cancelled():
                        raise UnavailableError("the task's message queue closed") from None
                    # The final task, or the wait's error (NOT_FOUND: deployment deleted).
                    yield _final_event_at(record.result(), expected)
                    return
                if raw is None:
                    yield _final_event_at(record.result(), expected)
                    return
                event = convert.event_from_message(messages_pb2.EventMessage.FromString(raw))
                if event.index < expected:
                    continue
                expected = event.index + 1
                yield event
                if event.kind.is_final:
                    return  # written to the topic by an earlier version of the worker
        finally:
            await discard(record)  # the topic is what the caller follows
            await stream.aclose()

    async def _final(self, task: Task) -> Task:
        """``task`` once final: as it is when it already is, else from the watcher."""
        if task.status.is_final:
            return task
        return await self.watcher.wait_final(task.deployment, task.task_id)

    async def _next_or_final(
        self, stream: AsyncIterator[bytes], record: asyncio.Future[Task], expected: int
    ) -> bytes | None:
        """The next message of ``stream``; ``None`` once ``record`` (the task's final state)
        is known and no workflow event before the final one is missing, or none came within
        the grace period."""
        pending: asyncio.Task[bytes] = asyncio.ensure_future(stream.__anext__())
        try:
            if not record.done():
                either: set[asyncio.Future[Any]] = {pending, record}
                await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            done = record.done() and not record.cancelled()
            if done and isinstance(record.exception(), NotFoundError):
                record.result()  # the task, or its deployment, was deleted: that ends it
            if pending.done() or record.cancelled() or record.exception() is not None:
                return await pending  # no record to fall back on: the topic alone
            if expected >= record.result().event_count:
                return None
            try:
                return await asyncio.wait_for(asyncio.shield(pending), self.final_event_grace)
            except TimeoutError:
                return None
        finally:
            if not pending.done():
                await cancel_and_wait(pending)

    # -- sessions ----------------------------------------------------------------------

    async def create_session(self, deployment: str) -> Session:
        """A new, empty session."""
        self.deployments.config(deployment)
        return await self.cp.create_session(deployment)

    async def get_session(self, deployment: str, session_id: str) -> Session:
        """A session with its task ids."""
        self.deployments.check_exists(deployment)  # readable while deploying or failed
        return await self.cp.get_session(deployment, check_id("session id", session_id))

    async def list_sessions(self, deployment: str) -> list[Session]:
        """A deployment's sessions."""
        self.deployments.check_exists(deployment)  # readable while deploying or failed
        return await self.cp.list_sessions(deployment)

    async def with_task_ids(self, deployment: str, sessions: list[Session]) -> list[Session]:
        """``sessions`` with their task ids filled in (listings leave them empty)."""
        for session in sessions:
            session.task_ids = await self.cp.session_task_ids(deployment, session.session_id)
        return sessions

    async def delete_session(self, deployment: str, session_id: str) -> None:
        """Delete a session and its stored workflow context."""
        self.deployments.config(deployment)
        check_id("session id", session_id)
        await self.cp.delete_session(deployment, session_id)
