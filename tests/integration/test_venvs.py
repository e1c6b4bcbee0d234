"""Per-deployment virtual environments, with real installs from PyPI."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest

from llama_mesh.server import venvs
from llama_mesh.server.venvs import VenvError, VenvManager, venv_key

SIX = "six==1.16.0"


def run_python(python: Path, code: str) -> str:
    result = subprocess.run([python, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


class Lines:
    """A progress callback that records the installer's output lines."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    async def __call__(self, line: str) -> None:
        self.lines.append(line)


async def test_no_dependencies_use_the_server_interpreter(tmp_path: Path) -> None:
    """Without dependencies no environment is built: the server's own python is used."""
    manager = VenvManager(tmp_path)
    assert await manager.ensure([]) == Path(sys.executable)
    assert await manager.ensure(["  ", ""]) == Path(sys.executable)
    assert list(tmp_path.iterdir()) == []


async def test_install_then_cache_hit(tmp_path: Path) -> None:
    """A real install: the venv python imports the dependency and the server's packages;
    the next ensure (same or new manager) reuses it without running the installer."""
    progress = Lines()
    python = await VenvManager(tmp_path).ensure([SIX], progress=progress)
    assert python.is_relative_to(tmp_path)
    assert python.parent.parent.name == venv_key([SIX])[:16]
    assert any("six" in line for line in progress.lines)
    six_file = run_python(python, "import six; print(six.__file__)")
    assert Path(six_file).is_relative_to(tmp_path)
    run_python(python, "import llama_mesh.server, workflows, nats")
    assert run_python(python, "import sys; print(sys.prefix)") != sys.prefix

    for manager in (VenvManager(tmp_path), VenvManager(tmp_path)):
        again = Lines()
        start = time.monotonic()
        assert await manager.ensure([f" {SIX} "], progress=again) == python
        assert time.monotonic() - start < 1.0
        assert again.lines == []


async def test_deployment_dependency_takes_precedence(tmp_path: Path) -> None:
    """A dependency installed in the venv shadows the server's own copy of that package."""
    server_version = metadata.version("idna")
    wanted = "3.4" if server_version != "3.4" else "3.3"
    python = await VenvManager(tmp_path).ensure([f"idna=={wanted}"])
    assert run_python(python, "import idna; print(idna.__version__)") == wanted
    assert run_python(python, "import httpx; print('ok')") == "ok"  # server package, venv idna


async def test_concurrent_ensure_installs_once(tmp_path: Path) -> None:
    """Concurrent ensure() calls for the same dependencies build the environment once."""
    manager = VenvManager(tmp_path)
    first, second = Lines(), Lines()
    a, b = await asyncio.gather(
        manager.ensure([SIX], progress=first), manager.ensure([SIX], progress=second)
    )
    assert a == b
    assert sorted([bool(first.lines), bool(second.lines)]) == [False, True]


async def test_missing_package_is_a_venv_error_and_cleans_up(tmp_path: Path) -> None:
    """A package that does not exist fails with the installer's message naming it, and
    the half-built environment is removed."""
    name = "llama-mesh-no-such-package-xyz"
    with pytest.raises(VenvError) as info:
        await VenvManager(tmp_path).ensure([f"{name}==1.0"])
    assert name in str(info.value)
    assert not (tmp_path / venv_key([f"{name}==1.0"])[:16]).exists()


async def test_installer_options_are_refused(tmp_path: Path) -> None:
    """Dependencies that look like installer options are refused before running anything."""
    with pytest.raises(VenvError, match="options are not allowed"):
        await VenvManager(tmp_path).ensure(["--index-url=https://evil.example/simple", SIX])


def test_key_is_order_and_whitespace_insensitive() -> None:
    """The cache key ignores order, duplicates and surrounding whitespace."""
    assert venv_key(["b", "a"]) == venv_key([" a ", "b", "a"])
    assert venv_key(["a"]) != venv_key(["a==1"])


async def test_half_built_environment_is_rebuilt(tmp_path: Path) -> None:
    """A directory without the completion marker (a crash mid-build) is rebuilt."""
    stale = tmp_path / venv_key([SIX])[:16]
    stale.mkdir()
    (stale / "junk").write_text("x")
    python = await VenvManager(tmp_path).ensure([SIX])
    assert not (stale / "junk").exists()
    run_python(python, "import six")


@pytest.mark.slow
async def test_pip_fallback_without_uv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without uv the environment is built with ``python -m venv`` and pip."""
    monkeypatch.setattr(venvs, "_find_uv", lambda: None)
    progress = Lines()
    python = await VenvManager(tmp_path).ensure([SIX], progress=progress)
    assert any("six" in line.lower() for line in progress.lines)
    run_python(python, "import six, llama_mesh.server, workflows")
