"""Deployments: parse, persist, bring up (sources, dependencies, workers), reload, delete.

A deployment's record (its YAML, base path, status, generation) lives in the control
plane's store, so a restarted server brings every deployment back with :meth:`restore`.
Progress of a (re)deploy is published on the deployment's progress topic as it happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from llama_mesh.server import subjects
from llama_mesh.server.aio import cancel_and_wait
from llama_mesh.server.allowlist import SourcePolicy
from llama_mesh.server.apiserver.brokers import DeploymentBroker, DeploymentBrokers
from llama_mesh.server.apiserver.supervisor import ReplicaSpec, StartupFailure, Supervisor
from llama_mesh.server.apiserver.uis import UiError, UiSpec, UiSupervisor
from llama_mesh.server.control_plane.store import ControlPlane
from llama_mesh.server.dependencies import (
    DependencyError,
    DependencyNotAllowedError,
    confine_dependencies,
)
from llama_mesh.server.deployment_config import (
    NAME_PATTERN,
    DeploymentConfig,
    DeploymentConfigError,
    ServiceConfig,
    parse_deployment_config,
)
from llama_mesh.server.domain import DeploymentRecord, DeploymentStatus, now
from llama_mesh.server.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    MeshError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnavailableError,
    UnreadableRecordError,
)
from llama_mesh.server.sources import (
    SourceError,
    SourceNotAllowedError,
    check_source,
    resolve_env,
    sync_source,
)
from llama_mesh.server.venvs import VenvError, VenvManager
from llama_mesh.v1 import apiserver_pb2, types_pb2

if TYPE_CHECKING:
    from llama_mesh.server.apiserver.cluster import Cluster
    from llama_mesh.server.gateway.control_planes import ControlPlanePorts

logger = logging.getLogger(__name__)

RESTORE_CONCURRENCY = 4
"""Deployments restored at once after a restart."""


@dataclass(frozen=True, slots=True)
class DeploymentSettings:
    """Server-wide settings of deployments."""

    data_dir: Path
    max_deployments: int = 10
    max_replicas: int = 16
    ready_timeout: float = 120.0
    ack_wait: float = 10.0
    policy: SourcePolicy = field(default_factory=SourcePolicy)


@dataclass(frozen=True, slots=True)
class Change:
    """On a cluster of servers: a create, reload or delete an API server took, which the
    supervisor holding the deployment's lease carries out (see ``apiserver/cluster.py``)."""

    action: Literal["create", "reload", "delete"]
    name: str
    config_yaml: str = ""
    base_path: str = ""
    local: bool = False
    file_name: str = ""
    reload: bool = False


class DeploymentManager:
    """Owns the parsed configuration and the workers of every deployment."""

    def __init__(
        self,
        control_plane: ControlPlane,
        brokers: DeploymentBrokers,
        supervisor: Supervisor,
        settings: DeploymentSettings,
    ) -> None:
        self._cp = control_plane
        self.brokers = brokers
        """Each deployment's broker; the server's own carries the progress topics."""
        self._progress = brokers.own
        self._supervisor = supervisor
        self.settings = settings
        self._venvs = VenvManager(settings.data_dir / "venvs")
        self.uis = UiSupervisor(settings.data_dir / "uis")
        """Runs deployments' own web UIs (the gateway's app gives it the gateway's clusters)."""
        self._configs: dict[str, DeploymentConfig] = {}
        self._generations: dict[str, int] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._tried: dict[str, int] = {}
        self.control_planes: ControlPlanePorts | None = None
        """Where the gateway serves deployments' 0.8 control planes; ``None``: nowhere."""
        # Deployments that run nothing: those being brought up for the first time (created,
        # or restored after a restart), and those whose last deploy failed (with the reason).
        self._pending: set[str] = set()
        self._failed: dict[str, str] = {}
        self.restored = asyncio.Event()
        """Set once :meth:`restore` has brought back (or marked failed) every deployment."""
        self.cluster: Cluster | None = None
        """On a cluster of servers (``serve --roles``): where creates, reloads and deletes
        go, to be carried out by the supervisor holding the deployment's lease; ``None``:
        they are carried out here (the all-in-one)."""
        self.held: set[str] = set()
        """On a cluster: the deployments whose lease this server holds, whose replicas it
        runs; it mirrors the others from the store (:meth:`follow`)."""
        self.on_deleted: list[Callable[[str], None]] = []
        """Called with a deployment's name when this server forgets it: deleted here, or
        seen deleted in the store (a cluster)."""

    @property
    def control_plane(self) -> ControlPlane:
        """The store of this server's deployments, tasks and sessions."""
        return self._cp

    @property
    def supervisor(self) -> Supervisor:
        """The supervisor running this server's workers."""
        return self._supervisor

    def names(self) -> list[str]:
        """Names of every deployment this server knows (ready, deploying or failed), sorted."""
        return sorted(set(self._configs) | self._pending | set(self._failed))

    def check_exists(self, name: str) -> None:
        """:class:`NotFoundError` unless ``name`` is a deployment (ready, deploying or failed)."""
        if name not in self._configs and name not in self._pending and name not in self._failed:
            raise NotFoundError(f"Deployment '{name}' not found", reason="DEPLOYMENT_NOT_FOUND")

    def is_pending(self, name: str) -> bool:
        """Whether ``name`` is being deployed for the first time (or restored) right now."""
        return name in self._pending

    def described_config(self, name: str, config_yaml: str) -> DeploymentConfig | None:
        """The configuration to describe a deployment with: the running one, else its file's."""
        if name in self._configs:
            return self._configs[name]
        try:
            return parse(config_yaml)
        except InvalidArgumentError:
            return None

    def generation(self, name: str) -> int:
        """The generation of a deployment this server runs (no store read: tasks ask often)."""
        self.config(name)
        return self._generations[name]

    def running_config(self, name: str) -> DeploymentConfig | None:
        """The configuration ``name`` runs with now, ``None`` when it runs nowhere."""
        return self._configs.get(name)

    def config(self, name: str) -> DeploymentConfig:
        """The parsed configuration of a deployment that runs.

        :class:`NotFoundError` when absent, :class:`UnavailableError` while it is deployed for
        the first time (or restored), :class:`FailedPreconditionError` when it failed.
        """
        if name in self._pending:
            raise UnavailableError(
                f"Deployment '{name}' is still deploying; try again once it is ready",
                reason="DEPLOYMENT_NOT_READY",
            )
        if name in self._failed:
            raise FailedPreconditionError(
                f"Deployment '{name}' failed: {self._failed[name]} (reload or delete it)",
                reason="DEPLOYMENT_FAILED",
            )
        try:
            return self._configs[name]
        except KeyError:
            raise NotFoundError(
                f"Deployment '{name}' not found", reason="DEPLOYMENT_NOT_FOUND"
            ) from None

    async def create(
        self,
        config_yaml: str | bytes,
        *,
        base_path: str,
        reload: bool,
        local: bool,
        file_name: str = "",
    ) -> DeploymentRecord:
        """Create (or with ``reload``, replace) a deployment and wait until it is ready.

        A deployment whose last deploy failed is replaced without ``reload``: it runs nothing.
        Replacing a running deployment is all or nothing (see :meth:`_replace`).
        ``file_name`` is what errors in the YAML call the file.
        """
        config = parse(config_yaml, file_name=file_name)
        self._check_limits(config)
        if self.cluster is not None:
            change = Change(
                "create", config.name, config.raw_yaml, base_path, local, file_name, reload
            )
            return await self._submit(self.cluster, change)
        return await self._create(config, base_path=base_path, reload=reload, local=local)

    async def _create(
        self, config: DeploymentConfig, *, base_path: str, reload: bool, local: bool
    ) -> DeploymentRecord:
        async with self._locks.setdefault(config.name, asyncio.Lock()):
            exists = config.name in self._configs
            if exists and not reload:
                raise AlreadyExistsError(
                    f"Deployment '{config.name}' already exists; deploy with reload to replace it",
                    reason="DEPLOYMENT_EXISTS",
                )
            if not exists and self._running_count(config.name) >= self.settings.max_deployments:
                raise ResourceExhaustedError(
                    f"This server runs at most {self.settings.max_deployments} deployments "
                    "(--max-deployments); failed ones do not count: delete one to make room",
                    reason="TOO_MANY_DEPLOYMENTS",
                )
            previous = await self._stored(config.name)
            record = DeploymentRecord(
                name=config.name,
                config_yaml=config.raw_yaml,
                base_path=str(Path(base_path or ".").resolve()),
                local=local,
                generation=await self._next_generation(config.name, previous),
                created_at=previous.created_at if previous else now(),
            )
            self._check_policy(config, record)
            if not exists:
                return await self._first_bring_up(config, record)
            return await self._replace(config, record)

    async def reload(self, name: str) -> DeploymentRecord:
        """Re-sync sources and restart the workers of a deployment (a new generation), all
        or nothing (see :meth:`_replace`)."""
        if self.cluster is not None:
            self.check_exists(name)
            return await self._submit(self.cluster, Change("reload", name))
        return await self._reload(name)

    async def _reload(self, name: str) -> DeploymentRecord:
        async with self._locks.setdefault(name, asyncio.Lock()):
            if name in self._failed:
                failed = await self._cp.get_deployment(name)
                failed.generation = await self._next_generation(name, failed)
                config = parse(failed.config_yaml)
                self._check_limits(config)
                self._check_policy(config, failed)
                return await self._first_bring_up(config, failed)
            self.config(name)
            record = await self._cp.get_deployment(name)
            record.generation = await self._next_generation(name, record)
            config = parse(record.config_yaml)
            self._check_limits(config)
            self._check_policy(config, record)
            return await self._replace(config, record)

    async def delete(self, name: str) -> None:
        """Stop a deployment's workers, drop its queued tasks and forget it (failed ones too)."""
        if self.cluster is not None:
            self.check_exists(name)
            await self.cluster.submit(Change("delete", name))
            await self.follow(name, None)  # as the store says now, whatever the watch says yet
            return
        await self._delete(name)

    async def _delete(self, name: str) -> None:
        async with self._locks.setdefault(name, asyncio.Lock()):
            if name in self._failed:
                config = parse((await self._cp.get_deployment(name)).config_yaml)
            else:
                config = self.config(name)
            await self._supervisor.stop(name)
            await self.uis.forget(name)
            broker = self.brokers.of(name)
            for service_id in config.services:
                await broker.purge_queue(subjects.task_queue(name, service_id))
            await self.brokers.close(name)
            if self.control_planes is not None:
                await self.control_planes.release(name)
            await self._cp.delete_deployment(name)
            await self._progress.delete_topic(subjects.progress_topic(name))
            self._configs.pop(name, None)
            self._generations.pop(name, None)
            self._failed.pop(name, None)
        self._deleted(name)

    def _deleted(self, name: str) -> None:
        for listener in self.on_deleted:
            listener(name)

    async def recall(self) -> list[DeploymentRecord]:
        """Read the saved deployments (after a server restart) and list them at once: those
        that had failed as failed (they are not run again until reloaded or deleted), the
        others as deploying. Returns the latter, for :meth:`restore`."""
        records = await self._cp.list_deployments()
        # Deployed meanwhile (a `serve` file, an early client) means already being handled.
        known = set(self.names())
        records = [r for r in records if r.name not in known]
        for record in records:
            if record.status is DeploymentStatus.FAILED:
                self._failed[record.name] = record.status_message or "failed"
                logger.info(
                    "deployment %s is not restored: it failed (%s); reload or delete it",
                    record.name,
                    record.status_message.splitlines()[0] if record.status_message else "",
                )
        waiting = [r for r in records if r.status is not DeploymentStatus.FAILED]
        self._pending.update(r.name for r in waiting)
        return waiting

    async def restore(
        self,
        waiting: list[DeploymentRecord] | None = None,
        *,
        concurrency: int = RESTORE_CONCURRENCY,
    ) -> None:
        """Bring back the saved deployments :meth:`recall` returned (it is called when
        ``waiting`` is None), ``concurrency`` at a time; each answers tasks once it is ready.
        One that fails now is marked failed, with one warning. Sets :attr:`restored`.
        """
        try:
            if waiting is None:
                waiting = await self.recall()
        except BaseException:
            self.restored.set()
            raise
        slots = asyncio.Semaphore(max(1, concurrency))

        async def bring_back(record: DeploymentRecord) -> None:
            async with slots, self._locks.setdefault(record.name, asyncio.Lock()):
                if record.name in self._configs or record.name in self._failed:
                    self._pending.discard(record.name)  # deployed (or failed) meanwhile
                    return
                try:
                    await self._first_bring_up(parse(record.config_yaml), record)
                except Exception as exc:
                    if record.status is not DeploymentStatus.FAILED:
                        with contextlib.suppress(Exception):
                            await self._fail(record, _reason(exc))
                    self._failed[record.name] = record.status_message or _reason(exc)
                    logger.warning(
                        "deployment %s could not be restored and is marked failed: %s",
                        record.name,
                        _reason(exc).splitlines()[0],
                    )
                finally:
                    self._pending.discard(record.name)

        try:
            async with asyncio.TaskGroup() as group:
                for record in waiting:
                    group.create_task(bring_back(record), name=f"restore-{record.name}")
        finally:
            self.restored.set()

    # -- on a cluster of servers -------------------------------------------------------------

    async def _submit(self, cluster: Cluster, change: Change) -> DeploymentRecord:
        """Have the deployment's supervisor carry ``change`` out; its stored record, which
        this server mirrors at once (its watch may bring the change a moment later), so
        that it answers for the deployment as its reply says."""
        await cluster.submit(change)
        record = await self._cp.get_deployment(change.name)
        await self.follow(change.name, record)
        return record

    async def carry_out(self, change: Change) -> None:
        """Carry out a change another server's API took (this server holds the lease)."""
        if change.action == "create":
            config = parse(change.config_yaml, file_name=change.file_name)
            self._check_limits(config)
            await self._create(
                config, base_path=change.base_path, reload=change.reload, local=change.local
            )
        elif change.action == "reload":
            await self._reload(change.name)
        else:
            await self._delete(change.name)

    async def take_over(self, name: str) -> None:
        """Bring up a deployment whose lease this server has just taken (its supervisor
        died or let it go), as :meth:`restore` does after a restart; one that failed stays
        failed, and one that cannot be brought up here is marked failed."""
        async with self._locks.setdefault(name, asyncio.Lock()):
            record = await self._stored(name)
            if record is None or record.status is DeploymentStatus.FAILED:
                return
            logger.info("deployment %s: taking over its replicas", name)
            serving = record.status is DeploymentStatus.READY and name in self._configs
            try:
                await self._first_bring_up(parse(record.config_yaml), record, serving=serving)
            except Exception as exc:
                logger.warning(
                    "deployment %s could not be taken over and is marked failed: %s",
                    name,
                    _reason(exc).splitlines()[0],
                )

    async def let_go(self, name: str) -> None:
        """Stop running a deployment whose lease this server lost (another supervisor may
        hold it now: never two), and mirror it from the store from now on."""
        async with self._locks.setdefault(name, asyncio.Lock()):
            self.held.discard(name)
            await self._supervisor.stop(name)
            await self.uis.stop(name)
        await self.follow(name, await self._stored(name))

    async def follow(self, name: str, record: DeploymentRecord | None) -> None:
        """Mirror ``record`` (``None``: deleted), the stored state of a deployment another
        server's supervisor runs: this server then knows it, routes its tasks to its broker,
        and answers for it as deploying, ready or failed. Deployments held here are left
        to their own bring-up."""
        async with self._locks.setdefault(name, asyncio.Lock()):
            if name in self.held:
                return
            if record is not None and record.status is DeploymentStatus.DEPLOYING:
                if name not in self._configs:  # a first deploy; a takeover keeps serving
                    self._pending.add(name)
                return
            self._pending.discard(name)
            if record is None or record.status is DeploymentStatus.FAILED:
                self._configs.pop(name, None)
                self._generations.pop(name, None)
                if record is None:
                    self._failed.pop(name, None)
                else:
                    self._failed[name] = record.status_message or "failed"
                await self.brokers.close(name)
                if record is None:
                    self._deleted(name)
                return
            config = parse(record.config_yaml)
            opened = await self.brokers.open(config)
            await self.brokers.discard(name, self.brokers.install(name, opened))
            self._configs[name] = config
            self._generations[name] = record.generation
            self._failed.pop(name, None)

    def _running_count(self, besides: str) -> int:
        """Deployments other than ``besides`` that count against ``max_deployments``:
        running or deploying (failed ones run nothing)."""
        return len((set(self._configs) | self._pending) - set(self._failed) - {besides})

    async def _first_bring_up(
        self, config: DeploymentConfig, record: DeploymentRecord, *, serving: bool = False
    ) -> DeploymentRecord:
        """Bring up a deployment that runs nothing yet (new, restored, or failed before).

        Meanwhile it is listed as deploying and refuses tasks as unavailable (unless it is
        ``serving``: taken over, its tasks wait in its queue for the new replicas); when it
        fails, its workers are stopped and it is listed as failed, with the reason, until
        it is deployed again or deleted.
        """
        name = record.name
        if not serving:
            self._pending.add(name)
        self._failed.pop(name, None)
        try:
            return await self._bring_up(config, record)
        except Exception as exc:
            self._configs.pop(name, None)
            self._generations.pop(name, None)
            await self._supervisor.stop(name)
            await self.uis.stop(name)
            await self.brokers.close(name)
            if record.status is not DeploymentStatus.FAILED:
                await self._fail(record, _reason(exc))
            self._failed[name] = record.status_message
            raise
        except BaseException:  # cancelled (the server stops): it stays as it was stored
            self._configs.pop(name, None)
            self._generations.pop(name, None)
            raise
        finally:
            self._pending.discard(name)

    async def progress(
        self, name: str
    ) -> AsyncIterator[apiserver_pb2.StreamDeploymentProgressResponse]:
        """Progress lines of the latest (re)deploy, ending with its last line.

        No check that ``name`` exists: a client may ask for the progress of a deployment it
        is creating at the same moment.
        """
        if not NAME_PATTERN.fullmatch(name):
            raise InvalidArgumentError(
                f"invalid deployment name {name!r}: letters, digits, '-' and '_'",
                reason="INVALID_NAME",
            )
        stream = self._progress.subscribe(subjects.progress_topic(name))
        try:
            async for raw in stream:
                msg = apiserver_pb2.StreamDeploymentProgressResponse.FromString(raw)
                yield msg
                if msg.done:
                    return
        finally:
            await stream.aclose()

    # -- checks before anything is fetched, built or stored --------------------------------

    def _check_limits(self, config: DeploymentConfig) -> None:
        limit = self.settings.max_replicas
        for service_id, service in config.services.items():
            if service.replicas > limit:
                key = f"services.{service_id}.replicas"
                raise InvalidArgumentError(
                    f"{key} is {service.replicas}, more than this server allows: {limit} "
                    "(serve --max-replicas, LLAMA_MESH_MAX_REPLICAS)",
                    reason="INVALID_DEPLOYMENT",
                    metadata={"key": key},
                )

    def _check_policy(self, config: DeploymentConfig, record: DeploymentRecord) -> None:
        """Refuse what the server's allow-lists do not admit: every service's source, and
        every dependency that can be judged before its source is fetched (the rest, paths
        relative to a git clone, are judged again once it is)."""
        policy = self.settings.policy
        base = Path(record.base_path)
        for service_id, service in config.services.items():
            try:
                check_source(service.source, base_path=base, policy=policy)
            except SourceNotAllowedError as exc:
                raise PermissionDeniedError(str(exc), reason="SOURCE_NOT_ALLOWED") from exc
            except SourceError as exc:
                raise InvalidArgumentError(str(exc), reason="INVALID_DEPLOYMENT") from exc
            local = service.source.type == "local"
            root = base if local else self._source_dest(record, service_id)
            _confine(service, service_id, root, policy)

    async def _next_generation(self, name: str, stored: DeploymentRecord | None) -> int:
        """A generation no replica has had: above the stored and the running one, any tried
        before (a failed reload's replicas may still be in the registry) and any replica's."""
        seen = [stored.generation if stored else 0, self._tried.get(name, 0)]
        seen.append(self._generations.get(name, 0))
        seen += [i.generation for i in await self._cp.list_instances(name)]
        self._tried[name] = max(seen) + 1
        return self._tried[name]

    def _source_dest(self, record: DeploymentRecord, service_id: str) -> Path:
        """Where a git source of this generation is cloned: each generation has its own, so
        a reload never touches the sources the running version was loaded from."""
        return self._generation_dir(record.name, record.generation) / service_id

    def _generation_dir(self, name: str, generation: int) -> Path:
        return self.settings.data_dir / "sources" / name / f"g{generation}"

    async def _remove_sources(self, name: str, *, keep: int) -> None:
        """Remove the cloned sources of every generation but ``keep``."""
        parent = self.settings.data_dir / "sources" / name
        keep_dir = self._generation_dir(name, keep)

        def remove() -> None:
            for child in parent.glob("g*") if parent.is_dir() else ():
                if child != keep_dir:
                    shutil.rmtree(child, ignore_errors=True)

        await asyncio.to_thread(remove)

    # -- reload -------------------------------------------------------------------------------

    async def _replace(
        self, config: DeploymentConfig, record: DeploymentRecord
    ) -> DeploymentRecord:
        """Replace a running deployment by ``record``'s version, all or nothing.

        The new version is prepared (sources, dependencies), every service's workflow is
        loaded once in its own environment, and its replicas start beside the running ones;
        only when every service has a live replica of the new generation is the record
        replaced and the old replicas stopped. Until then nothing of the running version is
        touched, and on any failure the new replicas are stopped: the old version keeps
        serving, and stays the stored one.
        """
        name = record.name
        running = self._generations[name]
        deploying = DeploymentStatus.DEPLOYING
        await self._progress.delete_topic(subjects.progress_topic(name))
        await self._say(name, f"reloading: generation {record.generation}", deploying)
        for warning in config.warnings:
            logger.warning("deployment %s: %s", name, warning)
            await self._say(name, f"warning: {warning}", deploying)
        broker: DeploymentBroker | None = None
        try:
            broker = await self._open_broker(config)
            specs = [await self._prepare(config, record, sid, broker) for sid in config.services]
            ui = await self._prepare_ui(config, record)
            await self._say(name, "loading the workflows in their environments", deploying)
            await self._supervisor.check(specs, timeout=self.settings.ready_timeout)
            for spec in specs:
                await self._say(
                    name, f"starting {spec.replicas} replica(s) of {spec.service_id}", deploying
                )
                await self._supervisor.add(spec)
            problem = await self._wait_ready(config, record.generation)
            if problem:
                raise StartupFailure(problem)
            # The running version's UI gives way to the new one (a UI holds its port);
            # when that does not start, the old one runs again.
            if ui is not None:
                await self._start_ui(ui)
            else:
                await self.uis.stop(name)
        except BaseException as exc:
            await asyncio.shield(self._roll_back(name, running, record.generation, broker))
            if not isinstance(
                exc,
                MeshError
                | SourceError
                | VenvError
                | DeploymentConfigError
                | StartupFailure
                | UiError,
            ):
                raise  # cancelled, or a bug: rolled back all the same
            reason = exc.message if isinstance(exc, MeshError) else str(exc)
            message = f"reload failed, generation {running} keeps serving: {reason}"
            await self._say(name, message, DeploymentStatus.FAILED, done=True)
            if isinstance(exc, MeshError):
                raise
            raise FailedPreconditionError(
                f"Deployment '{name}': {message}", reason="DEPLOY_FAILED"
            ) from exc
        record.status, record.status_message, record.updated_at = (
            DeploymentStatus.READY,
            "",
            now(),
        )
        await self._cp.put_deployment(record)
        self._configs[name] = config
        self._generations[name] = record.generation
        replaced = self.brokers.install(name, broker)
        await self._supervisor.retire(name, keep=record.generation)
        await self.brokers.discard(name, replaced)  # the old replicas used it until now
        await self._remove_sources(name, keep=record.generation)
        await self._serve_control_plane(config)
        await self._say(name, "ready", DeploymentStatus.READY, done=True)
        return record

    async def _roll_back(
        self, name: str, running: int, failed: int, broker: DeploymentBroker | None
    ) -> None:
        logger.warning(
            "deployment %s: generation %d failed; %d keeps serving", name, failed, running
        )
        await self._supervisor.retire(name, keep=running)
        await self.brokers.discard(name, broker)
        await asyncio.to_thread(shutil.rmtree, self._generation_dir(name, failed), True)

    async def _stored(self, name: str) -> DeploymentRecord | None:
        """The stored record of ``name``; ``None`` when there is none or it cannot be read
        (a deployment created under that name replaces it)."""
        try:
            return await self._cp.get_deployment(name)
        except (NotFoundError, UnreadableRecordError):
            return None

    async def _say(
        self, name: str, line: str, status: DeploymentStatus, done: bool = False
    ) -> None:
        logger.info("deployment %s: %s", name, line)
        msg = apiserver_pb2.StreamDeploymentProgressResponse(
            line=line, done=done, status=types_pb2.DeploymentStatus.ValueType(int(status))
        )
        await self._progress.publish(subjects.progress_topic(name), msg.SerializeToString())

    async def _bring_up(
        self, config: DeploymentConfig, record: DeploymentRecord
    ) -> DeploymentRecord:
        name = record.name
        await self._progress.delete_topic(subjects.progress_topic(name))
        record.status, record.status_message, record.updated_at = (
            DeploymentStatus.DEPLOYING,
            "",
            now(),
        )
        await self._cp.put_deployment(record)
        deploying = DeploymentStatus.DEPLOYING
        await self._say(name, f"deploying generation {record.generation}", deploying)
        for warning in config.warnings:
            logger.warning("deployment %s: %s", name, warning)
            await self._say(name, f"warning: {warning}", deploying)
        broker = await self._open_broker(config)
        self.brokers.install(name, broker)
        try:
            specs = [await self._prepare(config, record, sid, broker) for sid in config.services]
            ui = await self._prepare_ui(config, record)
        except (SourceError, VenvError, DeploymentConfigError, UiError) as exc:
            await self._fail(record, str(exc))
            raise FailedPreconditionError(
                f"Deployment '{name}' failed: {exc}", reason="DEPLOY_FAILED"
            ) from exc
        self._configs[name] = config
        self._generations[name] = record.generation
        self._supervisor.clear_failures(name)
        for spec in specs:
            await self._say(
                name, f"starting {spec.replicas} replica(s) of {spec.service_id}", deploying
            )
            await self._supervisor.start(spec)
        problem = await self._wait_ready(config, record.generation)
        if not problem and ui is not None:
            try:
                await self._start_ui(ui)
            except UiError as exc:
                problem = str(exc)
        if problem:
            await self._fail(record, problem)
            raise FailedPreconditionError(
                f"Deployment '{name}' failed: {problem}", reason="DEPLOY_FAILED"
            )
        await self._serve_control_plane(config)
        record.status = DeploymentStatus.READY
        await self._cp.put_deployment(record)
        await self._say(name, "ready", DeploymentStatus.READY, done=True)
        return record

    async def _serve_control_plane(self, config: DeploymentConfig) -> None:
        """Have the gateway serve the deployment's 0.8 control plane on its port, or say
        in the progress why it does not (the deployment works without it)."""
        if self.control_planes is None:
            return
        from llama_mesh.server.gateway.control_planes import DEFAULT_CONTROL_PLANE_PORT

        port = config.control_plane.get("port", DEFAULT_CONTROL_PLANE_PORT)
        problem = await self.control_planes.claim(config.name, port)
        if problem is None:
            line = f"0.8 control plane API on port {port}"
        else:
            line = f"warning: {problem}"
            logger.warning("deployment %s: %s", config.name, problem)
        await self._say(config.name, line, DeploymentStatus.DEPLOYING)

    async def _prepare_ui(
        self, config: DeploymentConfig, record: DeploymentRecord
    ) -> UiSpec | None:
        """Sync and install the deployment's ``ui`` (None when it has none).

        As with services, the ``path`` (a directory) of a local source is relative to the
        deployment's directory, that of a git source to the clone; without one, the UI is
        the source's directory (a local source's ``name``, as 0.8's ``ui`` folder).
        """
        ui = config.ui
        if ui is None:
            return None
        name = record.name
        deploying = DeploymentStatus.DEPLOYING
        await self._say(name, f"syncing source of the ui ({ui.source.type})", deploying)
        try:
            self.uis.tools()
        except UiError as exc:
            await self._say(name, f"ui: {exc}", deploying)
            raise
        try:
            source_dir = await sync_source(
                ui.source,
                base_path=Path(record.base_path),
                dest=self._generation_dir(name, record.generation) / ".ui-source",
                policy=self.settings.policy,
                local=record.local,
            )
            code_root = Path(record.base_path) if ui.source.type == "local" else source_dir
            env = resolve_env(ui, base_dir=code_root)
        except SourceNotAllowedError as exc:
            raise PermissionDeniedError(str(exc), reason="SOURCE_NOT_ALLOWED") from exc
        relative = ui.path or (ui.source.name if ui.source.type == "local" else ".")
        ui_dir = (code_root / relative).resolve()
        if not ui_dir.is_relative_to(code_root.resolve()):
            raise UiError(f"ui.path {ui.path!r} leaves the ui's source")

        async def report(line: str) -> None:
            await self._say(name, line, deploying)

        return await self.uis.install(
            name,
            ui_dir,
            generation=record.generation,
            port=ui.port,
            env=env,
            progress=report,
        )

    async def _start_ui(self, ui: UiSpec) -> None:
        await self._say(
            ui.deployment, f"ui: starting on port {ui.port}", DeploymentStatus.DEPLOYING
        )
        await self.uis.start(ui)
        line = f"ui at /ui/{ui.deployment}/ and /deployments/{ui.deployment}/ui/"
        await self._say(ui.deployment, line, DeploymentStatus.DEPLOYING)

    async def _fail(self, record: DeploymentRecord, message: str) -> None:
        record.status, record.status_message = DeploymentStatus.FAILED, message
        await self._cp.put_deployment(record)
        await self._say(record.name, f"failed: {message}", DeploymentStatus.FAILED, done=True)

    async def _open_broker(self, config: DeploymentConfig) -> DeploymentBroker:
        """Open the broker the deployment names (see :meth:`DeploymentBrokers.open`), saying
        which in the progress when it is not the server's own."""
        opened = await self.brokers.open(config)
        if opened.broker is not self.brokers.own:
            line = f"broker: {opened.choice.describe()}"
            await self._say(config.name, line, DeploymentStatus.DEPLOYING)
        return opened

    async def _prepare(
        self,
        config: DeploymentConfig,
        record: DeploymentRecord,
        service_id: str,
        broker: DeploymentBroker,
    ) -> ReplicaSpec:
        service = config.services[service_id]
        if not service.path:
            raise DeploymentConfigError(
                "a workflow service needs a 'path'", key_path=f"services.{service_id}"
            )
        name = record.name
        deploying = DeploymentStatus.DEPLOYING
        await self._say(name, f"syncing source of {service_id} ({service.source.type})", deploying)
        dest = self._source_dest(record, service_id)
        try:
            source_dir = await sync_source(
                service.source,
                base_path=Path(record.base_path),
                dest=dest,
                policy=self.settings.policy,
                local=record.local,
            )
        except SourceNotAllowedError as exc:
            raise PermissionDeniedError(str(exc), reason="SOURCE_NOT_ALLOWED") from exc
        # As in Llama Deploy, `path` and env-files of a local source are relative to the
        # deployment's directory (the source is checked above to lie within it); those of
        # a git source to the clone.
        code_root = Path(record.base_path) if service.source.type == "local" else source_dir
        try:
            env = resolve_env(service, base_dir=code_root)
        except SourceNotAllowedError as exc:
            raise PermissionDeniedError(str(exc), reason="SOURCE_NOT_ALLOWED") from exc

        async def report(line: str) -> None:
            await self._say(name, f"{service_id}: {line}", deploying)

        dependencies = _confine(service, service_id, code_root, self.settings.policy)
        if dependencies:
            await self._say(name, f"installing {len(dependencies)} dependencies", deploying)
        python = await self._venvs.ensure(dependencies, progress=report)
        return ReplicaSpec(
            deployment=name,
            service_id=service_id,
            path=service.path,
            source_dir=code_root,
            replicas=service.replicas,
            generation=record.generation,
            python=python,
            env=env,
            max_concurrent_tasks=service.max_concurrent_tasks,
            max_retries=service.max_retries,
            timeout=service.timeout,
            ack_wait=self.settings.ack_wait,
            broker=broker,
        )

    async def _wait_ready(self, config: DeploymentConfig, generation: int) -> str:
        """Wait until every service has a live replica of ``generation``; '' or a problem."""
        if not config.services:
            return ""

        async def all_live() -> str:
            seen: set[str] = set()
            async for instance in self._cp.watch_instances(config.name):
                if instance.generation == generation:
                    seen.add(instance.service_id)
                if seen >= set(config.services):
                    return ""
            return "the registry closed"

        async def first_failure() -> str:
            service_id, output = await self._supervisor.next_failure(config.name, generation)
            return f"service '{service_id}' did not start: {_last_lines(output)}"

        tasks = [asyncio.create_task(all_live()), asyncio.create_task(first_failure())]
        try:
            done, _ = await asyncio.wait(
                tasks, timeout=self.settings.ready_timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if not done:
                return f"services not ready within {self.settings.ready_timeout:.0f} s"
            return next(iter(done)).result()
        finally:
            for task in tasks:
                await cancel_and_wait(task)


def parse(config_yaml: str | bytes, *, file_name: str = "") -> DeploymentConfig:
    """Parse a deployment file; errors become :class:`InvalidArgumentError` naming the key.

    ``file_name`` is what the errors call the file (``deployment.yml`` when it is unknown).
    """
    try:
        return parse_deployment_config(config_yaml, source_name=file_name or "deployment.yml")
    except DeploymentConfigError as exc:
        raise InvalidArgumentError(
            str(exc), reason="INVALID_DEPLOYMENT", metadata={"key": exc.key_path}
        ) from exc


def _confine(
    service: ServiceConfig, service_id: str, root: Path, policy: SourcePolicy
) -> tuple[str, ...]:
    """The service's dependencies in the form to install, once the policy admits them."""
    try:
        return confine_dependencies(
            service.python_dependencies,
            root=root,
            policy=policy,
            key_path=f"services.{service_id}.python-dependencies",
        )
    except DependencyNotAllowedError as exc:
        raise PermissionDeniedError(str(exc), reason="SOURCE_NOT_ALLOWED") from exc
    except DependencyError as exc:
        raise InvalidArgumentError(str(exc), reason="INVALID_DEPLOYMENT") from exc


def _reason(exc: BaseException) -> str:
    """Why a deploy failed, in the words of the error (without the gRPC wrapping)."""
    return exc.message if isinstance(exc, MeshError) else (str(exc) or type(exc).__name__)


def _last_lines(text: str, count: int = 20) -> str:
    return "\n".join(text.strip().splitlines()[-count:])
