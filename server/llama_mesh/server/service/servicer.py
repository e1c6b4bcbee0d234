"""The ``WorkflowService`` gRPC service a replica serves (information and health).

Tasks reach replicas through the message queue; this server only describes the replica
and answers health checks. It listens on 127.0.0.1 on a free port, recorded in the
registry as the instance's ``address``.
"""

from __future__ import annotations

from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from llama_mesh.server import convert
from llama_mesh.server.grpc_errors import ErrorInterceptor
from llama_mesh.server.service.worker import Worker
from llama_mesh.v1 import service_pb2, service_pb2_grpc

SERVICE_NAME = service_pb2.DESCRIPTOR.services_by_name["WorkflowService"].full_name


class WorkflowServiceServicer(service_pb2_grpc.WorkflowServiceServicer):
    """Describes one replica and the workflow it runs."""

    def __init__(self, worker: Worker, workflow: Any) -> None:
        self._worker = worker
        self._workflow = workflow

    async def GetServiceInfo(
        self, request: service_pb2.GetServiceInfoRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.GetServiceInfoResponse:
        worker, cls = self._worker, type(self._workflow)
        reply = service_pb2.GetServiceInfoResponse(
            deployment=worker.settings.deployment,
            service_id=worker.settings.service_id,
            instance_id=worker.instance.instance_id,
            workflow_class=f"{cls.__module__}.{cls.__qualname__}",
            steps=sorted(self._workflow._get_steps()),
            in_flight=worker.in_flight,
            max_concurrent_tasks=worker.settings.max_concurrent_tasks,
            generation=worker.settings.generation,
        )
        reply.started_at.CopyFrom(convert.to_timestamp(worker.instance.started_at))
        return reply


async def start_info_server(
    worker: Worker, workflow: Any
) -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
    """Start the replica's gRPC server on 127.0.0.1; returns it, its health and its port."""
    server = grpc.aio.server(interceptors=[ErrorInterceptor()])
    service_pb2_grpc.add_WorkflowServiceServicer_to_server(
        WorkflowServiceServicer(worker, workflow), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, health_servicer, port
