"""Llama Deploy 0.8.1 serving the same workflows, for comparison.

0.8.1 runs in its own virtualenv (``llama-deploy==0.8.1``, ``llama-index-core==0.12.15``):
the one the compatibility tests build (``.venv-compat``, or ``$LLAMA_MESH_COMPAT_VENV``),
built here the same way when missing. Its API server is started with uvicorn on a free port
of 127.0.0.1; its workflow services would bind ``0.0.0.0`` (hard-coded ``internal_host``),
so the launcher rewrites that host to 127.0.0.1. One process holds everything (API server,
control plane, simple message queue, services, each deployment in a thread of its own), so
its memory is that process's RSS.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench._apps import DEPLOYMENT, write_ld08_app
from bench._procs import cpu_seconds, settled_rss
from bench._stats import Latencies, Memory, Throughput, per_1000_mib
from llama_mesh.server.ports import free_port

REPO = Path(__file__).resolve().parent.parent
REQUIREMENTS = ("llama-deploy==0.8.1", "llama-index-core==0.12.15")
STAMP = ".llama-mesh-compat"
"""The file the compat test fixture writes into the virtualenv: its requirement set."""
READY_TIMEOUT = 90.0
STOP_GRACE = 5.0
TAIL = 5.0
"""Seconds past a throughput window that calls already started may take to finish."""

LAUNCHER = """\
import sys
import uvicorn

_init = uvicorn.Config.__init__


def _loopback(self, *args, **kwargs):
    if kwargs.get("host") in (None, "0.0.0.0", "::"):
        kwargs["host"] = "127.0.0.1"
    _init(self, *args, **kwargs)


uvicorn.Config.__init__ = _loopback
uvicorn.run(
    "llama_deploy.apiserver:app", host="127.0.0.1", port=int(sys.argv[1]), log_level="warning"
)
"""


def venv_dir() -> Path:
    """The virtualenv with 0.8.1 (shared with the compat tests)."""
    configured = os.environ.get("LLAMA_MESH_COMPAT_VENV")
    return Path(configured) if configured else REPO / ".venv-compat"


def ensure_venv() -> Path:
    """The 0.8.1 interpreter, building its virtualenv with uv when needed."""
    venv = venv_dir()
    python = venv / "bin" / "python"
    wanted = "\n".join(REQUIREMENTS) + "\n"
    stamp = venv / STAMP
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    uv = Path(sys.executable).parent / "uv"
    base = Path(sys.base_prefix) / "bin" / "python3.11"
    interpreter = str(base) if base.exists() else "3.11"
    stamp.unlink(missing_ok=True)
    for args in (
        ["venv", "--quiet", "--allow-existing", "--python", interpreter, str(venv)],
        ["pip", "install", "--quiet", "--python", str(python), *REQUIREMENTS],
    ):
        subprocess.run([str(uv), *args], check=True, timeout=900)
    stamp.write_text(wanted)
    return python


def versions(python: Path) -> str:
    """``llama-deploy X, llama-index-core Y`` as installed in the 0.8.1 virtualenv."""
    code = (
        "from importlib.metadata import version as v;"
        "print(f\"llama-deploy {v('llama-deploy')}, llama-index-core {v('llama-index-core')}\")"
    )
    out = subprocess.run(
        [str(python), "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    return out.stdout.strip() or "unknown"


@dataclass
class Ld08Server:
    """A running 0.8.1 API server with the benchmark deployment."""

    process: asyncio.subprocess.Process
    base_url: str
    client: httpx.AsyncClient


@contextlib.asynccontextmanager
async def run_server(work: Path, python: Path) -> AsyncIterator[Ld08Server]:
    """Start 0.8.1's API server, deploy the benchmark app, stop its process group at the end."""
    app_dir = work / "ld08-app"
    ports = {
        k: free_port() for k in ("api", "control_plane", "message_queue", "echo", "stream", "gate")
    }
    deployment_file = write_ld08_app(app_dir, ports)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(work),
        "LANG": "C.UTF-8",
        "PYTHONWARNINGS": "ignore",
        "LLAMA_DEPLOY_APISERVER_PROMETHEUS_ENABLED": "false",
        "LLAMA_DEPLOY_APISERVER_RC_PATH": str(work / "ld08-rc"),
        # With local=true, 0.8.1 resolves service paths against the deployments path.
        "LLAMA_DEPLOY_APISERVER_DEPLOYMENTS_PATH": str(app_dir),
    }
    log = (work / "ld08-server.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        str(python),
        "-c",
        LAUNCHER,
        str(ports["api"]),
        cwd=work,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    base_url = f"http://127.0.0.1:{ports['api']}"
    try:
        async with httpx.AsyncClient(base_url=base_url, timeout=30.0) as client:
            await _wait_ready(client, process)
            response = await client.post(
                "/deployments/create",
                params={"base_path": str(app_dir), "local": "true"},
                files={"config_file": ("deployment.yml", deployment_file.read_bytes())},
            )
            response.raise_for_status()
            server = Ld08Server(process, base_url, client)
            await _wait_service(server)
            yield server
    finally:
        await _stop(process)
        log.close()


async def _wait_ready(client: httpx.AsyncClient, process: asyncio.subprocess.Process) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if process.returncode is not None:
            raise RuntimeError("the Llama Deploy 0.8.1 server exited at start")
        with contextlib.suppress(httpx.HTTPError):
            if (await client.get("/status/", timeout=2.0)).status_code == 200:
                return
        await asyncio.sleep(0.2)
    raise RuntimeError("the Llama Deploy 0.8.1 server did not answer /status/")


async def _wait_service(server: Ld08Server) -> None:
    """Run echo tasks until one succeeds: 0.8.1 returns from create before its services run."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            response = await server.client.post(
                f"/deployments/{DEPLOYMENT}/tasks/run", json=_body({"message": "hi"}), timeout=10
            )
            if response.status_code == 200:
                return
        await asyncio.sleep(0.5)
    raise RuntimeError("the Llama Deploy 0.8.1 echo service never answered")


async def _stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is not None:
        return
    for sig, wait in ((signal.SIGTERM, STOP_GRACE), (signal.SIGKILL, STOP_GRACE)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)  # its own session: the launcher and its threads
        try:
            await asyncio.wait_for(process.wait(), wait)
            return
        except TimeoutError:
            continue


def _body(values: dict[str, Any], service: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"input": json.dumps(values)}
    if service:
        body["service_id"] = service
    return body


async def latency(server: Ld08Server, *, iterations: int, warmup: int) -> Latencies:
    """Sequential ``POST /deployments/bench/tasks/run`` of the echo task."""
    sample = Latencies()
    path = f"/deployments/{DEPLOYMENT}/tasks/run"
    for i in range(warmup + iterations):
        started = time.perf_counter()
        response = await server.client.post(path, json=_body({"message": "hi"}))
        elapsed = time.perf_counter() - started
        if i >= warmup:
            sample.add(elapsed)
            sample.errors += response.status_code != 200
    return sample


async def throughput(server: Ld08Server, *, clients: int, seconds: float) -> Throughput:
    """``clients`` concurrent ``tasks/run`` loops for ``seconds``."""
    done = failures = 0
    stop_at = time.perf_counter() + seconds
    path = f"/deployments/{DEPLOYMENT}/tasks/run"
    limits = httpx.Limits(max_connections=clients)

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal done, failures
        while time.perf_counter() < stop_at:
            try:
                ok = (await http.post(path, json=_body({"message": "hi"}))).status_code == 200
            except httpx.HTTPError:
                ok = False
            done += ok
            failures += not ok

    pid = server.process.pid
    cpu = cpu_seconds(pid)
    async with httpx.AsyncClient(base_url=server.base_url, timeout=60, limits=limits) as http:
        started = time.perf_counter()
        # Calls still running well past the window are abandoned (not counted).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds + TAIL):
                await asyncio.gather(*(client(http) for _ in range(clients)))
        elapsed = time.perf_counter() - started
    cpu_ms = (cpu_seconds(pid) - cpu) * 1e3 / max(done, 1)
    failed = {"failed": failures} if failures else {}
    return Throughput(done, elapsed, clients, failed, {"0.8.1 process": cpu_ms})


async def streaming(server: Ld08Server, *, count: int, interval: float, skip: int) -> Latencies:
    """Receive time minus write time of each ``Stamp`` event, over the NDJSON event stream."""
    sample = Latencies()
    values = {"count": count, "interval": interval, "start_delay": 0.3}
    created = await server.client.post(
        f"/deployments/{DEPLOYMENT}/tasks/create", json=_body(values, "stream")
    )
    created.raise_for_status()
    task = created.json()
    path = f"/deployments/{DEPLOYMENT}/tasks/{task['task_id']}/events"
    params = {"session_id": task["session_id"]}
    timeout = 60 + count * interval
    async with server.client.stream("GET", path, params=params, timeout=timeout) as response:
        async for line in response.aiter_lines():
            if not line.strip():
                continue
            received = time.time_ns()
            stamp = _find(json.loads(line))
            if stamp is not None and stamp[0] >= skip:
                sample.add((received - stamp[1]) / 1e9)
    return sample


def _find(value: Any) -> tuple[int, int] | None:
    """``(seq, t_ns)`` wherever they sit in a serialized event."""
    if isinstance(value, dict):
        if "t_ns" in value and "seq" in value:
            return int(value["seq"]), int(value["t_ns"])
        for item in value.values():
            found = _find(item)
            if found is not None:
                return found
    if isinstance(value, str) and "t_ns" in value:
        with contextlib.suppress(ValueError):
            return _find(json.loads(value))
    return None


async def memory_sessions(server: Ld08Server, *, count: int, concurrency: int) -> Memory:
    """RSS added to the 0.8.1 process by ``count`` sessions."""
    path = f"/deployments/{DEPLOYMENT}/sessions/create"
    return await _memory(server, count, concurrency, lambda: server.client.post(path))


async def memory_queued(server: Ld08Server, *, count: int, concurrency: int) -> Memory:
    """RSS added by ``count`` ``gate`` tasks (0.8.1 runs 8 at once and holds the rest)."""
    path = f"/deployments/{DEPLOYMENT}/tasks/create"
    body = _body({"seconds": 3600}, "gate")
    return await _memory(server, count, concurrency, lambda: server.client.post(path, json=body))


async def _memory(server: Ld08Server, count: int, concurrency: int, call: Any) -> Memory:
    pid = server.process.pid
    before = (await settled_rss({"0.8.1": pid}))["0.8.1"]
    remaining = count
    failures = 0

    async def lane() -> None:
        nonlocal remaining, failures
        while remaining > 0:
            remaining -= 1
            response = await call()
            failures += response.status_code != 200

    await asyncio.gather(*(lane() for _ in range(min(concurrency, count))))
    after = (await settled_rss({"0.8.1": pid}))["0.8.1"]
    return Memory(count, {"0.8.1 process": per_1000_mib(after - before, count)}, failures=failures)
