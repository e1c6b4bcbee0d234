"""One deployment's UI process: ``<package manager> run <script>`` in its installed folder,
started with :func:`~llama_mesh.server.children.dying_with_parent` in a process group of its
own, ready once its port accepts connections, and stopped with its whole group (the package
manager and what its script runs). :class:`~llama_mesh.server.children.KeepAlive` restarts
it (see :mod:`.uis`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from llama_mesh.server.children import dying_with_parent
from llama_mesh.server.nodejs import NodeTools
from llama_mesh.server.ports import bindable

__all__ = ["READY_TIMEOUT", "UiError", "UiProcess", "UiSpec"]

READY_TIMEOUT = 120.0
"""Seconds a started UI has to accept connections on its port."""
_STOP_GRACE = 10.0
_TAIL_LINES = 30


class UiError(ValueError):
    """A deployment's UI could not be installed or started; the message says why."""


@dataclass(frozen=True, slots=True)
class UiSpec:
    """An installed UI, ready to run."""

    deployment: str
    directory: Path
    script: str
    port: int
    env: Mapping[str, str]


def _log_tail(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as log:
            log.seek(offset)
            text = log.read()[-16384:].decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-_TAIL_LINES:])


class UiProcess:
    """One deployment's UI process (``<package manager> run <script>``), restartable."""

    def __init__(self, spec: UiSpec, tools: NodeTools, log_path: Path) -> None:
        self.spec = spec
        self._tools = tools
        self._log_path = log_path
        self._process: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int | None:
        """The package manager's process id (the leader of the UI's process group)."""
        process = self._process
        return process.pid if process is not None and process.returncode is None else None

    async def start(self) -> None:
        """Start the UI and wait until it accepts connections on its port."""
        if not bindable(self.spec.port, reuse_addr=True):
            raise UiError(f"ui port {self.spec.port} is in use by another process")
        argv = [*self._tools.package_manager, "run", self.spec.script]
        linux = sys.platform.startswith("linux")
        with self._log_path.open("ab") as log:
            offset = log.tell()
            self._process = await asyncio.create_subprocess_exec(
                *dying_with_parent(argv),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=dict(self.spec.env),
                cwd=str(self.spec.directory),
                start_new_session=not linux,  # on Linux, the launcher starts a session
            )
        try:
            await self._wait_ready(self._process, offset)
        except BaseException:
            await self.stop()
            raise

    async def _wait_ready(self, process: asyncio.subprocess.Process, offset: int) -> None:
        """Until the port accepts a connection (Node prints nothing we could wait on)."""
        try:
            async with asyncio.timeout(READY_TIMEOUT):
                await self._poll_ready(process, offset)
        except TimeoutError:
            raise UiError(
                f"the ui did not accept connections on port {self.spec.port} within "
                f"{READY_TIMEOUT:g} s:\n{_log_tail(self._log_path, offset)}"
            ) from None

    async def _poll_ready(self, process: asyncio.subprocess.Process, offset: int) -> None:
        delay = 0.05
        while True:
            if process.returncode is not None:
                raise UiError(
                    f"the ui ({self._tools.name} run {self.spec.script}) exited with "
                    f"status {process.returncode}:\n{_log_tail(self._log_path, offset)}"
                )
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.spec.port)
            except OSError:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(process.wait(), delay)
                delay = min(delay * 2, 0.5)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return

    async def restart(self) -> None:
        """Start the UI again (after it exited)."""
        await self.start()

    async def wait(self) -> int:
        """Wait for the UI's process to exit; its status."""
        assert self._process is not None
        return await self._process.wait()

    async def stop(self) -> None:
        """Stop the UI's whole process group (the package manager and what it runs)."""
        process = self._process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), _STOP_GRACE)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
        # What the package manager ran may outlive it by a moment: the group goes too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
