"""The Markdown report: machine and versions, the table, how each figure was measured."""

from __future__ import annotations

import math
import os
import platform
import re
import subprocess
import sys
from collections.abc import Iterable
from importlib.metadata import version
from pathlib import Path
from typing import Any

from bench._brokers import LABELS
from bench._inprocess import BLOCK_WARMUP
from bench._plan import Plan, Results
from bench._procs import cpu_model, load_average, mem_total_gib
from bench._stats import Latencies, Memory, Throughput

REPO = Path(__file__).resolve().parent.parent


def _ms(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{value:.2f} ms" if value < 100 else f"{value:.0f} ms"


def _x(value: float) -> str:
    return "n/a" if math.isnan(value) or math.isinf(value) else f"{value:.2f}x"


def _mib(value: float) -> str:
    return f"{value:.2f} MiB"


def _div(a: float, b: float) -> float:
    return a / b if b else math.nan


def _get(data: dict[str, Any], key: str) -> Any:
    return data.get(key)


def _baseline(figures: dict[str, Any], key: str, whole: Any) -> Any:
    """The in-process figure measured next to ``figures[key]`` (``Results.pairing``), else
    ``whole``, the in-process phase's."""
    paired = figures.get("baseline", {}).get(key)
    return whole if paired is None else paired


Row = tuple[str, str, str, str, str, str, str]


def latency_rows(results: Results) -> list[Row]:
    """p50 and p99 of the echo task by path, against in-process and 0.8.1."""
    rows: list[Row] = []
    whole: Latencies | None = _get(results.inprocess, "latency")
    ld08: Latencies | None = _get(results.ld08, "latency")
    paths = (
        ("grpc", "gRPC, direct", True, False),
        ("grpc_again", "gRPC, direct, after the throughput phase", False, False),
        ("grpc_gateway", "gRPC, through the gateway", False, False),
        ("json_v1", "JSON `/v1/…/tasks:run`, gateway", True, False),
        ("json_v1_httpx", "JSON `/v1/…/tasks:run`, gateway, httpx client", False, False),
        ("json_08", "JSON 0.8 `/deployments/…/tasks/run`, gateway", False, True),
    )
    runs = [
        (results.mesh, key, label, targeted, compare_08)
        for key, label, targeted, compare_08 in paths
    ]
    for kind, figures in results.brokers.items():
        runs.append((figures, "grpc", f"gRPC, direct, deployment on {LABELS[kind]}", True, False))
    for figures, key, label, targeted, compare_08 in runs:
        sample: Latencies | None = _get(figures, key)
        if sample is None:
            continue
        base = _baseline(figures, key, whole)
        for q, name in ((50, "p50"), (99, "p99")):
            ours = sample.percentile(q) * 1e3
            theirs = base.percentile(q) * 1e3 if base else math.nan
            old = ld08.percentile(q) * 1e3 if ld08 and compare_08 else math.nan
            target, verdict = "", ""
            if targeted and q == 50:
                target = f"≤ 6x in-process ({_ms(6 * theirs)})"
                verdict = "pass" if ours <= 6 * theirs else "FAIL"
            rows.append(
                (
                    f"echo end to end {name}: {label}",
                    _ms(ours),
                    _ms(theirs),
                    _x(_div(ours, theirs)),
                    _ms(old),
                    target,
                    verdict,
                )
            )
    return rows


def throughput_rows(results: Results) -> list[Row]:
    """Tasks per second with 1 and 2 replicas."""
    rows: list[Row] = []
    whole: Throughput | None = _get(results.inprocess, "throughput")
    ld08: Throughput | None = _get(results.ld08, "throughput")
    for figures, key, label in _throughput_runs(results):
        ours: Throughput | None = _get(figures, key)
        if ours is None:
            continue
        base: Throughput | None = _baseline(figures, key, whole)
        theirs = base.per_cpu_second if base else math.nan
        measured = f", {base.per_second:.0f} measured" if base else ""
        rows.append(
            (
                f"throughput, echo, {label} (tasks/s)",
                f"{ours.per_second:.0f}",
                f"{theirs:.0f} per core{measured}",
                _x(_div(ours.per_second, theirs)),
                f"{ld08.per_second:.1f}" if ld08 else "n/a",
                f"≥ 0.5x in-process ({theirs / 2:.0f}/s)",
                "pass" if ours.per_second >= theirs / 2 else "FAIL",
            )
        )
    return rows


def disk_rows(mesh: dict[str, Any], *, targets: bool = True) -> list[Row]:
    """The disk's bound on throughput: the fsync ceiling, the fsynced writes per task, the
    throughput as a share of what they allow (the target where the disk limits) and the
    fsyncs nats-server made per task (no target: a measurement of the writes), for
    one llama-mesh server's figures (``Results.mesh`` or ``Results.mesh_sync``, whose rows
    are no target: ``targets`` false)."""
    ceiling: float | None = _get(mesh, "fsync_ceiling")
    if ceiling is None:
        return []
    sync = _get(mesh, "nats_sync") or "always"
    rows: list[Row] = [
        (
            f"JetStream ceiling: concurrent publishes/s to one stream (sync {sync})",
            f"{ceiling:.0f}",
            "",
            "",
            "",
            "",
            "",
        )
    ]
    for key, label in (("throughput_1", "1 replica"), ("throughput_2", "2 replicas")):
        ours: Throughput | None = _get(mesh, key)
        if ours is None:
            continue
        rows += _writes_rows(ours, label, sync, ceiling, targets=targets)
        fsyncs = ours.fsyncs_per_task
        rows.append(
            (
                f"nats-server fsyncs per task, {label} (sync {sync}; perf; consumer state "
                "included)",
                "n/a (perf not available)" if fsyncs is None else f"{fsyncs:.2f}",
                "",
                "",
                "",
                "",
                "",
            )
        )
    return rows


def _writes_rows(
    ours: Throughput, label: str, sync: str, ceiling: float, *, targets: bool
) -> list[Row]:
    """The JetStream writes per task of one throughput run, and its throughput as a share of
    what the ceiling allows at that many writes (none when no stream counted a write)."""
    if not ours.writes:
        return []
    per_task = ours.writes_per_task
    allowed = _div(ceiling, per_task)
    return [
        (
            f"JetStream writes per task, {label} (sync {sync}; each fsynced at always)",
            f"{per_task:.2f}",
            "",
            "",
            "",
            "2 (one to accept, one to finish)" if targets else "",
            ("pass" if per_task <= 2.05 else "FAIL") if targets else "",
        ),
        (
            f"throughput / (ceiling / writes per task), {label} (sync {sync})",
            f"{ours.per_second:.0f} of {allowed:.0f} tasks/s",
            "",
            _x(_div(ours.per_second, allowed)),
            "",
            "≥ 0.8x where the disk limits" if targets else "",
            ("pass" if ours.per_second >= 0.8 * allowed else "FAIL") if targets else "",
        ),
    ]


def sync_rows(results: Results) -> list[Row]:
    """The same server with its nats-server fsyncing once per interval (``--nats-sync``):
    what the fsync per write costs (its throughput is among :func:`throughput_rows`). Not a
    target: ``always`` stays the default."""
    out = results.mesh_sync
    interval = _get(out, "nats_sync")
    base: Latencies | None = _baseline(out, "grpc", _get(results.inprocess, "latency"))
    rows: list[Row] = []
    grpc: Latencies | None = _get(out, "grpc")
    if grpc is not None:
        ours, theirs = grpc.p50_ms, base.p50_ms if base else math.nan
        label = f"echo end to end p50: gRPC, direct, --nats-sync {interval}"
        rows.append((label, _ms(ours), _ms(theirs), _x(_div(ours, theirs)), "", "", ""))
    return rows + disk_rows(out, targets=False)


def _throughput_runs(results: Results) -> list[tuple[dict[str, Any], str, str]]:
    """Each throughput figure: where it is, its key, its label."""
    loads = (("throughput_1", "1 replica"), ("throughput_2", "2 replicas"))
    runs = [(results.mesh, key, label) for key, label in loads]
    if results.mesh_sync:
        interval = results.mesh_sync.get("nats_sync")
        runs += [(results.mesh_sync, k, f"{label}, --nats-sync {interval}") for k, label in loads]
    for kind, figures in results.brokers.items():
        runs += [(figures, key, f"{label}, on {LABELS[kind]}") for key, label in loads]
    return runs


def streaming_rows(results: Results) -> list[Row]:
    """Write-to-receive latency of streamed events."""
    ours: Latencies | None = _get(results.mesh, "streaming")
    base: Latencies | None = _get(results.inprocess, "streaming")
    ld08: Latencies | None = _get(results.ld08, "streaming")
    if ours is None:
        return []
    rows: list[Row] = []
    for q, name in ((50, "p50"), (99, "p99")):
        value = ours.percentile(q) * 1e3
        theirs = base.percentile(q) * 1e3 if base else math.nan
        target = "< 2 ms" if q == 50 else ""
        verdict = ("pass" if value < 2.0 else "FAIL") if q == 50 else ""
        rows.append(
            (
                f"event streaming {name} (write in workflow → client receives)",
                _ms(value),
                _ms(theirs),
                _x(_div(value, theirs)),
                _ms(ld08.percentile(q) * 1e3) if ld08 else "n/a",
                target,
                verdict,
            )
        )
    return rows


def memory_rows(results: Results) -> list[Row]:
    """Resident memory per 1,000 idle sessions and per 1,000 queued tasks."""
    rows: list[Row] = []
    for key, label in (("memory_sessions", "idle sessions"), ("memory_tasks", "queued tasks")):
        ours: Memory | None = _get(results.mesh, key)
        base: Memory | None = _get(results.inprocess, key)
        ld08: Memory | None = _get(results.ld08, key)
        if ours is None:
            continue
        theirs = base.total if base else math.nan
        parts = ", ".join(f"{k} {v:.2f}" for k, v in ours.mib_per_1000.items())
        rows.append(
            (
                f"memory per 1,000 {label} (RSS)",
                f"{_mib(ours.total)} ({parts})",
                _mib(theirs),
                _x(_div(ours.total, theirs)),
                _mib(ld08.total) if ld08 else "n/a",
                "",
                "",
            )
        )
        for name, value in ours.extra.items():
            rows.append((f"… {name} per 1,000 {label} (disk)", _mib(value), "", "", "", "", ""))
    return rows


def table(results: Results) -> str:
    """The Markdown table of every figure."""
    header: Row = (
        "metric",
        "llama-mesh",
        "in-process",
        "ratio",
        "llama-deploy 0.8.1",
        "target",
        "pass/fail",
    )
    rows = [
        header,
        ("---", "---:", "---:", "---:", "---:", "---", "---"),
        *latency_rows(results),
        *throughput_rows(results),
        *disk_rows(results.mesh),
        *sync_rows(results),
        *streaming_rows(results),
        *memory_rows(results),
    ]
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def _git(*args: str) -> str:
    """What ``git`` prints for ``args`` in the repository ("" when it fails)."""
    done = subprocess.run(
        ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False
    )
    return done.stdout.strip()


def environment(ld08_versions: str | None, brokers: Iterable[str] = ()) -> list[str]:
    """Machine, versions and load, as Markdown list items."""
    commit = _git("rev-parse", "--short", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    nats = _tool_version([str(Path(sys.executable).parent / "nats-server"), "--version"])
    envoy_line = _tool_version([str(Path(sys.executable).parent / "envoy"), "--version"])
    envoy = next(iter(re.findall(r"/(\d+\.\d+\.\d+)/", envoy_line)), envoy_line)
    packages = ", ".join(
        f"{name} {version(name)}"
        for name in ("llama-mesh", "llama-index-workflows", "grpcio", "nats-py", "protobuf")
    )
    return [
        f"- machine: {os.cpu_count()} CPUs (`nproc` {len(os.sched_getaffinity(0))}), "
        f"{cpu_model()}, {mem_total_gib():.0f} GiB, Linux {platform.release()}",
        f"- load average at the end: {load_average()}",
        f"- Python {platform.python_version()}; {packages}",
        f"- {nats}; envoy {envoy}",
        *_broker_versions(brokers),
        f"- llama-mesh commit {commit or 'unknown'}{' (with local changes)' if dirty else ''}",
        f"- llama-deploy 0.8.1 side: {ld08_versions or 'not run (--skip-08)'}",
    ]


def _broker_versions(kinds: Iterable[str]) -> list[str]:
    """The versions of the external brokers that ran, as Markdown list items."""
    argv = {
        "rabbitmq": ["dpkg-query", "--show", "--showformat=${Version}", "rabbitmq-server"],
        "redis": ["redis-server", "--version"],
    }
    return [f"- {LABELS[kind]}: {_tool_version(argv[kind])}" for kind in kinds]


def _tool_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except OSError:
        return "unknown"
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if text else "unknown"


def method(plan: Plan, results: Results) -> list[str]:
    """How each figure was measured, with this run's counts."""
    base_tp: Throughput | None = results.inprocess.get("throughput")
    ld_tp: Throughput | None = results.ld08.get("throughput")
    lines = [
        f"- plan `{plan.name}`; every system runs the same workflow source "
        "(`bench/_apps.py`), only its imports differ for 0.8.1. The client is this process; "
        "llama-mesh and 0.8.1 each run in processes of their own, one after the other.",
        f"- latency: {plan.latency_iterations} sequential echo tasks per path after "
        f"{plan.warmup} warm-up ones, over one grpc.aio channel or one keep-alive aiohttp "
        "connection (one row: httpx, to show what that client library costs); a call is cut "
        f"off after {plan.deadline:.0f} s and counted at that value. In-process: "
        f"{plan.inprocess_iterations} `await workflow.run(message=...)`. "
        f"0.8.1: {plan.ld08_latency_iterations} `POST /deployments/bench/tasks/run` with "
        "httpx (fewer: each takes over half a second).",
        f"- throughput: {plan.clients} concurrent clients calling RunTask (gRPC, direct) back "
        f"to back for {plan.throughput_seconds:.0f} s after a warm-up, deadline "
        f"{plan.throughput_deadline:.0f} s; 1 replica is service `echo`, 2 replicas `echo2` "
        f"(both `max-concurrent-tasks: 64`). In-process: {plan.clients} concurrent "
        f"`workflow.run` loops in this one process. 0.8.1: {plan.ld08_clients} clients of "
        f"`tasks/run` for {plan.ld08_throughput_seconds:.0f} s (its service runs 8 tasks at "
        "once).",
        f"- streaming: one task writes {plan.stream_events} events "
        f"{plan.stream_interval * 1e3:.0f} ms apart, each stamped with `time.time_ns()` when "
        f"written; latency = receive time - stamp (one clock), the first {plan.stream_skip} "
        "dropped. llama-mesh: `StreamEvents` (gRPC, direct); in-process: "
        f"`handler.stream_events()`; 0.8.1: {plan.ld08_stream_events} events through "
        "`GET /deployments/bench/tasks/{id}/events` (it hands out about one event per "
        "0.1 s poll).",
        "- disk: the ceiling is what "
        f"{plan.clients} concurrent clients get publishing 200-byte messages to one "
        "file-backed stream of the same nats-server; writes per task are the streams' "
        "stored messages (sequence numbers) during the throughput window, plus one tombstone "
        "per task message acknowledged off a work-queue stream, heartbeats left out (a "
        "purge moves no sequence number: not counted there); fsyncs per task are "
        "nats-server's fsync and fdatasync system calls, counted by `perf stat` on their "
        "tracepoints (`syscalls:sys_enter_fsync`, `syscalls:sys_enter_fdatasync`) over the "
        "throughput window and the drain after it: every write, tombstone and purge, the "
        "consumers' state and the replicas' heartbeats.",
        f"- memory: RSS (`VmRSS`, median of 5 readings) before and after creating "
        f"{plan.memory_count} sessions, or {plan.memory_count} tasks queued behind a `gate` "
        "replica busy with its first one (`max-concurrent-tasks: 1`), scaled to 1,000. "
        "llama-mesh: the API server process, nats-server and the gate worker, plus the "
        "growth of the JetStream store on disk; in-process: a fresh interpreter holding that "
        "many `Context(workflow)` objects, or that many started `workflow.run()` handlers "
        f"parked in their step; 0.8.1 ({plan.ld08_memory_count} of each): its one process, "
        "which holds its control plane, queue and services.",
    ]
    if results.brokers:
        lines.append(
            "- on RabbitMQ / Redis: the same echo deployments (`bench`, `bench-2r`) with "
            "`message-queue: {type: rabbitmq|redis, url: ...}`, on a server of their own "
            "started as the tests start it (tests/fixtures/rabbitmq.py: quorum queues; "
            "tests/fixtures/redis.py: `appendonly yes`, `appendfsync always`); the latency "
            "and throughput phases as above. The task records and results stay in the "
            "server's embedded NATS (fsynced): only the task messages change broker."
        )
    for figures, key, label in _throughput_runs(results):
        tp: Throughput | None = figures.get(key)
        if tp is not None:
            cpu = ", ".join(f"{k} {v:.2f}" for k, v in tp.cpu_ms_per_task.items())
            lines.append(
                f"- llama-mesh CPU per task, {label} (ms): {cpu}; {tp.tasks} tasks, "
                f"failed: {tp.failure_text}"
            )
            if tp.writes:
                writes = ", ".join(f"{k} {v / tp.tasks:.2f}" for k, v in sorted(tp.writes.items()))
                lines.append(f"- JetStream writes per task, {label}, by stream: {writes}")
            paired: Throughput | None = figures.get("baseline", {}).get(key)
            if paired is not None:
                lines.append(
                    f"- in-process CPU per task next to it, {label} (ms): "
                    f"{paired.cpu_ms_per_task['bench process']:.3f} ({paired.tasks} tasks); "
                    f"llama-mesh's all processes together: "
                    f"{_x(_div(sum(tp.cpu_ms_per_task.values()), 1e3 / paired.per_cpu_second))}"
                )
    if base_tp is not None:
        cpu = ", ".join(f"{k} {v:.3f}" for k, v in base_tp.cpu_ms_per_task.items())
        lines.append(
            f"- in-process CPU per task, the in-process phase (ms): {cpu}; {base_tp.tasks} "
            f"tasks in {base_tp.seconds:.1f} s. The in-process column's throughput is 1,000 / "
            "the CPU per task (tasks per CPU-second, one core), the target's basis: on this "
            "shared machine a process does not always get a whole core"
        )
    if results.pairing is not None:
        pairing = results.pairing
        lines.append(
            "- the in-process column of each llama-mesh row is the in-process run measured "
            "next to that row, as this machine's speed drifts over minutes: a latency row's "
            f"loop ran {pairing.block} in-process `workflow.run` back to back (after "
            f"{BLOCK_WARMUP} not counted) before each {pairing.block} of its calls; a "
            "throughput row's window had an in-process window of "
            f"{pairing.seconds:.0f} s ({pairing.clients} loops) just before and just after "
            "it (pooled). The in-process phase's own figures are the rows "
            "without llama-mesh (streaming, memory) and the line above"
        )
    if ld_tp is not None:
        cpu = ", ".join(f"{k} {v:.1f}" for k, v in ld_tp.cpu_ms_per_task.items())
        lines.append(
            f"- 0.8.1 CPU per task (ms): {cpu}; {ld_tp.tasks} tasks, failed: {ld_tp.failure_text}"
        )
    samples = [
        (key, results.mesh.get(key))
        for key in ("grpc", "grpc_again", "grpc_gateway", "json_v1", "json_v1_httpx", "json_08")
    ]
    samples += [(f"{kind} grpc", figures.get("grpc")) for kind, figures in results.brokers.items()]
    for key, sample in samples:
        if sample is not None and (sample.timeouts or sample.errors):
            lines.append(
                f"- **{key}: {sample.timeouts} of {len(sample)} calls hit the "
                f"{plan.deadline:.0f} s deadline, {sample.errors} failed**"
            )
    grpc_samples = [("", results.mesh.get("grpc"))]
    grpc_samples += [(f" on {LABELS[k]}", f.get("grpc")) for k, f in results.brokers.items()]
    for where, grpc_sample in grpc_samples:
        if grpc_sample is not None and grpc_sample.segments:
            medians = grpc_sample.segment_medians_ms().items()
            parts = "; ".join(f"{k}: {v:.2f}" for k, v in medians)
            lines.append(
                f"- where the time of a gRPC echo task{where} goes (medians, ms; from the "
                f"task's `created_at`/`started_at`/`finished_at`): {parts}"
            )
    for who, figures in [("llama-mesh", results.mesh), *results.brokers.items()]:
        stuck = figures.get("stuck")
        if stuck:
            lines.append(
                f"- **{stuck} {who} tasks were still RUNNING after their clients gave up; "
                "the benchmark cancelled them before stopping**"
            )
    return lines + [f"- note: {note}" for note in results.notes]


def report(plan: Plan, results: Results) -> str:
    """The whole Markdown report."""
    return "\n".join(
        [
            "## llama-mesh benchmark",
            "",
            *environment(results.ld08.get("versions"), results.brokers),
            "",
            table(results),
            "",
            "How each figure was measured:",
            "",
            *method(plan, results),
            "",
        ]
    )
