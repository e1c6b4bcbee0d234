"""Free TCP ports for the processes the server starts (nats-server, UIs) and for tests.

A port chosen now and bound later (a restarted nats-server binds the port it had; a test
writes a port into a deployment file the server binds seconds later) must not be taken in
between. The OS gives outgoing connections and ``bind(0)`` ports from its ephemeral range
(``net.ipv4.ip_local_port_range``, 32768-60999 by default on Linux), so a port from that range
can be taken by any connection opened in the meantime, the server's own included. The ports
handed out here lie outside it: only another explicit bind can take them.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_DEFAULT_EPHEMERAL = (32768, 60999)
_LOWEST = 15000  # below: the well-known services' ports (5432, 5672, 6379, 8000, 9090, ...)
_TRIES = 64


def ephemeral_range(path: Path = _EPHEMERAL_RANGE_FILE) -> tuple[int, int]:
    """The OS's range of ports for outgoing connections (Linux's, or its default elsewhere)."""
    try:
        low, high = (int(part) for part in path.read_text().split())
    except (OSError, ValueError):
        return _DEFAULT_EPHEMERAL
    return low, high


def _candidates(low: int, high: int) -> list[int]:
    """The ports from :data:`_LOWEST` up that lie outside ``low..high``."""
    below = range(_LOWEST, max(_LOWEST, low))
    above = range(max(_LOWEST, high + 1), 65536)
    return [*below, *above]


def bindable(port: int, host: str = "127.0.0.1", *, reuse_addr: bool = False) -> bool:
    """Whether a TCP socket can bind ``host:port`` now. With ``reuse_addr``, as a server
    setting ``SO_REUSEADDR`` would (connections of an earlier listener still in TIME_WAIT
    do not count); without, as a plain bind."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        if reuse_addr:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that is free now and outside the ephemeral range.

    Falls back to a port the OS picks when the whole range above 15000 is ephemeral or no
    try found a free one.
    """
    candidates = _candidates(*ephemeral_range())
    for port in random.sample(candidates, min(_TRIES, len(candidates))):
        if bindable(port, host):
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        picked: int = sock.getsockname()[1]
        return picked
