"""The ``Probes`` gRPC service: liveness (``GET /healthz``) and readiness (``GET /readyz``).

Both are open (no API key), like the gRPC health service, so that load balancers and
Kubernetes probes need no secret. Readiness means: every saved deployment has been restored
(or marked failed) and the message queue answers a read of the control plane's store.
"""

from __future__ import annotations

import asyncio

import grpc

from llama_mesh.server.apiserver.mesh import Mesh
from llama_mesh.server.errors import UnavailableError
from llama_mesh.v1 import probes_pb2, probes_pb2_grpc

QUEUE_CHECK_TIMEOUT = 2.0
"""Seconds the message queue has to answer a readiness check."""


class ProbesServicer(probes_pb2_grpc.ProbesServicer):
    """Answers liveness at once and readiness from the deployments and the queue."""

    def __init__(self, mesh: Mesh) -> None:
        self._mesh = mesh

    async def Healthz(
        self, request: probes_pb2.HealthzRequest, context: grpc.aio.ServicerContext
    ) -> probes_pb2.HealthzResponse:
        return probes_pb2.HealthzResponse(status="ok")

    async def Readyz(
        self, request: probes_pb2.ReadyzRequest, context: grpc.aio.ServicerContext
    ) -> probes_pb2.ReadyzResponse:
        deployments = self._mesh.deployments
        if not deployments.restored.is_set():
            raise UnavailableError(
                "not ready: saved deployments are still being restored", reason="NOT_READY"
            )
        try:
            async with asyncio.timeout(QUEUE_CHECK_TIMEOUT):
                await self._mesh.cp.list_deployments()
        except Exception as exc:
            raise UnavailableError(
                f"not ready: the message queue does not answer ({type(exc).__name__})",
                reason="NOT_READY",
            ) from exc
        return probes_pb2.ReadyzResponse(status="ok", deployments=len(deployments.names()))
