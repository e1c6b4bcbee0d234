"""Workflows written against llama-index-core run unchanged, driven by the 0.8.1 client.

Two deployments on one real server (embedded nats-server, worker processes, Envoy):

- ``examples/llama_deploy_08``, exactly as a Llama Deploy 0.8 user writes it: imports from
  ``llama_index.core.workflow``, no ``python-dependencies``; it runs on the llama-index-core
  of the default worker environment. Its own ``client.py`` drives it with the released client.
- ``tests/data/legacy_core``, pinning ``llama-index-core==0.12.15`` (whose ``Workflow`` is
  not a ``workflows.Workflow``): its workers run in the deployment's own virtualenv. That
  build is slow, so its environment is kept between runs (``.venv-workers`` at the
  repository root, or ``$LLAMA_MESH_WORKER_VENVS``), as the compat virtualenv is.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from llama_mesh.client import AsyncClient, TaskStatus
from llama_mesh.server.app import MeshServer, ServerSettings
from llama_mesh.server.ports import free_port
from tests.compat.conftest import REPO, CompatPython, CompatVenv, run_compat_script

pytestmark = [pytest.mark.compat, pytest.mark.asyncio(loop_scope="module")]

EXAMPLE = REPO / "examples" / "llama_deploy_08"
LEGACY = REPO / "tests" / "data" / "legacy_core"


def _worker_venvs() -> Path:
    configured = os.environ.get("LLAMA_MESH_WORKER_VENVS")
    return Path(configured) if configured else REPO / ".venv-workers"


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[MeshServer]:
    """A real server with the 0.8 example deployed; its deployment virtualenvs are cached."""
    data_dir = tmp_path_factory.mktemp("llama-index-core")
    cache = _worker_venvs()
    cache.mkdir(parents=True, exist_ok=True)
    (data_dir / "venvs").symlink_to(cache, target_is_directory=True)
    server = await MeshServer.start(
        ServerSettings(
            data_dir=data_dir,
            port=0,
            queue="nats",
            gateway=True,
            ack_wait=5.0,
            ready_timeout=120.0,
        )
    )
    try:
        # The example asks for control plane port 8000; a test takes a free one instead.
        text = (EXAMPLE / "deployment.yml").read_text()
        assert "port: 8000" in text
        await server.mesh.deployments.create(
            text.replace("port: 8000", f"port: {free_port()}").encode(),
            base_path=str(EXAMPLE),
            reload=False,
            local=True,
        )
        yield server
    finally:
        await server.shutdown()


@pytest.fixture(scope="module")
def gateway(server: MeshServer) -> str:
    assert server.gateway_url is not None
    return server.gateway_url


def control_plane_url(server: MeshServer, deployment: str) -> str:
    """Where ``deployment``'s 0.8 control plane routes (``control-plane.port``) answer."""
    control_planes = server.mesh.deployments.control_planes
    assert control_planes is not None
    return f"http://127.0.0.1:{control_planes.served[deployment]}"


async def test_the_0_8_example_runs_with_the_0_8_client(
    server: MeshServer, gateway: str, compat_venv: CompatVenv, client_home: Path
) -> None:
    """The example written for Llama Deploy 0.8 (llama_index.core imports, nothing added to
    its YAML) runs on the default worker environment: its client.py, on the released
    client, gets the default service's result, streamed events, a human-in-the-loop answer
    taken by the running task, a session's context kept between runs, and an error."""
    cp_url = control_plane_url(server, "llama_deploy_08")
    out = await run_compat_script(
        compat_venv, EXAMPLE / "client.py", gateway, cp_url, home=client_home, timeout=180.0
    )
    assert out["echo"] == "Message received: hello"
    assert [e["step"] for e in out["events"] if "step" in e] == [0, 1, 2]
    assert out["streamed_result"] == "Message received: stream"
    assert out["question"] == "What is your name?"
    assert out["greeting"] == "Hello, Ada!"
    assert out["counts"] == ["1", "2"]
    assert "500" in out["failure"] or "asked to fail" in out["failure"]
    assert out["services"] == ["counter_workflow", "echo_workflow", "greeter_workflow"]
    assert out["core_echo"] == "Message received: from the control plane"


LEGACY_SNIPPET = """
import asyncio, json
from llama_deploy import Client
from llama_deploy.types import TaskDefinition
from llama_index.core.workflow.events import HumanResponseEvent


def task(service_id=None, session_id=None, **kwargs):
    return TaskDefinition(input=json.dumps(kwargs), service_id=service_id, session_id=session_id)


async def main():
    out = {}
    client = Client(api_server_url=URL, timeout=60)
    d = await client.apiserver.deployments.get("legacy_core")
    out["run"] = await d.tasks.run(task(message="hi"))
    t = await d.tasks.create(task("echo", message="streamed", count=3))
    out["events"] = [ev async for ev in t.events()]
    out["streamed"] = (await t.results()).result
    g = await d.tasks.create(task("greeter"))
    stream = g.events()
    async for ev in stream:
        if "prefix" in ev:
            out["question"] = ev["prefix"]
            break
    await stream.aclose()
    await g.send_event(HumanResponseEvent(response="Grace"), service_name="greeter")
    out["greeting"] = (await g.results()).result
    session = await d.sessions.create()
    out["counts"] = [
        await d.tasks.run(task("counter", session.session_id)) for _ in range(3)
    ]
    other = await d.sessions.create()
    out["other"] = await d.tasks.run(task("counter", other.session_id))
    try:
        await d.tasks.run(task(message="fail"))
        out["failure"] = None
    except Exception as exc:
        out["failure"] = {"status": exc.response.status_code, "body": exc.response.text}
    print(json.dumps(out))


asyncio.run(main())
"""


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def legacy(server: MeshServer) -> str:
    """``tests/data/legacy_core`` deployed (its llama-index-core 0.12.15 virtualenv built
    on first use, then reused)."""
    return await server.deploy_file(LEGACY / "deployment.yml")


@pytest.mark.slow
async def test_a_pinned_llama_index_core_0_12_runs_with_the_0_8_client(
    legacy: str, gateway: str, compat_python: CompatPython
) -> None:
    """A deployment pinning llama-index-core==0.12.15 runs: a result, streamed events,
    human in the loop (the client's 0.12 HumanResponseEvent into the running task),
    session context (ctx.set/ctx.get with that version's serializer) kept per session,
    and a workflow's error as the task's error."""
    out: dict[str, Any] = await compat_python(
        f"URL = {gateway!r}\n" + LEGACY_SNIPPET, timeout=300.0
    )
    assert out["run"] == "echo: hi"
    assert [e["step"] for e in out["events"] if "step" in e] == [0, 1, 2]
    assert out["streamed"] == "echo: streamed"
    assert out["question"] == "Name?"
    assert out["greeting"] == "Hello, Grace!"
    assert out["counts"] == ["1", "2", "3"]
    assert out["other"] == "1"
    assert out["failure"]["status"] >= 400
    assert "asked to fail" in out["failure"]["body"]


@pytest.mark.slow
async def test_a_pinned_llama_index_core_0_12_times_out_and_cancels(
    legacy: str, server: MeshServer
) -> None:
    """Under llama-index-core 0.12.15 the workflow's own timeout fails the task with that
    version's WorkflowTimeoutError, and a cancelled task (waiting for input) ends
    CANCELLED with the reason given."""
    async with AsyncClient(f"127.0.0.1:{server.grpc_port}") as client:
        slow = await client.tasks.create(legacy, {"seconds": 120}, service="slow")
        waiting = await client.tasks.create(legacy, {}, service="greeter")
        async for event in client.tasks.events(legacy, waiting.task_id):
            if event.data.get("prefix") == "Name?":
                break
        await client.tasks.cancel(legacy, waiting.task_id, reason="no answer")
        async for event in client.tasks.events(legacy, waiting.task_id):
            if event.is_final:
                break
        cancelled = await client.tasks.get(legacy, waiting.task_id)
        async for event in client.tasks.events(legacy, slow.task_id):
            if event.is_final:
                break
        timed_out = await client.tasks.get(legacy, slow.task_id)
    assert cancelled.status is TaskStatus.CANCELLED
    assert cancelled.error is not None and "no answer" in cancelled.error.message
    assert timed_out.status is TaskStatus.FAILED
    assert timed_out.error is not None and timed_out.error.type == "WorkflowTimeoutError"
