"""``llamactl serve`` as a real process: start-up errors, Ctrl-C, and being killed.

Start-up problems a user can fix are one line and exit status 2, not a traceback; a
terminal's Ctrl-C (SIGINT to the whole foreground process group) stops the server and
every child cleanly and quietly; a SIGKILLed server leaves no worker behind.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from llama_mesh.server.nats_server import NatsServer, NatsServerConfig
from llama_mesh.server.ports import free_port
from tests.helpers import assert_eventually

APP_MODULE = """\
import asyncio

from workflows import Workflow, step
from workflows.events import StartEvent, StopEvent


class Echo(Workflow):
    @step
    async def run_it(self, ev: StartEvent) -> StopEvent:
        return StopEvent(result=ev.get("message"))


class Nap(Workflow):
    @step
    async def run_it(self, ev: StartEvent) -> StopEvent:
        await asyncio.sleep(float(ev.get("seconds", 1)))
        return StopEvent(result="rested")


echo = Echo(timeout=60)
nap = Nap(timeout=600)
"""
APP_YAML = """\
name: tiny
default-service: echo
services:
  echo:
    name: Echo
    source: {type: local, name: src}
    path: src/app:echo
  nap:
    name: Nap
    source: {type: local, name: src}
    path: src/app:nap
"""


def write_app(root: Path) -> Path:
    (root / "src").mkdir(parents=True)
    (root / "src" / "app.py").write_text(APP_MODULE)
    (root / "deployment.yml").write_text(APP_YAML)
    return root / "deployment.yml"


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def children(pid: int) -> dict[int, str]:
    """The live child processes of ``pid`` and their command lines."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid and alive(int(entry.name)):
            found[int(entry.name)] = cmdline(int(entry.name))
    return found


async def run_serve(*args: str | Path, timeout: float = 120) -> tuple[int, str]:
    """Run ``serve`` to its end; its exit status and its output (stdout and stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "llama_mesh.server",
        *map(str, args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    async with asyncio.timeout(timeout):
        out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode()


class Serve:
    """A running ``serve`` in its own process group, as a terminal's foreground job."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.seen: dict[int, str] = {}
        """Child processes seen (killed at teardown should they outlive the test)."""

    def children(self) -> dict[int, str]:
        kids = children(self.proc.pid)
        self.seen.update(kids)
        return kids

    def leftovers(self) -> list[int]:
        """Children seen that still run the same command (not a reused PID)."""
        self.children()
        return [pid for pid, cmd in self.seen.items() if alive(pid) and cmdline(pid) == cmd]

    async def wait_for(self, text: str, timeout: float = 120) -> None:
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            while not any(text in line for line in self.lines):
                line = await self.proc.stdout.readline()
                assert line, "serve ended early:\n" + "".join(self.lines)
                self.lines.append(line.decode())

    async def finish(self, timeout: float = 60) -> int:
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            rest = await self.proc.stdout.read()
            self.lines.append(rest.decode())
            return await self.proc.wait()

    @property
    def output(self) -> str:
        return "".join(self.lines)


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Serve]:
    app = write_app(tmp_path / "app")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "llama_mesh.server",
        "--data-dir",
        str(tmp_path / "data"),
        "--port",
        "0",
        str(app),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    running = Serve(proc)
    try:
        yield running
    finally:
        if proc.returncode is None:
            proc.kill()
        for pid in running.leftovers():
            os.kill(pid, signal.SIGKILL)
        if proc.returncode is None:
            await proc.wait()


async def test_ctrl_c_stops_serve_and_its_children_quietly(serve: Serve) -> None:
    """SIGINT to serve's whole process group (what a terminal's Ctrl-C does) stops serve
    with status 0 and no error, warning or restart lines, and every child (nats-server,
    Envoy, the worker) is gone."""
    await serve.wait_for("ready on")
    kids = serve.children()
    assert any("nats-server" in c for c in kids.values())
    assert any("llama_mesh.server.service" in c for c in kids.values())

    os.killpg(serve.proc.pid, signal.SIGINT)
    status = await serve.finish()

    assert status == 0, serve.output
    stopping = serve.output.split("llama-mesh: stopping", 1)[1]
    for noise in (" ERROR ", " WARNING ", "restarting", "Traceback"):
        assert noise not in stopping, serve.output
    assert [pid for pid in kids if alive(pid)] == []


async def test_a_killed_serve_leaves_no_worker_behind(serve: Serve) -> None:
    """After SIGKILL of serve, its worker processes (and nats-server, Envoy) exit by
    themselves, within seconds even when a worker is running a long task (it used to finish
    it first, retrying its dead NATS, for minutes)."""
    await serve.wait_for("ready on")
    kids = serve.children()
    workers = [pid for pid, cmd in kids.items() if "llama_mesh.server.service" in cmd]
    assert len(workers) == 2
    gateway = serve.output.split("gateway  ", 1)[1].split()[0]
    async with httpx.AsyncClient(base_url=gateway, timeout=30) as http:
        created = await http.post(
            "/v1/deployments/tiny/tasks", json={"service_id": "nap", "input": {"seconds": 600}}
        )
        task_id = created.json()["task"]["task_id"]

        async def running() -> bool:
            task = (await http.get(f"/v1/deployments/tiny/tasks/{task_id}")).json()["task"]
            return bool(task["status"] == "TASK_STATUS_RUNNING")

        await assert_eventually(running, timeout=60, interval=0.2)

    serve.proc.kill()
    await serve.proc.wait()

    await assert_eventually(lambda: not any(alive(pid) for pid in kids), timeout=60, interval=0.2)


@pytest.mark.parametrize("option", ["--port", "--grpc-port", "--metrics-port"])
async def test_a_port_in_use_is_one_line_and_exit_2(tmp_path: Path, option: str) -> None:
    """A port already taken stops serve with one line naming the address and the option."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", free_port()))
        taken.listen()
        port = taken.getsockname()[1]
        others = {"--port": "0", "--grpc-port": "0"}
        others.pop(option, None)
        options = [x for pair in others.items() for x in pair]
        status, output = await run_serve(
            "--queue", "inprocess", "--data-dir", tmp_path, *options, option, str(port)
        )

    assert status == 2, output
    assert f"cannot listen on 127.0.0.1:{port} ({option}): the address is in use" in output
    assert "Traceback" not in output


async def test_a_data_dir_in_use_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """A data directory whose store another nats-server holds stops serve with one line."""
    holder = await NatsServer.start(NatsServerConfig(store_dir=tmp_path / "nats"))
    try:
        status, output = await run_serve("--data-dir", tmp_path, "--port", "0")
    finally:
        await holder.stop()

    assert status == 2, output
    assert "is in use by another nats-server" in output
    assert "--data-dir" in output
    assert "Traceback" not in output


async def test_a_deployment_file_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    """serve FILE with a byte that is not UTF-8 names that file and line, and exits 2."""
    bad = tmp_path / "latin1.yml"
    bad.write_bytes(b"name: tiny\n# caf\xe9\n")
    status, output = await run_serve(
        "--queue", "inprocess", "--no-gateway", "--data-dir", tmp_path / "data", bad
    )

    assert status == 2, output
    assert "latin1.yml:2: not valid UTF-8" in output
    assert "Traceback" not in output
