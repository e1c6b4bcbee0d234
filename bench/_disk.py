"""What the disk allows the task path: JetStream's fsync ceiling on this machine, and the
fsynced writes one task makes.

With ``sync_interval: always`` nats-server fsyncs every message it stores before it
acknowledges it, and the tombstone it writes when an acknowledged message leaves a work
queue. Concurrent tasks can then run no faster than the fsyncs the disk takes per second
divided by the fsynced writes each task makes: the ceiling (:func:`fsync_ceiling`) and the
count (:func:`stream_writes`, from the streams' own sequence numbers, so independent of the
machine's load) are both measured in the same run as the throughput they bound.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass

import nats
from nats.js import api

_SKIPPED = ("_instances",)
"""Streams whose writes do not come from tasks: the replicas' heartbeats (one per replica
every 2 s)."""


@dataclass(frozen=True, slots=True)
class StreamState:
    """One stream's counters at one moment."""

    last_seq: int
    messages: int
    work_queue: bool


async def stream_states(nats_url: str) -> dict[str, StreamState]:
    """Every stream's counters now (heartbeat streams left out)."""
    nc = await nats.connect(nats_url)
    try:
        infos = await nc.jetstream().streams_info()
    finally:
        await nc.close()
    return {
        info.config.name or "": StreamState(
            info.state.last_seq,
            info.state.messages,
            info.config.retention == api.RetentionPolicy.WORK_QUEUE,
        )
        for info in infos
        if not (info.config.name or "").endswith(_SKIPPED)
    }


def stream_writes(before: dict[str, StreamState], after: dict[str, StreamState]) -> dict[str, int]:
    """The fsynced writes each stream made between two readings: the messages it stored,
    and for a work queue also the tombstones of the messages acknowledged off it."""
    writes: dict[str, int] = {}
    for name, now in after.items():
        then = before.get(name, StreamState(0, 0, now.work_queue))
        stored = now.last_seq - then.last_seq
        removed = stored - (now.messages - then.messages) if now.work_queue else 0
        if stored or removed:
            writes[name] = stored + removed
    return writes


async def fsync_ceiling(nats_url: str, *, publishers: int, seconds: float) -> float:
    """Publishes per second that ``publishers`` concurrent clients get from one file-backed
    stream of this nats-server (each publish fsynced when it syncs ``always``): the most
    fsynced writes per second the task path can hope for. The stream is deleted after."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    name = f"BENCH_CEILING_{uuid.uuid4().hex[:8]}"
    subject = f"bench.ceiling.{name}"
    await js.add_stream(name=name, subjects=[subject], storage=api.StorageType.FILE)
    done = 0
    stop_at = 0.0

    async def publisher() -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            await js.publish(subject, b"x" * 200)
            done += 1

    try:
        stop_at = time.perf_counter() + min(1.0, seconds / 3)  # warm-up, not counted
        await asyncio.gather(*(publisher() for _ in range(publishers)))
        done = 0
        started = time.perf_counter()
        stop_at = started + seconds
        await asyncio.gather(*(publisher() for _ in range(publishers)))
        return done / (time.perf_counter() - started)
    finally:
        try:
            await js.delete_stream(name)
        finally:
            await nc.close()
