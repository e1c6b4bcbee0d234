"""A real ``serve`` configured only by the Llama Deploy 0.8 API server's variables.

As a 0.8 container image starts it: ``LLAMA_DEPLOY_APISERVER_PORT``, ``_RC_PATH`` (a
folder of deployment files to deploy at start-up) and ``_PROMETHEUS_PORT``, no flags for
any of them.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from pathlib import Path

import httpx

from llama_mesh.server.ports import free_port
from tests.fixtures.mesh import TESTAPP

START_TIMEOUT = 120.0


async def test_serve_honours_the_0_8_server_variables(tmp_path: Path) -> None:
    """The gateway listens on LLAMA_DEPLOY_APISERVER_PORT, every YAML file of the rc folder
    is deployed (one that fails is reported and skipped, as 0.8 did), tasks run on them, and
    metrics are served on LLAMA_DEPLOY_APISERVER_PROMETHEUS_PORT."""
    rc = tmp_path / "rc"
    shutil.copytree(TESTAPP.parent, rc)
    (rc / "broken.yaml").write_text("name: broken\nservices:\n  a:\n    nme: b\n")
    (rc / "readme.txt").write_text("not a deployment")
    port, metrics_port = free_port(), free_port()
    env = {
        **os.environ,
        "LLAMA_DEPLOY_APISERVER_PORT": str(port),
        "LLAMA_DEPLOY_APISERVER_RC_PATH": str(rc),
        "LLAMA_DEPLOY_APISERVER_PROMETHEUS_PORT": str(metrics_port),
        "LLAMA_DEPLOY_APISERVER_DEPLOYMENTS_PATH": str(tmp_path / "unused"),
    }
    for name in ("LLAMA_MESH_PORT", "LLAMA_MESH_RC_PATH", "LLAMA_MESH_METRICS_PORT"):
        env.pop(name, None)
    command = [sys.executable, "-m", "llama_mesh.server", "--queue", "inprocess"]
    command += ["--data-dir", str(tmp_path / "data"), "--grpc-port", str(free_port())]
    log = tmp_path / "serve.log"
    with log.open("ab") as stderr:
        process = await asyncio.create_subprocess_exec(
            *command,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
        )
    lines: list[str] = []
    try:
        assert process.stdout is not None
        async with asyncio.timeout(START_TIMEOUT):
            while "ready on" not in (lines[-1] if lines else ""):
                raw = await process.stdout.readline()
                assert raw, f"serve exited before ready:\n{log.read_text()}"
                lines.append(raw.decode().rstrip())
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            listed = await http.get("/deployments/")
            ran = await http.post(
                "/deployments/testapp/tasks/run", json={"input": json.dumps({"message": "rc"})}
            )
            metrics = await http.get(f"http://127.0.0.1:{metrics_port}/metrics")
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 60)

    assert f"llama-mesh: gateway  http://127.0.0.1:{port} " in "\n".join(lines) + " "
    assert f"llama-mesh: rc folder {rc}: 2 deployment file(s)" in lines
    assert f"llama-mesh: deployed testapp from {rc / 'deployment.yml'}" in lines
    assert any("LLAMA_DEPLOY_APISERVER_DEPLOYMENTS_PATH is not used" in line for line in lines)
    assert f"cannot deploy {rc / 'broken.yaml'}" in log.read_text()
    assert listed.status_code == 200 and [d["name"] for d in listed.json()] == ["testapp"]
    assert ran.status_code == 200 and ran.json() == "echo: rc"
    assert metrics.status_code == 200 and "llama_mesh" in metrics.text
