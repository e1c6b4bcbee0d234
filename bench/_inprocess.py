"""The baseline: the same workflow objects run directly in this process.

Latency is ``await workflow.run(...)``; throughput is concurrent runs on this one process
(one core, the GIL); streaming latency reads ``handler.stream_events()``. Memory is measured
in a fresh interpreter (``python -m bench._inprocess memory ...``) so that this process's
heap does not absorb or inflate it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

from bench._apps import MODULE
from bench._procs import rss_bytes, self_cpu_seconds
from bench._stats import Latencies, Throughput

T = TypeVar("T")


def load_app(directory: Path) -> ModuleType:
    """Import the generated workflow module from ``directory``."""
    spec = importlib.util.spec_from_file_location(MODULE, directory / f"{MODULE}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[MODULE] = module
    spec.loader.exec_module(module)
    return module


async def latency(workflow: Any, *, iterations: int, warmup: int) -> Latencies:
    """Sequential ``await workflow.run(message=...)``, one at a time."""
    sample = Latencies()
    for i in range(warmup + iterations):
        started = time.perf_counter()
        result = await workflow.run(message="hi")
        elapsed = time.perf_counter() - started
        if result != "hi":
            sample.errors += 1
        if i >= warmup:
            sample.add(elapsed)
    return sample


async def throughput(workflow: Any, *, clients: int, seconds: float) -> Throughput:
    """``clients`` coroutines running the workflow back to back for ``seconds``."""
    done = 0
    deadline = 0.0

    async def client() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await workflow.run(message="hi")
            done += 1

    deadline = time.perf_counter() + min(1.0, seconds / 3)  # warm-up, not counted
    await asyncio.gather(*(client() for _ in range(clients)))
    done = 0
    cpu = self_cpu_seconds()
    started = time.perf_counter()
    deadline = started + seconds
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.perf_counter() - started
    cpu_ms = (self_cpu_seconds() - cpu) * 1e3 / max(done, 1)
    return Throughput(done, elapsed, clients, cpu_ms_per_task={"bench process": cpu_ms})


BLOCK_WARMUP = 5
"""In-process runs before each block of a :class:`Pairing`, not counted: the first runs after
the llama-mesh calls are slower, and the in-process figure is of runs back to back."""


@dataclass(slots=True)
class Pairing:
    """The in-process echo run measured next to each llama-mesh figure, for its ratio.

    This shared machine's speed drifts over minutes (the same measurement repeated varies
    by up to 2x, docs/benchmarks.md), so a ratio of two figures taken minutes apart measures
    the drift too. A latency loop runs :attr:`block` in-process runs back to back (as the
    in-process phase does, after :data:`BLOCK_WARMUP` not counted) before each :attr:`block`
    of its own calls; a throughput window gets an in-process window of :attr:`seconds` just
    before and just after it.
    """

    workflow: Any
    clients: int
    seconds: float
    block: int

    def latency_blocks(self, into: dict[str, Any], key: str) -> Callable[[], Awaitable[None]]:
        """The hook a llama-mesh latency loop calls between its blocks: ``block`` in-process
        runs, added to the sample ``into[key]``."""
        sample = into.setdefault(key, Latencies())

        async def run_block() -> None:
            runs = await latency(self.workflow, iterations=self.block, warmup=BLOCK_WARMUP)
            sample.values += runs.values
            sample.errors += runs.errors

        return run_block

    async def around(self, into: dict[str, Any], key: str, window: Awaitable[T]) -> T:
        """``window`` (a llama-mesh throughput window) with an in-process window just before
        and just after it, pooled into ``into[key]``."""
        before = await throughput(self.workflow, clients=self.clients, seconds=self.seconds)
        result = await window
        after = await throughput(self.workflow, clients=self.clients, seconds=self.seconds)
        tasks = before.tasks + after.tasks
        cpu = sum(t.cpu_ms_per_task["bench process"] * t.tasks for t in (before, after))
        into[key] = Throughput(
            tasks,
            before.seconds + after.seconds,
            self.clients,
            cpu_ms_per_task={"bench process": cpu / max(tasks, 1)},
        )
        return result


async def streaming(workflow: Any, *, count: int, interval: float, skip: int) -> Latencies:
    """Receive time minus write time of each ``Stamp`` event (the first ``skip`` dropped)."""
    sample = Latencies()
    handler = workflow.run(count=count, interval=interval, start_delay=0.0)
    async for event in handler.stream_events():
        stamped = getattr(event, "t_ns", None)
        if stamped is None:
            continue
        received = time.time_ns()
        if int(getattr(event, "seq", 0)) >= skip:
            sample.add((received - int(stamped)) / 1e9)
    await handler
    return sample


async def _memory(directory: Path, what: str, count: int) -> dict[str, int]:
    app = load_app(directory)
    context_cls = _context_class()
    # Run the code paths once so that first-use allocations are not counted.
    await app.gate.run(seconds=0.0)
    context_cls(app.echo)
    gc.collect()
    before = rss_bytes(os.getpid())
    sessions: list[Any] = []
    handlers: list[Any] = []
    if what == "sessions":
        sessions = [context_cls(app.echo) for _ in range(count)]
    else:
        handlers = [app.gate.run(seconds=3600.0) for _ in range(count)]
        await asyncio.sleep(0.5)  # every run reaches its step and parks there
    gc.collect()
    after = rss_bytes(os.getpid())
    for handler in handlers:
        await handler.cancel_run()
    return {"delta_bytes": after - before, "count": len(sessions) + len(handlers)}


def _context_class() -> Any:
    from workflows import Context

    return Context


def main(argv: list[str] | None = None) -> int:
    """``python -m bench._inprocess memory DIR sessions|tasks COUNT``: prints JSON."""
    parser = argparse.ArgumentParser(prog="python -m bench._inprocess")
    parser.add_argument("mode", choices=["memory"])
    parser.add_argument("directory", type=Path)
    parser.add_argument("what", choices=["sessions", "tasks"])
    parser.add_argument("count", type=int)
    args = parser.parse_args(argv)
    result = asyncio.run(_memory(args.directory, args.what, args.count))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
