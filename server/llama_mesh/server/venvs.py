"""Virtual environments for a deployment's ``python-dependencies``.

Workers of a service with ``python-dependencies`` run on the python of a virtual environment
that holds those dependencies; nothing is ever installed into the server's own environment.
A service without dependencies runs on the server's interpreter.

Each environment is keyed by the sorted, stripped dependency list and the server's python
(version and prefix), lives in ``root/<key[:16]>`` and is reused once complete (a marker file
is written last). It is built with ``uv`` (``uv venv`` then ``uv pip install``), or with
``python -m venv`` and pip when ``uv`` cannot be found.

The server's own packages (llama-mesh, nats-py, llama-index-workflows, ...) are not installed
again: a ``.pth`` file in the new environment's site-packages adds the server's site-packages
directories *after* the environment's own, with ``site.addsitedir`` so that their ``.pth``
files (editable installs) work too. A deployment's dependencies therefore take precedence
over the server's copies of the same packages.

Concurrent :meth:`VenvManager.ensure` calls for the same dependencies in one process build
once (a lock per key); separate processes should not share a root.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import inspect
import json
import logging
import os
import shutil
import site
import sys
import sysconfig
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from llama_mesh.server.children import kill_and_wait

logger = logging.getLogger(__name__)

INSTALL_TIMEOUT = 900.0
"""Seconds one installer step (create or install) may take."""

Progress = Callable[[str], Awaitable[None] | None]
"""Receives each line of installer output as it arrives."""

_MARKER = ".llama-mesh-ready"
_PTH = "_llama_mesh_server.pth"
_TAIL_LINES = 40


class VenvError(ValueError):
    """A virtual environment could not be built; the message ends with the installer's output."""


def venv_key(dependencies: Sequence[str]) -> str:
    """The cache key of an environment: sha256 of the normalized list and the server python."""
    deps = _normalize(dependencies)
    identity = {"deps": deps, "python": sys.version, "prefix": sys.prefix}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


class VenvManager:
    """Creates and caches virtual environments under ``root``."""

    def __init__(self, root: Path, *, install_timeout: float = INSTALL_TIMEOUT) -> None:
        self._root = root.absolute()
        self._install_timeout = install_timeout
        self._locks: dict[str, asyncio.Lock] = {}

    async def ensure(
        self, dependencies: Sequence[str], *, progress: Progress | None = None
    ) -> Path:
        """Return the python executable that has ``dependencies`` available.

        No dependencies: the server's own interpreter. Otherwise a cached environment's
        python, building the environment first when needed (``progress`` then receives the
        installer's output line by line).

        Raises:
            VenvError: the environment could not be built (the half-built one is removed).
        """
        deps = _normalize(dependencies)
        if not deps:
            return Path(sys.executable)
        for dep in deps:
            if dep.startswith("-"):
                raise VenvError(f"{dep!r}: installer options are not allowed in dependencies")
        key = venv_key(deps)
        venv = self._root / key[:16]
        python = _venv_python(venv)
        async with self._locks.setdefault(key, asyncio.Lock()):
            if await asyncio.to_thread(_is_ready, venv, python):
                logger.debug("reusing virtual environment %s", venv)
                return python
            logger.info("building virtual environment %s for %s", venv, deps)
            try:
                await self._build(venv, python, deps, progress)
            except BaseException:
                await asyncio.to_thread(shutil.rmtree, venv, True)
                raise
            return python

    async def _build(
        self, venv: Path, python: Path, deps: list[str], progress: Progress | None
    ) -> None:
        await asyncio.to_thread(_reset, venv)
        uv = _find_uv()
        if uv is not None:
            await self._run(
                [uv, "venv", "--no-project", "--python", sys.executable, venv], progress
            )
        else:
            await self._run([sys.executable, "-m", "venv", venv], progress)
        site_dir = (await self._run([python, "-c", _PURELIB], None)).strip()
        await asyncio.to_thread(_write_pth, Path(site_dir))
        if uv is not None:
            await self._run([uv, "pip", "install", "--python", python, *deps], progress, deps)
        else:
            pip: list[str | Path] = [python, "-m", "pip", "install", "--disable-pip-version-check"]
            await self._run([*pip, *deps], progress, deps)
        marker = json.dumps({"dependencies": deps, "python": sys.version})
        await asyncio.to_thread((venv / _MARKER).write_text, marker)

    async def _run(
        self,
        argv: Sequence[str | Path],
        progress: Progress | None,
        deps: Sequence[str] = (),
    ) -> str:
        """Run one installer step, streaming its output; return that output."""
        args = [str(a) for a in argv]
        env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}
        env.update({"UV_PYTHON_DOWNLOADS": "never", "UV_NO_PROGRESS": "1", "NO_COLOR": "1"})
        try:
            proc = await asyncio.create_subprocess_exec(
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                cwd=self._root,
                limit=1 << 20,
                env=env,
            )
        except OSError as exc:
            raise VenvError(f"cannot run {args[0]}: {exc}") from exc
        assert proc.stdout is not None
        lines: list[str] = []
        tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        try:
            async with asyncio.timeout(self._install_timeout):
                async for raw in proc.stdout:
                    line = raw.decode("utf-8", "replace").rstrip()
                    lines.append(line)
                    tail.append(line)
                    await _report(progress, line)
                await proc.wait()
        except TimeoutError:
            await kill_and_wait(proc)
            raise VenvError(
                f"{' '.join(args[:3])} timed out after {self._install_timeout:g}s:\n"
                + "\n".join(tail)
            ) from None
        except BaseException:
            await asyncio.shield(kill_and_wait(proc))
            raise
        if proc.returncode != 0:
            what = f"installing {', '.join(deps)}" if deps else " ".join(args[:3])
            output = "\n".join(tail)
            raise VenvError(f"{what} failed (exit {proc.returncode}):\n{output}")
        return "\n".join(lines)


_PURELIB = "import sysconfig; print(sysconfig.get_paths()['purelib'])"


def _normalize(dependencies: Sequence[str]) -> list[str]:
    return sorted({dep.strip() for dep in dependencies if dep.strip()})


def _venv_python(venv: Path) -> Path:
    if os.name == "nt":
        return venv / "Scripts" / "python.exe"
    return venv / "bin" / "python"


def _is_ready(venv: Path, python: Path) -> bool:
    return (venv / _MARKER).is_file() and python.exists()


def _reset(venv: Path) -> None:
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)


def _find_uv() -> str | None:
    beside = Path(sys.executable).parent / ("uv.exe" if os.name == "nt" else "uv")
    if beside.is_file():
        return str(beside)
    return shutil.which("uv")


def _server_site_dirs() -> list[str]:
    """The server's site-packages directories, in its own order."""
    candidates = [*site.getsitepackages()]
    paths = sysconfig.get_paths()
    candidates += [paths["purelib"], paths["platlib"]]
    user_site = site.getusersitepackages()
    if site.ENABLE_USER_SITE and user_site in sys.path:
        candidates.append(user_site)
    seen: list[str] = []
    for candidate in candidates:
        if candidate not in seen and Path(candidate).is_dir():
            seen.append(candidate)
    return seen


def _write_pth(site_dir: Path) -> None:
    lines = [f"import site; site.addsitedir({d!r})" for d in _server_site_dirs()]
    (site_dir / _PTH).write_text("\n".join(lines) + "\n", encoding="utf-8")


async def _report(progress: Progress | None, line: str) -> None:
    if progress is None:
        return
    try:
        result = progress(line)
        if inspect.isawaitable(result):
            await result
    except Exception:
        logger.exception("progress callback failed")
