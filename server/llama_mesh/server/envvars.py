"""Settings read from ``LLAMA_MESH_*`` environment variables by the server's commands."""

from __future__ import annotations

import os


def env_setting(name: str, default: str | None = None) -> str | None:
    """``$LLAMA_MESH_<name>``, else ``default``. An empty variable counts as unset: compose
    files pass ``${X:-}``, and an empty path would otherwise become "."."""
    return os.environ.get(f"LLAMA_MESH_{name}") or default


LLAMA_DEPLOY_PREFIX = "LLAMA_DEPLOY_APISERVER_"
"""Prefix of the Llama Deploy 0.8 API server's own settings, read as fallbacks."""


def llama_deploy_setting(name: str) -> str | None:
    """``$LLAMA_DEPLOY_APISERVER_<name>`` (the 0.8 server's setting), else None; empty is
    unset, as for :func:`env_setting`."""
    return os.environ.get(f"{LLAMA_DEPLOY_PREFIX}{name}") or None


def setting(name: str, default: str | None = None) -> str | None:
    """``$LLAMA_MESH_<name>``, else ``$LLAMA_DEPLOY_APISERVER_<name>``, else ``default``."""
    return env_setting(name) or llama_deploy_setting(name) or default


def split_list(values: list[str]) -> tuple[str, ...]:
    """The items of a repeated option whose values (and environment variable) may also be
    comma-separated lists; blanks dropped."""
    return tuple(item.strip() for value in values for item in value.split(",") if item.strip())
