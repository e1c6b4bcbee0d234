"""Latency samples and their percentiles."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(slots=True)
class Latencies:
    """Seconds per operation; ``timeouts`` counts operations cut off at the deadline.

    A timed-out operation is recorded at its deadline, so it raises p99 rather than
    vanishing from the sample.
    """

    values: list[float] = field(default_factory=list)
    timeouts: int = 0
    errors: int = 0
    segments: dict[str, list[float]] = field(default_factory=dict)
    """Named parts of each operation, in seconds (see ``segment_medians_ms``)."""

    def add(self, seconds: float) -> None:
        """Record one operation."""
        self.values.append(seconds)

    def percentile(self, q: float) -> float:
        """The nearest-rank ``q``-th percentile (0 < q <= 100) in seconds."""
        if not self.values:
            return math.nan
        ordered = sorted(self.values)
        rank = max(1, math.ceil(q / 100 * len(ordered)))
        return ordered[rank - 1]

    @property
    def p50_ms(self) -> float:
        """The median in milliseconds."""
        return self.percentile(50) * 1e3

    @property
    def p99_ms(self) -> float:
        """The 99th percentile in milliseconds."""
        return self.percentile(99) * 1e3

    def add_segments(self, parts: dict[str, float]) -> None:
        """Record how one operation's time divides into named parts."""
        for name, seconds in parts.items():
            self.segments.setdefault(name, []).append(seconds)

    def segment_medians_ms(self) -> dict[str, float]:
        """The median of each named part, in milliseconds."""
        return {k: sorted(v)[len(v) // 2] * 1e3 for k, v in self.segments.items() if v}

    def __len__(self) -> int:
        return len(self.values)


@dataclass(frozen=True, slots=True)
class Throughput:
    """Tasks completed by concurrent clients in a time window."""

    tasks: int
    seconds: float
    clients: int
    failures: dict[str, int] = field(default_factory=dict)
    cpu_ms_per_task: dict[str, float] = field(default_factory=dict)
    writes: dict[str, int] = field(default_factory=dict)
    """Fsynced JetStream writes by stream during the window (see ``bench._disk``)."""
    fsyncs: int | None = None
    """The nats-server's fsync and fdatasync calls during the window and the drain after
    it (``None``: not counted, no working ``perf``)."""

    @property
    def writes_per_task(self) -> float:
        """Fsynced JetStream writes per completed task."""
        return sum(self.writes.values()) / self.tasks if self.tasks else math.nan

    @property
    def fsyncs_per_task(self) -> float | None:
        """The nats-server's fsync calls per completed task (``None``: not counted)."""
        if self.fsyncs is None:
            return None
        return self.fsyncs / self.tasks if self.tasks else math.nan

    @property
    def per_second(self) -> float:
        """Completed tasks per second."""
        return self.tasks / self.seconds if self.seconds > 0 else math.nan

    @property
    def per_cpu_second(self) -> float:
        """Tasks per CPU-second of all the processes measured: what one core could do."""
        total = sum(self.cpu_ms_per_task.values())
        return 1e3 / total if total > 0 else math.nan

    @property
    def failure_text(self) -> str:
        """``0`` or the failures by kind."""
        if not self.failures:
            return "0"
        return ", ".join(f"{n} {kind}" for kind, n in sorted(self.failures.items()))


@dataclass(frozen=True, slots=True)
class Memory:
    """Resident memory added per 1,000 items, by process, measured with ``count`` items."""

    count: int
    mib_per_1000: dict[str, float]
    extra: dict[str, float] = field(default_factory=dict)
    failures: int = 0

    @property
    def total(self) -> float:
        """The sum over the processes, MiB per 1,000 items."""
        return sum(self.mib_per_1000.values())


def per_1000_mib(delta_bytes: int, count: int) -> float:
    """A byte delta measured over ``count`` items, as MiB per 1,000 items."""
    return delta_bytes / 1024 / 1024 * 1000 / count
