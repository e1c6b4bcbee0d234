"""Deployments' own web UIs behind the gateway: ``/ui/{deployment}/`` (Llama Deploy 0.8's
path) and ``/deployments/{deployment}/ui/`` (0.9's), WebSockets included.

A UI is a process of its own on a loopback port (see
:mod:`llama_mesh.server.apiserver.uis`). UIs come and go while Envoy runs, so their
upstreams are not in its bootstrap: each is a cluster ``ui-{deployment}`` in a file Envoy
watches (filesystem CDS: ``dynamic_resources.cds_config.path_config_source``), which
:class:`UiClusters` rewrites atomically. The main listener's routes stay static: two routes
(:func:`ui_routes`) send both paths to the cluster named in the :data:`UI_CLUSTER_HEADER`
request header, which the request guard (``request_guard.lua``, after its Host and Origin
checks, and its API key check when the server has keys) always sets from the path,
whatever the client sent. A deployment without a UI
names a cluster that does not exist: a JSON 404. The 0.9 path is rewritten to the 0.8 one,
the base path the UI is told to serve under.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = [
    "CDS_FILE",
    "UI_CLUSTER_HEADER",
    "UiClusters",
    "base_path",
    "cluster_name",
    "render_cds",
    "ui_routes",
]

CDS_FILE = "clusters.json"
UI_CLUSTER_HEADER = "x-llama-mesh-ui-cluster"
"""The request header naming the UI cluster of a request (set by the request guard)."""
_CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
_V09_PATH_REGEX = r"^/deployments/([^/]+)/ui(/.*)?$"


def base_path(deployment: str) -> str:
    """The path a deployment's UI is served under (what it is told in its environment)."""
    return f"/ui/{deployment}"


def cluster_name(deployment: str) -> str:
    """The Envoy cluster of ``deployment``'s UI (the request guard derives the same)."""
    return f"ui-{deployment}"


def _route_action(*, rewrite: bool) -> dict[str, Any]:
    action: dict[str, Any] = {
        "cluster_header": UI_CLUSTER_HEADER,
        "cluster_not_found_response_code": "NOT_FOUND",
        "timeout": "0s",
        "idle_timeout": "0s",
        "upgrade_configs": [{"upgrade_type": "websocket", "enabled": True}],
    }
    if rewrite:
        action["regex_rewrite"] = {
            "pattern": {"regex": r"^/deployments/([^/]+)/ui"},
            "substitution": r"/ui/\1",
        }
    return action


def _buffer_off() -> dict[str, Any]:
    # Uploads and WebSockets stream through; the JSON body cap is for the API.
    return {
        "envoy.filters.http.buffer": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.BufferPerRoute",
            "disabled": True,
        }
    }


def ui_routes() -> list[dict[str, Any]]:
    """The main listener's routes to deployments' UIs (both paths)."""
    return [
        {
            "name": "ui",
            "match": {"safe_regex": {"regex": r"^/ui/[^/]+(/.*)?$"}},
            "route": _route_action(rewrite=False),
            "request_headers_to_remove": [UI_CLUSTER_HEADER],
            "typed_per_filter_config": _buffer_off(),
        },
        {
            "name": "ui-0.9",
            "match": {"safe_regex": {"regex": _V09_PATH_REGEX}},
            "route": _route_action(rewrite=True),
            "request_headers_to_remove": [UI_CLUSTER_HEADER],
            "typed_per_filter_config": _buffer_off(),
        },
    ]


def _cluster(deployment: str, port: int) -> dict[str, Any]:
    return {
        "@type": _CLUSTER_TYPE,
        "name": cluster_name(deployment),
        "type": "STATIC",
        "connect_timeout": "5s",
        "load_assignment": {
            "cluster_name": cluster_name(deployment),
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {"address": "127.0.0.1", "port_value": port}
                                }
                            }
                        }
                    ]
                }
            ],
        },
    }


def render_cds(ports: dict[str, int]) -> dict[str, Any]:
    """The CDS file's content: one cluster per ``deployment: port``, sorted by name."""
    return {
        "version_info": json.dumps(sorted(ports.items())),
        "resources": [_cluster(name, port) for name, port in sorted(ports.items())],
    }


class UiClusters:
    """Which deployment's UI listens on which loopback port, as the gateway's CDS file."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._ports: dict[str, int] = {}
        self._write()

    def add(self, deployment: str, port: int) -> None:
        """Proxy ``deployment``'s UI paths to ``127.0.0.1:port``."""
        if self._ports.get(deployment) != port:
            self._ports[deployment] = port
            self._write()

    def remove(self, deployment: str) -> None:
        """Stop proxying ``deployment``'s UI (nothing when it has none)."""
        if self._ports.pop(deployment, None) is not None:
            self._write()

    def _write(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._path.with_name(f".{self._path.name}.tmp")
        tmp.write_text(json.dumps(render_cds(self._ports), indent=1))
        os.replace(tmp, self._path)  # a rename: what Envoy's watch reacts to
