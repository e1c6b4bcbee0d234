"""Child processes that must not outlive the process that started them."""

from __future__ import annotations

import os
import sys

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


def dying_with_parent(argv: list[str]) -> list[str]:
    """Return ``argv`` wrapped so the process gets SIGTERM when this process dies (Linux),
    in a session of its own (so a terminal's Ctrl-C reaches only this process).

    Note the kernel sends it when the *thread* that started the child exits, so start the
    child from a thread that lives as long as the process (the event loop's).
    """
    if not sys.platform.startswith("linux"):
        return argv
    return [sys.executable, "-I", "-S", "-c", _LAUNCHER, str(os.getpid()), *argv]
