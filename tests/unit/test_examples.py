"""The example deployments that `./dev serve` serves together can all be served in full."""

from __future__ import annotations

from pathlib import Path

from llama_mesh.server.deployment_config import parse_deployment_config
from llama_mesh.server.gateway.control_planes import DEFAULT_CONTROL_PLANE_PORT

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*/deployment.yml"))


def test_examples_claim_distinct_control_plane_ports() -> None:
    """Every example's 0.8 control plane gets its port: none falls back to the 8000 another
    one names (the later one's control plane API would not be served, and the
    llama_deploy_08 client would reach the wrong deployment on 8000)."""
    assert len(EXAMPLES) >= 5
    ports: dict[object, str] = {}
    for path in EXAMPLES:
        config = parse_deployment_config(path.read_text(), source_name=str(path))
        port = config.control_plane.get("port", DEFAULT_CONTROL_PLANE_PORT)
        assert port not in ports, f"{config.name} and {ports[port]} both use port {port}"
        ports[port] = config.name
    assert ports[DEFAULT_CONTROL_PLANE_PORT] == "llama_deploy_08"
