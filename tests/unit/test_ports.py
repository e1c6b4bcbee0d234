"""Free ports lie outside the OS's ephemeral range, so no outgoing connection takes them
between the pick and the bind."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from llama_mesh.server import ports


def test_the_ephemeral_range_is_read_from_the_kernel_file(tmp_path: Path) -> None:
    """The range comes from ``ip_local_port_range``; unreadable or garbled, Linux's default."""
    path = tmp_path / "ip_local_port_range"
    path.write_text("40000\t50000\n")
    assert ports.ephemeral_range(path) == (40000, 50000)
    path.write_text("forty thousand\n")
    assert ports.ephemeral_range(path) == (32768, 60999)
    assert ports.ephemeral_range(tmp_path / "missing") == (32768, 60999)


def test_candidates_skip_the_ephemeral_range_and_the_well_known_ports() -> None:
    """Candidates are 15000-65535 minus the ephemeral range, on both sides of it."""
    candidates = set(ports._candidates(32768, 60999))
    assert min(candidates) == 15000 and max(candidates) == 65535
    assert 32767 in candidates and 61000 in candidates
    assert not candidates & set(range(32768, 61000))
    assert ports._candidates(1024, 65535) == []


def test_free_port_is_bindable_and_outside_the_ephemeral_range() -> None:
    """What this machine's kernel calls ephemeral is never handed out while others remain."""
    low, high = ports.ephemeral_range()
    for _ in range(20):
        port = ports.free_port()
        assert not low <= port <= high
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_a_taken_candidate_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    """A candidate another socket holds is not returned; the free one is."""
    with socket.socket() as taken, socket.socket() as spare:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        spare.bind(("127.0.0.1", 0))
        taken_port, spare_port = taken.getsockname()[1], spare.getsockname()[1]
        spare.close()
        monkeypatch.setattr(ports, "_candidates", lambda low, high: [taken_port, spare_port])
        assert {ports.free_port() for _ in range(10)} == {spare_port}


def test_no_candidate_left_falls_back_to_the_os(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the whole range above 15000 ephemeral, the OS picks (a port is still returned)."""
    monkeypatch.setattr(ports, "ephemeral_range", lambda: (1024, 65535))
    port = ports.free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_bindable_tells_a_listening_port_from_a_free_one() -> None:
    """A port another socket listens on is not bindable, with or without SO_REUSEADDR."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert not ports.bindable(port)
        assert not ports.bindable(port, reuse_addr=True)
    assert ports.bindable(port) and ports.bindable(port, reuse_addr=True)
