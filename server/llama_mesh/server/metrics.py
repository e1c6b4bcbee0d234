"""Prometheus metrics: tasks by status, latencies, queue depth, redeliveries, RPCs.

Task metrics follow the control plane's task records (the API server's task watch), so
they count what every replica did, wherever it runs. Served on ``--metrics-port`` (127.0.0.1).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from llama_mesh.server.control_plane.store import ControlPlane, TaskChange
from llama_mesh.server.control_plane.watcher import TaskWatcher
from llama_mesh.server.domain import Task, TaskStatus

logger = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """The mesh's metrics in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._http: WSGIServer | None = None
        labels = ("deployment", "service")
        self.tasks = Counter(
            "llama_mesh_tasks",
            "Tasks that reached a status",
            (*labels, "status"),
            registry=self.registry,
        )
        self.active = Gauge(
            "llama_mesh_tasks_active",
            "Tasks queued or running now",
            (*labels, "status"),
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "llama_mesh_queue_depth",
            "Tasks waiting in a service's queue",
            labels,
            registry=self.registry,
        )
        self.duration = Histogram(
            "llama_mesh_task_duration_seconds",
            "From start on a replica to a final status",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.wait = Histogram(
            "llama_mesh_task_queue_seconds",
            "From creation to start on a replica",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.redeliveries = Counter(
            "llama_mesh_task_redeliveries",
            "Deliveries beyond the first, per finished task",
            labels,
            registry=self.registry,
        )
        self.rpcs = Counter(
            "llama_mesh_rpc_requests",
            "gRPC requests by method and status code",
            ("method", "code"),
            registry=self.registry,
        )
        self.rpc_seconds = Histogram(
            "llama_mesh_rpc_duration_seconds",
            "gRPC request durations (to the first reply)",
            ("method",),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._seen: dict[str, TaskStatus] = {}

    def observe_task(self, task: Task) -> None:
        """Account for a task record after a change (idempotent per status)."""
        previous = self._seen.get(task.task_id)
        if previous is task.status:
            return
        labels = (task.deployment, task.service_id)
        if previous in (TaskStatus.QUEUED, TaskStatus.RUNNING):
            self.active.labels(*labels, previous.name.lower()).dec()
            if previous is TaskStatus.QUEUED:
                self.queue_depth.labels(*labels).dec()
        self.tasks.labels(*labels, task.status.name.lower()).inc()
        if task.status.is_final:
            self._seen.pop(task.task_id, None)
            if previous is not TaskStatus.RUNNING and task.started_at:
                # A short task goes from QUEUED to final without showing RUNNING: its wait
                # is counted now.
                self.wait.labels(*labels).observe(max(0.0, task.started_at - task.created_at))
            if task.started_at and task.finished_at:
                self.duration.labels(*labels).observe(task.finished_at - task.started_at)
            if task.attempts > 1:
                self.redeliveries.labels(*labels).inc(task.attempts - 1)
            return
        self._seen[task.task_id] = task.status
        self.active.labels(*labels, task.status.name.lower()).inc()
        if task.status is TaskStatus.QUEUED:
            self.queue_depth.labels(*labels).inc()
        elif task.status is TaskStatus.RUNNING and task.started_at:
            self.wait.labels(*labels).observe(max(0.0, task.started_at - task.created_at))

    async def follow(self, control_plane: ControlPlane, watcher: TaskWatcher) -> None:
        """Update task metrics from every task change the watcher sees from now on.

        Tasks still queued or running when this starts (after a restart) are counted as
        active, not as new.
        """
        watcher.add_listener(self._on_change)
        watcher.start()
        for record in await control_plane.list_deployments():
            for task in await control_plane.list_tasks(record.name):
                if not task.status.is_final and task.task_id not in self._seen:
                    self.observe_task(task)

    def _on_change(self, change: TaskChange) -> None:
        if change.task is not None:
            self.observe_task(change.task)

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Expose ``/metrics`` over HTTP (a daemon thread) until :meth:`stop_serving`;
        returns the port (``port`` 0: one the system picked)."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http.server_port)

    def stop_serving(self) -> None:
        """Close the ``/metrics`` port (idempotent; blocks up to half a second)."""
        http, self._http = self._http, None
        if http is not None:
            http.shutdown()
            http.server_close()


class MetricsInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Counts requests by method and status code and times them."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or not handler.unary_unary:
            return handler
        method = handler_call_details.method
        behavior = handler.unary_unary
        metrics = self._metrics

        async def timed(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            code = "OK"
            try:
                return await behavior(request, context)
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except Exception:
                code = context.code().name if context.code() else "UNKNOWN"
                raise
            finally:
                metrics.rpcs.labels(method, code).inc()
                metrics.rpc_seconds.labels(method).observe(time.perf_counter() - started)

        return grpc.unary_unary_rpc_method_handler(
            timed,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
