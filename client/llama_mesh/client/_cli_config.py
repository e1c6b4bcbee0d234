"""``llamactl config``: Llama Deploy 0.8's profile commands over the same YAML file."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from llama_mesh.client._cli_output import emit, table
from llama_mesh.client._cli_state import CliError, pass_state
from llama_mesh.client._config import ConfigFile, Profile, grpc_target, profile_vars
from llama_mesh.client._exceptions import ConfigError

_TRUE = ("y", "yes", "t", "true", "on", "1")
_FALSE = ("n", "no", "f", "false", "off", "0")


def _config(ctx: click.Context) -> ConfigFile:
    return pass_state(ctx).config_file()


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"invalid truth value {value!r}")


@click.group()
def config() -> None:
    """Manage configuration profiles and settings."""


@config.command("get-profiles")
@click.pass_context
def get_profiles(ctx: click.Context) -> None:
    """List all available configuration profiles."""
    cfg = _config(ctx)
    state = pass_state(ctx)
    if state.fmt != "table":
        rows = [
            {"name": name, "current": name == cfg.current_profile, **vars_of(profile)}
            for name, profile in cfg.profiles.items()
        ]
        emit(rows, state.fmt)
        return
    rows_t = [
        ["*" if name == cfg.current_profile else "", name, profile.server]
        for name, profile in cfg.profiles.items()
    ]
    click.echo(table(rows_t, ["Current", "Profile", "Server url"]))


def vars_of(profile: Profile) -> dict[str, object]:
    """A profile's settings as a dict (the TLS paths only when set)."""
    return profile_vars(profile)


def _pem_path(value: str) -> str | None:
    """An absolute path to an existing file (so the profile works from any directory);
    ``None`` for an empty value, which unsets the setting."""
    if not value:
        return None
    path = Path(value).expanduser().resolve()
    if not path.is_file():
        raise ValueError(f"no such file: {value}")
    return str(path)


@config.command("current-profile")
@click.pass_context
def current_profile(ctx: click.Context) -> None:
    """Display the name of the currently active profile."""
    click.echo(_config(ctx).current_profile)


@config.command("use-profile")
@click.argument("profile")
@click.pass_context
def use_profile(ctx: click.Context, profile: str) -> None:
    """Switch to using a different profile."""
    cfg = _config(ctx)
    if profile not in cfg.profiles:
        raise CliError(f"Cannot find profile '{profile}' in the config file.")
    cfg.current_profile = profile
    cfg.write()


@config.command("set-profile-vars")
@click.argument("param")
@click.argument("value")
@click.pass_context
def set_profile_vars(ctx: click.Context, param: str, value: str) -> None:
    """Set a variable of the current profile.

    PARAM is server, insecure, timeout, tls_ca, tls_cert or tls_key. With the global
    -p NAME, set it on that profile instead, creating it if needed. The tls_* variables are
    PEM files (a CA to trust; a client certificate and its key, for a server requiring
    mTLS); an empty value unsets one.
    """
    cfg = _config(ctx)
    name = pass_state(ctx).profile or cfg.current_profile
    current = cfg.profiles.get(name, Profile())
    param = param.strip().lower()
    try:
        if param == "server":
            grpc_target(value)
            current = replace(current, server=value)
        elif param == "insecure":
            current = replace(current, insecure=_bool(value))
        elif param == "timeout":
            timeout = float(value)
            if timeout <= 0:
                raise ValueError("the timeout must be positive")
            current = replace(current, timeout=timeout)
        elif param in ("tls_ca", "tls_cert", "tls_key"):
            path: dict[str, Any] = {param: _pem_path(value)}
            current = replace(current, **path)
        else:
            raise CliError(f"Unknown parameter '{param}'.")
    except (ValueError, ConfigError) as exc:
        raise CliError(f"Error setting {param}={value} for profile '{name}': {exc}") from exc
    cfg.profiles[name] = current
    cfg.write()
    click.echo(f"Set {param}={value} for profile '{name}'")


@config.command("delete-profile")
@click.argument("profile")
@click.pass_context
def delete_profile(ctx: click.Context, profile: str) -> None:
    """Delete a profile from the configuration."""
    cfg = _config(ctx)
    if profile not in cfg.profiles:
        raise CliError(f"Cannot find profile '{profile}' in the config file.")
    if profile == cfg.current_profile:
        raise CliError(
            f"Cannot delete profile '{profile}' because it is currently in use. "
            "Switch to another profile with 'llamactl config use-profile' first."
        )
    del cfg.profiles[profile]
    cfg.write()
    click.echo(f"Profile '{profile}' has been deleted.")


@config.command("rename-profile")
@click.argument("old_name")
@click.argument("new_name")
@click.pass_context
def rename_profile(ctx: click.Context, old_name: str, new_name: str) -> None:
    """Rename a profile in the configuration."""
    cfg = _config(ctx)
    if old_name not in cfg.profiles:
        raise CliError(f"Cannot find profile '{old_name}' in the config file.")
    if new_name in cfg.profiles:
        raise CliError(f"Profile '{new_name}' already exists in the config file.")
    cfg.profiles[new_name] = cfg.profiles.pop(old_name)
    if cfg.current_profile == old_name:
        cfg.current_profile = new_name
    cfg.write()
    click.echo(f"Profile '{old_name}' has been renamed to '{new_name}'.")
