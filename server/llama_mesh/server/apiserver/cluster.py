"""Several servers on one NATS (``serve --roles``): stateless API servers, and one
supervisor per deployment elected through the state store.

Every server mirrors the deployments bucket (:meth:`DeploymentManager.follow`): a
deployment created through any API server is known to all, its tasks go to its broker from
any of them, and each supervisor counts every deployment against ``--max-deployments``. A
create, reload or delete is not carried out by the API server that took it: it writes the
change into the ``deployment_changes`` bucket and waits for its outcome. The supervisor
holding the deployment's lease carries it out, as the all-in-one does (sources,
environments, replicas, all-or-nothing reload), and writes the outcome back; its progress
is on the server's own broker, visible to every API server.

A lease is a key of the ``deployment_leases`` bucket, whose entries expire after
:data:`LEASE_TTL`: created to acquire it (one creator wins), updated with its revision to
renew it (compare-and-set: a holder that lost it cannot renew it by mistake), taken by
another supervisor once it expired. A holder that cannot renew in time stops its replicas
before the lease can expire (:data:`SELF_FENCE`), so two never run a deployment at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import socket
import time
from collections.abc import Iterable
from typing import Any

from llama_mesh.server import errors
from llama_mesh.server.aio import cancel_and_wait
from llama_mesh.server.apiserver.deployments import Change, DeploymentManager
from llama_mesh.server.domain import DeploymentRecord, DeploymentStatus, new_id
from llama_mesh.server.errors import MeshError, UnavailableError
from llama_mesh.server.queues.errors import KeyExistsError, QueueError, RevisionMismatchError
from llama_mesh.server.queues.iterators import Subscription
from llama_mesh.server.queues.state import KeyValueEntry, KeyValueStore, StateStore

logger = logging.getLogger(__name__)

LEASE_TTL = 10.0
"""Seconds a deployment's lease lasts unless renewed: how long a dead supervisor's
deployments wait before another supervisor takes them over."""
RENEW_EVERY = LEASE_TTL / 4
"""How often a supervisor renews its leases and looks for deployments nobody holds."""
SELF_FENCE = LEASE_TTL * 0.7
"""A holder that has not renewed a lease for this long gives the deployment up (stops its
replicas) before the lease can expire and another supervisor take it."""
CHANGE_TTL = 24 * 3600.0
"""Seconds a change nobody collected stays in the store (its API server died meanwhile)."""


def holder_id() -> str:
    """This server's name in the leases it holds: host, process and a random part."""
    return f"{socket.gethostname()}-{os.getpid()}-{new_id()[:8]}"


class Leases:
    """The leases this supervisor holds, with the revisions it renews them by."""

    def __init__(self, bucket: KeyValueStore, holder: str) -> None:
        self._bucket = bucket
        self.holder = holder
        self._revisions: dict[str, int] = {}
        self._renewed: dict[str, float] = {}

    def holds(self, name: str) -> bool:
        """Whether this supervisor holds the lease of deployment ``name``."""
        return name in self._revisions

    async def acquire(self, name: str) -> bool:
        """Take the lease of ``name`` if nobody holds it (or it expired)."""
        try:
            revision = await self._bucket.create(name, self.holder.encode())
        except KeyExistsError:
            return False
        self._revisions[name] = revision
        self._renewed[name] = time.monotonic()
        return True

    async def renew(self) -> list[str]:
        """Renew every lease held; returns those lost (another holds it, or it could not
        be renewed for :data:`SELF_FENCE` seconds), which are no longer held."""
        lost = []
        for name, revision in list(self._revisions.items()):
            # The store retries while NATS elects a leader: never past the fence.
            left = SELF_FENCE - (time.monotonic() - self._renewed[name])
            try:
                async with asyncio.timeout(max(0.0, left)):
                    self._revisions[name] = await self._bucket.update(
                        name, self.holder.encode(), revision
                    )
                self._renewed[name] = time.monotonic()
                continue
            except (RevisionMismatchError, KeyExistsError):
                logger.warning("lost the lease of deployment %s: it expired", name)
            except (QueueError, TimeoutError) as exc:
                if time.monotonic() - self._renewed[name] < SELF_FENCE:
                    continue  # the store is away for a moment; the lease still runs
                logger.warning(
                    "gave up the lease of deployment %s: not renewed for %.0f s (%r)",
                    name,
                    SELF_FENCE,
                    exc,
                )
            lost.append(name)
            self._forget(name)
        return lost

    async def release(self, name: str) -> None:
        """Give the lease of ``name`` up at once (deleted, or the server stops)."""
        revision = self._revisions.get(name)
        self._forget(name)
        if revision is None:
            return
        with contextlib.suppress(QueueError):
            entry = await self._bucket.get(name)
            if entry is not None and entry.revision == revision:
                await self._bucket.delete(name)

    def held(self) -> list[str]:
        """The deployments whose lease is held."""
        return sorted(self._revisions)

    def _forget(self, name: str) -> None:
        self._revisions.pop(name, None)
        self._renewed.pop(name, None)


class Cluster:
    """This server's part in a cluster: mirroring deployments, and (``supervisor``)
    holding leases and carrying out changes."""

    def __init__(
        self,
        manager: DeploymentManager,
        changes: KeyValueStore,
        leases: Leases,
        *,
        supervisor: bool,
        supervise: Iterable[str] = (),
    ) -> None:
        self._manager = manager
        self._changes = changes
        self.leases = leases
        self._supervisor = supervisor
        self._supervise = frozenset(supervise)
        self._tasks: set[asyncio.Task[None]] = set()
        self.claim_timeout = LEASE_TTL * 3
        """How long an API server waits for a supervisor to take a change."""

    @classmethod
    async def open(
        cls,
        manager: DeploymentManager,
        state_store: StateStore,
        *,
        supervisor: bool,
        supervise: Iterable[str] = (),
    ) -> Cluster:
        """The cluster part of ``manager``'s server (which then routes changes through it)."""
        changes = await state_store.kv("deployment_changes", ttl=CHANGE_TTL)
        leases = Leases(await state_store.kv("deployment_leases", ttl=LEASE_TTL), holder_id())
        self = cls(manager, changes, leases, supervisor=supervisor, supervise=supervise)
        manager.cluster = self
        return self

    def start(self) -> None:
        """Start following the store; :attr:`DeploymentManager.restored` is set once every
        stored deployment has been read."""
        self._spawn(self._follow(), "follow-deployments")
        if self._supervisor:
            self._spawn(self._hold_leases(), "leases")
            self._spawn(self._take_changes(), "deployment-changes")

    async def stop(self) -> None:
        """Stop following the store and taking leases and changes (the server stops)."""
        for task in list(self._tasks):
            await cancel_and_wait(task)

    async def close(self) -> None:
        """Stop, and release the leases held (once their replicas are stopped), so that
        other supervisors take the deployments over at once."""
        await self.stop()
        for name in self.leases.held():
            await self.leases.release(name)

    # -- the api role ------------------------------------------------------------------------

    async def submit(self, change: Change) -> None:
        """Have the supervisor of ``change.name`` carry ``change`` out and wait for it;
        its error (a :class:`MeshError`) is raised here."""
        key = f"{change.name}.{new_id()}"
        watch = self._changes.watch(key)
        try:
            revision = await self._changes.put(key, json.dumps(dataclasses.asdict(change)).encode())
            outcome = await self._outcome(change, key, revision, watch)
        finally:
            await watch.aclose()
            with contextlib.suppress(QueueError):
                await self._changes.delete(key)
        if outcome is not None:
            raise _error(outcome)

    async def _outcome(
        self, change: Change, key: str, revision: int, watch: Subscription[KeyValueEntry]
    ) -> dict[str, Any] | None:
        """The outcome a supervisor writes; :class:`UnavailableError` when none takes the
        change within :attr:`claim_timeout` (it is withdrawn: none will)."""
        deadline = time.monotonic() + self.claim_timeout
        claimed = False
        while True:
            try:
                wait = None if claimed else max(0.0, deadline - time.monotonic())
                entry: KeyValueEntry = await asyncio.wait_for(anext(watch), wait)
            except TimeoutError:
                if await self._withdraw(key, revision):
                    raise UnavailableError(
                        f"no supervisor took the {change.action} of deployment "
                        f"'{change.name}' within {self.claim_timeout:.0f} s, and it was "
                        "withdrawn: run one (serve --roles supervisor) that may supervise it",
                        reason="NO_SUPERVISOR",
                    ) from None
                claimed = True  # taken just now: its outcome comes
                continue
            if entry.value is None:
                continue
            state = json.loads(entry.value)
            claimed = claimed or "taken_by" in state
            if "outcome" in state:
                outcome: dict[str, Any] | None = state["outcome"]
                return outcome

    async def _withdraw(self, key: str, revision: int) -> bool:
        """Withdraw a change nobody took; False when a supervisor took it meanwhile."""
        try:
            await self._changes.update(key, json.dumps({"withdrawn": True}).encode(), revision)
        except RevisionMismatchError:
            return False
        return True

    async def _follow(self) -> None:
        manager = self._manager
        first = {record.name: record for record in await manager.control_plane.list_deployments()}
        for name, record in first.items():
            await self._mirror(name, record)
        manager.restored.set()
        async for name, stored in manager.control_plane.watch_deployments():
            await self._mirror(name, stored)

    async def _mirror(self, name: str, record: DeploymentRecord | None) -> None:
        try:
            await self._manager.follow(name, record)
        except (QueueError, MeshError) as exc:  # its broker is away, say: the next change
            message = exc.message if isinstance(exc, MeshError) else str(exc)
            logger.warning("deployment %s cannot be mirrored: %s", name, message)

    # -- the supervisor role -------------------------------------------------------------------

    def _may_supervise(self, name: str) -> bool:
        return not self._supervise or name in self._supervise

    async def _hold_leases(self) -> None:
        """Renew the leases held and take those nobody holds, every :data:`RENEW_EVERY`."""
        while True:
            for name in await self.leases.renew():
                try:
                    await self._manager.let_go(name)
                except (QueueError, MeshError) as exc:  # stopped; mirrored at its next change
                    logger.warning("deployment %s: after its lease was lost: %s", name, exc)
            try:
                for record in await self._manager.control_plane.list_deployments():
                    name = record.name
                    if record.status is DeploymentStatus.FAILED or self.leases.holds(name):
                        continue
                    if self._may_supervise(name) and await self._acquire(name):
                        await self._manager.take_over(name)
                        await self._take_waiting(name)
            except (QueueError, MeshError) as exc:
                logger.warning("leases: the state store: %s; trying again", exc)
            await asyncio.sleep(RENEW_EVERY)

    async def _acquire(self, name: str) -> bool:
        if not await self.leases.acquire(name):
            return False
        self._manager.held.add(name)
        logger.info("holding the lease of deployment %s", name)
        return True

    async def _take_changes(self) -> None:
        async for entry in self._changes.watch(""):
            try:
                await self._consider(entry)
            except QueueError as exc:
                logger.warning("deployment change %s: %s", entry.key, exc)
            except (ValueError, TypeError, KeyError) as exc:  # not written by an API server
                logger.warning("deployment change %s is not one: %r", entry.key, exc)

    async def _take_waiting(self, name: str) -> None:
        """Take the changes of ``name`` left waiting (its last supervisor died)."""
        for entry in await self._changes.entries(f"{name}."):
            await self._consider(entry)

    async def _consider(self, entry: KeyValueEntry) -> None:
        """Take a change this supervisor may carry out: one of a deployment whose lease
        it holds (or acquires now), not carried out yet nor being carried out by a holder."""
        if entry.value is None:
            return
        state = json.loads(entry.value)
        name = entry.key.partition(".")[0]
        taken_by = state.pop("taken_by", None)
        if "action" not in state or "outcome" in state or taken_by == self.leases.holder:
            return  # withdrawn, carried out, or being carried out here
        if not self._may_supervise(name):
            return
        if not self.leases.holds(name):
            if not await self._acquire(name):
                return  # its holder carries it out
            if state["action"] != "delete":  # a reload that fails leaves it running
                await self._manager.take_over(name)
        try:
            claimed = {**state, "taken_by": self.leases.holder}
            revision = await self._changes.update(
                entry.key, json.dumps(claimed).encode(), entry.revision
            )
        except RevisionMismatchError:
            return  # changed meanwhile: the watch brings it again
        self._spawn(self._carry_out(entry.key, Change(**state), claimed, revision), entry.key)

    async def _carry_out(
        self, key: str, change: Change, claimed: dict[str, Any], revision: int
    ) -> None:
        outcome: dict[str, Any] | None = None
        try:
            await self._manager.carry_out(change)
        except MeshError as exc:
            outcome = {
                "type": type(exc).__name__,
                "message": exc.message,
                "reason": exc.reason,
                "metadata": exc.metadata,
            }
        except Exception as exc:
            logger.exception("deployment %s: the %s failed", change.name, change.action)
            outcome = {"type": "MeshError", "message": str(exc) or type(exc).__name__}
        if change.name not in self._manager.names():  # deleted, or never stored
            await self.leases.release(change.name)
            self._manager.held.discard(change.name)
        with contextlib.suppress(QueueError):
            done = json.dumps({**claimed, "outcome": outcome}).encode()
            await self._changes.update(key, done, revision)

    def _spawn(self, coroutine: Any, name: str) -> None:
        task = asyncio.create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _error(outcome: dict[str, Any]) -> MeshError:
    """The error a supervisor reported, as the class it raised (``MeshError`` otherwise)."""
    kind = getattr(errors, str(outcome.get("type")), MeshError)
    if not (isinstance(kind, type) and issubclass(kind, MeshError)):
        kind = MeshError
    reason, metadata = outcome.get("reason"), outcome.get("metadata")
    return kind(str(outcome.get("message", "")), reason=reason, metadata=metadata)
