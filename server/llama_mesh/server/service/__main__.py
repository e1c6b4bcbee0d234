"""Run one replica of a workflow service: ``python -m llama_mesh.server.service``.

Needs only a NATS URL, the deployment and the service id: the deployment's YAML is read
from the control plane's store, the source is synced unless ``--source-dir`` is given.
``llamactl worker`` runs the same entrypoint.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path

from llama_mesh.server.allowlist import SourcePolicy
from llama_mesh.server.control_plane.store import ControlPlane
from llama_mesh.server.deployment_config import (
    ServiceConfig,
    SourceConfig,
    parse_deployment_config,
)
from llama_mesh.server.errors import MeshError
from llama_mesh.server.logs import configure_logging
from llama_mesh.server.queues.nats import NATS_URL_VARIABLE, NatsLogin, connect_nats
from llama_mesh.server.service.loader import load_workflow
from llama_mesh.server.service.servicer import start_info_server
from llama_mesh.server.service.worker import Worker, WorkerSettings
from llama_mesh.server.sources import sync_source

logger = logging.getLogger("llama_mesh.worker")

EXIT_BAD_SERVICE = 3
"""Exit status when the service cannot be loaded (the supervisor does not retry fast)."""


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of a worker process."""
    parser = argparse.ArgumentParser(prog="llama-mesh-worker", description=__doc__)
    parser.add_argument(
        "--nats",
        default=os.environ.get(NATS_URL_VARIABLE),
        help=f"NATS URL(s), comma-separated (default: ${NATS_URL_VARIABLE})",
    )
    parser.add_argument("--deployment", required=True, help="deployment name")
    parser.add_argument("--service", required=True, help="service id in the deployment")
    parser.add_argument("--source-dir", type=Path, help="service source directory (else synced)")
    parser.add_argument(
        "--path",
        help="the workflow (dir/module:attr; with --source-dir): the service's settings then "
        "come from these options, not from the deployment's stored record",
    )
    parser.add_argument("--max-concurrent-tasks", type=int, default=1, help="with --path")
    parser.add_argument("--max-retries", type=int, default=2, help="with --path")
    parser.add_argument("--timeout", type=float, help="workflow timeout in seconds, with --path")
    parser.add_argument("--generation", type=int, default=0, help="deployment generation")
    parser.add_argument("--ack-wait", type=float, default=10.0, help="seconds before redelivery")
    parser.add_argument("--instance-id", help="replica id (default: random)")
    NatsLogin.add_options(parser)
    parser.add_argument(
        "--exit-with-parent",
        type=int,
        metavar="PID",
        help="stop when the process PID (the supervising server) dies",
    )
    parser.add_argument("--log-level", default=os.environ.get("LLAMA_MESH_LOG_LEVEL", "INFO"))
    return parser


async def run(args: argparse.Namespace) -> int:
    """Connect, load the workflow, run until SIGTERM/SIGINT; returns the exit status."""
    queue = await connect_nats(args.nats.split(","), login=args.login)
    try:
        cp = await ControlPlane.open(queue)
        try:
            if args.path is not None:
                service = ServiceConfig(
                    id=args.service,
                    name=args.service,
                    source=SourceConfig("local", "."),
                    path=args.path,
                    max_concurrent_tasks=args.max_concurrent_tasks,
                    max_retries=args.max_retries,
                    timeout=args.timeout,
                )
            else:
                service = await _stored_service(cp, args)
            source_dir = args.source_dir
            if source_dir is None:
                record = await cp.get_deployment(args.deployment)
                dest = Path(tempfile.mkdtemp(prefix=f"llama-mesh-{args.deployment}-"))
                source_dir = await sync_source(
                    service.source,
                    base_path=Path(record.base_path or "."),
                    dest=dest,
                    policy=SourcePolicy(allowed_local_roots=None, allowed_git_prefixes=None),
                    local=record.local,
                )
            workflow = load_workflow(source_dir, service.path or "")
        except (MeshError, ValueError) as exc:
            print(f"llama-mesh worker: cannot start {args.service}: {exc}", file=sys.stderr)
            return EXIT_BAD_SERVICE
        settings = WorkerSettings(
            deployment=args.deployment,
            service_id=args.service,
            max_concurrent_tasks=service.max_concurrent_tasks,
            max_retries=service.max_retries,
            timeout=service.timeout,
            ack_wait=args.ack_wait,
            generation=args.generation,
            **({"instance_id": args.instance_id} if args.instance_id else {}),
        )
        worker = Worker(queue, cp, workflow, settings)
        server, health_servicer, port = await start_info_server(worker, workflow)
        worker.instance.address = f"127.0.0.1:{port}"
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stop_soon)
        try:
            await worker.run()
        finally:
            await health_servicer.enter_graceful_shutdown()
            await server.stop(grace=2.0)
        return 0
    finally:
        with contextlib.suppress(Exception):  # a broker that is gone must not keep us alive
            async with asyncio.timeout(10):
                await queue.close()


async def _stored_service(cp: ControlPlane, args: argparse.Namespace) -> ServiceConfig:
    record = await cp.get_deployment(args.deployment)
    config = parse_deployment_config(record.config_yaml)
    if args.service not in config.services:
        raise MeshError(f"service '{args.service}' is not in '{args.deployment}'")
    return config.services[args.service]


def exit_with_parent(parent: int) -> None:
    """Have the kernel send SIGTERM when the parent dies (Linux), so a killed server leaves
    no orphaned replicas behind; exit at once if it is already gone."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        sys.exit(0)


def main(argv: list[str] | None = None) -> int:
    """Entry point of a worker process."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.path is not None and args.source_dir is None:
        parser.error("--path needs --source-dir")
    if not args.nats:
        parser.error(f"the NATS URL is needed: --nats URL or ${NATS_URL_VARIABLE}")
    try:
        args.login = NatsLogin.from_options(args)
    except ValueError as exc:
        parser.error(str(exc))
    if args.exit_with_parent:
        exit_with_parent(args.exit_with_parent)
    configure_logging(args.log_level, prefix=f"[worker {args.deployment}/{args.service}] ")
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
