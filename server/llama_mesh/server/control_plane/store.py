"""The control plane's state, kept in key-value buckets of the state store.

A record that does not parse (written by another version, a bug or another client of the
store) never fails a listing or a watch: it is skipped and logged. Reading it alone is an
:class:`UnreadableRecordError` naming it.

One key per thing, never a growing document (a session's tasks are in its index). A task
created without a session starts one whose id is the task's and that has no record: the
session is implied by its task (its record or its queued message) until it is deleted,
which leaves a deletion marker on its key, or until the task is final when the task ends
its session (``Task.ends_session``: a Llama Deploy 0.8 ``tasks/run`` without a session).

=================  ==========================================  ===========================
bucket             key                                         value
=================  ==========================================  ===========================
``deployments``    ``<deployment>``                            ``types.Deployment``
``tasks``          ``<deployment>.<task_id>``                  ``types.Task``
``sessions``       ``<deployment>.<session_id>``               ``types.Session`` (none for a
                                                               session implied by its task)
``session_tasks``  ``<deployment>.<session_id>.<task_id>``     task creation time (text)
``session_state``  ``<deployment>.<session_id>``               ``SessionStateMessage``
``instances``      ``<deployment>.<service_id>.<instance_id>`` ``types.ServiceInstance`` (TTL)
``services``       ``<deployment>.<service_name>``             a service a 0.8 client
                                                               registered (JSON)
=================  ==========================================  ===========================

Workers and the API server both use this class: it is the library form of the
``ControlPlane`` service, so a worker needs nothing but the message queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from typing import Protocol, Self, TypeVar

from google.protobuf.message import DecodeError

from llama_mesh.server import convert
from llama_mesh.server.domain import (
    DeploymentRecord,
    ServiceInstance,
    Session,
    Task,
    new_id,
    now,
)
from llama_mesh.server.errors import AlreadyExistsError, NotFoundError, UnreadableRecordError
from llama_mesh.server.queues.errors import KeyExistsError, RevisionMismatchError
from llama_mesh.server.queues.iterators import Subscription
from llama_mesh.server.queues.state import KeyValueEntry, KeyValueStore, StateStore
from llama_mesh.v1 import messages_pb2, types_pb2

logger = logging.getLogger(__name__)
T = TypeVar("T")
T_in = TypeVar("T_in")

HEARTBEAT_INTERVAL = 2.0
"""Seconds between a replica's heartbeats."""
INSTANCE_TTL = 3 * HEARTBEAT_INTERVAL
"""A replica whose heartbeat is older than this disappears from the registry."""
_BATCH = 64
"""Keys read or deleted at once when many are (a session's tasks, a deployment's keys)."""


@dataclass(frozen=True, slots=True)
class StoredTask:
    """A task as read from (or written to) its key, with the key's revision then."""

    task: Task
    revision: int


@dataclass(frozen=True, slots=True)
class _SessionRecord:
    """A session's record as read: ``stored`` unless implied by its task."""

    record: types_pb2.Session
    stored: bool


@dataclass(frozen=True, slots=True)
class TaskChange:
    """A write to a task's key: the task as written, or ``None`` when it was deleted."""

    deployment: str
    task_id: str
    task: Task | None
    revision: int


class QueuedTasks(Protocol):
    """The tasks whose message waits in a work queue, seen by the broker: a task whose
    message is its only record so far (see ``TaskMessage.recorded``) is found here."""

    async def find(self, deployment: str, task_id: str) -> Task | None:
        """The QUEUED task whose message is still in one of the deployment's queues."""

    async def in_queues(self, deployment: str) -> list[Task]:
        """Every task whose message is still in one of the deployment's queues."""


class ControlPlane:
    """Registry, sessions, tasks, results and session state over key-value buckets.

    ``queued``, when set (by the API server), finds the tasks that have no record yet
    because their message is their record of acceptance: reads and listings of tasks then
    show them as QUEUED, with revision 0, and the first change of such a task creates its
    record. Without it (in a worker) a task without a record is not found.
    """

    def __init__(self, queued: QueuedTasks | None = None) -> None:
        self._buckets: dict[str, KeyValueStore] = {}
        self.queued = queued

    @classmethod
    async def open(cls, state_store: StateStore) -> Self:
        """Open (creating when needed) every bucket the control plane uses."""
        self = cls()
        for name in (
            "deployments",
            "tasks",
            "sessions",
            "session_tasks",
            "session_state",
            "services",
        ):
            self._buckets[name] = await state_store.kv(name)
        self._buckets["instances"] = await state_store.kv("instances", ttl=INSTANCE_TTL)
        return self

    def records_only(self) -> ControlPlane:
        """This control plane (the same buckets) without :attr:`queued`: a worker's view,
        for which a task without a record has none, whatever waits in the queues."""
        view = ControlPlane()
        view._buckets = self._buckets
        return view

    # -- deployments -------------------------------------------------------------------

    async def put_deployment(self, record: DeploymentRecord) -> None:
        """Store (create or replace) a deployment record."""
        data = convert.deployment_record_to_proto(record).SerializeToString()
        await self._buckets["deployments"].put(record.name, data)

    async def get_deployment(self, name: str) -> DeploymentRecord:
        """The stored deployment ``name``; :class:`NotFoundError` when absent."""
        entry = await self._buckets["deployments"].get(name)
        if entry is None or entry.value is None:
            raise NotFoundError(f"Deployment '{name}' not found", reason="DEPLOYMENT_NOT_FOUND")
        return _decode("deployment", entry, _read_deployment)

    async def list_deployments(self) -> list[DeploymentRecord]:
        """Every stored deployment, sorted by name."""
        return _decode_all(
            "deployment", await self._buckets["deployments"].entries(), _read_deployment
        )

    async def watch_deployments(self) -> AsyncIterator[tuple[str, DeploymentRecord | None]]:
        """Every stored deployment, then each change as it is written: ``(name, record)``,
        ``record`` ``None`` when it was deleted (records that cannot be read are skipped)."""
        watch = self._buckets["deployments"].watch("")
        try:
            async for entry in watch:
                if entry.value is None:
                    yield entry.key, None
                for record in _decode_all("deployment", [entry], _read_deployment):
                    yield entry.key, record
        finally:
            await watch.aclose()

    async def delete_deployment(self, name: str) -> None:
        """Forget a deployment with its tasks, sessions and session state."""
        for bucket in ("tasks", "sessions", "session_tasks", "session_state", "services"):
            store = self._buckets[bucket]
            await _in_batches(store.delete, await store.keys(f"{name}."))
        await self._buckets["deployments"].delete(name)

    # -- services registered by 0.8 clients ----------------------------------------------

    async def put_registered_service(self, deployment: str, name: str, definition: bytes) -> None:
        """Record (or replace) a service a Llama Deploy 0.8 client registered."""
        await self._buckets["services"].put(f"{deployment}.{name}", definition)

    async def registered_services(self, deployment: str) -> dict[str, bytes]:
        """The services 0.8 clients registered with a deployment, by name."""
        prefix = f"{deployment}."
        return {
            entry.key[len(prefix) :]: entry.value
            for entry in await self._buckets["services"].entries(prefix)
            if entry.value is not None
        }

    async def delete_registered_service(self, deployment: str, name: str) -> bool:
        """Forget a registered service; whether there was one."""
        key = f"{deployment}.{name}"
        entry = await self._buckets["services"].get(key)
        if entry is None or entry.value is None:
            return False
        await self._buckets["services"].delete(key)
        return True

    # -- sessions ----------------------------------------------------------------------

    async def create_session(self, deployment: str) -> Session:
        """Store a new, empty session (a task created without a session needs none: its
        session is implied, see the module's docstring)."""
        session = Session(session_id=new_id(), deployment=deployment)
        data = convert.session_to_proto(session).SerializeToString()
        try:
            await self._buckets["sessions"].create(f"{deployment}.{session.session_id}", data)
        except KeyExistsError as exc:
            raise AlreadyExistsError(f"Session '{session.session_id}' already exists") from exc
        return session

    async def get_session(
        self, deployment: str, session_id: str, *, task_ids: bool = True
    ) -> Session:
        """A session (with its task ids unless ``task_ids`` is false, which reads one key
        rather than the session's whole index); :class:`NotFoundError` when absent."""
        record = self._session_record(deployment, session_id)
        if task_ids:
            msg, indexed = await asyncio.gather(record, self._indexed(deployment, session_id))
        else:
            msg, indexed = await record, []
        if msg is None:
            raise _session_not_found(deployment, session_id)
        session = _decode_value("session", f"{deployment}.{session_id}", msg.record, _read_session)
        session.task_ids = _in_order(session.task_ids, indexed) if task_ids else []
        return session

    async def session_task_ids(self, deployment: str, session_id: str) -> list[str]:
        """The session's task ids in creation order: the task that implies it (or, in a
        record of an earlier version, the one it was created for), then those of its index."""
        msg, indexed = await asyncio.gather(
            self._session_record(deployment, session_id), self._indexed(deployment, session_id)
        )
        return _in_order(list(msg.record.task_ids) if msg else [], indexed)

    async def _session_record(self, deployment: str, session_id: str) -> _SessionRecord | None:
        """A session's stored record, or the one its task implies; ``None`` when it has
        neither or was deleted."""
        entry = await self._buckets["sessions"].get(f"{deployment}.{session_id}", deleted=True)
        if entry is not None:
            if entry.value is None:
                return None  # deleted: an implied session stays so although its task lives on
            record = _decode("session", entry, lambda _, v: types_pb2.Session.FromString(v))
            return _SessionRecord(record, stored=True)
        try:
            task = await self.get_task(deployment, session_id)
        except NotFoundError:
            return None
        if task.session_id != session_id or _ended(task):
            return None
        return _SessionRecord(_implied_session(task), stored=False)

    async def _indexed(self, deployment: str, session_id: str) -> list[str]:
        """The task ids of a session's index, in creation order."""
        prefix = f"{deployment}.{session_id}."
        stamped = _decode_all(
            "session index",
            await self._buckets["session_tasks"].entries(prefix),
            lambda key, value: (float(value or b"0"), key[len(prefix) :]),
        )
        return [task_id for _, task_id in sorted(stamped)]

    async def list_sessions(self, deployment: str) -> list[Session]:
        """The deployment's sessions, stored or implied by their task, sorted by id (task
        ids not filled in)."""
        prefix = f"{deployment}."
        entries, tasks = await asyncio.gather(
            self._buckets["sessions"].entries(prefix, deleted=True),
            self.list_stored_tasks(deployment),
        )
        keyed = {entry.key[len(prefix) :] for entry in entries}  # stored or deleted
        sessions = _decode_all("session", entries, _read_session)
        sessions += [
            _read_session(f"{prefix}{stored.task.task_id}", _implied_session(stored.task))
            for stored in tasks
            if stored.task.session_id == stored.task.task_id
            and stored.task.task_id not in keyed
            and not _ended(stored.task)
        ]
        for session in sessions:
            session.task_ids = []  # the record holds the first one only: leave them all out
        return sorted(sessions, key=lambda session: session.session_id)

    async def delete_session(self, deployment: str, session_id: str) -> None:
        """Delete a session, its task index and its workflow state.

        The session's own key goes last: a deletion cut short can be repeated.
        """
        try:
            msg = await self._session_record(deployment, session_id)
        except UnreadableRecordError:  # delete it all the same
            msg = _SessionRecord(types_pb2.Session(), stored=True)
        if msg is None:
            raise _session_not_found(deployment, session_id)
        index = self._buckets["session_tasks"]
        keys = await index.keys(f"{deployment}.{session_id}.")
        await asyncio.gather(
            _in_batches(index.delete, keys),
            self._buckets["session_state"].delete(f"{deployment}.{session_id}"),
        )
        key = f"{deployment}.{session_id}"
        if not msg.stored:
            # Its task lives on: a deletion marker on its key ends the session (deleting a
            # key never written leaves none).
            await self._buckets["sessions"].put(key, msg.record.SerializeToString())
        await self._buckets["sessions"].delete(key)

    async def get_session_state(self, deployment: str, session_id: str) -> bytes | None:
        """The stored workflow context (JSON text) of a session, if any."""
        entry = await self._buckets["session_state"].get(f"{deployment}.{session_id}")
        if entry is None or entry.value is None:
            return None
        return _decode(
            "session state",
            entry,
            lambda _, value: messages_pb2.SessionStateMessage.FromString(value).context_json,
        )

    async def put_session_state(
        self, deployment: str, session_id: str, context_json: bytes, *, task_id: str
    ) -> None:
        """Store a session's workflow context after a task ran in it."""
        msg = messages_pb2.SessionStateMessage(
            session_id=session_id, context_json=context_json, task_id=task_id
        )
        msg.updated_at.CopyFrom(convert.to_timestamp(now()))
        await self._buckets["session_state"].put(
            f"{deployment}.{session_id}", msg.SerializeToString()
        )

    # -- tasks -------------------------------------------------------------------------

    async def record_task(self, task: Task, *, index: bool = True) -> StoredTask:
        """Store a new task and, with ``index``, add it to its session's index (both writes
        at once; a task that implies its session is not indexed in it)."""
        data = convert.task_to_proto(task).SerializeToString()
        created, indexed = await asyncio.gather(
            self._buckets["tasks"].create(f"{task.deployment}.{task.task_id}", data),
            self.index_task(task) if index else _nothing(),
            return_exceptions=True,
        )
        stored: StoredTask | None = None
        if isinstance(created, KeyExistsError):
            # A create tried again after NATS came back, whose first attempt was stored (its
            # answer lost) and a worker has since updated: the record is this very task.
            stored = await self._own_record(task)
            if stored is None:
                raise AlreadyExistsError(f"Task '{task.task_id}' already exists") from created
        for outcome in (created, indexed):
            if isinstance(outcome, BaseException) and stored is None:
                raise outcome
        if isinstance(indexed, BaseException):
            raise indexed
        if stored is not None:
            return stored
        assert isinstance(created, int)
        return StoredTask(task, created)

    async def index_task(self, task: Task) -> None:
        """Add a task to its (existing) session's index."""
        key = f"{task.deployment}.{task.session_id}.{task.task_id}"
        await self._buckets["session_tasks"].put(key, repr(task.created_at).encode())

    async def _own_record(self, task: Task) -> StoredTask | None:
        """The stored record of ``task`` if the task stored under its id is this one (same
        creation time, session, service and input), else ``None``."""
        try:
            stored = await self.read_task(task.deployment, task.task_id)
        except NotFoundError:
            return None
        found = stored.task
        same = (found.session_id, found.service_id, found.input) == (
            task.session_id,
            task.service_id,
            task.input,
        )
        # Within a microsecond: epoch seconds go through nanoseconds in the record.
        return stored if same and abs(found.created_at - task.created_at) < 1e-6 else None

    async def get_task(self, deployment: str, task_id: str) -> Task:
        """A task; :class:`NotFoundError` when absent."""
        return (await self.read_task(deployment, task_id)).task

    async def read_task(self, deployment: str, task_id: str) -> StoredTask:
        """A task with its revision (0: queued, no record yet, see :attr:`queued`);
        :class:`NotFoundError` when absent."""
        stored = await self._record(deployment, task_id)
        if stored is None and self.queued is not None:
            queued = await self.queued.find(deployment, task_id)
            if queued is not None:
                return StoredTask(queued, 0)
            # Its message may have left the queue after its record was stored: look again.
            stored = await self._record(deployment, task_id)
        if stored is None:
            raise NotFoundError(
                f"Task '{task_id}' not found in deployment '{deployment}'",
                reason="TASK_NOT_FOUND",
            )
        return stored

    async def _record(self, deployment: str, task_id: str) -> StoredTask | None:
        """A task's stored record with its revision, ``None`` when it has none."""
        entry = await self._buckets["tasks"].get(f"{deployment}.{task_id}")
        if entry is None or entry.value is None:
            return None
        return StoredTask(_decode("task", entry, _read_task), entry.revision)

    async def list_tasks(self, deployment: str, session_id: str | None = None) -> list[Task]:
        """The deployment's tasks (of one session when given), newest first."""
        if not session_id:
            return [stored.task for stored in await self.list_stored_tasks(deployment)]
        task_ids = await self.session_task_ids(deployment, session_id)
        entries = await _in_batches(
            self._buckets["tasks"].get, [f"{deployment}.{t}" for t in task_ids]
        )
        tasks = _decode_all("task", entries, _read_task)
        if self.queued is not None and len(tasks) < len(task_ids):
            recorded = {task.task_id for task in tasks}
            for task_id in task_ids:
                if task_id not in recorded:
                    with contextlib.suppress(NotFoundError, UnreadableRecordError):
                        tasks.append((await self.read_task(deployment, task_id)).task)
        tasks.sort(key=lambda t: t.created_at, reverse=True)
        return tasks

    async def list_stored_tasks(self, deployment: str) -> list[StoredTask]:
        """The deployment's tasks with their revisions (0 for those without a record yet),
        newest first."""
        # The queues first: a task that leaves its queue meanwhile has its record by then.
        queued = await self.queued.in_queues(deployment) if self.queued is not None else []
        stored: dict[str, StoredTask] = {task.task_id: StoredTask(task, 0) for task in queued}
        for entry in await self._buckets["tasks"].entries(f"{deployment}."):
            for task in _decode_all("task", [entry], _read_task):
                stored[task.task_id] = StoredTask(task, entry.revision)
        return sorted(stored.values(), key=lambda s: s.task.created_at, reverse=True)

    async def update_task(
        self, deployment: str, task_id: str, change: Callable[[Task], Task | None]
    ) -> Task:
        """Apply ``change`` to the stored task with compare-and-set, retrying on conflicts.

        ``change`` gets a copy and returns the new task, or ``None`` to leave it as it is
        (for instance when the task is already final: results are recorded idempotently).
        Returns the task as stored afterwards.
        """
        return (await self.change_task(deployment, task_id, change)).task

    async def change_task(
        self,
        deployment: str,
        task_id: str,
        change: Callable[[Task], Task | None],
        *,
        known: StoredTask | None = None,
    ) -> StoredTask:
        """:meth:`update_task` with revisions: starting from ``known`` (the task as this
        process last read or wrote it) saves reading it first, unless it changed since.

        A task known at revision 0 has no record yet (its message is its record): the
        change creates the record, unless another process created it first, in which case
        the change applies to that record.
        """
        store = self._buckets["tasks"]
        key = f"{deployment}.{task_id}"
        current = known or await self.read_task(deployment, task_id)
        while True:
            changed = change(replace(current.task))
            if changed is None:
                return current
            data = convert.task_to_proto(changed).SerializeToString()
            try:
                if current.revision == 0:
                    revision = await store.create(key, data)
                else:
                    revision = await store.update(key, data, current.revision)
            except (RevisionMismatchError, KeyExistsError):
                current = await self.read_task(deployment, task_id)
                continue
            return StoredTask(changed, revision)

    def watch_task_changes(self) -> AsyncGenerator[TaskChange, None]:
        """Every write to a task's key from this call on, in every deployment."""
        return _task_changes(self._buckets["tasks"].watch("", include_existing=False))

    # -- service registry --------------------------------------------------------------

    async def heartbeat(self, instance: ServiceInstance) -> None:
        """Record that a replica is alive (expires after :data:`INSTANCE_TTL`)."""
        instance.last_heartbeat = now()
        key = f"{instance.deployment}.{instance.service_id}.{instance.instance_id}"
        await self._buckets["instances"].put(
            key, convert.instance_to_proto(instance).SerializeToString()
        )

    async def remove_instance(self, instance: ServiceInstance) -> None:
        """Take a replica out of the registry at once (clean shutdown)."""
        key = f"{instance.deployment}.{instance.service_id}.{instance.instance_id}"
        await self._buckets["instances"].delete(key)

    async def watch_instances(self, deployment: str) -> AsyncIterator[ServiceInstance]:
        """Each heartbeat of the deployment's replicas as it is written (deletions skipped)."""
        watch = self._buckets["instances"].watch(f"{deployment}.")
        try:
            async for entry in watch:
                for instance in _decode_all("instance", [entry], _read_instance):
                    yield instance
        finally:
            await watch.aclose()

    async def list_instances(
        self, deployment: str, service_id: str | None = None
    ) -> list[ServiceInstance]:
        """Live replicas of a deployment (of one service when given)."""
        store = self._buckets["instances"]
        prefix = f"{deployment}.{service_id}." if service_id else f"{deployment}."
        return [
            instance
            for instance in _decode_all("instance", await store.entries(prefix), _read_instance)
            if now() - instance.last_heartbeat <= INSTANCE_TTL
        ]


async def _task_changes(watch: Subscription[KeyValueEntry]) -> AsyncGenerator[TaskChange, None]:
    try:
        async for entry in watch:
            deployment, _, task_id = entry.key.partition(".")
            task = None
            if entry.value is not None:
                readable = _decode_all("task", [entry], _read_task)
                if not readable:
                    continue
                task = readable[0]
            yield TaskChange(deployment, task_id, task, entry.revision)
    finally:
        await watch.aclose()


_UNREADABLE = (DecodeError, ValueError, TypeError, KeyError, OverflowError)
"""What reading a record that is not one raises (protobuf, enums, numbers, keys)."""


def _decode(kind: str, entry: KeyValueEntry, read: Callable[[str, bytes], T]) -> T:
    """``read(key, value)`` of a stored entry that has a value."""
    assert entry.value is not None
    return _decode_value(kind, entry.key, entry.value, read)


def _decode_value(kind: str, key: str, value: T_in, read: Callable[[str, T_in], T]) -> T:
    """``read(key, value)``; :class:`UnreadableRecordError` naming the record when it is
    not one (its content is never quoted)."""
    try:
        return read(key, value)
    except _UNREADABLE as exc:
        raise UnreadableRecordError(
            f"the stored {kind} record '{key}' cannot be read ({type(exc).__name__}): it was "
            "written by another version, a bug or another client; rewrite or delete it",
            metadata={"record": kind, "key": key},
        ) from exc


def _decode_all(
    kind: str, entries: Iterable[KeyValueEntry | None], read: Callable[[str, bytes], T]
) -> list[T]:
    """The readable records among ``entries``; the others are skipped and logged."""
    records = []
    for entry in entries:
        if entry is None or entry.value is None:
            continue
        try:
            records.append(_decode(kind, entry, read))
        except UnreadableRecordError as exc:
            logger.warning("skipped: %s", exc.message)
    return records


def _check_key(key: str, deployment: str, name: str) -> None:
    """A record of ``<deployment>.<name>`` (or of ``name`` alone) must be stored there."""
    if key not in (f"{deployment}.{name}", name):
        raise ValueError("the record is not the one of its key")


def _ended(task: Task) -> bool:
    """Whether the session ``task`` implies ended with it (see ``Task.ends_session``)."""
    return task.ends_session and task.status.is_final


def _read_task(key: str, value: bytes) -> Task:
    task = convert.task_from_proto(types_pb2.Task.FromString(value))
    _check_key(key, task.deployment, task.task_id)
    return task


def _read_session(key: str, value: bytes | types_pb2.Session) -> Session:
    msg = value if isinstance(value, types_pb2.Session) else types_pb2.Session.FromString(value)
    session = convert.session_from_proto(msg)
    _check_key(key, session.deployment, session.session_id)
    return session


def _read_deployment(key: str, value: bytes) -> DeploymentRecord:
    record = convert.deployment_record_from_proto(types_pb2.Deployment.FromString(value))
    _check_key(key, "", record.name)
    return record


def _read_instance(key: str, value: bytes) -> ServiceInstance:
    deployment, service_id, _ = key.split(".", 2)
    msg = types_pb2.ServiceInstance.FromString(value)
    return convert.instance_from_proto(msg, deployment=deployment, service_id=service_id)


async def _in_batches(act: Callable[[str], Awaitable[T]], keys: list[str]) -> list[T]:
    """``act(key)`` for every key, :data:`_BATCH` at a time; the results in key order."""
    results: list[T] = []
    for start in range(0, len(keys), _BATCH):
        results += await asyncio.gather(*(act(key) for key in keys[start : start + _BATCH]))
    return results


def _session_not_found(deployment: str, session_id: str) -> NotFoundError:
    return NotFoundError(
        f"Session '{session_id}' not found in deployment '{deployment}'",
        reason="SESSION_NOT_FOUND",
    )


def _implied_session(task: Task) -> types_pb2.Session:
    """The record of the session ``task`` implies (its id is the task's)."""
    return convert.session_to_proto(
        Session(
            session_id=task.task_id,
            deployment=task.deployment,
            created_at=task.created_at,
            task_ids=[task.task_id],
        )
    )


def _in_order(first: list[str], indexed: list[str]) -> list[str]:
    """A session's task ids: those in its record (created with it), then its index's."""
    return first + [task_id for task_id in indexed if task_id not in first]


async def _nothing() -> None:
    return None
