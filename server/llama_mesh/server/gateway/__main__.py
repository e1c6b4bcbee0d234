"""``python -m llama_mesh.server.gateway``: print an Envoy config for a separately run Envoy.

``llamactl serve`` starts its own Envoy; this is for the multi-host shape
(docker-compose.yml), where Envoy runs in its own container in front of the API server.

TLS: ``--tls-cert`` and ``--tls-key`` (both or neither) make the listener serve HTTPS;
``--upstream-tls-ca`` makes Envoy speak TLS to the API server, checking that the server's
certificate names the ``--upstream`` host (a DNS name, sent as SNI, or an IP address), and
``--upstream-tls-cert`` with ``--upstream-tls-key`` add a client certificate for an API
server that requires mTLS (``--internal-ca``). The TLS options also come from the
environment as ``LLAMA_MESH_<NAME>`` (``LLAMA_MESH_TLS_CERT``, ...; flags win). File
paths are written into the config as given, made absolute: name them as Envoy will see them.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from llama_mesh.server.envvars import env_setting, split_list
from llama_mesh.server.gateway.config import (
    DEFAULT_DESCRIPTOR_PATH,
    GatewayConfig,
    render_envoy_yaml,
)

# GatewayConfig's field names -> the options that set them, to name options in its errors.
_OPTION_BY_FIELD = {
    "upstream_host": "--upstream",
    "upstream_port": "--upstream",
    "more_upstreams": "--upstream",
    "listen_host": "--host",
    "listen_port": "--port",
    "admin_socket": "--admin-socket",
    "cors_origins": "--cors-origin",
    "allowed_hosts": "--allowed-host",
    "tls_cert": "--tls-cert",
    "tls_key": "--tls-key",
    "upstream_tls_ca": "--upstream-tls-ca",
    "upstream_tls_cert": "--upstream-tls-cert",
    "upstream_tls_key": "--upstream-tls-key",
}
_FIELD_PATTERN = re.compile(
    r"\b(" + "|".join(sorted(_OPTION_BY_FIELD, key=len, reverse=True)) + r")\b"
)


def build_parser() -> argparse.ArgumentParser:
    """The options of ``python -m llama_mesh.server.gateway``."""
    parser = argparse.ArgumentParser(
        prog="python -m llama_mesh.server.gateway",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--upstream",
        action="append",
        required=True,
        help="API server gRPC address HOST:PORT ([V6ADDR]:PORT); repeat for several API "
        "servers on one NATS (serve --roles api): Envoy balances over them, checks their gRPC "
        "health, ejects one it cannot reach, and retries read calls on another",
    )
    parser.add_argument("--host", default="127.0.0.1", help="listen address")
    parser.add_argument("--port", type=int, default=4501, help="listen port")
    parser.add_argument(
        "--admin-socket",
        type=Path,
        help="Unix socket of Envoy's admin interface (mode 0600; default: no admin)",
    )
    parser.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        help="allowed CORS origin (repeat; '*' for any); requests with another Origin are refused",
    )
    parser.add_argument(
        "--allowed-host",
        action="append",
        default=[env_setting("ALLOWED_HOSTS") or ""],
        help="a host name the gateway answers to besides loopback and --host (repeat; '*' for "
        "any; env LLAMA_MESH_ALLOWED_HOSTS, comma-separated); needed with --host 0.0.0.0",
    )
    parser.add_argument(
        "--descriptor",
        type=Path,
        default=DEFAULT_DESCRIPTOR_PATH,
        help="descriptor set path as Envoy will see it",
    )
    tls = parser.add_argument_group("TLS (paths as Envoy will see them)")
    tls.add_argument(
        "--tls-cert",
        type=Path,
        default=env_setting("TLS_CERT"),
        help="PEM certificate chain: the listener serves HTTPS (with --tls-key; "
        "env LLAMA_MESH_TLS_CERT)",
    )
    tls.add_argument(
        "--tls-key",
        type=Path,
        default=env_setting("TLS_KEY"),
        help="PEM private key of --tls-cert (env LLAMA_MESH_TLS_KEY)",
    )
    tls.add_argument(
        "--upstream-tls-ca",
        type=Path,
        default=env_setting("UPSTREAM_TLS_CA"),
        help="PEM CA: speak TLS to the API server, whose certificate it must have signed and "
        "which must name the --upstream host (env LLAMA_MESH_UPSTREAM_TLS_CA)",
    )
    tls.add_argument(
        "--upstream-tls-cert",
        type=Path,
        default=env_setting("UPSTREAM_TLS_CERT"),
        help="PEM client certificate for an API server that requires mTLS (with "
        "--upstream-tls-key and --upstream-tls-ca; env LLAMA_MESH_UPSTREAM_TLS_CERT)",
    )
    tls.add_argument(
        "--upstream-tls-key",
        type=Path,
        default=env_setting("UPSTREAM_TLS_KEY"),
        help="PEM private key of --upstream-tls-cert (env LLAMA_MESH_UPSTREAM_TLS_KEY)",
    )
    return parser


def _absolute(path: Path | None) -> Path | None:
    # Absolute but not resolved: the file is where Envoy will see it (maybe another
    # container), so symbolic links here say nothing about it.
    return Path(os.path.abspath(path)) if path is not None else None


def parse_config(argv: list[str] | None = None) -> GatewayConfig:
    """The ``GatewayConfig`` of a command line; exits with a usage error if it is not one."""
    parser = build_parser()
    args = parser.parse_args(argv)
    upstreams = []
    for upstream in args.upstream:
        host, _, port = upstream.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not host or not port.isdigit():
            parser.error(f"--upstream must be HOST:PORT, not {upstream!r}")
        upstreams.append((host, int(port)))
    (host, port), *more = upstreams
    try:
        return GatewayConfig(
            upstream_host=host,
            upstream_port=port,
            more_upstreams=tuple(more),
            balanced=True,
            listen_host=args.host,
            listen_port=args.port,
            admin_socket=_absolute(args.admin_socket),
            cors_origins=tuple(args.cors_origin),
            allowed_hosts=split_list(args.allowed_host),
            descriptor_path=args.descriptor,
            tls_cert=_absolute(args.tls_cert),
            tls_key=_absolute(args.tls_key),
            upstream_tls_ca=_absolute(args.upstream_tls_ca),
            upstream_tls_cert=_absolute(args.upstream_tls_cert),
            upstream_tls_key=_absolute(args.upstream_tls_key),
        )
    except ValueError as exc:
        parser.error(_FIELD_PATTERN.sub(lambda m: _OPTION_BY_FIELD[m.group(1)], str(exc)))


def main(argv: list[str] | None = None) -> int:
    """Print the rendered Envoy YAML on stdout."""
    sys.stdout.write(render_envoy_yaml(parse_config(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
