"""``./dev``: what a newcomer sees while it prepares the virtual environment.

Runs a copy of the script in a scratch repository whose requirements and two packages are
tiny, so that the real steps (``python -m venv``, pip installing uv, uv installing the
requirements and the packages) run in seconds; the output is what CI shows (no terminal).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
UV_PIN = next(
    line
    for line in (ROOT / "requirements-dev.txt").read_text().splitlines()
    if line.startswith("uv==")
)


def _package(root: Path, name: str) -> None:
    root.mkdir()
    (root / "pyproject.toml").write_text(
        "[build-system]\nrequires = ['setuptools>=68']\nbuild-backend = 'setuptools.build_meta'\n"
        f"[project]\nname = '{name}'\nversion = '0.0.1'\n[tool.setuptools]\npy-modules = []\n"
    )


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    """A repository with ./dev, a requirements file pinning only uv, and two empty packages."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy2(ROOT / "dev", repo / "dev")
    (repo / "requirements-dev.txt").write_text(UV_PIN + "\n")
    _package(repo / "client", "dev-script-probe-client")
    _package(repo / "server", "dev-script-probe-server")
    return repo


def _dev(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "LLAMA_MESH_VENV"}
    env["PYTHON"] = sys.executable  # a Python 3.11+, as ./dev asks for
    return subprocess.run(
        [str(repo / "dev"), *args],
        cwd=repo,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


@pytest.mark.slow
def test_preparing_the_venv_says_each_step_and_is_silent_once_done(scratch: Path) -> None:
    """The first run names each of the three steps before it runs it, lets uv list what it
    installed, and says when the environment is ready; a second run prepares nothing."""
    first = _dev(scratch, "fmt")
    err = first.stderr
    steps = [
        "dev: preparing",
        "dev: [1/3] virtual environment:",
        "dev: [2/3] installer: uv==",
        "dev: [3/3] packages:",
        "+ dev-script-probe-client",  # uv's own lines
        "ready in",
    ]
    positions = [err.find(step) for step in steps]
    assert -1 not in positions, err
    assert positions == sorted(positions), err
    assert (scratch / ".venv" / ".installed").is_file()

    second = _dev(scratch, "fmt")
    assert "dev: preparing" not in second.stderr
    assert "[1/3]" not in second.stderr
