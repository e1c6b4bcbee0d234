"""Settings read from ``LLAMA_MESH_*`` environment variables by the server's commands."""

from __future__ import annotations

import os


def env_setting(name: str, default: str | None = None) -> str | None:
    """``$LLAMA_MESH_<name>``, else ``default``. An empty variable counts as unset: compose
    files pass ``${X:-}``, and an empty path would otherwise become "."."""
    return os.environ.get(f"LLAMA_MESH_{name}") or default


def split_list(values: list[str]) -> tuple[str, ...]:
    """The items of a repeated option whose values (and environment variable) may also be
    comma-separated lists; blanks dropped."""
    return tuple(item.strip() for value in values for item in value.split(",") if item.strip())
