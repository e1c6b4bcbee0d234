"""The README's examples run as written, against a server started the way the README says.

The server is ``./dev serve`` (every ``examples/*/deployment.yml``), with ``--port 0`` so
that the gateway takes a free port, and with fresh ``XDG_DATA_HOME`` and
``XDG_CONFIG_HOME`` so that it neither reads nor writes the user's state and profiles.

Blocks preceded by ``<!-- readme-test -->`` are executed from the repository root with the
environment a newcomer has (no virtual environment on ``PATH``): ``python`` blocks by the
venv's interpreter (what ``.venv/bin/python example.py`` runs), ``bash`` blocks with
``bash -euo pipefail``. ``localhost:4501`` in a block is pointed at the gateway, and so is
``LLAMA_MESH_ADDRESS`` (the address of clients given none, else ``127.0.0.1:4501``).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio
import yaml

pytestmark = pytest.mark.asyncio(loop_scope="module")

ROOT = Path(__file__).resolve().parent.parent.parent
README = ROOT / "README.md"
BLOCK = re.compile(r"<!-- readme-test -->\n```(\w+)\n(.*?)\n```", re.S)
HEADING = re.compile(r"^#{2,3} (.+)$", re.M)
READY = re.compile(r"llama-mesh: ready on http://(127\.0\.0\.1:\d+)")
START_TIMEOUT = 600.0  # ./dev checks the venv, then nats-server, Envoy and every example's workers
STOP_TIMEOUT = 60.0
BLOCK_TIMEOUT = 120.0


@dataclass(frozen=True)
class Block:
    """One tested README block: the section it is in, its language and its code."""

    section: str
    language: str
    code: str


def blocks() -> list[Block]:
    """The README's tested blocks, in order."""
    text = README.read_text()
    found = []
    for match in BLOCK.finditer(text):
        headings = HEADING.findall(text, 0, match.start())
        found.append(Block(headings[-1].strip(), match.group(1), match.group(2)))
    return found


def example_names() -> list[str]:
    """The deployment names of every ``examples/*/deployment.yml``."""
    return sorted(
        yaml.safe_load(path.read_text())["name"] for path in ROOT.glob("examples/*/deployment.yml")
    )


@dataclass
class Served:
    """The running ``./dev serve``: its gateway's host:port and what it printed."""

    address: str
    output: list[str] = field(default_factory=list)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def served(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Served]:
    """``./dev serve --port 0`` in its own process group, stopped with SIGTERM (as Ctrl-C)."""
    home = tmp_path_factory.mktemp("readme")
    env = dict(os.environ)
    env["XDG_DATA_HOME"] = str(home / "data")
    env["XDG_CONFIG_HOME"] = str(home / "config")
    if sys.prefix != sys.base_prefix:  # ./dev's venv is the one running the tests
        env.setdefault("LLAMA_MESH_VENV", sys.prefix)
    for name in list(env):
        if name.startswith("LLAMA_MESH_") and name != "LLAMA_MESH_VENV":
            del env[name]
    proc = await asyncio.create_subprocess_exec(
        str(ROOT / "dev"),
        "serve",
        "--port",
        "0",
        cwd=ROOT,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    assert proc.stdout is not None
    output: list[str] = []
    draining: asyncio.Task[None] | None = None

    async def ready() -> str:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            output.append(line)
            if match := READY.search(line):
                return match.group(1)
        raise AssertionError("./dev serve ended before it was ready:\n" + "\n".join(output))

    async def drain() -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            output.append(raw.decode(errors="replace").rstrip())

    try:
        try:
            address = await asyncio.wait_for(ready(), START_TIMEOUT)
        except TimeoutError:
            pytest.fail("./dev serve was not ready in time:\n" + "\n".join(output))
        draining = asyncio.create_task(drain())
        yield Served(address, output)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if draining is not None:
            await draining


async def test_dev_serve_serves_every_example(served: Served) -> None:
    """``./dev serve`` deploys every ``examples/*/deployment.yml``, those added later too."""
    deployed = {
        match.group(1)
        for line in served.output
        if (match := re.search(r"llama-mesh: deployed (\S+) from examples/", line))
    }
    assert deployed == set(example_names()), "\n".join(served.output)


async def test_readme_has_tested_blocks_for_each_interface() -> None:
    """The quickstart and the Python, CLI and HTTP sections each carry an executed example."""
    sections = {block.section for block in blocks()}
    assert set(PROMISES) <= sections
    assert set(PROMISES) >= sections, "a tested block in a section with no promises"


async def run_block(block: Block, address: str) -> tuple[int, str]:
    code = block.code.replace("localhost:4501", address)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_MESH_")}
    env["LLAMA_MESH_ADDRESS"] = address
    # A newcomer's PATH: without the venv that runs the tests.
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(
        d for d in env.get("PATH", "").split(os.pathsep) if d and d != venv_bin
    )
    env.pop("VIRTUAL_ENV", None)
    if block.language == "python":
        argv = [sys.executable, "-c", code]
    else:
        argv = ["bash", "-euo", "pipefail", "-c", code]
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
        cwd=ROOT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), BLOCK_TIMEOUT)
    return proc.returncode or 0, out.decode(errors="replace")


@pytest.mark.parametrize("index", range(len(blocks())))
async def test_readme_block_runs(served: Served, index: int) -> None:
    """Each tested README block exits 0 and prints what its comments promise."""
    block = blocks()[index]
    if "curl " in block.code and shutil.which("curl") is None:
        pytest.skip("curl is not installed on this machine")
    status, output = await run_block(block, served.address)
    assert status == 0, output
    for text in PROMISES[block.section]:
        assert text in output, f"{text!r} not in the output:\n{output}"


PROMISES = {
    "Quickstart": ["Message received: Hello", '"Message received: Hi"'],
    "Python": [
        "Message received: Hello",
        "3 result {'result': 'counted to 3'}",
        "{'total': 7}",
        "Hello, Ada!",
        "NotFoundError Service 'nope' not found",
    ],
    "llamactl": ["Message received: Hello", '"name": "quickstart"', '"total": 2'],
    "JSON over HTTP": [
        '"status":"Healthy"',
        '"Message received: Hi"',
        'data: {"event":{',
        "TASK_STATUS_SUCCEEDED",
        "Deployment 'nope' not found",
    ],
}
"""What the blocks of each README section must print (the outcomes their comments describe)."""
