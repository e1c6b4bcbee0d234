"""Fixtures for the compatibility suite: the released Llama Deploy 0.8.1 client against us.

``compat_venv`` builds (once; a stamp file remembers the requirement set) a virtualenv with
``llama-deploy==0.8.1`` and ``llama-index-core==0.12.15``, apart from the development one, so
that what runs is the released client exactly as its users have it. ``compat_server`` starts
one real server per test module (embedded nats-server, worker processes, Envoy gateway) with
``tests/data/testapp`` deployed. :func:`run_compat_python` and :func:`run_llamactl` drive the
released client from that virtualenv.

The helpers are coroutines: the API server runs in the test's event loop, so a blocking
``subprocess.run`` must happen in a thread, never on the loop.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest
import pytest_asyncio

from llama_mesh.server.app import MeshServer, ServerSettings
from tests.fixtures.mesh import TESTAPP

REPO = Path(__file__).resolve().parents[2]
COMPAT_REQUIREMENTS = ("llama-deploy==0.8.1", "llama-index-core==0.12.15")
"""What Llama Deploy 0.8 users have installed: the last release of that architecture."""
STAMP = ".llama-mesh-compat"
"""File in the virtualenv holding the requirement set it was built with."""
SUBPROCESS_TIMEOUT = 120.0

SHOUT_YAML = """\
name: {name}
control-plane:
  port: 8000
default-service: shout
services:
  shout:
    name: Shout
    source:
      type: local
      name: .
    path: shout_app:shout
"""
SHOUT_MODULE = """\
from workflows import Workflow, step
from workflows.events import StartEvent, StopEvent


class Shout(Workflow):
    @step
    async def run_it(self, ev: StartEvent) -> StopEvent:
        return StopEvent(result="{tag}: " + str(ev.get("message", "")))


shout = Shout(timeout=60)
"""


@dataclass(frozen=True, slots=True)
class CompatVenv:
    """The virtualenv with the released client: its interpreter and its ``llamactl``."""

    python: Path
    llamactl: Path


def _venv_dir() -> Path:
    configured = os.environ.get("LLAMA_MESH_COMPAT_VENV")
    return Path(configured) if configured else REPO / ".venv-compat"


def _base_python() -> str:
    """The Python 3.11 interpreter the development virtualenv was made from."""
    candidate = Path(sys.base_prefix) / "bin" / "python3.11"
    return str(candidate) if candidate.exists() else "3.11"


def _uv(*args: str) -> None:
    uv = Path(sys.executable).parent / "uv"
    proc = subprocess.run(
        [str(uv), *args], capture_output=True, text=True, timeout=600, check=False
    )
    if proc.returncode != 0:
        pytest.fail(
            f"building the compat virtualenv failed: uv {' '.join(args)}\n"
            f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}",
            pytrace=False,
        )


def write_shout_deployment(directory: Path, name: str, tag: str = "v1") -> Path:
    """A second, one-service deployment in ``directory``; its workflow answers
    ``"<tag>: <message>"`` (rewrite it with another tag to see a reload). Returns the YAML."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "shout_app.py").write_text(SHOUT_MODULE.replace("{tag}", tag))
    config = directory / "deployment.yml"
    config.write_text(SHOUT_YAML.format(name=name))
    return config


@pytest.fixture(scope="session")
def compat_venv() -> CompatVenv:
    """The virtualenv with ``llama-deploy==0.8.1``, built once and reused across runs."""
    venv = _venv_dir()
    venv_python = venv / "bin" / "python"
    stamp = venv / STAMP
    wanted = "\n".join(COMPAT_REQUIREMENTS) + "\n"
    if not (venv_python.exists() and stamp.exists() and stamp.read_text() == wanted):
        stamp.unlink(missing_ok=True)
        _uv("venv", "--quiet", "--allow-existing", "--python", _base_python(), str(venv))
        _uv("pip", "install", "--quiet", "--python", str(venv_python), *COMPAT_REQUIREMENTS)
        stamp.write_text(wanted)
    return CompatVenv(python=venv_python, llamactl=venv / "bin" / "llamactl")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def compat_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[MeshServer]:
    """One server per module: embedded nats-server, worker processes, the Envoy gateway,
    with ``tests/data/testapp`` deployed."""
    settings = ServerSettings(
        data_dir=tmp_path_factory.mktemp("compat-mesh"),
        port=0,  # the gateway takes a free port itself: no race for it
        queue="nats",
        nats_url=None,
        gateway=True,
        control_planes=False,  # testapp's port 8000 is not the tests' to take
        ack_wait=2.0,
        ready_timeout=60.0,
    )
    server = await MeshServer.start(settings)
    try:
        await server.deploy_file(TESTAPP)
        yield server
    finally:
        await server.shutdown()


@pytest.fixture(scope="module")
def gateway_url(compat_server: MeshServer) -> str:
    """``http://127.0.0.1:PORT`` of the compat server's gateway."""
    assert compat_server.gateway_url is not None
    return compat_server.gateway_url


LLAMACTL_CONFIG = """\
current_profile: default
profiles:
  default:
    server: http://localhost:4501
    insecure: false
    timeout: 30.0
"""
"""``llamactl``'s own default profile, written up front: concurrent first runs would race to
create it (one truncating the file while another reads it)."""


@pytest.fixture(scope="module")
def client_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home directory for the released client, with ``llamactl``'s config file in it."""
    home = tmp_path_factory.mktemp("compat-home")
    config = home / ".config" / "llamactl" / "config.yaml"
    config.parent.mkdir(parents=True)
    config.write_text(LLAMACTL_CONFIG)
    return home


def compat_env(home: Path) -> dict[str, str]:
    """A clean environment for the released client: no proxies, warnings off, own home."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "LANG": "C.UTF-8",
        "PYTHONWARNINGS": "ignore",
    }


async def _run(args: list[str], home: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        args,
        env=compat_env(home),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


async def run_compat_python(
    venv: CompatVenv, code: str, *, home: Path, timeout: float = SUBPROCESS_TIMEOUT
) -> Any:
    """Run ``code`` with the compat interpreter; return the JSON its last stdout line holds.

    Fails the test, with the snippet's stderr, when it exits non-zero or prints no JSON.
    """
    proc = await _run([str(venv.python), "-c", code], home, timeout)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        pytest.fail(
            f"compat snippet exited {proc.returncode}\n--- stdout\n{proc.stdout}"
            f"\n--- stderr\n{proc.stderr}",
            pytrace=False,
        )
    return json.loads(lines[-1])


async def run_compat_script(
    venv: CompatVenv,
    script: Path,
    *args: str,
    home: Path,
    timeout: float = SUBPROCESS_TIMEOUT,
) -> Any:
    """Run the Python file ``script`` with the compat interpreter; the JSON it printed last.

    Fails the test, with the script's output, when it exits non-zero or prints no JSON.
    """
    proc = await _run([str(venv.python), str(script), *args], home, timeout)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        pytest.fail(
            f"{script.name} exited {proc.returncode}\n--- stdout\n{proc.stdout}"
            f"\n--- stderr\n{proc.stderr}",
            pytrace=False,
        )
    return json.loads(lines[-1])


async def run_llamactl(
    venv: CompatVenv,
    server_url: str,
    *args: str,
    home: Path,
    timeout: float = SUBPROCESS_TIMEOUT,
) -> tuple[int, str, str]:
    """``llamactl -s URL ARGS...`` from the compat virtualenv: (exit code, stdout, stderr)."""
    proc = await _run([str(venv.llamactl), "-s", server_url, *args], home, timeout)
    return proc.returncode, proc.stdout, proc.stderr


class CompatPython(Protocol):
    """Runs a snippet with the compat interpreter and returns the JSON it printed last."""

    async def __call__(self, code: str, *, timeout: float = ...) -> Any: ...


class Llamactl(Protocol):
    """Runs the released ``llamactl -s GATEWAY ARGS...``: (exit code, stdout, stderr)."""

    async def __call__(self, *args: str, timeout: float = ...) -> tuple[int, str, str]: ...


@pytest.fixture(scope="module")
def compat_python(compat_venv: CompatVenv, client_home: Path) -> CompatPython:
    """:func:`run_compat_python` bound to the compat virtualenv and a private home."""

    async def run(code: str, *, timeout: float = SUBPROCESS_TIMEOUT) -> Any:
        return await run_compat_python(compat_venv, code, home=client_home, timeout=timeout)

    return run


@pytest.fixture(scope="module")
def llamactl(compat_venv: CompatVenv, gateway_url: str, client_home: Path) -> Llamactl:
    """:func:`run_llamactl` bound to the compat virtualenv and the compat server's gateway."""

    async def run(*args: str, timeout: float = SUBPROCESS_TIMEOUT) -> tuple[int, str, str]:
        return await run_llamactl(
            compat_venv, gateway_url, *args, home=client_home, timeout=timeout
        )

    return run
