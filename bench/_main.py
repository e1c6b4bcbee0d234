"""Run every benchmark and print the report (see ``bench/run.py``).

Phases run one after the other: the in-process baseline, then llama-mesh, then Llama Deploy
0.8.1; each measurement has a time limit, and Ctrl-C or SIGTERM cancels the running one and
stops every process started.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from bench import _brokers, _disk, _inprocess, _ld08, _mesh
from bench._apps import (
    BROKER_DEPLOYMENTS,
    DEPLOYMENT,
    TWO_REPLICAS_DEPLOYMENT,
    write_mesh_app,
)
from bench._plan import FULL, QUICK, SYNC_ROW, Plan, Results
from bench._report import report
from bench._stats import Latencies, Memory

REPO = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def say(message: str) -> None:
    """Progress goes to stderr; stdout holds only the report."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Stopper:
    """Ctrl-C and SIGTERM: cancel the running measurement (again, until it ends), then stop.

    Only the measurement is cancelled, never the clean-up after it, so every process
    started is still stopped; :func:`phase` turns the cancellation into ``Interrupted``.
    A cancellation can be lost inside nats-py or httpx on Python 3.11 (CPython gh-86296),
    hence the repeats.
    """

    def __init__(self) -> None:
        self.requested = False
        self.current: asyncio.Future[Any] | None = None

    def request(self) -> None:
        """The signal handler."""
        if not self.requested:
            say("interrupted: stopping what was started")
        self.requested = True
        self._cancel()

    def _cancel(self) -> None:
        task = self.current
        if task is not None and not task.done():
            task.cancel()
            asyncio.get_running_loop().call_later(0.5, self._cancel)


class Interrupted(Exception):
    """The run was interrupted; raised out of :func:`phase`."""


STOPPER = Stopper()


async def phase(plan: Plan, what: str, coro: Awaitable[T]) -> T:
    """Run one measurement with a time limit, saying what it is; Ctrl-C cancels it."""

    async def limited() -> T:
        async with asyncio.timeout(plan.phase_timeout):
            return await coro

    if STOPPER.requested:
        raise Interrupted
    say(what)
    task = asyncio.ensure_future(limited())
    STOPPER.current = task
    try:
        return await task
    except asyncio.CancelledError:
        if STOPPER.requested:
            raise Interrupted from None
        raise
    finally:
        STOPPER.current = None
        if not task.done():
            task.cancel()


async def run_inprocess(plan: Plan, work: Path, results: Results) -> None:
    """The baseline: the workflows run in this process."""
    app_dir = work / "inprocess-app"
    write_mesh_app(app_dir)
    app = _inprocess.load_app(app_dir)
    out = results.inprocess
    seconds = min(PAIRED_SECONDS, plan.throughput_seconds)
    results.pairing = _inprocess.Pairing(app.echo, plan.clients, seconds, _mesh.BLOCK)
    out["latency"] = await phase(
        plan,
        "in-process: echo latency",
        _inprocess.latency(app.echo, iterations=plan.inprocess_iterations, warmup=plan.warmup),
    )
    out["throughput"] = await phase(
        plan,
        "in-process: echo throughput",
        _inprocess.throughput(app.echo, clients=plan.clients, seconds=plan.throughput_seconds),
    )
    out["streaming"] = await phase(
        plan,
        "in-process: streaming latency",
        _inprocess.streaming(
            app.stream,
            count=plan.stream_events,
            interval=plan.stream_interval,
            skip=plan.stream_skip,
        ),
    )
    for what in ("sessions", "tasks"):
        out[f"memory_{what}"] = await phase(
            plan, f"in-process: memory of {what}", _inprocess_memory(app_dir, what, plan)
        )


PAIRED_SECONDS = 3.0
"""Length of the in-process throughput windows just before and after each llama-mesh one."""


def _between(results: Results, out: dict[str, Any], key: str) -> _mesh.Between | None:
    """The in-process run measured between the blocks of a llama-mesh latency loop, into
    ``out["baseline"][key]`` (none without the in-process part)."""
    if results.pairing is None:
        return None
    return results.pairing.latency_blocks(out.setdefault("baseline", {}), key)


def _grpc_latency(
    plan: Plan, results: Results, out: dict[str, Any], target: str, key: str
) -> Awaitable[Latencies]:
    """The gRPC latency loop of ``out[key]``, the in-process run measured between its blocks."""
    return _mesh.grpc_latency(
        target,
        iterations=plan.latency_iterations,
        warmup=plan.warmup,
        deadline=plan.deadline,
        between=_between(results, out, key),
    )


def _json_latency(
    plan: Plan,
    results: Results,
    out: dict[str, Any],
    key: str,
    request: tuple[str, str, dict[str, Any]],
    *,
    client: _mesh.JsonClient = "aiohttp",
) -> Awaitable[Latencies]:
    """The JSON latency loop of ``out[key]`` (``request``: base URL, path, body), the
    in-process run measured between its blocks."""
    base_url, path, body = request
    return _mesh.json_latency(
        base_url,
        path,
        body,
        iterations=plan.latency_iterations,
        warmup=plan.warmup,
        deadline=plan.deadline,
        client=client,
        between=_between(results, out, key),
    )


async def _inprocess_memory(app_dir: Path, what: str, plan: Plan) -> Memory:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench._inprocess",
        "memory",
        str(app_dir),
        what,
        str(plan.memory_count),
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        stdout, _ = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    data = json.loads(stdout.decode().strip().splitlines()[-1])
    mib = data["delta_bytes"] / 1024 / 1024 * 1000 / plan.memory_count
    return Memory(plan.memory_count, {"bench process": mib})


async def run_mesh(plan: Plan, work: Path, results: Results, nats_sync: str) -> None:
    """llama-mesh: gRPC and JSON latency, throughput, streaming, memory."""
    out = results.mesh
    out["nats_sync"] = nats_sync
    say(f"llama-mesh: starting the server (nats-server sync_interval {nats_sync}) and deploying")
    async with _mesh.run_server(work, nats_sync=nats_sync) as server:
        memory = {"count": plan.memory_count, "concurrency": plan.memory_concurrency}
        out["memory_sessions"] = await phase(
            plan, "llama-mesh: memory of idle sessions", _mesh.memory_sessions(server, **memory)
        )
        out["memory_tasks"] = await phase(
            plan, "llama-mesh: memory of queued tasks", _mesh.memory_queued(server, **memory)
        )
        gateway = server.gateway_url
        gateway_target = gateway.removeprefix("http://")
        v1 = (gateway, f"/v1/deployments/{DEPLOYMENT}/tasks:run", _mesh.json_body_v1())
        route_08 = (gateway, f"/deployments/{DEPLOYMENT}/tasks/run", _mesh.json_body_08())
        latencies: list[tuple[str, str, Callable[[], Awaitable[Latencies]]]] = [
            (
                "grpc",
                "gRPC latency (direct)",
                lambda: _grpc_latency(plan, results, out, server.grpc_target, "grpc"),
            ),
            (
                "grpc_gateway",
                "gRPC latency (through the gateway)",
                lambda: _grpc_latency(plan, results, out, gateway_target, "grpc_gateway"),
            ),
            (
                "json_v1",
                "JSON latency (/v1)",
                lambda: _json_latency(plan, results, out, "json_v1", v1),
            ),
            (
                "json_v1_httpx",
                "JSON latency (/v1, httpx client)",
                lambda: _json_latency(plan, results, out, "json_v1_httpx", v1, client="httpx"),
            ),
            (
                "json_08",
                "JSON latency (0.8 route)",
                lambda: _json_latency(plan, results, out, "json_08", route_08),
            ),
        ]
        for key, what, measure in latencies:
            out[key] = await phase(plan, f"llama-mesh: {what}", measure())
        await _throughputs(plan, results, server, out, "llama-mesh")
        out["fsync_ceiling"] = await phase(
            plan,
            "llama-mesh: the disk's ceiling (concurrent JetStream publishes)",
            _disk.fsync_ceiling(
                server.nats_url, publishers=plan.clients, seconds=plan.throughput_seconds
            ),
        )
        out["streaming"] = await phase(
            plan,
            "llama-mesh: streaming latency",
            _mesh.streaming(
                server,
                count=plan.stream_events,
                interval=plan.stream_interval,
                skip=plan.stream_skip,
                deadline=30.0,
            ),
        )
        out["grpc_again"] = await phase(
            plan,
            "llama-mesh: gRPC latency (direct) again, after the throughput phase",
            _grpc_latency(plan, results, out, server.grpc_target, "grpc_again"),
        )
        stuck = await phase(
            plan, "llama-mesh: cancelling leftover tasks", _mesh.cancel_stuck(server)
        )
        out["stuck"] = stuck
        say("llama-mesh: stopping")


async def run_mesh_sync(plan: Plan, work: Path, results: Results) -> None:
    """llama-mesh with ``--nats-sync`` :data:`SYNC_ROW`: the latency, throughput and disk
    figures that the fsync per write moves, on a server of its own."""
    out = results.mesh_sync
    out["nats_sync"] = SYNC_ROW
    who = f"llama-mesh --nats-sync {SYNC_ROW}"
    say(f"{who}: starting the server and deploying")
    async with _mesh.run_server(work, name="sync", nats_sync=SYNC_ROW) as server:
        out["grpc"] = await phase(
            plan,
            f"{who}: gRPC latency (direct)",
            _grpc_latency(plan, results, out, server.grpc_target, "grpc"),
        )
        await _throughputs(plan, results, server, out, who)
        out["fsync_ceiling"] = await phase(
            plan,
            f"{who}: the disk's ceiling",
            _disk.fsync_ceiling(
                server.nats_url, publishers=plan.clients, seconds=plan.throughput_seconds
            ),
        )
        say(f"{who}: stopping")


LOADS = (("throughput_1", DEPLOYMENT, "echo"), ("throughput_2", TWO_REPLICAS_DEPLOYMENT, "echo2"))
"""The throughput rows: result key, deployment, service."""


async def _throughputs(
    plan: Plan,
    results: Results,
    server: _mesh.MeshServer,
    out: dict[str, Any],
    who: str,
    *,
    others: dict[str, int] | None = None,
) -> None:
    """Throughput with 1 and 2 replicas into ``out`` (``others``: more pids to read CPU of),
    each window between two of the in-process run (into ``out["baseline"]``)."""
    for key, deployment, service in LOADS:
        window = _mesh.throughput(
            server,
            deployment,
            service,
            clients=plan.clients,
            seconds=plan.throughput_seconds,
            deadline=plan.throughput_deadline,
            others=others,
        )
        if results.pairing is not None:
            window = results.pairing.around(out.setdefault("baseline", {}), key, window)
        out[key] = await phase(plan, f"{who}: throughput ({service})", window)


async def run_broker(plan: Plan, work: Path, results: Results, kind: str) -> None:
    """llama-mesh with the echo deployments on an external broker: gRPC latency and
    throughput, measured as for the server's own NATS."""
    out = results.brokers.setdefault(kind, {})
    who = f"llama-mesh on {_brokers.LABELS[kind]}"
    say(f"{who}: starting {kind} and the server, deploying")
    async with (
        _brokers.running(kind, work / kind) as broker,
        _mesh.run_server(
            work, name=kind, deployments=BROKER_DEPLOYMENTS, message_queue=broker.message_queue
        ) as server,
    ):
        out["grpc"] = await phase(
            plan,
            f"{who}: gRPC latency (direct)",
            _grpc_latency(plan, results, out, server.grpc_target, "grpc"),
        )
        await _throughputs(plan, results, server, out, who, others={f"{kind}-server": broker.pid})
        out["stuck"] = await phase(
            plan, f"{who}: cancelling leftover tasks", _mesh.cancel_stuck(server)
        )
        say(f"{who}: stopping")


async def run_ld08(plan: Plan, work: Path, results: Results) -> None:
    """Llama Deploy 0.8.1 on the same workflows."""
    out = results.ld08
    say("llama-deploy 0.8.1: preparing its virtualenv")
    python = await asyncio.to_thread(_ld08.ensure_venv)
    out["versions"] = await asyncio.to_thread(_ld08.versions, python)
    say("llama-deploy 0.8.1: starting the server and deploying")
    async with _ld08.run_server(work, python) as server:
        memory = {"count": plan.ld08_memory_count, "concurrency": 8}
        out["memory_sessions"] = await phase(
            plan, "llama-deploy 0.8.1: memory of sessions", _ld08.memory_sessions(server, **memory)
        )
        out["latency"] = await phase(
            plan,
            "llama-deploy 0.8.1: JSON latency",
            _ld08.latency(server, iterations=plan.ld08_latency_iterations, warmup=2),
        )
        out["throughput"] = await phase(
            plan,
            "llama-deploy 0.8.1: throughput",
            _ld08.throughput(
                server, clients=plan.ld08_clients, seconds=plan.ld08_throughput_seconds
            ),
        )
        out["streaming"] = await phase(
            plan,
            "llama-deploy 0.8.1: streaming latency",
            _ld08.streaming(
                server,
                count=plan.ld08_stream_events,
                interval=plan.stream_interval,
                skip=plan.stream_skip,
            ),
        )
        out["memory_tasks"] = await phase(
            plan,
            "llama-deploy 0.8.1: memory of queued tasks",
            _ld08.memory_queued(server, **memory),
        )
        say("llama-deploy 0.8.1: stopping")


async def run(args: argparse.Namespace) -> int:
    """Every phase in order; the report is printed even when a phase failed."""
    plan = QUICK if args.quick else FULL
    results = Results()
    started = time.perf_counter()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, STOPPER.request)
    with tempfile.TemporaryDirectory(prefix="llama-mesh-bench-") as tmp:
        work = Path(tmp)
        steps = _steps(args, plan, work, results)
        failed = False
        for name, step in steps:
            try:
                await step()
            except Interrupted:
                results.notes.append(f"interrupted during {name}; the figures are partial")
                failed = True
                break
            except Exception as exc:
                failed = True
                results.notes.append(f"{name} failed: {type(exc).__name__}: {exc}")
                say(f"{name} failed: {exc!r}")
                _show_logs(work)
    say(f"done in {time.perf_counter() - started:.0f} s")
    print(report(plan, results), flush=True)
    if STOPPER.requested:
        return 130
    return 1 if failed else 0


def _steps(
    args: argparse.Namespace, plan: Plan, work: Path, results: Results
) -> list[tuple[str, Callable[[], Awaitable[None]]]]:
    """The phases ``--only`` and ``--skip-08`` select, in order; an external broker this
    machine cannot run is left out with a note."""
    steps: list[tuple[str, Callable[[], Awaitable[None]]]] = []
    for part in args.only:
        if part == "inprocess":
            steps.append(("in-process", lambda: run_inprocess(plan, work, results)))
        elif part == "nats":
            steps.append(("llama-mesh", lambda: run_mesh(plan, work, results, args.nats_sync)))
        elif part == "nats-sync":
            if args.nats_sync == "always":  # else the server above already ran that way
                steps.append(
                    (
                        f"llama-mesh --nats-sync {SYNC_ROW}",
                        lambda: run_mesh_sync(plan, work, results),
                    )
                )
        elif part in _brokers.EXTERNAL:
            lacking = _brokers.missing(part)
            if lacking:
                results.notes.append(f"{part} rows not run: {lacking}")
            else:
                steps.append((part, functools.partial(run_broker, plan, work, results, part)))
        elif not args.skip_08:  # "08"
            steps.append(("llama-deploy 0.8.1", lambda: run_ld08(plan, work, results)))
    return steps


PARTS = ("inprocess", "nats", "nats-sync", *_brokers.EXTERNAL, "08")
"""What ``--only`` selects, in the order they run."""


def _parts(text: str) -> list[str]:
    """``--only``'s comma-separated list, in :data:`PARTS` order; an unknown name is an error."""
    names = {name.strip() for name in text.split(",") if name.strip()}
    unknown = sorted(names - set(PARTS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"{', '.join(unknown) or 'nothing'}: not one of {', '.join(PARTS)}"
        )
    return [part for part in PARTS if part in names]


def _show_logs(work: Path) -> None:
    for log in sorted(work.glob("*.log")) + sorted(work.glob("*-data/logs/*/*.log")):
        tail = log.read_text(errors="replace").splitlines()[-20:]
        say(f"--- last lines of {log.name}:\n" + "\n".join(tail))


def main(argv: list[str] | None = None) -> int:
    """Parse the options and run."""
    parser = argparse.ArgumentParser(
        prog="bench/run.py", description="llama-mesh benchmarks; prints a Markdown table"
    )
    parser.add_argument("--quick", action="store_true", help="fewer iterations (< 1 minute)")
    parser.add_argument("--skip-08", action="store_true", help="do not run llama-deploy 0.8.1")
    parser.add_argument(
        "--nats-sync",
        default="always",
        metavar="INTERVAL",
        help="the server's --nats-sync: always (the default) or a duration such as 1s",
    )
    parser.add_argument(
        "--only",
        type=_parts,
        default=list(PARTS),
        metavar="PARTS",
        help=f"run only these, comma-separated: {', '.join(PARTS)} (default: all)",
    )
    args = parser.parse_args(argv)
    return asyncio.run(run(args))
