"""The README's examples run as written against a real server (NATS, workers, Envoy).

Blocks preceded by ``<!-- readme-test -->`` are executed: ``python`` blocks with this
interpreter, ``bash`` blocks with ``bash -euo pipefail`` and the venv's ``bin`` first on
``PATH``. ``localhost:4501`` is pointed at the test's gateway.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from llama_mesh.server.app import MeshServer, ServerSettings

pytestmark = pytest.mark.asyncio(loop_scope="module")

ROOT = Path(__file__).resolve().parent.parent.parent
EXAMPLES = ("quickstart", "streaming", "human_in_the_loop", "sessions")
BLOCK = re.compile(r"<!-- readme-test -->\n```(\w+)\n(.*?)\n```", re.S)


def blocks() -> list[tuple[str, str]]:
    """The README's tested blocks as (language, code)."""
    return BLOCK.findall((ROOT / "README.md").read_text())


@pytest.mark.asyncio(loop_scope="module")
async def test_readme_has_tested_blocks_for_each_interface() -> None:
    """The Python, CLI and HTTP sections each carry an executed example."""
    languages = [language for language, _ in blocks()]
    assert languages.count("python") >= 1
    assert languages.count("bash") >= 2


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def gateway(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    server = await MeshServer.start(
        ServerSettings(
            data_dir=tmp_path_factory.mktemp("readme"),
            port=0,  # the gateway takes a free port itself: no race for it
            queue="nats",
            gateway=True,
            control_planes=False,
            ack_wait=5.0,
        )
    )
    try:
        for name in EXAMPLES:
            await server.deploy_file(ROOT / "examples" / name / "deployment.yml")
        assert server.gateway_url is not None
        yield server.gateway_url.removeprefix("http://")
    finally:
        await server.shutdown()


async def run_block(language: str, code: str, address: str) -> tuple[int, str]:
    code = code.replace("localhost:4501", address)
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("LLAMA_MESH_API_KEY", None)
    if language == "python":
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
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode or 0, out.decode(errors="replace")


@pytest.mark.parametrize("index", range(len(blocks())))
async def test_readme_block_runs(gateway: str, index: int) -> None:
    """Each tested README block exits 0 and prints what its comments promise."""
    language, code = blocks()[index]
    if "curl " in code and shutil.which("curl") is None:
        pytest.skip("curl is not installed on this machine")
    status, output = await run_block(language, code, gateway)
    assert status == 0, output
    for text in PROMISES[language if language == "python" else _bash_kind(code)]:
        assert text in output, f"{text!r} not in the output:\n{output}"


def _bash_kind(code: str) -> str:
    return "curl" if "curl " in code else "llamactl"


PROMISES = {
    "python": [
        "Message received: Hello",
        "3 result {'result': 'counted to 3'}",
        "{'total': 7}",
        "Hello, Ada!",
        "NotFoundError Service 'nope' not found",
    ],
    "llamactl": ["Message received: Hello", '"name": "quickstart"', '"total": 2'],
    "curl": [
        '"status":"Healthy"',
        '"Message received: Hi"',
        'data: {"event":{',
        "TASK_STATUS_SUCCEEDED",
        "Deployment 'nope' not found",
    ],
}
"""What each kind of block must print (the outcomes its comments describe)."""
