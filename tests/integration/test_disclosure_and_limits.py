"""Errors about a file's content never quote it, and a deployment cannot ask for more than
the server's limits: through the real deploy path of a running server."""

from __future__ import annotations

from pathlib import Path

import pytest

from llama_mesh.server.app import ServerSettings
from llama_mesh.server.errors import FailedPreconditionError, InvalidArgumentError
from llama_mesh.server.serve import build_parser, settings_from_args
from tests.fixtures.mesh import MeshFactory

SHADOW = "root:*:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n"
SECRET = "root:*:19000"

APP = """\
name: peek
services:
  a:
    name: A
    source: {type: local, name: .}
    path: wf:a
    replicas: %(replicas)d
    env-files: [%(env_file)s]
"""


def fake_root(tmp_path: Path) -> Path:
    """A directory standing for ``/``, with an ``etc/shadow`` and a harmless ``.env``."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "shadow").write_text(SHADOW)
    (root / ".env").write_text("A=1\n")
    return root


async def test_an_env_file_that_is_not_one_is_not_quoted(
    mesh_factory: MeshFactory, tmp_path: Path
) -> None:
    """``env-files: [etc/shadow]`` with ``base_path`` at the root fails naming the file and
    the line, but neither the error nor the stored deployment quotes the file."""
    server = await mesh_factory()
    root = fake_root(tmp_path)
    config = APP % {"replicas": 1, "env_file": "etc/shadow"}
    with pytest.raises(FailedPreconditionError) as failed:
        await server.mesh.deployments.create(config, base_path=str(root), reload=False, local=True)
    assert f"{root}/etc/shadow:1: expected KEY=VALUE" in failed.value.message
    assert SECRET not in str(failed.value) and "daemon" not in str(failed.value)
    stored = await server.mesh.cp.get_deployment("peek")
    assert stored.status_message and SECRET not in stored.status_message


async def test_a_deployment_file_that_is_not_yaml_is_not_quoted(
    mesh_factory: MeshFactory, tmp_path: Path
) -> None:
    """A password file uploaded as the deployment file is refused (its lines parse as
    unknown keys) without its text; so is an ``env`` value of the wrong type (it may be a
    secret)."""
    server = await mesh_factory()
    with pytest.raises(InvalidArgumentError) as refused:
        await server.mesh.deployments.create(
            SHADOW, base_path=str(tmp_path), reload=False, local=True
        )
    assert "unknown key (not shown" in refused.value.message
    assert SECRET not in refused.value.message and "daemon" not in refused.value.message
    numeric = APP.replace("    env-files: [%(env_file)s]\n", "    env: {TOKEN: 8675309123}\n")
    with pytest.raises(InvalidArgumentError) as typed:
        await server.mesh.deployments.create(
            numeric % {"replicas": 1}, base_path=str(tmp_path), reload=False, local=True
        )
    assert "services.a.env.TOKEN" in typed.value.message
    assert "8675309123" not in typed.value.message


async def test_replicas_are_capped_by_the_server(mesh_factory: MeshFactory, tmp_path: Path) -> None:
    """``replicas`` above ``--max-replicas`` is INVALID_ARGUMENT naming the key, the value
    and the option, before anything is stored; at the limit it deploys."""
    server = await mesh_factory(max_replicas=3)
    root = fake_root(tmp_path)
    (root / "wf.py").write_text(
        "from workflows import Workflow, step\n"
        "from workflows.events import StartEvent, StopEvent\n\n"
        "class A(Workflow):\n"
        "    @step\n"
        "    async def go(self, ev: StartEvent) -> StopEvent:\n"
        "        return StopEvent(result='ok')\n\n"
        "a = A()\n"
    )
    for replicas in (4, 1_000_000):
        config = APP % {"replicas": replicas, "env_file": ".env"}
        with pytest.raises(InvalidArgumentError) as refused:
            await server.mesh.deployments.create(
                config, base_path=str(root), reload=False, local=True
            )
        message = refused.value.message
        assert "services.a.replicas" in message and str(replicas) in message
        assert "--max-replicas" in message and "3" in message
        assert refused.value.metadata == {"key": "services.a.replicas"}
    assert await server.mesh.cp.list_deployments() == []
    config = APP % {"replicas": 3, "env_file": ".env"}
    await server.mesh.deployments.create(config, base_path=str(root), reload=False, local=True)
    task = await server.mesh.run_task("peek", service_id="a", session_id=None, input={})
    assert task.result == "ok"


def test_max_replicas_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--max-replicas`` (or ``LLAMA_MESH_MAX_REPLICAS``) sets the limit, 16 by default;
    below 1 is refused naming the option."""
    data = ["--data-dir", str(tmp_path)]
    assert settings_from_args(build_parser().parse_args(data)).max_replicas == 16
    monkeypatch.setenv("LLAMA_MESH_MAX_REPLICAS", "7")
    assert settings_from_args(build_parser().parse_args(data)).max_replicas == 7
    args = [*data, "--max-replicas", "2"]
    assert settings_from_args(build_parser().parse_args(args)).max_replicas == 2
    with pytest.raises(ValueError, match="--max-replicas"):
        ServerSettings(data_dir=tmp_path, max_replicas=0)
