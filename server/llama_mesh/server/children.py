"""Child processes: they must not outlive the process that started them
(:func:`dying_with_parent`), and the long-running ones are restarted when they die
(:class:`KeepAlive`: the embedded nats-server and the gateway's Envoy; worker replicas use
the same backoff); a short-lived one that is given up on is killed and reaped
(:func:`kill_and_wait`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Callable
from typing import Protocol

from llama_mesh.server.aio import cancel_and_wait

logger = logging.getLogger(__name__)

# Run by a fresh interpreter between us and the child: it asks the kernel to SIGTERM it when
# its parent (this process) dies, then becomes the child (exec keeps the PID, that request
# and the file descriptors passed down). A preexec_fn would do the same in a forked copy of
# this process, but fork() with gRPC threads running runs gRPC's fork handlers and crashes
# the child; posix_spawn/vfork do not.
_LAUNCHER = """\
import ctypes, ctypes.util, os, signal, sys
libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
os.setsid()  # its own session: a terminal's Ctrl-C reaches only its parent, which stops it
if os.getppid() != int(sys.argv[1]):  # the parent died before prctl took effect
    sys.exit(1)
os.execv(sys.argv[2], sys.argv[2:])
"""


async def kill_and_wait(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL ``proc`` unless it has ended, and reap it (nothing when it has ended)."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


def dying_with_parent(argv: list[str]) -> list[str]:
    """Return ``argv`` wrapped so the process gets SIGTERM when this process dies (Linux),
    in a session of its own (so a terminal's Ctrl-C reaches only this process).

    Note the kernel sends it when the *thread* that started the child exits, so start the
    child from a thread that lives as long as the process (the event loop's).
    """
    if not sys.platform.startswith("linux"):
        return argv
    return [sys.executable, "-I", "-S", "-c", _LAUNCHER, str(os.getpid()), *argv]


RESTART_BACKOFF = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
"""Seconds before each restart of a child that died (the last one repeats)."""
STABLE_AFTER = 30.0
"""A child that ran this long resets its restart backoff."""
RESTART_ATTEMPTS = 5
"""Failed starts in a row after which :class:`KeepAlive` gives up on a child."""


class Restartable(Protocol):
    """A child process that :class:`KeepAlive` can watch and start again."""

    @property
    def pid(self) -> int | None:
        """The running process's id (``None`` when not running)."""

    async def wait(self) -> int:
        """Wait for the process to exit; its exit status."""

    async def restart(self) -> None:
        """Start the process again, as configured before; raise if it does not become ready."""

    async def stop(self) -> None:
        """Stop the process for good (idempotent)."""


class KeepAlive:
    """Restart a child process whenever it exits, until :meth:`stop`.

    Restarts wait :data:`RESTART_BACKOFF` (longer for a child that keeps dying young); each
    is logged, and ``on_down`` / ``on_up`` hear of the outage. After
    :data:`RESTART_ATTEMPTS` failed starts in a row it gives up: ``on_give_up`` gets the
    reason (with the child's last error) and the child stays down.
    """

    def __init__(
        self,
        name: str,
        child: Restartable,
        *,
        on_down: Callable[[str], None] = lambda reason: None,
        on_up: Callable[[], None] = lambda: None,
        on_give_up: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self.name = name
        self.child = child
        self._on_down = on_down
        self._on_up = on_up
        self._on_give_up = on_give_up
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Begin watching the (running) child."""
        if self._task is None:
            self._task = asyncio.create_task(self._watch(), name=f"keep-alive-{self.name}")

    async def stop(self) -> None:
        """Stop watching, then stop the child; idempotent."""
        if self._task is not None:
            await cancel_and_wait(self._task)
        await self.child.stop()

    @staticmethod
    def _delay(failures: int) -> float:
        return RESTART_BACKOFF[min(failures, len(RESTART_BACKOFF) - 1)]

    async def _watch(self) -> None:
        try:
            await self._keep_alive()
        except Exception as exc:  # a bug here must not leave the child unwatched unseen
            logger.exception("supervising %s failed", self.name)
            self._on_give_up(f"supervising {self.name} failed: {exc!r}")

    async def _keep_alive(self) -> None:
        loop = asyncio.get_running_loop()
        quick_exits = 0
        while True:
            started, pid = loop.time(), self.child.pid
            status = await self.child.wait()
            reason = f"{self.name} (pid {pid}) exited with status {status}"
            logger.warning("%s; restarting it", reason)
            self._on_down(f"{reason}; restarting")
            quick_exits = 0 if loop.time() - started > STABLE_AFTER else quick_exits + 1
            failed_starts = 0
            while True:
                await asyncio.sleep(self._delay(max(quick_exits - 1, 0) + failed_starts))
                try:
                    await self.child.restart()
                    break
                except Exception as exc:
                    failed_starts += 1
                    logger.warning(
                        "%s did not start (attempt %d of %d): %s",
                        self.name,
                        failed_starts,
                        RESTART_ATTEMPTS,
                        exc,
                    )
                    if failed_starts >= RESTART_ATTEMPTS:
                        message = (
                            f"{self.name} could not be restarted ({failed_starts} attempts); "
                            f"last error: {exc}"
                        )
                        logger.error("%s", message)
                        self._on_give_up(message)
                        return
                    self._on_down(f"{reason}; restarting (attempt {failed_starts} failed)")
            logger.info("%s restarted (pid %s)", self.name, self.child.pid)
            self._on_up()
