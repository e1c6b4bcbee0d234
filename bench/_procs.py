"""Processes and the machine, read from ``/proc`` (no psutil): memory, CPU time, children."""

from __future__ import annotations

import asyncio
import os
import platform
from dataclasses import dataclass
from pathlib import Path

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (``VmRSS`` of ``/proc/<pid>/status``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"no VmRSS for pid {pid}")


async def settled_rss(
    pids: dict[str, int], *, settle: float = 0.5, readings: int = 5, interval: float = 0.1
) -> dict[str, int]:
    """RSS by name: the median of ``readings`` taken ``interval`` apart, after ``settle`` s.

    A single reading of a Go (nats-server) or Python heap can be off by megabytes while a
    collection or a trim is under way; the median of a few is stable to well under one.
    """
    await asyncio.sleep(settle)
    samples: dict[str, list[int]] = {name: [] for name in pids}
    for _ in range(readings):
        for name, pid in pids.items():
            samples[name].append(rss_bytes(pid))
        await asyncio.sleep(interval)
    return {name: sorted(values)[readings // 2] for name, values in samples.items()}


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def self_cpu_seconds() -> float:
    """CPU time of this process (all threads)."""
    times = os.times()
    return times.user + times.system


@dataclass(frozen=True, slots=True)
class Child:
    """A direct child process: its pid, executable name and command line."""

    pid: int
    name: str
    argv: tuple[str, ...]


def children(parent: int) -> list[Child]:
    """Direct children of ``parent``, found by scanning ``/proc/*/stat``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # exited meanwhile
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        if ppid != parent:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        found.append(Child(int(entry.name), name, tuple(a.decode() for a in argv if a)))
    return sorted(found, key=lambda c: c.pid)


def dir_bytes(path: Path) -> int:
    """Total size of the files under ``path``."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo``."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def mem_total_gib() -> float:
    """Installed memory in GiB (``MemTotal``)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 1024 / 1024
    return 0.0


def load_average() -> str:
    """The 1, 5 and 15 minute load averages."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])
