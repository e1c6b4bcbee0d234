"""A replica of a workflow service: pulls tasks from its work queue and runs them.

Reliability, in the order things happen for one delivery:

1. A first delivery of a message that is its task's only record (``TaskMessage.recorded``
   unset: the API server stored nothing else to accept the task) starts the run at once,
   with no read. Otherwise the record is read first: a task already final (cancelled while
   queued, or a crash between "result stored" and "ack") is acknowledged without running
   again; a delivery past ``max-retries`` redeliveries marks the task failed with the
   reason and is acknowledged: a task never disappears silently.
2. RUNNING is written once the run lasts :data:`START_NOTICE` or waits for input; input
   sent to the task (and a cancellation) is taken from then on. The first write of a task
   without a record creates it; should the task have been cancelled meanwhile (its record
   created as CANCELLED), the run is cancelled, or its result dropped if it finished first.
3. While the workflow runs, ``in_progress()`` keeps the delivery from being redelivered;
   if this process dies, the heartbeats stop and another replica gets the task after
   ``ack_wait``. Should a redelivery reach the replica that still runs the task (its
   heartbeats went unheard longer than ``ack_wait``, as while a NATS cluster elects a
   consumer leader), it waits for that run, kept alive, and is then handled as any
   redelivery: it finds the task final and is acknowledged. One replica never runs a task
   twice at once.
4. Session context, then the result, are stored before the message is acknowledged. The
   task's final event is not published: readers make it from the record (which counts
   the workflow events before it).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import socket
from collections.abc import AsyncGenerator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import DecodeError

from llama_mesh.server import convert, subjects
from llama_mesh.server.aio import cancel_and_wait, discard, raise_if_cancelling
from llama_mesh.server.control_plane.store import HEARTBEAT_INTERVAL, ControlPlane, StoredTask
from llama_mesh.server.domain import (
    ID_PATTERN,
    EventKind,
    HumanEvent,
    JsonValue,
    ServiceInstance,
    Task,
    TaskError,
    TaskEvent,
    TaskStatus,
    new_id,
    now,
)
from llama_mesh.server.errors import NotFoundError
from llama_mesh.server.queues.broker import Broker, ConsumerOptions, Delivery
from llama_mesh.server.queues.errors import MessageTooLargeError, QueueUnavailableError
from llama_mesh.server.service.runner import (
    CancelRequest,
    ContextKept,
    RunOutcome,
    TaskInput,
    run_workflow,
)
from llama_mesh.v1 import messages_pb2

logger = logging.getLogger(__name__)

START_NOTICE = 0.05
"""Seconds a task runs before RUNNING is written to its record (at once when it asks for
input): a short task goes from QUEUED to its final status in one write."""
LAST_RECORD_PAUSE = 1.0
"""Seconds between attempts to record the failure of a message's last delivery while the
store is unavailable (each attempt is itself tried again for a while)."""


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    """What a replica runs and how."""

    deployment: str
    service_id: str
    max_concurrent_tasks: int = 1
    max_retries: int = 2
    timeout: float | None = None
    ack_wait: float = 10.0
    generation: int = 0
    instance_id: str = field(default_factory=new_id)

    @property
    def consumer_options(self) -> ConsumerOptions:
        """One delivery more than the retries allow, so the last one can record the failure."""
        return ConsumerOptions(
            max_in_flight=self.max_concurrent_tasks,
            ack_wait=self.ack_wait,
            max_deliver=self.max_retries + 2,
        )


class Worker:
    """Runs one service's tasks; ``run()`` until ``shutdown()``."""

    def __init__(
        self,
        broker: Broker,
        control_plane: ControlPlane,
        workflow: object,
        settings: WorkerSettings,
        *,
        address: str = "",
    ) -> None:
        self._broker = broker
        self._cp = control_plane
        self._workflow = workflow
        self.settings = settings
        self.instance = ServiceInstance(
            instance_id=settings.instance_id,
            deployment=settings.deployment,
            service_id=settings.service_id,
            hostname=socket.gethostname(),
            pid=os.getpid(),
            address=address,
            generation=settings.generation,
        )
        self._stopping = asyncio.Event()
        self._running: set[asyncio.Task[None]] = set()
        self._runs: dict[str, asyncio.Event] = {}
        """Task id -> set when this replica's run of it ends (deliveries being handled)."""
        self._chores: set[asyncio.Task[None]] = set()
        """Clean-up after tasks (releasing subscriptions), done off the way to the result."""

    @property
    def in_flight(self) -> int:
        """How many tasks this replica runs now."""
        return len(self._runs)

    async def run(self) -> None:
        """Heartbeat and consume tasks until :meth:`shutdown`."""
        await self._cp.heartbeat(self.instance)
        logger.info(
            "worker %s of %s/%s ready",
            self.instance.instance_id,
            self.settings.deployment,
            self.settings.service_id,
        )
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._heartbeats())
                group.create_task(self._consume())
                await self._stopping.wait()
                raise _Stop
        except* _Stop:
            pass
        finally:
            await self._drain()
            with contextlib.suppress(Exception):  # the broker may be gone: do not wait long
                async with asyncio.timeout(5):
                    await self._cp.remove_instance(self.instance)

    async def shutdown(self) -> None:
        """Stop taking tasks; running ones finish (idempotent)."""
        self.stop_soon()

    def stop_soon(self) -> None:
        """Ask :meth:`run` to stop, from a signal handler (idempotent)."""
        self._stopping.set()

    async def _drain(self) -> None:
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        if self._chores:
            await asyncio.gather(*self._chores, return_exceptions=True)

    def _spawn(self, chore: Coroutine[Any, Any, None], *, name: str) -> None:
        job = asyncio.create_task(chore, name=name)
        self._chores.add(job)
        job.add_done_callback(self._chores.discard)

    async def _heartbeats(self) -> None:
        while True:
            self.instance.in_flight = self.in_flight
            try:
                await self._cp.heartbeat(self.instance)
            except Exception as exc:
                logger.warning("heartbeat failed: %s", exc)
            raise_if_cancelling()
            await asyncio.sleep(HEARTBEAT_INTERVAL)

    async def _consume(self) -> None:
        queue_name = subjects.task_queue(self.settings.deployment, self.settings.service_id)
        deliveries = self._broker.consume_tasks(queue_name, self.settings.consumer_options)
        async for delivery in deliveries:
            job = asyncio.create_task(self._handle(delivery))
            self._running.add(job)
            job.add_done_callback(self._running.discard)

    async def _handle(self, delivery: Delivery) -> None:
        try:
            msg = messages_pb2.TaskMessage.FromString(delivery.data)
        except DecodeError:
            logger.error("dropping an undecodable task message (%d bytes)", len(delivery.data))
            await delivery.term()
            return
        if msg.deployment != self.settings.deployment or not ID_PATTERN.fullmatch(msg.task_id):
            logger.error("dropping a task message for %r/%r", msg.deployment, msg.task_id)
            await delivery.term()
            return
        await self._after_any_run_of(msg.task_id, delivery)
        ended = self._runs[msg.task_id] = asyncio.Event()
        try:
            await self._process(msg, delivery)
        except Exception:
            if delivery.delivery_count >= self.settings.consumer_options.max_deliver:
                # A nak of the last delivery drops the message, and with it a task whose
                # failure could not be recorded: left unsettled, it stays in the queue.
                logger.exception(
                    "task %s: unexpected failure on its last delivery; left in the queue",
                    msg.task_id,
                )
                return
            logger.exception("task %s: unexpected failure; it will be redelivered", msg.task_id)
            with contextlib.suppress(Exception):
                await delivery.nak(delay=1.0)
        finally:
            del self._runs[msg.task_id]
            ended.set()

    async def _after_any_run_of(self, task_id: str, delivery: Delivery) -> None:
        """Wait, keeping ``delivery`` alive, while this replica runs ``task_id`` (for an
        earlier delivery of its message)."""
        while (running := self._runs.get(task_id)) is not None:
            logger.info("task %s delivered again while it runs here: waiting for that run", task_id)
            keepalive = self._keepalive(delivery)
            try:
                await running.wait()
            finally:
                await keepalive.stop()

    async def _process(self, msg: messages_pb2.TaskMessage, delivery: Delivery) -> None:
        deployment, task_id = msg.deployment, msg.task_id
        attempt = delivery.delivery_count
        began = now()
        kwargs: dict[str, JsonValue] = json.loads(msg.input_json) if msg.input_json else {}
        context_read: asyncio.Task[bytes | None] | None = None
        if not msg.new_session:  # read alongside the record, if there is one to read
            context_read = asyncio.create_task(
                self._cp.get_session_state(deployment, msg.session_id)
            )
        try:
            stored = await self._check(msg, kwargs, delivery, attempt)
        except BaseException:
            await discard(context_read)
            raise
        if stored is None:
            await discard(context_read)
            return
        task = stored.task
        context = _log_context(task)
        announcement = _Announcement(functools.partial(self._announce, stored, attempt))
        announced = announcement.done
        try:
            context_json = await context_read if context_read is not None else None
            outcome, count = await self._run(
                task,
                kwargs,
                delivery,
                announcement=announcement,
                context_json=context_json,
                keep_context=_context_kept(msg),
            )
        finally:
            await announcement.stop()
        if not announced.cancelled():
            failure = announced.exception()
            if failure is None:
                stored = announced.result()
            elif isinstance(failure, NotFoundError):
                logger.warning("task %s was deleted; dropping it", task_id, extra=context)
                await delivery.term()
                return
        try:
            if outcome.context_json is not None:
                try:
                    await self._cp.put_session_state(
                        deployment, task.session_id, outcome.context_json, task_id=task_id
                    )
                except MessageTooLargeError as exc:
                    raise _TooLarge("the session's workflow context", exc) from exc
            try:
                await self._finish(stored, outcome, event_count=count, attempt=attempt, began=began)
            except MessageTooLargeError as exc:
                raise _TooLarge("the task's record with its result", exc) from exc
        except _TooLarge as exc:
            # Too large now is too large on every delivery: fail once, saying why.
            logger.warning("task %s: %s", task_id, exc.error.message, extra=context)
            outcome = RunOutcome(TaskStatus.FAILED, error=exc.error)
            await self._finish(stored, outcome, event_count=count, attempt=attempt, began=began)
        except NotFoundError:
            logger.warning("task %s was deleted; dropping it", task_id, extra=context)
            await delivery.term()
            return
        await delivery.ack()
        # Logged once the result is stored and acknowledged: off the way to the caller,
        # and the time covers all this delivery's work.
        logger.info(
            "task %s in %.1f ms (attempt %d)",
            outcome.status.name.lower(),
            (now() - began) * 1000,
            attempt,
            extra=context,
        )

    async def _check(
        self,
        msg: messages_pb2.TaskMessage,
        kwargs: dict[str, JsonValue],
        delivery: Delivery,
        attempt: int,
    ) -> StoredTask | None:
        """The task to run as this process knows it, ``None`` (the delivery settled) when
        there is nothing to run.

        A first delivery of a message that is the task's only record needs no read: the
        task is QUEUED (revision 0) and its first change creates the record. Otherwise the
        record is read: the task may have been cancelled while queued, have finished (a
        crash between "result stored" and "ack"), or have been delivered too often.
        """
        queued = StoredTask(convert.task_from_message(msg, kwargs), 0)
        if attempt == 1 and not msg.recorded:
            return queued
        try:
            stored = await self._cp.read_task(msg.deployment, msg.task_id)
        except NotFoundError:
            if msg.recorded:
                logger.warning("task %s no longer exists; dropping it", msg.task_id)
                await delivery.term()
                return None
            stored = queued  # a replica got it before and died before storing anything
        if stored.task.status.is_final:
            await delivery.ack()
            return None
        if attempt > self.settings.max_retries + 1:
            error = TaskError(
                "MaxRetriesExceeded",
                f"the task was delivered {attempt - 1} times without finishing "
                f"(max-retries: {self.settings.max_retries})",
            )
            outcome = RunOutcome(TaskStatus.FAILED, error=error)
            await self._finish_last(stored, outcome, delivery, attempt)
            await delivery.ack()
            return None
        return stored

    async def _finish_last(
        self, stored: StoredTask, outcome: RunOutcome, delivery: Delivery, attempt: int
    ) -> None:
        """Record the failure of a message's last delivery, tried again for as long as the
        store is unavailable (NATS down, or out of space) and the worker runs: there is no
        delivery after this one to record it."""
        keepalive = self._keepalive(delivery)
        try:
            while True:
                try:
                    await self._finish(stored, outcome, event_count=0, attempt=attempt)
                    return
                except QueueUnavailableError as exc:
                    if self._stopping.is_set():
                        raise
                    logger.warning(
                        "task %s: its failure is not recorded yet (%s); trying again",
                        stored.task.task_id,
                        exc,
                    )
                await asyncio.sleep(LAST_RECORD_PAUSE)
        finally:
            await keepalive.stop()

    def _starter(self, attempt: int) -> Callable[[Task], Task | None]:
        def start(t: Task) -> Task | None:
            if t.status.is_final:
                return None
            t.status, t.attempts, t.started_at = TaskStatus.RUNNING, attempt, now()
            t.instance_id = self.instance.instance_id
            return t

        return start

    async def _announce(self, stored: StoredTask, attempt: int) -> StoredTask:
        """Write RUNNING (see :class:`_Announcement` for when)."""
        task = stored.task
        stored = await self._cp.change_task(
            task.deployment, task.task_id, self._starter(attempt), known=stored
        )
        if stored.task.status is TaskStatus.RUNNING:
            _log_running(stored.task, attempt)
        return stored

    async def _run(
        self,
        task: Task,
        kwargs: dict[str, JsonValue],
        delivery: Delivery,
        *,
        announcement: _Announcement,
        context_json: bytes | None,
        keep_context: ContextKept,
    ) -> tuple[RunOutcome, int]:
        counter = 0
        topic = subjects.events_topic(task.deployment, task.task_id)
        attempt = delivery.delivery_count

        async def on_event(type_name: str, data: dict[str, JsonValue]) -> None:
            nonlocal counter
            event = TaskEvent(task.task_id, counter, EventKind.WORKFLOW, type_name, data)
            counter += 1
            payload = convert.event_to_message(event, attempt=attempt).SerializeToString()
            await self._broker.publish(topic, payload)

        keepalive = self._keepalive(delivery)
        inputs = self._inputs(task, announcement.done)
        try:
            outcome = await run_workflow(
                self._workflow,
                kwargs,
                context_json=context_json,
                keep_context=keep_context,
                on_event=on_event,
                inputs=inputs,
                timeout=self.settings.timeout,
                on_input_required=announcement.now,
            )
        finally:
            await keepalive.stop()
            # Releasing the input subscription is not on the way to the result.
            self._spawn(inputs.aclose(), name=f"inputs-close-{task.task_id}")
        return outcome, counter

    async def _inputs(
        self, task: Task, announced: asyncio.Future[StoredTask]
    ) -> AsyncGenerator[TaskInput, None]:
        """Events and cancellations sent to the task, once its start is announced.

        Inputs sent earlier wait in the task's input topic and arrive then; a record that
        turned final before the announcement (cancelled while queued) cancels the run.
        """
        try:
            stored = await asyncio.shield(announced)
        except NotFoundError:
            yield CancelRequest("the task has no record")
            return
        if stored.task.status.is_final:
            error = stored.task.error
            yield CancelRequest(error.message if error else "cancelled")
            return
        topic = subjects.inputs_topic(task.deployment, task.task_id)
        subscription = self._broker.subscribe(topic)
        try:
            async for raw in subscription:
                try:
                    msg = messages_pb2.TaskInputMessage.FromString(raw)
                    data = json.loads(msg.human_event.data_json or b"{}")
                except (DecodeError, ValueError):
                    logger.warning("task %s: skipping an undecodable input", task.task_id)
                    continue
                if msg.HasField("cancel"):
                    yield CancelRequest(msg.cancel.reason or "cancelled by request")
                elif msg.HasField("human_event") and isinstance(data, dict):
                    yield HumanEvent(type=msg.human_event.type, data=data)
        finally:
            await subscription.aclose()

    def _keepalive(self, delivery: Delivery) -> _Keepalive:
        """Keeps ``delivery`` from being redelivered while it is worked on (until ``stop()``):
        three notices per ``ack_wait``."""
        return _Keepalive(delivery, self.settings.ack_wait / 3)

    async def _finish(
        self,
        stored: StoredTask,
        outcome: RunOutcome,
        *,
        event_count: int,
        attempt: int,
        began: float | None = None,
    ) -> None:
        """Record the outcome, unless the task is final already (cancelled meanwhile).
        ``began``: when the run began, for a record that never said RUNNING."""
        finished = now()

        def finish(t: Task) -> Task | None:
            if t.status.is_final:
                return None
            t.status, t.result, t.error = outcome.status, outcome.result, outcome.error
            t.finished_at, t.event_count = finished, event_count
            t.attempts, t.instance_id = attempt, self.instance.instance_id
            if t.started_at is None:
                t.started_at = began or finished
            return t

        task = stored.task
        await self._cp.change_task(task.deployment, task.task_id, finish, known=stored)


def _context_kept(msg: messages_pb2.TaskMessage) -> ContextKept:
    """None for a task whose session ends with it; only one worth resuming for a task
    whose session it creates (a blank one is no write)."""
    if msg.ends_session:
        return "never"
    return "unless_blank" if msg.new_session else "always"


def _log_context(task: Task) -> dict[str, str]:
    return {"deployment": task.deployment, "task_id": task.task_id, "session_id": task.session_id}


def _log_running(task: Task, attempt: int) -> None:
    """One line when a task shows RUNNING; a quick one logs only its end (with its time)."""
    logger.info("task running (attempt %d)", attempt, extra=_log_context(task))


class _Keepalive:
    """Tells the broker every ``interval`` seconds that ``delivery`` is still worked on, until
    :meth:`stop`: a timer, and a task only while a notice is on its way (most tasks end
    before the first)."""

    def __init__(self, delivery: Delivery, interval: float) -> None:
        self._delivery = delivery
        self._interval = interval
        self._loop = asyncio.get_running_loop()
        self._timer = self._loop.call_later(interval, self._tick)
        self._notice: asyncio.Task[None] | None = None

    def _tick(self) -> None:
        if self._notice is None or self._notice.done():
            self._notice = self._loop.create_task(self._send())
        self._timer = self._loop.call_later(self._interval, self._tick)

    async def _send(self) -> None:
        with contextlib.suppress(Exception):
            await self._delivery.in_progress()

    async def stop(self) -> None:
        """No more notices; one on its way is cancelled."""
        self._timer.cancel()
        if self._notice is not None:
            await cancel_and_wait(self._notice)


class _Announcement:
    """RUNNING, written by ``write()`` once the run has lasted :data:`START_NOTICE` or
    :meth:`now` is called (the workflow wants input): a short task goes from QUEUED to its
    final status in one write. A timer until then, not a task. :attr:`done` gets the record
    as written, or the write's error; it is cancelled if the write never began or was
    stopped."""

    def __init__(self, write: Callable[[], Coroutine[Any, Any, StoredTask]]) -> None:
        self._loop = asyncio.get_running_loop()
        self.done: asyncio.Future[StoredTask] = self._loop.create_future()
        self._write = write
        self._task: asyncio.Task[None] | None = None
        self._timer = self._loop.call_later(START_NOTICE, self.now)

    def now(self) -> None:
        """Write RUNNING now, unless it is written or being written (idempotent)."""
        self._timer.cancel()
        if self._task is None:
            self._task = self._loop.create_task(self._run())

    async def _run(self) -> None:
        try:
            stored = await self._write()
        except asyncio.CancelledError:
            self.done.cancel()
            raise
        except Exception as exc:
            self.done.set_exception(exc)
        else:
            self.done.set_result(stored)

    async def stop(self) -> None:
        """Cancel the write if it has not finished (nothing is written if it never began)."""
        self._timer.cancel()
        if self._task is not None:
            await cancel_and_wait(self._task)
        self.done.cancel()  # a no-op once it has a result


class _Stop(Exception):
    """Ends the worker's task group on shutdown."""


class _TooLarge(Exception):
    """What a task produced is too large for the message queue: the task's error."""

    def __init__(self, what: str, exc: MessageTooLargeError) -> None:
        super().__init__(what)
        self.error = TaskError(
            "MessageTooLarge",
            f"{what} is {exc.size} bytes, more than the message queue's limit of "
            f"{exc.limit} bytes ({exc.limit_name}): it cannot be stored",
        )
