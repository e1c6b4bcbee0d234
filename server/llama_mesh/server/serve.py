"""``llamactl serve`` / ``python -m llama_mesh.server``: run the whole mesh in one command.

Starts an embedded JetStream ``nats-server`` (unless ``--nats-url`` names one), the gRPC
services, Envoy on ``--port`` (4501 by default, what Llama Deploy 0.8 clients expect),
deploys the given files, prints where everything listens and a ready line, and on Ctrl-C
or SIGTERM stops every child process cleanly.

Every option can also come from the environment (``LLAMA_MESH_PORT``, ``LLAMA_MESH_HOST``,
``LLAMA_MESH_NATS_URL``, ``LLAMA_MESH_DATA_DIR``, ...); flags win. The Llama Deploy 0.8 API
server's own variables (``LLAMA_DEPLOY_APISERVER_HOST``, ``_PORT``, ``_RC_PATH``,
``_PROMETHEUS_ENABLED``, ``_PROMETHEUS_PORT``) are read after those, so 0.8 container images
start unchanged.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import signal
import sys
from pathlib import Path

from llama_mesh.server.app import ROLES, MeshServer, ServerSettings, StartupError
from llama_mesh.server.auth import ApiKeys, parse_keys
from llama_mesh.server.envvars import (
    LLAMA_DEPLOY_PREFIX,
    env_setting,
    llama_deploy_setting,
    setting,
    split_list,
)
from llama_mesh.server.errors import MeshError
from llama_mesh.server.logs import configure_logging
from llama_mesh.server.queues.nats import NatsLogin, redact_url

logger = logging.getLogger("llama_mesh.serve")


def default_data_dir() -> Path:
    """Where state lives unless ``--data-dir`` says otherwise."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "llama-mesh"


def _int_env(name: str) -> int | None:
    value = env_setting(name)
    return int(value) if value else None


DESCRIPTION = (
    "Run the whole mesh in one command: an embedded nats-server (unless --nats-url names "
    "one), the gRPC services, the Envoy gateway on --port and the workers of the given "
    "deployment files. Every option can also come from the environment as "
    "LLAMA_MESH_<OPTION> (LLAMA_MESH_PORT, LLAMA_MESH_DATA_DIR, ...); options win."
)
"""What ``serve --help`` says above the options."""


_FALSE = frozenset({"0", "off", "f", "false", "n", "no"})

IGNORED_LLAMA_DEPLOY_SETTINGS = {
    "DEPLOYMENTS_PATH": "sources live under --data-dir",
    "USE_TLS": "the gateway serves HTTPS with --tls-cert and --tls-key",
}
"""0.8 API server settings with no meaning here, and what to use instead."""


def _prometheus_port() -> int | None:
    """The metrics port 0.8's ``PROMETHEUS_ENABLED`` / ``PROMETHEUS_PORT`` ask for (9000
    when only enabled); None when neither is set, or metrics are disabled."""
    enabled = llama_deploy_setting("PROMETHEUS_ENABLED")
    port = llama_deploy_setting("PROMETHEUS_PORT")
    if enabled is None and port is None:
        return None
    if enabled is not None and enabled.strip().lower() in _FALSE:
        return None
    return int(port) if port else 9000


def _metrics_port() -> int | None:
    return _int_env("METRICS_PORT") if env_setting("METRICS_PORT") else _prometheus_port()


def build_parser(prog: str = "llamactl serve") -> argparse.ArgumentParser:
    """The options of ``serve``."""
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    p.add_argument(
        "deployment_files",
        nargs="*",
        type=Path,
        metavar="DEPLOYMENT_FILE",
        help="deployment YAML files to deploy once the server is up",
    )
    p.add_argument(
        "--roles",
        default=env_setting("ROLES"),
        help=f"what this server is, a comma list of {', '.join(ROLES)}: one of several "
        "servers sharing --nats-url, each deployment supervised by one of them "
        "(default: all three, alone on its NATS)",
    )
    p.add_argument(
        "--supervise",
        action="append",
        metavar="NAME",
        default=[],
        help="with the supervisor role: supervise only this deployment; repeat for more "
        "(default: compete for every deployment)",
    )
    p.add_argument(
        "--host",
        default=setting("HOST", "127.0.0.1"),
        help="gateway listen address (default: 127.0.0.1)",
    )
    p.add_argument(
        "--port",
        type=int,
        default=int(setting("PORT", "4501") or 4501),
        help="gateway port: JSON, gRPC and gRPC-Web (default: 4501)",
    )
    p.add_argument(
        "--rc-path",
        type=Path,
        default=setting("RC_PATH"),
        help="also deploy every *.yml and *.yaml file in this folder at start-up (default: none)",
    )
    p.add_argument(
        "--grpc-host",
        default=env_setting("GRPC_HOST", "127.0.0.1"),
        help="gRPC listen address; change it only when Envoy runs elsewhere (default: 127.0.0.1)",
    )
    p.add_argument(
        "--grpc-port",
        type=int,
        default=int(env_setting("GRPC_PORT", "0") or 0),
        help="internal gRPC port (default: 0, any free port)",
    )
    p.add_argument(
        "--nats-url",
        default=env_setting("NATS_URL"),
        help="use this NATS, a user and password in it: nats://u:p@host:port "
        "(default: none, an embedded nats-server)",
    )
    NatsLogin.add_options(p)  # for --nats-url
    p.add_argument(
        "--nats-replicas",
        type=int,
        default=_int_env("NATS_REPLICAS") or 1,
        help="copies of each stream on a NATS cluster: 1, 3 or 5, with --nats-url (default: 1)",
    )
    p.add_argument(
        "--nats-sync",
        metavar="INTERVAL",
        default=env_setting("NATS_SYNC", "always"),
        help="when the embedded nats-server fsyncs: always (every write, before it is "
        "acknowledged) or a duration such as 1s (faster; a machine failure loses what was "
        "acknowledged within it) (default: always)",
    )
    p.add_argument(
        "--broker",
        metavar="URL",
        default=env_setting("BROKER_URL"),
        help="the broker of deployments whose message-queue is nats, simple or absent: "
        "amqp://user:password@host:port/vhost or redis://host:port "
        "(default: $LLAMA_MESH_BROKER_URL, else the server's own)",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=Path(env_setting("DATA_DIR") or default_data_dir()),
        help="JetStream store, logs and deployment sources "
        "(default: $XDG_DATA_HOME/llama-mesh, else ~/.local/share/llama-mesh)",
    )
    p.add_argument(
        "--queue",
        choices=["nats", "inprocess"],
        default=env_setting("QUEUE", "nats"),
        help="message queue: nats, or inprocess for one process without persistence "
        "(default: nats)",
    )
    p.add_argument("--no-gateway", action="store_true", help="serve gRPC only, no Envoy")
    p.add_argument(
        "--no-control-planes",
        action="store_true",
        default=env_setting("NO_CONTROL_PLANES", "") not in ("", "0", "false"),
        help="do not serve deployments' Llama Deploy 0.8 control plane API on their "
        "control-plane.port (default: served)",
    )
    p.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        help="allowed CORS origin; repeat for more, '*' for any; requests with another Origin "
        "are refused (default: none)",
    )
    p.add_argument(
        "--allowed-host",
        action="append",
        default=[env_setting("ALLOWED_HOSTS") or ""],
        help="a host name the gateway answers to besides loopback and --host; repeat for more, "
        "'*' for any; env LLAMA_MESH_ALLOWED_HOSTS is comma-separated; needed with --host "
        "0.0.0.0 (default: none)",
    )
    p.add_argument(
        "--max-deployments",
        type=int,
        default=int(env_setting("MAX_DEPLOYMENTS", "10") or 10),
        help="how many deployments the server accepts (default: 10)",
    )
    p.add_argument(
        "--max-replicas",
        type=int,
        default=int(env_setting("MAX_REPLICAS", "16") or 16),
        help="most replicas a service may ask for (default: 16)",
    )
    p.add_argument(
        "--ack-wait",
        type=float,
        default=float(env_setting("ACK_WAIT", "10") or 10),
        help="seconds before a task of a dead worker is redelivered (default: 10)",
    )
    p.add_argument(
        "--allow-local-root",
        action="append",
        type=Path,
        default=None,
        help="local sources and dependency paths must be inside one of these directories; "
        "repeat for more (default: any directory)",
    )
    p.add_argument(
        "--allow-git-prefix",
        action="append",
        default=None,
        help="git sources and dependency URLs must lie within one of these URL prefixes, "
        "compared by parsed parts; repeat for more (default: any URL)",
    )
    p.add_argument(
        "--api-key",
        action="append",
        default=[env_setting("API_KEYS") or ""],
        help="bearer key for running tasks; repeat for more "
        "(default: none, from $LLAMA_MESH_API_KEYS)",
    )
    p.add_argument(
        "--admin-key",
        action="append",
        default=[env_setting("ADMIN_KEYS") or ""],
        help="bearer key that may also deploy and delete; repeat for more "
        "(default: none, from $LLAMA_MESH_ADMIN_KEYS)",
    )
    p.add_argument(
        "--insecure-no-auth",
        action="store_true",
        default=env_setting("INSECURE_NO_AUTH", "") in ("1", "true", "yes"),
        help="serve on a non-loopback --host or --grpc-host without API keys: anyone who "
        "reaches it can deploy code that runs as this user (env LLAMA_MESH_INSECURE_NO_AUTH=1)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=_metrics_port(),
        help="serve Prometheus /metrics on 127.0.0.1:PORT, 0 for any free port "
        "(default: none, no metrics)",
    )
    p.add_argument(
        "--tls-cert",
        type=Path,
        default=env_setting("TLS_CERT"),
        help="PEM certificate chain: the gateway serves HTTPS, with --tls-key "
        "(default: none, plain HTTP)",
    )
    p.add_argument(
        "--tls-key",
        type=Path,
        default=env_setting("TLS_KEY"),
        help="PEM private key of --tls-cert (default: none)",
    )
    p.add_argument(
        "--internal-ca",
        type=Path,
        default=env_setting("INTERNAL_CA"),
        help="PEM CA: the gRPC port requires mTLS, client certificates signed by it, "
        "with --internal-cert and --internal-key (default: none, no TLS on the gRPC port)",
    )
    p.add_argument(
        "--internal-cert",
        type=Path,
        default=env_setting("INTERNAL_CERT"),
        help="PEM certificate of the gRPC port, also the gateway's client certificate; "
        "must name IP 127.0.0.1 (default: none)",
    )
    p.add_argument(
        "--internal-key",
        type=Path,
        default=env_setting("INTERNAL_KEY"),
        help="PEM private key of --internal-cert (default: none)",
    )
    p.add_argument(
        "--log-level",
        default=env_setting("LOG_LEVEL", "INFO"),
        help="DEBUG, INFO, WARNING or ERROR (default: INFO)",
    )
    p.add_argument(
        "--log-format",
        choices=["plain", "json"],
        default=env_setting("LOG_FORMAT", "plain"),
        help="plain text lines, or one JSON object a line (default: plain)",
    )
    return p


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) is reachable from this machine only."""
    if host.lower() in ("localhost", "localhost.", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # another name: it may resolve to anything


def check_exposure(args: argparse.Namespace) -> None:
    """Refuse (``ValueError`` saying why) to listen beyond loopback without API keys."""
    keys = ApiKeys(user=parse_keys(args.api_key), admin=parse_keys(args.admin_key))
    if keys.enabled or args.insecure_no_auth:
        return
    roles = _roles(args)
    api = roles is None or "api" in roles  # a supervisor alone serves health checks only
    gateway = not args.no_gateway and (roles is None or "gateway" in roles)
    exposed = [
        f"{option} {host}"
        for option, host in (("--host", args.host), ("--grpc-host", args.grpc_host))
        if (gateway if option == "--host" else api) and not is_loopback(host)
    ]
    if exposed:
        raise ValueError(
            f"{' and '.join(exposed)} listens beyond this machine, and no --api-key or "
            "--admin-key is set: anyone who reaches it could deploy code that runs as this "
            "user. Set API keys, or pass --insecure-no-auth to serve without them."
        )


def _roles(args: argparse.Namespace) -> frozenset[str] | None:
    """The roles ``--roles`` names; ``None`` when it is not given (the all-in-one)."""
    if args.roles is None:
        return None
    return frozenset(split_list([args.roles]))


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    """The typed, frozen settings of a parsed command line (keys checked first: nothing
    else matters about a server anyone could deploy code on)."""
    check_exposure(args)
    return _settings(args)


def _settings(args: argparse.Namespace) -> ServerSettings:
    return ServerSettings(
        data_dir=args.data_dir.resolve(),
        host=args.host,
        port=args.port,
        grpc_host=args.grpc_host,
        grpc_port=args.grpc_port,
        queue=args.queue,
        nats_url=args.nats_url,
        nats_creds=args.nats_creds,
        nats_tls_ca=args.nats_tls_ca,
        nats_tls_cert=args.nats_tls_cert,
        nats_tls_key=args.nats_tls_key,
        nats_replicas=args.nats_replicas,
        nats_sync=args.nats_sync,
        broker_url=args.broker or None,
        roles=_roles(args),
        supervise=tuple(args.supervise),
        gateway=not args.no_gateway and "gateway" in (_roles(args) or {"gateway"}),
        control_planes=not args.no_control_planes,
        cors_origins=tuple(args.cors_origin),
        allowed_hosts=split_list(args.allowed_host),
        max_deployments=args.max_deployments,
        max_replicas=args.max_replicas,
        ack_wait=args.ack_wait,
        allowed_local_roots=tuple(p.resolve() for p in args.allow_local_root)
        if args.allow_local_root
        else None,
        allowed_git_prefixes=tuple(args.allow_git_prefix) if args.allow_git_prefix else None,
        api_keys=ApiKeys(user=parse_keys(args.api_key), admin=parse_keys(args.admin_key)),
        metrics_port=args.metrics_port,
        tls_cert=_resolved(args.tls_cert),
        tls_key=_resolved(args.tls_key),
        internal_ca=_resolved(args.internal_ca),
        internal_cert=_resolved(args.internal_cert),
        internal_key=_resolved(args.internal_key),
    )


def _resolved(path: Path | None) -> Path | None:
    # Absolute, like --data-dir: the paths are written into the gateway's envoy.yaml, which
    # should read the same whatever directory Envoy starts in.
    return path.resolve() if path is not None else None


def _say(line: str) -> None:
    print(f"llama-mesh: {line}", flush=True)


def rc_files(rc_path: Path) -> list[Path]:
    """The deployment files of an rc folder, in name order (none if it does not exist)."""
    if not rc_path.is_dir():
        return []
    return sorted(p for p in rc_path.iterdir() if p.suffix in (".yml", ".yaml") and p.is_file())


async def serve(settings: ServerSettings, files: list[Path], rc_path: Path | None = None) -> int:
    """Run until SIGINT/SIGTERM; returns the exit status.

    A file of ``files`` that cannot be deployed stops the server (exit 2); one of the
    ``rc_path`` folder is reported and skipped, as the 0.8 server did.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        server = await MeshServer.start(settings)
    except StartupError as exc:
        print(f"llama-mesh: cannot start: {exc}", file=sys.stderr)
        return 2
    try:
        if server.nats_url:
            origin = "external" if settings.nats_url else f"embedded, store {settings.data_dir}"
            _say(f"nats     {redact_url(server.nats_url)} ({origin})")
        if server.default_broker.settings is not None:
            _say(f"broker   {server.default_broker.describe()} (deployments naming no other)")
        mtls = ", mTLS" if settings.internal_tls else ""
        served = "ApiServer, LlamaDeployApi, ..." if settings.has_role("api") else "health"
        _say(f"grpc     {settings.grpc_host}:{server.grpc_port} ({served}{mtls})")
        if settings.roles is not None:
            roles = ",".join(r for r in ROLES if r in settings.roles)
            if "supervisor" in settings.roles:
                roles += f" (supervises {', '.join(settings.supervise) or 'any deployment'})"
            _say(f"roles    {roles}")
        if server.gateway_url:
            _say(f"gateway  {server.gateway_url} (JSON /v1 and Llama Deploy 0.8 API, gRPC)")
        if server.metrics_port is not None:
            _say(f"metrics  http://127.0.0.1:{server.metrics_port}/metrics (Prometheus)")
        for path in files:
            try:
                name = await server.deploy_file(path)
            except (MeshError, OSError) as exc:
                message = exc.message if isinstance(exc, MeshError) else str(exc)
                print(f"llama-mesh: cannot deploy {path}: {message}", file=sys.stderr)
                return 2
            _say(f"deployed {name} from {path}")
        if rc_path is not None:
            found = rc_files(rc_path)
            _say(f"rc folder {rc_path}: {len(found)} deployment file(s)")
            for path in found:
                try:
                    name = await server.deploy_file(path)
                except (MeshError, OSError) as exc:
                    message = exc.message if isinstance(exc, MeshError) else str(exc)
                    print(f"llama-mesh: cannot deploy {path}: {message}", file=sys.stderr)
                    continue
                _say(f"deployed {name} from {path}")
        _say(f"ready on {server.gateway_url or f'127.0.0.1:{server.grpc_port}'}")
        stopping = asyncio.ensure_future(stop.wait())
        failing = asyncio.ensure_future(server.failed.wait())
        try:
            await asyncio.wait({stopping, failing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            failing.cancel()
        if server.failed.is_set():
            print(f"llama-mesh: cannot go on: {server.failure}", file=sys.stderr, flush=True)
            return 1
        _say("stopping")
        return 0
    finally:
        await server.shutdown()


def main(argv: list[str] | None = None, prog: str = "llamactl serve") -> int:
    """Entry point shared by ``llamactl serve`` and ``python -m llama_mesh.server``."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    configure_logging(args.log_level, args.log_format)
    os.environ["LLAMA_MESH_LOG_FORMAT"] = args.log_format  # workers log the same way
    for name, instead in IGNORED_LLAMA_DEPLOY_SETTINGS.items():
        if llama_deploy_setting(name):
            _say(f"{LLAMA_DEPLOY_PREFIX}{name} is not used: {instead}")
    return asyncio.run(serve(settings, list(args.deployment_files), args.rc_path))
