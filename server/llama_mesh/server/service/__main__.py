"""Run one replica of a workflow service: ``python -m llama_mesh.server.service``.

Needs only a NATS URL, the deployment and the service id: the deployment's YAML is read
from the control plane's store (its ``message-queue`` names the broker with the tasks), the
source is synced unless ``--source-dir`` is given.
``llamactl worker`` runs the same entrypoint; both are :class:`~.serving.WorkflowService`,
which serves a workflow object from any process.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import os
import signal
import sys
from pathlib import Path

from llama_mesh.server.deployment_config import ServiceConfig, SourceConfig
from llama_mesh.server.errors import MeshError
from llama_mesh.server.logs import configure_logging
from llama_mesh.server.queues.nats import NATS_URL_VARIABLE, NatsLogin
from llama_mesh.server.queues.selection import BROKER_URL_VARIABLE, BROKER_VARIABLE, BrokerChoice
from llama_mesh.server.service.serving import WorkflowService

logger = logging.getLogger("llama_mesh.worker")

EXIT_BAD_SERVICE = 3
"""Exit status when the service cannot be loaded (the supervisor does not retry fast)."""
EXIT_ORPHANED = 4
"""Exit status when the supervising server died with tasks still running."""
ORPHAN_GRACE = 2.0
"""Seconds an orphaned replica gives itself to stop cleanly before it exits regardless."""


DESCRIPTION = (
    "Run one replica of a workflow service. It needs only a NATS URL, the deployment and "
    "the service id: the deployment's YAML is read from the control plane's store, its "
    "source is synced unless --source-dir is given."
)
"""What ``worker --help`` says above the options."""


def build_parser(prog: str = "llamactl worker") -> argparse.ArgumentParser:
    """Command-line options of a worker process."""
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    parser.add_argument(
        "--nats",
        default=os.environ.get(NATS_URL_VARIABLE),
        help=f"NATS URL(s), comma-separated (default: ${NATS_URL_VARIABLE})",
    )
    parser.add_argument("--deployment", required=True, help="deployment name")
    parser.add_argument("--service", required=True, help="service id in the deployment")
    parser.add_argument(
        "--source-dir",
        type=Path,
        help="service source directory (default: none, synced from the deployment)",
    )
    parser.add_argument(
        "--path",
        help="the workflow (dir/module:attr; with --source-dir): the service's settings then "
        "come from these options, not from the deployment's stored record (default: none)",
    )
    parser.add_argument(
        "--max-concurrent-tasks", type=int, default=1, help="with --path (default: 1)"
    )
    parser.add_argument("--max-retries", type=int, default=2, help="with --path (default: 2)")
    parser.add_argument(
        "--timeout", type=float, help="workflow timeout in seconds, with --path (default: none)"
    )
    parser.add_argument(
        "--generation", type=int, default=0, help="deployment generation (default: 0)"
    )
    parser.add_argument(
        "--ack-wait",
        type=float,
        default=10.0,
        help="seconds before a task of a dead worker is redelivered (default: 10)",
    )
    parser.add_argument("--instance-id", help="replica id (default: random)")
    NatsLogin.add_options(parser)
    parser.add_argument(
        "--broker",
        metavar="URL",
        help="take the tasks from this broker (amqp://... or redis://...), whatever the "
        "deployment names (default: the broker its message-queue names, with "
        f"${BROKER_URL_VARIABLE} for one that names none)",
    )
    parser.add_argument(
        "--exit-with-parent",
        type=int,
        metavar="PID",
        help="stop when the process PID, the supervising server, dies (default: none)",
    )
    parser.add_argument(
        "--log-level",
        default=os.environ.get("LLAMA_MESH_LOG_LEVEL", "INFO"),
        help="DEBUG, INFO, WARNING or ERROR (default: INFO, from $LLAMA_MESH_LOG_LEVEL)",
    )
    return parser


async def run(args: argparse.Namespace) -> int:
    """Join the mesh as a replica of the service, until SIGTERM/SIGINT; the exit status."""
    try:
        service = await WorkflowService.connect(
            deployment=args.deployment,
            service=args.service,
            nats=args.nats,
            login=args.login,
            source_dir=args.source_dir,
            ack_wait=args.ack_wait,
            generation=args.generation,
            instance_id=args.instance_id,
            service_config=_given_settings(args),
            broker=_given_broker(args),
        )
    except (MeshError, ValueError) as exc:
        print(f"llama-mesh worker: cannot start {args.service}: {exc}", file=sys.stderr)
        return EXIT_BAD_SERVICE
    loop = asyncio.get_running_loop()

    def stop() -> None:
        service.stop_soon()
        if args.exit_with_parent and os.getppid() != args.exit_with_parent:
            # The server that started this replica was killed (this is its death signal)
            # and its nats-server with it: running tasks could not store their results,
            # and they are redelivered once a server is back. Do not wait for them.
            logger.warning("the server (pid %s) is gone; exiting", args.exit_with_parent)
            loop.call_later(ORPHAN_GRACE, os._exit, EXIT_ORPHANED)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    await service.run()
    return 0


def _given_broker(args: argparse.Namespace) -> BrokerChoice | None:
    """The broker ``--broker`` names, else the one the server that started this replica
    handed it (``$LLAMA_MESH_BROKER``), else ``None``: as the deployment names it."""
    if args.broker:
        return BrokerChoice.from_url(args.broker, os.environ)
    handed = os.environ.get(BROKER_VARIABLE)
    return BrokerChoice.from_json(handed) if handed else None


def _given_settings(args: argparse.Namespace) -> ServiceConfig | None:
    """The service's settings from the command line (``--path``), or None: from the store."""
    if args.path is None:
        return None
    return ServiceConfig(
        id=args.service,
        name=args.service,
        source=SourceConfig("local", "."),
        path=args.path,
        max_concurrent_tasks=args.max_concurrent_tasks,
        max_retries=args.max_retries,
        timeout=args.timeout,
    )


def exit_with_parent(parent: int) -> None:
    """Have the kernel send SIGTERM when the parent dies (Linux), so a killed server leaves
    no orphaned replicas behind; exit at once if it is already gone."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        sys.exit(0)


def main(argv: list[str] | None = None, prog: str = "llamactl worker") -> int:
    """Entry point of a worker process (``prog``: the name its usage lines show)."""
    parser = build_parser(prog)
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
    sys.exit(main(prog="python -m llama_mesh.server.service"))
