"""Sources and dependencies outside the allow-lists never reach git or the installer.

A real server (gRPC ``CreateDeployment``) with ``--allow-local-root`` and
``--allow-git-prefix``; a real HTTP server that logs every request (a git remote would see
them); packages whose build backend, and a repository whose module, leave a marker file when
they run. Refused entries leave no marker and no request; admitted ones of the same making do
reach the installer and git, so the markers and the log are known to work.
"""

from __future__ import annotations

import http.server
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from llama_mesh.v1 import apiserver_pb2, apiserver_pb2_grpc
from tests.fixtures.mesh import MeshFactory

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")

WORKFLOW = """\
from workflows import Workflow, step
from workflows.events import StartEvent, StopEvent
%(mark)s

class Ok(Workflow):
    @step
    async def go(self, ev: StartEvent) -> StopEvent:
        return StopEvent(result="ok")


wf = Ok()
"""

BACKEND = """\
import pathlib

pathlib.Path(%(marker)r).write_text("built")


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    raise RuntimeError("this backend only leaves a mark")
"""

PYPROJECT = """\
[build-system]
requires = []
build-backend = "backend"
backend-path = ["."]

[project]
name = "%(name)s"
version = "1.0"
"""


@dataclass
class Layout:
    root: Path
    app: Path
    outside: Path
    markers: Path
    prefix: str
    requests: list[str]

    def marks(self) -> list[str]:
        return sorted(p.name for p in self.markers.iterdir())


def marker_package(directory: Path, name: str, marker: Path) -> None:
    """A package whose build backend writes ``marker`` as soon as the installer loads it."""
    directory.mkdir(parents=True)
    (directory / "pyproject.toml").write_text(PYPROJECT % {"name": name})
    (directory / "backend.py").write_text(BACKEND % {"marker": str(marker)})


def marker_repository(bare: Path, marker: Path) -> None:
    """A bare git repository whose workflow module writes ``marker`` when imported; served
    over dumb HTTP too (``update-server-info``)."""
    work = bare.parent / f"{bare.name}-work"
    work.mkdir(parents=True)
    mark = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
    (work / "wf.py").write_text(WORKFLOW % {"mark": mark})
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
    }
    for args in (["init", "-q", "-b", "main"], ["add", "wf.py"], ["commit", "-q", "-m", "x"]):
        subprocess.run(["git", *args], cwd=work, env=env, check=True)
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(bare)], env=env, check=True)
    subprocess.run(["git", "update-server-info"], cwd=bare, env=env, check=True)


@pytest.fixture
def layout(tmp_path: Path) -> Iterator[Layout]:
    """root/app (allowed, with a marker package), outside/ (a marker package and repository),
    and an HTTP server over www/ (the same repository, at /evil.git and /allowed/evil.git)."""
    markers = tmp_path / "markers"
    markers.mkdir()
    root, outside, www = tmp_path / "root", tmp_path / "outside", tmp_path / "www"
    app = root / "app"
    app.mkdir(parents=True)
    (app / "wf.py").write_text(WORKFLOW % {"mark": ""})
    marker_package(app / "goodpkg", "goodpkg", markers / "good-package")
    marker_package(outside / "evilpkg", "evilpkg", markers / "evil-package")
    marker_repository(outside / "evil.git", markers / "evil-repository")
    (www / "allowed").mkdir(parents=True)
    shutil.copytree(outside / "evil.git", www / "evil.git")
    shutil.copytree(outside / "evil.git", www / "allowed" / "evil.git")
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(www), **kwargs)  # type: ignore[arg-type]

        def do_GET(self) -> None:
            requests.append(self.path)
            super().do_GET()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        prefix = f"http://127.0.0.1:{server.server_address[1]}/allowed/"
        yield Layout(root, app, outside, markers, prefix, requests)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def deployment(source: str, dependencies: Sequence[str] = ()) -> str:
    """A one-service deployment of ``kind:name`` with these dependencies."""
    kind, _, name = source.partition(":")
    deps = "".join(f"\n      - {d!r}" for d in dependencies)
    return (
        f"name: probe\nservices:\n  s:\n    name: S\n"
        f"    source: {{type: {kind}, name: {name!r}}}\n    path: wf:wf\n"
        + (f"    python-dependencies:{deps}\n" if deps else "")
    )


async def create(port: int, config: str, base_path: Path) -> grpc.aio.AioRpcError:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = apiserver_pb2_grpc.ApiServerStub(channel)
        request = apiserver_pb2.CreateDeploymentRequest(
            config_yaml=config, base_path=str(base_path), local=True
        )
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await stub.CreateDeployment(request, timeout=300)
    return failed.value


async def test_refused_sources_and_dependencies_never_reach_git_or_the_installer(
    mesh_factory: MeshFactory, layout: Layout
) -> None:
    """Walking-around git URLs, local repositories and packages outside the allowed root,
    and dependency URLs outside the prefix are PERMISSION_DENIED naming the entry and the
    option: git made no request, no build backend or module ran, nothing was cloned or
    built. Admitted entries of the same making reach the installer and git."""
    server = await mesh_factory(
        allowed_local_roots=(layout.root,), allowed_git_prefixes=(layout.prefix,)
    )
    base = layout.prefix.removesuffix("allowed/")
    outside = layout.outside
    refused_sources = [
        f"{base}allowed/%2e%2e/evil.git",
        f"{base}allowed/.%2e/evil.git",
        f"{base}allowed@{base.removeprefix('http://')}evil.git",
        f"{base.removesuffix('/')}@127.0.0.1/evil.git",
        (outside / "evil.git").as_uri(),
    ]
    for url in refused_sources:
        error = await create(server.grpc_port, deployment(f"git:{url}"), layout.app)
        assert error.code() is grpc.StatusCode.PERMISSION_DENIED, (url, error.details())
        assert "--allow-" in (error.details() or "")
    refused_dependencies = [
        f"evilpkg @ {(outside / 'evilpkg').as_uri()}",
        str(outside / "evilpkg"),
        "../../outside/evilpkg",
        f"git+{(outside / 'evil.git').as_uri()}",
        f"{base}allowed/%2e%2e/evilpkg-1.0.tar.gz",
        f"evil @ git+{base}allowed/.%2e/evil.git",
    ]
    for dep in refused_dependencies:
        error = await create(server.grpc_port, deployment("local:.", ["httpx", dep]), layout.app)
        assert error.code() is grpc.StatusCode.PERMISSION_DENIED, (dep, error.details())
        details = error.details() or ""
        assert "python-dependencies[1]" in details and "--allow-" in details
    assert layout.marks() == [] and layout.requests == []
    data = server.settings.data_dir
    assert not (data / "venvs").exists() or not any((data / "venvs").iterdir())
    assert not (data / "sources").exists()
    assert await server.mesh.cp.list_deployments() == []

    # The same kinds of entries, admitted, do reach the installer and git.
    error = await create(
        server.grpc_port, deployment("local:.", ["goodpkg @ ./goodpkg"]), layout.app
    )
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION, error.details()
    assert layout.marks() == ["good-package"]
    error = await create(server.grpc_port, deployment(f"git:{base}allowed/evil.git"), layout.app)
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION, error.details()
    assert layout.requests and all(r.startswith("/allowed/evil.git/") for r in layout.requests)
