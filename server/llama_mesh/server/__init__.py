"""llama-mesh server: API server, control plane, orchestrator, workflow workers, gateway.

The public Python API is :class:`WorkflowService`: serve a workflow object as one service of
a deployment of a running mesh, from any process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llama_mesh.server.service.serving import WorkflowService

__all__ = ["WorkflowService"]


def __getattr__(name: str) -> Any:
    # Imported on first use: every server module imports this package first.
    if name == "WorkflowService":
        from llama_mesh.server.service.serving import WorkflowService

        return WorkflowService
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
