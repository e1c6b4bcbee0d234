"""What one run measures (iteration counts, durations) and the figures it collects."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench._inprocess import Pairing


@dataclass(frozen=True, slots=True)
class Plan:
    """Iteration counts and durations of one run."""

    name: str
    latency_iterations: int
    inprocess_iterations: int
    warmup: int
    throughput_seconds: float
    clients: int
    stream_events: int
    stream_interval: float
    stream_skip: int
    memory_count: int
    ld08_latency_iterations: int
    ld08_throughput_seconds: float
    ld08_memory_count: int
    ld08_clients: int
    ld08_stream_events: int
    deadline: float = 1.0
    throughput_deadline: float = 5.0
    memory_concurrency: int = 16
    phase_timeout: float = 240.0


FULL = Plan("full", 300, 2000, 20, 10.0, 32, 230, 0.004, 10, 1000, 20, 10.0, 200, 8, 60)
QUICK = Plan("quick", 100, 500, 10, 3.0, 32, 215, 0.004, 10, 200, 5, 3.0, 50, 8, 25)


SYNC_ROW = "1s"
"""The ``--nats-sync`` of the comparison rows (fsync once a second instead of per write)."""


@dataclass(slots=True)
class Results:
    """Every figure of one run, by system."""

    inprocess: dict[str, Any] = field(default_factory=dict)
    mesh: dict[str, Any] = field(default_factory=dict)
    mesh_sync: dict[str, Any] = field(default_factory=dict)
    """llama-mesh again with ``--nats-sync`` :data:`SYNC_ROW`: the trade-off's other side."""
    brokers: dict[str, dict[str, Any]] = field(default_factory=dict)
    """llama-mesh with the deployments on an external broker, by kind (``rabbitmq``...)."""
    ld08: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    pairing: Pairing | None = None
    """The in-process run measured next to each llama-mesh figure (``None`` without the
    in-process part): into each system's ``figures["baseline"][key]``."""
