"""Compose the server: message queue, control plane, orchestrator, workers, gRPC, gateway.

:func:`create_grpc_server` builds the gRPC server (kept apart from running it);
:class:`MeshServer` starts every part in order and stops them in reverse.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from llama_mesh.server.aio import cancel_and_wait
from llama_mesh.server.allowlist import SourcePolicy
from llama_mesh.server.apiserver.brokers import DeploymentBrokers
from llama_mesh.server.apiserver.compat import LlamaDeployApiServicer
from llama_mesh.server.apiserver.deployments import DeploymentManager, DeploymentSettings
from llama_mesh.server.apiserver.mesh import Mesh
from llama_mesh.server.apiserver.servicer import ApiServerServicer
from llama_mesh.server.apiserver.supervisor import (
    InProcessSupervisor,
    ProcessSupervisor,
    Supervisor,
)
from llama_mesh.server.auth import ApiKeys, AuthInterceptor
from llama_mesh.server.children import KeepAlive
from llama_mesh.server.control_plane.servicer import ControlPlaneServicer
from llama_mesh.server.control_plane.store import ControlPlane
from llama_mesh.server.errors import MeshError
from llama_mesh.server.gateway import Gateway
from llama_mesh.server.grpc_errors import ErrorInterceptor
from llama_mesh.server.metrics import Metrics, MetricsInterceptor
from llama_mesh.server.nats_server import (
    SYNC_ALWAYS,
    NatsServer,
    NatsServerConfig,
    check_sync_interval,
    store_login,
)
from llama_mesh.server.orchestrator import Orchestrator, OrchestratorServicer
from llama_mesh.server.probes import ProbesServicer
from llama_mesh.server.queues.broker import Broker
from llama_mesh.server.queues.nats import NatsLogin
from llama_mesh.server.queues.selection import BrokerChoice
from llama_mesh.server.queues.state import StateStore
from llama_mesh.v1 import (
    apiserver_pb2,
    apiserver_pb2_grpc,
    control_plane_pb2,
    control_plane_pb2_grpc,
    llama_deploy_api_pb2,
    llama_deploy_api_pb2_grpc,
    orchestrator_pb2,
    orchestrator_pb2_grpc,
    probes_pb2,
    probes_pb2_grpc,
)

if TYPE_CHECKING:
    from llama_mesh.server.apiserver.cluster import Cluster
    from llama_mesh.server.gateway import GatewayConfig

logger = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
ROLES = ("api", "supervisor", "gateway")
"""What a server can be (``serve --roles``): the API, the supervisor of deployments'
replicas, the gateway in front of the API."""
SERVICE_NAMES = (
    apiserver_pb2.DESCRIPTOR.services_by_name["ApiServer"].full_name,
    llama_deploy_api_pb2.DESCRIPTOR.services_by_name["LlamaDeployApi"].full_name,
    control_plane_pb2.DESCRIPTOR.services_by_name["ControlPlane"].full_name,
    orchestrator_pb2.DESCRIPTOR.services_by_name["Orchestrator"].full_name,
    probes_pb2.DESCRIPTOR.services_by_name["Probes"].full_name,
)


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """How one ``llamactl serve`` runs; read once at start."""

    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 4501
    grpc_host: str = "127.0.0.1"
    grpc_port: int = 0
    queue: Literal["nats", "inprocess"] = "nats"
    nats_url: str | None = None
    nats_creds: Path | None = None
    """NATS user credentials file (JWT and seed), for an external NATS that requires it."""
    nats_tls_ca: Path | None = None
    """The CA to trust for TLS to an external NATS."""
    nats_tls_cert: Path | None = None
    """Client certificate for an external NATS that requires one (mTLS); with its key."""
    nats_tls_key: Path | None = None
    nats_replicas: int = 1
    """Copies of each stream and bucket the server creates: 3 (or 5) on a NATS cluster, so
    that losing a node loses nothing. Streams that exist keep theirs."""
    nats_sync: str = SYNC_ALWAYS
    """When the embedded nats-server fsyncs JetStream writes: ``always`` (each write before
    it is acknowledged), or a duration (``1s``): more throughput, but a machine failure
    loses what was acknowledged in the last interval."""
    broker_url: str | None = None
    """The broker of deployments that name none (or ``nats``/``simple``):
    ``amqp://...`` or ``redis://...``; ``None``: the server's own."""
    roles: frozenset[str] | None = None
    """``None``: the all-in-one, alone on its NATS. A set of :data:`ROLES`: one of several
    servers on an external NATS (see :mod:`llama_mesh.server.apiserver.cluster`)."""
    supervise: tuple[str, ...] = ()
    """The deployments this server's supervisor may hold; empty: any."""
    gateway: bool = True
    control_planes: bool = True
    """Whether the gateway serves each deployment's Llama Deploy 0.8 control plane API on
    its ``control-plane.port``."""
    cors_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    """Host names the gateway answers to besides loopback and ``host`` (``"*"``: any)."""
    max_deployments: int = 10
    max_replicas: int = 16
    """Most replicas one service may ask for (``replicas``)."""
    ack_wait: float = 10.0
    ready_timeout: float = 120.0
    allowed_local_roots: tuple[Path, ...] | None = None
    allowed_git_prefixes: tuple[str, ...] | None = None
    api_keys: ApiKeys = field(default_factory=ApiKeys)
    metrics_port: int | None = None
    # HTTPS on the gateway's listener (PEM certificate chain and key).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # mTLS on the gRPC port: its server certificate, and the CA its clients' (the gateway's
    # included) certificates must chain to. The gateway presents internal_cert as its client
    # certificate and checks that the server's names 127.0.0.1, the address it dials.
    internal_ca: Path | None = None
    internal_cert: Path | None = None
    internal_key: Path | None = None

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError(
                "tls_cert, tls_key (--tls-cert, --tls-key): set both (HTTPS on the gateway) "
                "or neither"
            )
        if self.tls_cert is not None and not self.gateway:
            raise ValueError("tls_cert, tls_key (--tls-cert, --tls-key): need the gateway")
        self.nats_login  # noqa: B018 - NatsLogin refuses a certificate without its key
        if self.nats_replicas not in (1, 3, 5):
            raise ValueError(
                f"nats_replicas (--nats-replicas) is {self.nats_replicas}: use 1, or 3 or 5 "
                "on a NATS cluster of at least that many servers"
            )
        if self.nats_replicas > 1 and (self.queue != "nats" or self.nats_url is None):
            raise ValueError(
                "nats_replicas (--nats-replicas) above 1 needs a NATS cluster (--nats-url); "
                "the embedded nats-server is a single node"
            )
        try:
            check_sync_interval(self.nats_sync)
        except ValueError as exc:
            raise ValueError(f"nats_sync (--nats-sync): {exc}") from None
        if self.nats_sync != SYNC_ALWAYS and (self.queue != "nats" or self.nats_url is not None):
            raise ValueError(
                "nats_sync (--nats-sync) applies to the embedded nats-server only; an external "
                "NATS (--nats-url) keeps its own sync_interval"
            )
        if self.gateway and self.host in ("0.0.0.0", "::", "") and not self.allowed_hosts:
            raise ValueError(
                f"allowed_hosts (--allowed-host): the gateway listens on {self.host or 'every'}"
                " address; name the host names its clients use (--allowed-host NAME, repeat), "
                "or '*' to answer to any name (web pages can then reach it by DNS rebinding)"
            )
        self._check_roles()
        if self.max_replicas < 1:
            raise ValueError(f"max_replicas (--max-replicas) is {self.max_replicas}: use 1 or more")
        SourcePolicy(self.allowed_local_roots, self.allowed_git_prefixes)  # refuses bad prefixes
        internal = (self.internal_ca, self.internal_cert, self.internal_key)
        if None in internal and internal != (None, None, None):
            raise ValueError(
                "internal_ca, internal_cert, internal_key (--internal-ca, --internal-cert, "
                "--internal-key): set all three (mTLS on the gRPC port) or none"
            )

    def _check_roles(self) -> None:
        roles = self.roles
        if roles is None:
            if self.supervise:
                raise ValueError("supervise (--supervise): needs --roles with supervisor")
            return
        if not roles or not roles <= set(ROLES):
            raise ValueError(
                f"roles (--roles): {','.join(sorted(roles)) or 'none'}; name one or more of "
                f"{', '.join(ROLES)}"
            )
        if self.queue != "nats" or self.nats_url is None:
            raise ValueError(
                "roles (--roles): servers with roles share an external NATS (--nats-url); "
                "without one, leave --roles out (the all-in-one)"
            )
        if "gateway" in roles and "api" not in roles:
            raise ValueError(
                "roles (--roles): the gateway role fronts the api role of the same server; "
                "for a gateway in front of several API servers, run Envoy with the config "
                "of python -m llama_mesh.server.gateway --upstream HOST:PORT ..."
            )
        if self.supervise and "supervisor" not in roles:
            raise ValueError("supervise (--supervise): needs the supervisor role (--roles)")

    def has_role(self, role: str) -> bool:
        """Whether this server plays ``role`` (the all-in-one plays every one)."""
        return self.roles is None or role in self.roles

    @property
    def nats_login(self) -> NatsLogin:
        """How to log in to an external NATS besides its URL."""
        return NatsLogin(self.nats_creds, self.nats_tls_ca, self.nats_tls_cert, self.nats_tls_key)

    @property
    def internal_tls(self) -> bool:
        """Whether the gRPC port requires mTLS (client certificates signed by ``internal_ca``)."""
        return self.internal_ca is not None


def create_grpc_server(
    address: str,
    mesh: Mesh,
    *,
    queue_kind: str,
    api_keys: ApiKeys | None = None,
    metrics: Metrics | None = None,
    credentials: grpc.ServerCredentials | None = None,
    api: bool = True,
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """A gRPC server with every service, health and reflection; returns it and its port.

    With ``api_keys`` enabled, every call but health checks needs a bearer key. With
    ``credentials`` (see :func:`internal_server_credentials`) the port speaks only TLS.
    Without ``api`` (a supervisor alone) it serves health checks only, for probes.
    """
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if metrics is not None:
        interceptors.append(MetricsInterceptor(metrics))
    if api_keys is not None and api_keys.enabled:
        interceptors.append(AuthInterceptor(api_keys))
    server = grpc.aio.server(
        interceptors=[*interceptors, ErrorInterceptor()],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    if api:
        _add_api_services(server, mesh, queue_kind)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    served = SERVICE_NAMES if api else ()
    reflection.enable_server_reflection(
        (*served, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as exc:  # grpc's "Failed to bind to address ..."
        raise OSError(f"cannot listen on {address}: the address is in use") from exc
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    return server, port, health_servicer


def _add_api_services(server: grpc.aio.Server, mesh: Mesh, queue_kind: str) -> None:
    apiserver_pb2_grpc.add_ApiServerServicer_to_server(
        ApiServerServicer(mesh, queue_kind=queue_kind), server
    )
    llama_deploy_api_pb2_grpc.add_LlamaDeployApiServicer_to_server(
        LlamaDeployApiServicer(mesh), server
    )
    control_plane_pb2_grpc.add_ControlPlaneServicer_to_server(
        ControlPlaneServicer(mesh, queue_kind=queue_kind), server
    )
    orchestrator_pb2_grpc.add_OrchestratorServicer_to_server(
        OrchestratorServicer(mesh.orchestrator, mesh.deployments), server
    )
    probes_pb2_grpc.add_ProbesServicer_to_server(ProbesServicer(mesh), server)


def internal_server_credentials(settings: ServerSettings) -> grpc.ServerCredentials | None:
    """The gRPC port's mTLS credentials, or ``None`` when ``settings`` ask for none.

    Every client, health checks included, must present a certificate signed by
    ``internal_ca``: the port is the way around the gateway, so it is closed to anyone
    without one.
    """
    if settings.internal_ca is None:
        return None
    assert settings.internal_cert is not None and settings.internal_key is not None
    return grpc.ssl_server_credentials(
        [(settings.internal_key.read_bytes(), settings.internal_cert.read_bytes())],
        root_certificates=settings.internal_ca.read_bytes(),
        require_client_auth=True,
    )


class StartupError(Exception):
    """The server cannot start for a reason its user can fix; the message says which (one
    line, naming the option)."""


class MeshServer:
    """Every part of a running server; :meth:`start` then :meth:`shutdown`."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self._stack = AsyncExitStack()
        self.state_store: StateStore
        """Where the control plane keeps its buckets (NATS JetStream, or in-process)."""
        self.broker: Broker
        """The server's own broker: its topics, and deployments that name no other."""
        self.default_broker = BrokerChoice()
        """The broker of deployments that name none (``broker_url``'s, or :attr:`broker`)."""
        self.mesh: Mesh
        self.supervisor: Supervisor
        self.grpc_port = 0
        self.nats_url: str | None = None
        self.gateway_url: str | None = None
        self.metrics_port: int | None = None
        """The port serving ``/metrics`` (``settings.metrics_port``, resolved when 0)."""
        self._server: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        self._closed = False
        self.metrics = Metrics()
        self._background: set[asyncio.Task[None]] = set()
        self._restoring: asyncio.Task[None] | None = None
        self.nats_server: NatsServer | None = None
        """The embedded nats-server (``None`` with ``--nats-url`` or the in-process queue)."""
        self.gateway: Gateway | None = None
        self.cluster: Cluster | None = None
        """This server's part in a cluster of servers (``None``: the all-in-one)."""
        self.failed = asyncio.Event()
        """Set when a child process could not be restarted: the server cannot go on."""
        self.failure = ""
        """Why :attr:`failed` was set."""

    @classmethod
    async def start(cls, settings: ServerSettings) -> MeshServer:
        """Start everything; on failure, stop what was started and raise."""
        self = cls(settings)
        try:
            await self._start()
        except BaseException as exc:
            await self.shutdown()
            problem = _startup_problem(exc, settings)
            if problem is not None:
                raise StartupError(problem) from exc
            raise
        return self

    async def _start(self) -> None:
        s = self.settings
        s.data_dir.mkdir(parents=True, exist_ok=True)
        self.default_broker = default = self._default_broker()
        self.state_store, self.broker = await self._open_queue()
        self._stack.push_async_callback(self.state_store.close)
        self._stack.push_async_callback(self.broker.close)
        cp = await ControlPlane.open(self.state_store)
        brokers = DeploymentBrokers(
            self.broker, self.state_store, default=default, availability=self._availability
        )
        self._stack.push_async_callback(brokers.close_all)  # once no replica uses them
        if s.queue == "inprocess":
            self.supervisor = InProcessSupervisor(self.broker, cp.records_only())
        else:
            assert self.nats_url is not None
            self.supervisor = ProcessSupervisor(
                self.nats_url, s.data_dir / "logs", login=s.nats_login
            )
        self._stack.push_async_callback(self.supervisor.shutdown)
        deployments = DeploymentManager(
            cp,
            brokers,
            self.supervisor,
            DeploymentSettings(
                data_dir=s.data_dir,
                max_deployments=s.max_deployments,
                max_replicas=s.max_replicas,
                ready_timeout=s.ready_timeout,
                ack_wait=s.ack_wait,
                policy=SourcePolicy(s.allowed_local_roots, s.allowed_git_prefixes),
            ),
        )
        self.mesh = Mesh(cp, deployments, Orchestrator(brokers))
        self._stack.push_async_callback(deployments.uis.shutdown)
        self.state_store.on_availability(self._nats_availability)
        api = s.has_role("api")
        if api:
            # Watching before serving: callers waiting on tasks find the watch running.
            self.mesh.watcher.start()
            self._stack.push_async_callback(self.mesh.watcher.close)
        server, self.grpc_port, self._health = create_grpc_server(
            f"{s.grpc_host}:{s.grpc_port}",
            self.mesh,
            queue_kind=s.queue,
            api_keys=s.api_keys,
            metrics=self.metrics,
            credentials=internal_server_credentials(s),
            api=api,
        )
        self._server = server
        await server.start()
        self._stack.push_async_callback(self._stop_grpc)
        if api:  # task metrics follow the API's task watch
            follower = asyncio.create_task(
                self.metrics.follow(cp, self.mesh.watcher), name="metrics"
            )
            self._background.add(follower)
        self._stack.push_async_callback(self._stop_background)
        if s.metrics_port is not None:
            self.metrics_port = self.metrics.serve(s.metrics_port)
            self._stack.push_async_callback(asyncio.to_thread, self.metrics.stop_serving)
        gateway_config = self._gateway_config() if s.gateway else None
        if gateway_config is not None and gateway_config.control_plane_lds is not None:
            from llama_mesh.server.gateway.control_planes import ControlPlanePorts

            deployments.control_planes = ControlPlanePorts(gateway_config)
        if gateway_config is not None and gateway_config.ui_cds is not None:
            from llama_mesh.server.gateway.uis import UiClusters

            deployments.uis.clusters = UiClusters(gateway_config.ui_cds)
        if s.roles is not None:
            await self._join_cluster(s.roles)
        else:
            # The gateway opens at once; saved deployments come back meanwhile, several at
            # a time, each listed as deploying (tasks for it: UNAVAILABLE) until it is
            # ready. `/readyz` answers once they all have. Control plane ports claimed
            # before the gateway runs are in its listener file when it starts.
            saved = await deployments.recall()  # listed at once: deploying, or failed
            self._restoring = asyncio.create_task(deployments.restore(saved), name="restore")
        if gateway_config is not None:
            await self._start_gateway(gateway_config)
            if deployments.control_planes is not None:
                await deployments.control_planes.attach()
        # From now on gRPC health says what is down (and SERVING while nothing is).
        publisher = asyncio.create_task(
            self.mesh.health.publish(self._health, SERVICE_NAMES), name="health"
        )
        self._background.add(publisher)

    async def _join_cluster(self, roles: frozenset[str]) -> None:
        """Take part in a cluster of servers: deployments come from the store, and the
        supervisor runs those whose lease it takes (none is restored on its own)."""
        from llama_mesh.server.apiserver.cluster import Cluster

        cluster = await Cluster.open(
            self.mesh.deployments,
            self.state_store,
            supervisor="supervisor" in roles,
            supervise=self.settings.supervise,
        )
        self.cluster = cluster
        cluster.start()
        self._stack.push_async_callback(cluster.close)

    def _nats_availability(self, reason: str | None) -> None:
        self._availability("nats", reason)

    def _availability(self, component: str, reason: str | None) -> None:
        if reason is None:
            self.mesh.health.up(component)
        else:
            self.mesh.health.down(component, reason)

    def _default_broker(self) -> BrokerChoice:
        """The broker of deployments that name none: ``broker_url``'s, or the server's own."""
        url = self.settings.broker_url
        if url is None:
            return BrokerChoice()
        try:
            return BrokerChoice.from_url(url, os.environ)
        except MeshError as exc:
            raise StartupError(exc.message) from exc

    def _fail(self, reason: str) -> None:
        """A child process is down for good: the server cannot serve."""
        if not self.failed.is_set():
            self.failure = reason
            self.failed.set()

    async def wait_restored(self) -> None:
        """Wait until every saved deployment has been restored or marked failed."""
        await self.mesh.deployments.restored.wait()

    async def _open_queue(self) -> tuple[StateStore, Broker]:
        """The state store and the server's own broker: one NATS connection backs both
        (the embedded nats-server, or ``nats_url``), or the in-process ones."""
        s = self.settings
        if s.queue == "inprocess":
            from llama_mesh.server.queues.inprocess import InProcessBroker, InProcessStateStore

            return InProcessStateStore(), InProcessBroker()
        from llama_mesh.server.queues.nats import NatsBroker, NatsStateStore, connect_nats

        if s.nats_url is None:
            # Only clients with the store's own login may connect: the server and the
            # workers it starts (who get the URL with it through their environment).
            store = s.data_dir / "nats"
            nats = await NatsServer.start(
                NatsServerConfig(
                    store_dir=store, users=(store_login(store),), sync_interval=s.nats_sync
                )
            )
            self.nats_server = nats
            # Restarted on the same port, store and login when it dies: clients reconnect.
            keeper = KeepAlive("nats-server", nats, on_give_up=self._fail)
            keeper.start()
            self._stack.push_async_callback(keeper.stop)
            self.nats_url = nats.login_url
        else:
            self.nats_url = s.nats_url
        connection = await connect_nats(
            self.nats_url.split(","), login=s.nats_login, replicas=s.nats_replicas
        )
        try:
            broker = await NatsBroker.open(connection)
        except BaseException:
            await connection.close()
            raise
        return NatsStateStore(connection), broker

    def _gateway_config(self) -> GatewayConfig:
        from llama_mesh.server.gateway import GatewayConfig
        from llama_mesh.server.gateway.control_planes import LDS_FILE
        from llama_mesh.server.gateway.uis import CDS_FILE

        s = self.settings
        work_dir = s.data_dir / "gateway"
        return GatewayConfig(
            listen_host=s.host,
            listen_port=s.port,
            upstream_port=self.grpc_port,
            cors_origins=s.cors_origins,
            allowed_hosts=s.allowed_hosts,
            tls_cert=s.tls_cert,
            tls_key=s.tls_key,
            # The gateway is an mTLS client of the gRPC port, with the server's own certificate.
            upstream_tls_ca=s.internal_ca,
            upstream_tls_cert=s.internal_cert,
            upstream_tls_key=s.internal_key,
            control_plane_lds=work_dir / "control-planes" / LDS_FILE if s.control_planes else None,
            ui_cds=work_dir / "uis" / CDS_FILE,
            ui_api_key=s.api_keys.enabled,
        )

    async def _start_gateway(self, cfg: GatewayConfig) -> None:
        work_dir = self.settings.data_dir / "gateway"
        work_dir.mkdir(parents=True, exist_ok=True)
        gateway = await Gateway.start(cfg, work_dir=work_dir)
        self.gateway = gateway
        health = self.mesh.health
        keeper = KeepAlive(
            "envoy",
            gateway,
            on_down=lambda reason: health.down("gateway", reason),
            on_up=lambda: health.up("gateway"),
            on_give_up=self._fail,
        )
        keeper.start()
        self._stack.push_async_callback(keeper.stop)
        self.gateway_url = gateway.url

    async def _stop_background(self) -> None:
        for task in self._background:
            await cancel_and_wait(task)

    async def _stop_grpc(self) -> None:
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace=5.0)

    async def deploy_file(self, path: Path, *, reload: bool = True) -> str:
        """Deploy a YAML file from disk (local sources relative to its directory)."""
        record = await self.mesh.deployments.create(
            path.read_bytes(),
            base_path=str(path.resolve().parent),
            reload=reload,
            local=True,
            file_name=path.name,
        )
        return record.name

    async def shutdown(self) -> None:
        """Stop everything (idempotent): the restore under way, then the workers, then the
        rest in reverse order of start (gateway, gRPC, the queue and nats-server last)."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            if self._restoring is not None:
                await cancel_and_wait(self._restoring)
        with contextlib.suppress(Exception):
            if self.cluster is not None:  # takes no lease while its replicas stop
                await self.cluster.stop()
        with contextlib.suppress(Exception):
            if hasattr(self, "supervisor"):
                await self.supervisor.shutdown()
        with contextlib.suppress(Exception):
            await self._stack.aclose()


def _startup_problem(exc: BaseException, settings: ServerSettings) -> str | None:
    """The one-line reason of a start-up failure its user can fix, or ``None``."""
    from llama_mesh.server.gateway import GatewayStartError
    from llama_mesh.server.nats_server import NatsServerError

    if isinstance(exc, GatewayStartError) and "Address already in use" in str(exc):
        where = f"{settings.host}:{settings.port}"
        return f"cannot listen on {where} (--port): the address is in use"
    if isinstance(exc, OSError) and _address_in_use(exc):
        if isinstance(exc.__cause__, RuntimeError) or "cannot listen on" in str(exc):
            where = f"{settings.grpc_host}:{settings.grpc_port}"
            return f"cannot listen on {where} (--grpc-port): the address is in use"
        return (
            f"cannot listen on 127.0.0.1:{settings.metrics_port} (--metrics-port): "
            "the address is in use"
        )
    if isinstance(exc, NatsServerError) and "is in use by another nats-server" in str(exc):
        return str(exc).splitlines()[0].replace("; stop it,", " (another llama-mesh?); stop it,")
    return None


def _address_in_use(exc: OSError) -> bool:
    return exc.errno == errno.EADDRINUSE or "the address is in use" in str(exc)
