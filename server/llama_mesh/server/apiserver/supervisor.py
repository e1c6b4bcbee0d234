"""Worker supervision: start a service's replicas, restart them when they die, stop them.

Two kinds behind one interface:

* :class:`ProcessSupervisor` runs each replica as its own process (``python -m
  llama_mesh.server.service``) with the deployment's interpreter (its virtual environment)
  and only the service's environment variables; used with NATS.
* :class:`InProcessSupervisor` runs replicas as asyncio tasks of this process; used with
  the in-process queue (single-process use and fast tests), where there is nothing to
  connect a second process to. It cannot isolate environment variables or dependencies.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from llama_mesh.server.apiserver.brokers import DeploymentBroker
from llama_mesh.server.children import RESTART_BACKOFF, STABLE_AFTER, kill_and_wait
from llama_mesh.server.control_plane.store import ControlPlane
from llama_mesh.server.queues.broker import Broker
from llama_mesh.server.queues.nats import NATS_URL_VARIABLE, NatsLogin
from llama_mesh.server.queues.selection import BROKER_VARIABLE
from llama_mesh.server.service.loader import load_workflow
from llama_mesh.server.service.worker import Worker, WorkerSettings

logger = logging.getLogger(__name__)

BASE_ENV_KEYS = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "SYSTEMROOT")
"""The only variables of the server's environment a worker inherits (plus its own)."""
MAX_CRASH_LOOPS = 6
"""A replica that exits this many times in a row, each sooner than STABLE_AFTER, is given
up on: its service is marked failed (with the last error output) until the next deploy."""


@dataclass(frozen=True, slots=True)
class ReplicaSpec:
    """Everything needed to start the replicas of one service."""

    deployment: str
    service_id: str
    path: str
    source_dir: Path
    replicas: int
    generation: int
    python: Path = field(default_factory=lambda: Path(sys.executable))
    env: Mapping[str, str] = field(default_factory=dict)
    max_concurrent_tasks: int = 1
    max_retries: int = 2
    timeout: float | None = None
    ack_wait: float = 10.0
    broker: DeploymentBroker | None = None
    """The deployment's broker; ``None``: the server's own."""


class StartupFailure(Exception):
    """A replica exited before it became ready; carries its error output."""


class Supervisor(abc.ABC):
    """Starts, restarts and stops the replicas of deployments."""

    def __init__(self) -> None:
        self._failure_queues: dict[str, asyncio.Queue[tuple[str, str, int]]] = {}
        self._given_up: dict[tuple[str, str], str] = {}
        self.closing = False
        """Set by :meth:`shutdown`: replicas that exit now are not restarted."""

    def _give_up(self, deployment: str, service_id: str, reason: str) -> None:
        self._given_up[(deployment, service_id)] = reason

    def failure(self, deployment: str, service_id: str) -> str:
        """Why a service was given up on (its replicas kept crashing), or ''."""
        return self._given_up.get((deployment, service_id), "")

    def _forget_failures(self, deployment: str, service_id: str | None = None) -> None:
        for key in list(self._given_up):
            if key[0] == deployment and service_id in (None, key[1]):
                del self._given_up[key]

    def _report_failure(
        self, deployment: str, service_id: str, output: str, generation: int
    ) -> None:
        self._failure_queues.setdefault(deployment, asyncio.Queue()).put_nowait(
            (service_id, output, generation)
        )

    async def next_failure(self, deployment: str, generation: int | None = None) -> tuple[str, str]:
        """Wait for a replica of ``deployment`` (of ``generation`` when given) to exit
        unexpectedly: (service, output)."""
        queue = self._failure_queues.setdefault(deployment, asyncio.Queue())
        while True:
            service_id, output, of = await queue.get()
            if generation is None or of == generation:
                return service_id, output

    def clear_failures(self, deployment: str) -> None:
        """Forget failures reported so far (before waiting for a fresh start)."""
        self._failure_queues.pop(deployment, None)

    async def start(self, spec: ReplicaSpec) -> None:
        """Start ``spec.replicas`` replicas of a service, then stop its other generations."""
        await self.add(spec)
        await self._stop_where(
            spec.deployment,
            lambda service_id, generation: (
                service_id == spec.service_id and generation != spec.generation
            ),
        )

    @abc.abstractmethod
    async def add(self, spec: ReplicaSpec) -> None:
        """Start ``spec.replicas`` replicas of a service beside whatever runs."""

    async def retire(self, deployment: str, *, keep: int) -> None:
        """Stop every replica of ``deployment`` that is not of generation ``keep``."""
        await self._stop_where(deployment, lambda _, generation: generation != keep)

    @abc.abstractmethod
    async def check(self, specs: Sequence[ReplicaSpec], *, timeout: float) -> None:
        """Load the services' workflows as their replicas would, without starting any.

        Raises:
            StartupFailure: one cannot be loaded (with the error output), or not in time.
        """

    @abc.abstractmethod
    async def _stop_where(self, deployment: str, which: Callable[[str, int], bool]) -> None:
        """Stop the replicas of ``deployment`` that ``which(service_id, generation)`` picks."""

    @abc.abstractmethod
    async def stop(self, deployment: str) -> None:
        """Stop every replica of a deployment."""

    @abc.abstractmethod
    def pids(self, deployment: str, service_id: str) -> list[int]:
        """Operating-system pids of a service's running replicas."""

    async def shutdown(self) -> None:
        """Stop everything, every deployment at once (idempotent)."""
        self.closing = True
        await asyncio.gather(*(self.stop(d) for d in list(self._deployments())))

    @abc.abstractmethod
    def _deployments(self) -> list[str]: ...


_TAIL_LINES = 40
_TAIL_BYTES = 16 * 1024


def _last_lines(text: str, count: int) -> str:
    return "\n".join(text.splitlines()[-count:])


def _log_tail(path: Path, offset: int) -> str:
    """The last lines a replica wrote to its log file after ``offset`` (its start)."""
    try:
        with path.open("rb") as log:
            end = log.seek(0, os.SEEK_END)
            log.seek(max(offset, end - _TAIL_BYTES))
            text = log.read().decode(errors="replace")
    except OSError:
        return ""
    return "".join(text.splitlines(keepends=True)[-_TAIL_LINES:]).strip()


def _worker_command(spec: ReplicaSpec) -> list[str]:
    """The worker's command line: everything it needs, so that it does not depend on the
    stored record (a reload starts a new version before the record names it)."""
    timeout = [] if spec.timeout is None else ["--timeout", repr(spec.timeout)]
    return [
        str(spec.python),
        "-m",
        "llama_mesh.server.service",
        "--deployment",
        spec.deployment,
        "--service",
        spec.service_id,
        "--source-dir",
        str(spec.source_dir),
        "--path",
        spec.path,
        "--max-concurrent-tasks",
        str(spec.max_concurrent_tasks),
        "--max-retries",
        str(spec.max_retries),
        *timeout,
        "--generation",
        str(spec.generation),
        "--ack-wait",
        str(spec.ack_wait),
    ]


def _worker_environment(spec: ReplicaSpec, connection_env: Mapping[str, str]) -> dict[str, str]:
    env = {k: os.environ[k] for k in BASE_ENV_KEYS if k in os.environ}
    env.update(spec.env)
    # Where NATS and the broker are, and how to log in, go in the environment rather than
    # on the command line, which every local user can read; after the service's own
    # variables, which must not point the worker elsewhere.
    env.update(connection_env)
    env["PYTHONUNBUFFERED"] = "1"
    for name in ("LLAMA_MESH_LOG_LEVEL", "LLAMA_MESH_LOG_FORMAT"):
        if name in os.environ:
            env[name] = os.environ[name]
    return env


class _Replica:
    """One supervised worker process, restarted until stopped."""

    def __init__(
        self,
        spec: ReplicaSpec,
        index: int,
        log_dir: Path,
        supervisor: ProcessSupervisor,
    ) -> None:
        self.spec = spec
        self.index = index
        self._nats_env = supervisor.nats_env
        self._log_dir = log_dir
        self.process: asyncio.subprocess.Process | None = None
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._on_failure = supervisor._report_failure
        self._supervisor = supervisor

    def start(self) -> None:
        self._task = asyncio.create_task(self._supervise())

    def _command(self) -> list[str]:
        return [*_worker_command(self.spec), "--exit-with-parent", str(os.getpid())]

    def _environment(self) -> dict[str, str]:
        env = dict(self._nats_env)
        if self.spec.broker is not None:
            env[BROKER_VARIABLE] = self.spec.broker.choice.to_json()
        return _worker_environment(self.spec, env)

    async def _supervise(self) -> None:
        failures = 0
        loop = asyncio.get_running_loop()
        log_path = self._log_dir / f"{self.spec.service_id}-{self.index}.log"
        while not self._stopping:
            started = loop.time()
            # The replica writes its log straight to its file, not through a pipe to this
            # process: its logging must not block when this process stalls, nor break when
            # it dies.
            with log_path.open("ab") as log:
                offset = log.tell()
                self.process = await asyncio.create_subprocess_exec(
                    *self._command(),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=log,
                    env=self._environment(),
                    cwd=str(self.spec.source_dir),
                    start_new_session=True,
                )
            code = await self.process.wait()
            if self._stopping or self._supervisor.closing:
                return
            tail = _log_tail(log_path, offset) or f"exit {code}"
            self._on_failure(self.spec.deployment, self.spec.service_id, tail, self.spec.generation)
            failures = 0 if loop.time() - started > STABLE_AFTER else failures + 1
            where = f"{self.spec.deployment}/{self.spec.service_id}#{self.index}"
            if failures >= self._supervisor.max_crash_loops:
                reason = (
                    f"replica {self.index} exited {failures} times in a row (last: status "
                    f"{code}); not restarted until the deployment is reloaded. Its last output:"
                    f"\n{tail}"
                )
                self._supervisor._give_up(self.spec.deployment, self.spec.service_id, reason)
                logger.error("replica %s given up on: %s", where, reason)
                return
            backoff = self._supervisor.restart_backoff
            delay = backoff[min(failures, len(backoff) - 1)]
            logger.warning(
                "replica %s exited with %s; restarting in %g s; its last output:\n%s",
                where,
                code,
                delay,
                _last_lines(tail, 10),
            )
            await asyncio.sleep(delay)

    async def stop(self, grace: float = 10.0) -> None:
        self._stopping = True
        process = self.process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), grace)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class ProcessSupervisor(Supervisor):
    """Replicas as worker processes connected to NATS."""

    def __init__(
        self,
        nats_url: str,
        log_dir: Path,
        *,
        login: NatsLogin | None = None,
        restart_backoff: Sequence[float] = RESTART_BACKOFF,
        max_crash_loops: int = MAX_CRASH_LOOPS,
    ) -> None:
        super().__init__()
        self.restart_backoff = tuple(restart_backoff)
        """Seconds before the 1st, 2nd, ... restart of a replica that keeps exiting."""
        self.max_crash_loops = max_crash_loops
        self.nats_env = {NATS_URL_VARIABLE: nats_url}
        self.nats_env.update((login or NatsLogin()).environment())
        self._log_dir = log_dir
        self._replicas: dict[str, list[_Replica]] = {}

    async def add(self, spec: ReplicaSpec) -> None:
        log_dir = self._log_dir / spec.deployment
        log_dir.mkdir(parents=True, exist_ok=True)
        self._forget_failures(spec.deployment, spec.service_id)
        new = [_Replica(spec, i, log_dir, self) for i in range(spec.replicas)]
        for replica in new:
            replica.start()
        self._replicas.setdefault(spec.deployment, []).extend(new)

    async def _stop_where(self, deployment: str, which: Callable[[str, int], bool]) -> None:
        running = self._replicas.get(deployment, [])
        old = [r for r in running if which(r.spec.service_id, r.spec.generation)]
        self._replicas[deployment] = [r for r in running if r not in old]
        await asyncio.gather(*(r.stop() for r in old))

    async def check(self, specs: Sequence[ReplicaSpec], *, timeout: float) -> None:
        # What a replica would import, where, with which interpreter and variables (no
        # NATS): one process for the services that share all of these, all at once.
        groups: dict[tuple[str, str, tuple[tuple[str, str], ...]], list[ReplicaSpec]] = {}
        for spec in specs:
            key = (str(spec.python), str(spec.source_dir), tuple(sorted(spec.env.items())))
            groups.setdefault(key, []).append(spec)
        checks = [self._check(same, timeout) for same in groups.values()]
        for outcome in await asyncio.gather(*checks, return_exceptions=True):
            if isinstance(outcome, BaseException):
                raise outcome

    @staticmethod
    async def _check(specs: list[ReplicaSpec], timeout: float) -> None:
        first = specs[0]
        argv = [str(first.python), "-m", "llama_mesh.server.service.check"]
        argv += ["--source-dir", str(first.source_dir)]
        argv += [f"{spec.service_id}={spec.path}" for spec in specs]
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=_worker_environment(first, {}),
            cwd=str(first.source_dir),
            start_new_session=True,
        )
        try:
            async with asyncio.timeout(timeout):
                output, _ = await proc.communicate()
        except TimeoutError:
            raise StartupFailure(f"loading the workflows took more than {timeout:g} s") from None
        finally:
            await kill_and_wait(proc)
        if proc.returncode != 0:
            text = output[-_TAIL_BYTES:].decode(errors="replace")
            tail = "".join(text.splitlines(keepends=True)[-_TAIL_LINES:]).strip()
            raise StartupFailure(tail or f"exit {proc.returncode}")

    async def stop(self, deployment: str) -> None:
        self._forget_failures(deployment)
        replicas = self._replicas.pop(deployment, [])
        await asyncio.gather(*(r.stop() for r in replicas))

    def pids(self, deployment: str, service_id: str) -> list[int]:
        return [
            r.process.pid
            for r in self._replicas.get(deployment, [])
            if r.spec.service_id == service_id
            and r.process is not None
            and r.process.returncode is None
        ]

    def _deployments(self) -> list[str]:
        return list(self._replicas)


class InProcessSupervisor(Supervisor):
    """Replicas as asyncio tasks sharing this process, handed their deployment's broker
    object (``own``, the server's own broker, when the spec names none)."""

    def __init__(self, own: Broker, control_plane: ControlPlane) -> None:
        super().__init__()
        self._own = own
        self._cp = control_plane
        self._workers: dict[str, list[tuple[Worker, asyncio.Task[None]]]] = {}

    async def add(self, spec: ReplicaSpec) -> None:
        try:
            workflow = load_workflow(spec.source_dir, spec.path)
        except Exception as exc:
            self._report_failure(spec.deployment, spec.service_id, str(exc), spec.generation)
            return
        running = self._workers.setdefault(spec.deployment, [])
        for _ in range(spec.replicas):
            settings = WorkerSettings(
                deployment=spec.deployment,
                service_id=spec.service_id,
                max_concurrent_tasks=spec.max_concurrent_tasks,
                max_retries=spec.max_retries,
                timeout=spec.timeout,
                ack_wait=spec.ack_wait,
                generation=spec.generation,
            )
            broker = self._own if spec.broker is None else spec.broker.broker
            worker = Worker(broker, self._cp, workflow, settings)
            running.append((worker, asyncio.create_task(worker.run())))

    async def _stop_where(self, deployment: str, which: Callable[[str, int], bool]) -> None:
        running = self._workers.get(deployment, [])
        old = [(w, t) for w, t in running if which(w.settings.service_id, w.settings.generation)]
        self._workers[deployment] = [pair for pair in running if pair not in old]
        await self._stop_pairs(old)

    async def check(self, specs: Sequence[ReplicaSpec], *, timeout: float) -> None:
        del timeout  # an in-process import cannot be interrupted
        for spec in specs:
            try:
                load_workflow(spec.source_dir, spec.path)
            except Exception as exc:
                raise StartupFailure(f"service '{spec.service_id}': {exc}") from exc

    async def stop(self, deployment: str) -> None:
        await self._stop_pairs(self._workers.pop(deployment, []))

    @staticmethod
    async def _stop_pairs(pairs: list[tuple[Worker, asyncio.Task[None]]]) -> None:
        for worker, _ in pairs:
            await worker.shutdown()
        await asyncio.gather(*(t for _, t in pairs), return_exceptions=True)

    def pids(self, deployment: str, service_id: str) -> list[int]:
        return []

    def _deployments(self) -> list[str]:
        return list(self._workers)
