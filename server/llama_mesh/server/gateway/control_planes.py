"""Llama Deploy 0.8 control planes: one gateway listener per deployment, on its port.

A 0.8 deployment's clients talk to its control plane on ``control-plane.port`` (8000 by
default). The gateway serves there the ``google.api.http`` bindings of the ``ControlPlane``
gRPC service, with the same filters as its main listener, and names the deployment to the
API server in the :data:`DEPLOYMENT_HEADER` request header (set by the listener's route, so
a client cannot choose another deployment): one set of bindings serves every port.

Deployments come and go while Envoy runs, so these listeners are not in its bootstrap but in
a file it watches (filesystem LDS: ``dynamic_resources.lds_config.path_config_source``).
:class:`ControlPlanePorts` decides which deployment gets which port and rewrites that file
atomically (write, then rename: what Envoy's watch reacts to); the main listener, static,
is never touched. A port is given to the first deployment that asks; a second one, or a
port another process holds, is refused with a message naming the port, and the deployment
keeps working through the API server's routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from llama_mesh.server.gateway import config as gw

__all__ = [
    "CONTROL_PLANE_SERVICE",
    "DEFAULT_CONTROL_PLANE_PORT",
    "DEPLOYMENT_HEADER",
    "LDS_FILE",
    "ControlPlanePorts",
    "lds_config_source",
    "render_control_plane_listener",
    "render_lds",
]

logger = logging.getLogger(__name__)

CONTROL_PLANE_SERVICE = "llama_mesh.v1.ControlPlane"
DEPLOYMENT_HEADER = "x-llama-mesh-deployment"
"""The request header naming the deployment whose control plane port a request came in on."""
DEFAULT_CONTROL_PLANE_PORT = 8000
"""Llama Deploy 0.8's default ``control-plane.port``."""
LDS_FILE = "listeners.json"
_LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
_READY_TIMEOUT = 20.0
_PROBE_TIMEOUT = 2.0


def lds_config_source(path: Path) -> dict[str, Any]:
    """The bootstrap's ``lds_config``: the listeners in ``path``, reloaded when it is replaced."""
    return {
        "resource_api_version": "V3",
        "path_config_source": {
            "path": str(path),
            "watched_directory": {"path": str(path.parent)},
        },
    }


def render_control_plane_listener(
    cfg: gw.GatewayConfig, deployment: str, port: int
) -> dict[str, Any]:
    """The listener serving ``deployment``'s 0.8 control plane on ``cfg.listen_host:port``."""
    listener = gw._listener(dataclasses.replace(cfg, listen_port=port))
    name = f"control-plane-{deployment}"
    listener["name"] = name
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["stat_prefix"] = name
    hcm["route_config"] = _route_config(cfg, deployment)
    for http_filter in hcm["http_filters"]:
        if http_filter["name"] == "envoy.filters.http.grpc_json_transcoder":
            http_filter["typed_config"]["services"] = [CONTROL_PLANE_SERVICE]
    return listener


def _route_config(cfg: gw.GatewayConfig, deployment: str) -> dict[str, Any]:
    name = f"control-plane-{deployment}"
    routes: list[dict[str, Any]] = [
        {
            # JSON requests once transcoded, and gRPC to the ControlPlane service itself:
            # both are told which deployment this port serves.
            "name": "control-plane",
            "match": {
                "prefix": f"/{CONTROL_PLANE_SERVICE}/",
                "headers": [
                    {"name": "content-type", "string_match": {"prefix": "application/grpc"}}
                ],
            },
            "route": gw._upstream_route(),
            "request_headers_to_add": [
                {
                    "header": {"key": DEPLOYMENT_HEADER, "value": deployment},
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                }
            ],
            "typed_per_filter_config": {
                "envoy.filters.http.buffer": {
                    "@type": (
                        "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.BufferPerRoute"
                    ),
                    "disabled": True,
                }
            },
        },
        {
            "name": "not-found",
            "match": {"prefix": "/"},
            "route": {
                "cluster": gw.NOT_FOUND_CLUSTER,
                "cluster_not_found_response_code": "NOT_FOUND",
            },
        },
    ]
    virtual_host: dict[str, Any] = {"name": name, "domains": ["*"], "routes": routes}
    if cfg.cors_origins:
        virtual_host["typed_per_filter_config"] = {
            "envoy.filters.http.cors": gw._cors_policy(cfg.cors_origins)
        }
    return {"name": name, "virtual_hosts": [virtual_host], "validate_clusters": False}


def render_lds(cfg: gw.GatewayConfig, ports: dict[str, int]) -> dict[str, Any]:
    """The LDS file's content: one listener per ``deployment: port``, sorted by name."""
    return {
        "version_info": json.dumps(sorted(ports.items())),
        "resources": [
            {"@type": _LISTENER_TYPE, **render_control_plane_listener(cfg, name, port)}
            for name, port in sorted(ports.items())
        ],
    }


def _port_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on now (another process holds it), or ``None``."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        return f"control plane port {port}: cannot resolve {host!r}: {exc}"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        # As Envoy binds its listeners: a port left in TIME_WAIT is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            return (
                f"control plane port {port} is in use by another process ({exc.strerror}): "
                "this deployment's 0.8 control plane API is not served; "
                "it works through the API server"
            )
    return None


class ControlPlanePorts:
    """Which deployment's 0.8 control plane the gateway serves on which port.

    ``cfg`` is the gateway's configuration (host, TLS, CORS, limits: the control plane
    listeners share them); its ``control_plane_lds`` is the file written here. Until
    :meth:`attach` is called (the gateway is not running yet), claims only update the file,
    which Envoy reads when it starts.
    """

    def __init__(self, cfg: gw.GatewayConfig) -> None:
        if cfg.control_plane_lds is None:
            raise ValueError("control_plane_lds: the gateway config names no listener file")
        self._cfg = cfg
        self._path = cfg.control_plane_lds
        self._served: dict[str, int] = {}
        self._lock = asyncio.Lock()
        self._attached = False
        self._write()

    @property
    def served(self) -> dict[str, int]:
        """``deployment: port`` of every control plane served."""
        return dict(self._served)

    async def claim(self, deployment: str, port: object) -> str | None:
        """Serve ``deployment``'s control plane on ``port``; ``None``, or why it is not."""
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            return f"control-plane.port {port!r} is not a port number (1-65535)"
        async with self._lock:
            if self._served.get(deployment) == port:
                return None
            holder = next((d for d, p in self._served.items() if p == port), None)
            if holder is not None:
                return (
                    f"control plane port {port} is already served for deployment "
                    f"'{holder}': this deployment's 0.8 control plane API is not served; "
                    "it works through the API server"
                )
            problem = _port_problem(self._cfg.listen_host, port)
            if problem is not None:
                return problem
            previous = self._served.get(deployment)
            self._served[deployment] = port
            self._write()
            if self._attached:
                problem = await self._wait_listening(port)
                if problem is not None:
                    if previous is None:
                        del self._served[deployment]
                    else:
                        self._served[deployment] = previous
                    self._write()
                    return problem
            logger.info("deployment %s: 0.8 control plane on port %d", deployment, port)
            return None

    async def release(self, deployment: str) -> None:
        """Stop serving ``deployment``'s control plane (nothing when it has none); returns
        once the port accepts no new connection (connections open on it are drained)."""
        async with self._lock:
            port = self._served.pop(deployment, None)
            if port is None:
                return
            self._write()
            if self._attached and not await self._wait(port, listening=False):
                logger.warning("control plane port %d still accepts connections", port)

    async def attach(self) -> None:
        """The gateway runs now: wait until it listens on every port claimed so far."""
        async with self._lock:
            self._attached = True
            for deployment, port in list(self._served.items()):
                problem = await self._wait_listening(port)
                if problem is not None:
                    logger.warning("deployment %s: %s", deployment, problem)
                    del self._served[deployment]
                    self._write()

    def _write(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._path.with_name(f".{self._path.name}.tmp")
        tmp.write_text(json.dumps(render_lds(self._cfg, self._served), indent=1))
        os.replace(tmp, self._path)  # a rename: what Envoy's watch reacts to

    async def _wait_listening(self, port: int) -> str | None:
        """Wait until the gateway accepts connections on ``port``; ``None`` or the problem."""
        if await self._wait(port, listening=True):
            return None
        return (
            f"the gateway did not listen on control plane port {port} within "
            f"{_READY_TIMEOUT:g} s: this deployment's 0.8 control plane API is not served; "
            "it works through the API server"
        )

    async def _wait(self, port: int, *, listening: bool) -> bool:
        """Wait until ``port`` accepts connections (or, not ``listening``, refuses them);
        whether it did within the time allowed.

        Envoy tells nothing when it has applied a listener file, so this tries to connect,
        with backoff.
        """
        host = gw._connect_host(self._cfg.listen_host)
        deadline = time.monotonic() + _READY_TIMEOUT
        delay = 0.01
        while True:
            try:
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection(host, port), _PROBE_TIMEOUT
                )
            except (OSError, TimeoutError):
                accepted = False
            else:
                accepted = True
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
            if accepted == listening:
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)
