"""What the disk allows the task path: JetStream's fsync ceiling on this machine, and the
fsynced writes one task makes.

With ``sync_interval: always`` nats-server fsyncs every message it stores before it
acknowledges it, and the tombstone it writes when an acknowledged message leaves a work
queue. Concurrent tasks can then run no faster than the fsyncs the disk takes per second
divided by the fsynced writes each task makes: the ceiling (:func:`fsync_ceiling`) and the
count (:func:`stream_writes`, from the streams' own sequence numbers, so independent of the
machine's load) are both measured in the same run as the throughput they bound.

The streams' counters do not show every fsync: nats-server also fsyncs its consumers' state,
and a purge (one write, whatever it removes) moves no sequence number. :func:`count_fsyncs`
counts the fsync and fdatasync system calls themselves, with ``perf`` when the machine has it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import time
import uuid
from collections.abc import AsyncIterator
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
    and for a work queue also the tombstones of the messages acknowledged off it.

    A limits-retention stream's writes are the messages it stored: the purges that remove
    its acknowledged messages leave no trace in these counters (:func:`count_fsyncs` counts
    them)."""
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


_FSYNC_EVENTS = ("syscalls:sys_enter_fsync", "syscalls:sys_enter_fdatasync")
_PERF_ATTACH_TIMEOUT = 5.0
_PERF_SETTLE = 0.1
"""Seconds between perf's first counter and the window: it opens one per thread and
event, then enables them all."""
_PERF_STOP_TIMEOUT = 10.0


@dataclass(slots=True)
class Fsyncs:
    """The fsync and fdatasync calls counted by :func:`count_fsyncs`: ``None`` until the
    count has stopped, and after it when ``perf`` is missing or failed."""

    count: int | None = None


@contextlib.asynccontextmanager
async def count_fsyncs(pid: int) -> AsyncIterator[Fsyncs]:
    """Count the fsync and fdatasync system calls of process ``pid`` (all its threads) from
    entering the block to leaving it, into the yielded :class:`Fsyncs`.

    ``perf stat`` on the two syscall tracepoints, attached once it holds its counters and
    stopped with SIGINT (it then prints its counts). Without a working ``perf`` (not
    installed, not allowed to trace) the block runs all the same and the count stays
    ``None``: the benchmark does not depend on it.
    """
    result = Fsyncs()
    perf = await _start_perf(pid)
    try:
        yield result
    finally:
        if perf is not None:
            result.count = await _stop_perf(perf)


async def _start_perf(pid: int) -> asyncio.subprocess.Process | None:
    """``perf stat`` attached to ``pid`` and counting, or ``None`` (no perf, or it quit)."""
    executable = shutil.which("perf")
    if executable is None:
        return None
    argv = [executable, "stat", "-x,", "-p", str(pid)]
    for event in _FSYNC_EVENTS:
        argv += ["-e", event]
    perf = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    give_up = time.perf_counter() + _PERF_ATTACH_TIMEOUT
    while perf.returncode is None and not _holds_counters(perf.pid):
        if time.perf_counter() > give_up:
            await _stop_perf(perf)
            return None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(perf.wait(), 0.02)
    if perf.returncode is not None:
        await perf.communicate()  # its error, read to close the pipe
        return None
    await asyncio.sleep(_PERF_SETTLE)
    return perf


def _holds_counters(pid: int) -> bool:
    """Whether process ``pid`` has opened a perf event (a counter) yet."""
    fds = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fds)
    except OSError:
        return False
    for name in names:
        with contextlib.suppress(OSError):
            if os.readlink(f"{fds}/{name}") == "anon_inode:[perf_event]":
                return True
    return False


async def _stop_perf(perf: asyncio.subprocess.Process) -> int | None:
    """SIGINT ``perf`` (by its pid: it prints its counts and exits); the sum of its counts,
    or ``None`` when it printed no count for an event. SIGKILL if it does not exit."""
    if perf.returncode is None:
        perf.send_signal(signal.SIGINT)
    try:
        _, stderr = await asyncio.wait_for(perf.communicate(), _PERF_STOP_TIMEOUT)
    except TimeoutError:
        perf.kill()
        await perf.wait()
        return None
    counts: dict[str, int] = {}
    for line in stderr.decode(errors="replace").splitlines():
        fields = line.split(",")
        if len(fields) < 3 or fields[2] not in _FSYNC_EVENTS:
            continue
        value = fields[0]
        if value == "<not counted>":  # enabled, but the process never ran on a CPU
            counts[fields[2]] = 0
        elif value.isdigit():
            counts[fields[2]] = int(value)
    if set(counts) != set(_FSYNC_EVENTS):
        return None
    return sum(counts.values())
