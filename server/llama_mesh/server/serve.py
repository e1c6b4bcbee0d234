"""``llamactl serve`` / ``python -m llama_mesh.server``: run the whole mesh in one command.

Starts an embedded JetStream ``nats-server`` (unless ``--nats-url`` names one), the gRPC
services, Envoy on ``--port`` (4501 by default, what Llama Deploy 0.8 clients expect),
deploys the given files, prints where everything listens and a ready line, and on Ctrl-C
or SIGTERM stops every child process cleanly.

Every option can also come from the environment (``LLAMA_MESH_PORT``, ``LLAMA_MESH_HOST``,
``LLAMA_MESH_NATS_URL``, ``LLAMA_MESH_DATA_DIR``, ...); flags win.
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

from llama_mesh.server.app import MeshServer, ServerSettings
from llama_mesh.server.auth import ApiKeys, parse_keys
from llama_mesh.server.envvars import env_setting
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


def build_parser(prog: str = "llamactl serve") -> argparse.ArgumentParser:
    """The options of ``serve``."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("deployment_files", nargs="*", type=Path, metavar="DEPLOYMENT_FILE")
    p.add_argument(
        "--host", default=env_setting("HOST", "127.0.0.1"), help="gateway listen address"
    )
    p.add_argument("--port", type=int, default=int(env_setting("PORT", "4501") or 4501))
    p.add_argument(
        "--grpc-host",
        default=env_setting("GRPC_HOST", "127.0.0.1"),
        help="gRPC listen address (127.0.0.1 unless Envoy runs elsewhere)",
    )
    p.add_argument(
        "--grpc-port",
        type=int,
        default=int(env_setting("GRPC_PORT", "0") or 0),
        help="internal gRPC port on 127.0.0.1 (0: any free port)",
    )
    p.add_argument(
        "--nats-url",
        default=env_setting("NATS_URL"),
        help="use this NATS (else embedded); a user and password go in it: nats://u:p@host:port",
    )
    NatsLogin.add_options(p)  # for --nats-url
    p.add_argument(
        "--nats-replicas",
        type=int,
        default=_int_env("NATS_REPLICAS") or 1,
        help="copies of each stream on a NATS cluster (1, 3 or 5; with --nats-url)",
    )
    p.add_argument(
        "--data-dir", type=Path, default=Path(env_setting("DATA_DIR") or default_data_dir())
    )
    p.add_argument("--queue", choices=["nats", "inprocess"], default=env_setting("QUEUE", "nats"))
    p.add_argument("--no-gateway", action="store_true", help="serve gRPC only, no Envoy")
    p.add_argument("--cors-origin", action="append", default=[], help="allowed CORS origin")
    p.add_argument(
        "--max-deployments", type=int, default=int(env_setting("MAX_DEPLOYMENTS", "10") or 10)
    )
    p.add_argument(
        "--ack-wait",
        type=float,
        default=float(env_setting("ACK_WAIT", "10") or 10),
        help="seconds before a task of a dead worker is redelivered",
    )
    p.add_argument(
        "--allow-local-root",
        action="append",
        type=Path,
        default=None,
        help="local sources must be inside one of these directories",
    )
    p.add_argument(
        "--allow-git-prefix",
        action="append",
        default=None,
        help="git sources must start with one of these prefixes",
    )
    p.add_argument(
        "--api-key",
        action="append",
        default=[env_setting("API_KEYS") or ""],
        help="bearer key for running tasks (repeat; env LLAMA_MESH_API_KEYS)",
    )
    p.add_argument(
        "--admin-key",
        action="append",
        default=[env_setting("ADMIN_KEYS") or ""],
        help="bearer key that may also deploy and delete (env LLAMA_MESH_ADMIN_KEYS)",
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
        default=_int_env("METRICS_PORT"),
        help="serve Prometheus /metrics on 127.0.0.1:PORT (0: any free port)",
    )
    p.add_argument(
        "--tls-cert",
        type=Path,
        default=env_setting("TLS_CERT"),
        help="PEM certificate chain: the gateway serves HTTPS (with --tls-key)",
    )
    p.add_argument(
        "--tls-key", type=Path, default=env_setting("TLS_KEY"), help="PEM private key of --tls-cert"
    )
    p.add_argument(
        "--internal-ca",
        type=Path,
        default=env_setting("INTERNAL_CA"),
        help="PEM CA: the gRPC port requires mTLS, client certificates signed by it "
        "(with --internal-cert, --internal-key)",
    )
    p.add_argument(
        "--internal-cert",
        type=Path,
        default=env_setting("INTERNAL_CERT"),
        help="PEM certificate of the gRPC port, also the gateway's client certificate; "
        "must name IP 127.0.0.1",
    )
    p.add_argument(
        "--internal-key",
        type=Path,
        default=env_setting("INTERNAL_KEY"),
        help="PEM private key of --internal-cert",
    )
    p.add_argument("--log-level", default=env_setting("LOG_LEVEL", "INFO"))
    p.add_argument(
        "--log-format", choices=["plain", "json"], default=env_setting("LOG_FORMAT", "plain")
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


def check_exposure(settings: ServerSettings, *, insecure_no_auth: bool) -> None:
    """Refuse (``ValueError`` saying why) to listen beyond loopback without API keys."""
    if settings.api_keys.enabled or insecure_no_auth:
        return
    exposed = [
        f"{option} {host}"
        for option, host in (("--host", settings.host), ("--grpc-host", settings.grpc_host))
        if (option == "--grpc-host" or settings.gateway) and not is_loopback(host)
    ]
    if exposed:
        raise ValueError(
            f"{' and '.join(exposed)} listens beyond this machine, and no --api-key or "
            "--admin-key is set: anyone who reaches it could deploy code that runs as this "
            "user. Set API keys, or pass --insecure-no-auth to serve without them."
        )


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    """The typed, frozen settings of a parsed command line."""
    settings = _settings(args)
    check_exposure(settings, insecure_no_auth=args.insecure_no_auth)
    return settings


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
        gateway=not args.no_gateway,
        cors_origins=tuple(args.cors_origin),
        max_deployments=args.max_deployments,
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


async def serve(settings: ServerSettings, files: list[Path]) -> int:
    """Run until SIGINT/SIGTERM; returns the exit status."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    server = await MeshServer.start(settings)
    try:
        if server.nats_url:
            origin = "external" if settings.nats_url else f"embedded, store {settings.data_dir}"
            _say(f"nats     {redact_url(server.nats_url)} ({origin})")
        mtls = ", mTLS" if settings.internal_tls else ""
        _say(
            f"grpc     {settings.grpc_host}:{server.grpc_port} "
            f"(ApiServer, LlamaDeployApi, ...{mtls})"
        )
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
    return asyncio.run(serve(settings, list(args.deployment_files)))
