"""``python -m bench._mesh_server``: one llama-mesh server for the benchmark, in its own process.

Runs :class:`~llama_mesh.server.app.MeshServer` (embedded nats-server, worker processes,
the Envoy gateway) so that its memory and CPU can be read apart from the benchmark client.
Prints one JSON line with its pid and addresses once it listens, then runs until its
standard input closes (the benchmark ended or died) or it gets SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path

from llama_mesh.server.app import MeshServer, ServerSettings


async def serve(args: argparse.Namespace) -> int:
    """Start, announce, wait for the end, stop."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    settings = ServerSettings(
        data_dir=args.data_dir,
        port=args.port,
        queue="nats",
        nats_url=None,
        gateway=True,
        control_planes=False,
        ack_wait=10.0,
        nats_sync=args.nats_sync,
        ready_timeout=120.0,
    )
    server = await MeshServer.start(settings)
    try:
        announce = {
            "pid": os.getpid(),
            "grpc_port": server.grpc_port,
            "gateway_url": server.gateway_url,
            "nats_url": server.nats_url,
        }
        print(json.dumps(announce), flush=True)
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        eof = asyncio.ensure_future(reader.read())
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait({eof, stopped}, return_when=asyncio.FIRST_COMPLETED)
        for waiter in (eof, stopped):
            waiter.cancel()
        await asyncio.gather(eof, stopped, return_exceptions=True)
    finally:
        await server.shutdown()
    return 0


def main() -> int:
    """Parse the options and serve."""
    parser = argparse.ArgumentParser(prog="python -m bench._mesh_server")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True, help="gateway port")
    parser.add_argument("--nats-sync", default="always", help="serve's --nats-sync")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    return asyncio.run(serve(args))


if __name__ == "__main__":
    raise SystemExit(main())
