"""``python -m llama_mesh.server.gateway``: print an Envoy config for a separately run Envoy.

``llamactl serve`` starts its own Envoy; this is for the multi-host shape
(docker-compose.yml), where Envoy runs in its own container in front of the API server.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llama_mesh.server.gateway.config import (
    DEFAULT_DESCRIPTOR_PATH,
    GatewayConfig,
    render_envoy_yaml,
)


def main(argv: list[str] | None = None) -> int:
    """Print the rendered Envoy YAML on stdout."""
    parser = argparse.ArgumentParser(
        prog="python -m llama_mesh.server.gateway", description=__doc__
    )
    parser.add_argument("--upstream", required=True, help="API server gRPC address HOST:PORT")
    parser.add_argument("--host", default="127.0.0.1", help="listen address")
    parser.add_argument("--port", type=int, default=4501, help="listen port")
    parser.add_argument("--admin-port", type=int, help="Envoy admin port (127.0.0.1)")
    parser.add_argument("--cors-origin", action="append", default=[])
    parser.add_argument(
        "--descriptor",
        type=Path,
        default=DEFAULT_DESCRIPTOR_PATH,
        help="descriptor set path as Envoy will see it",
    )
    args = parser.parse_args(argv)
    host, _, port = args.upstream.rpartition(":")
    if not host or not port.isdigit():
        parser.error("--upstream must be HOST:PORT")
    try:
        cfg = GatewayConfig(
            upstream_host=host,
            upstream_port=int(port),
            listen_host=args.host,
            listen_port=args.port,
            admin_port=args.admin_port,
            cors_origins=tuple(args.cors_origin),
            descriptor_path=args.descriptor,
        )
    except ValueError as exc:
        parser.error(str(exc))
    sys.stdout.write(render_envoy_yaml(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
