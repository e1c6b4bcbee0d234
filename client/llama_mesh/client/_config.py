"""Where the client connects, and how: resolved once into a frozen :class:`ConnectionSettings`.

Each setting comes from the first of: an explicit argument, the environment
(``LLAMA_MESH_ADDRESS``, ``LLAMA_MESH_API_KEY``, ``LLAMA_MESH_TLS_CA``), the llamactl profile
file (Llama Deploy 0.8's ``~/.config/llamactl/config.yaml``: ``current_profile`` and
``profiles: {name: {server, insecure, timeout}}``), the default ``127.0.0.1:4501``.

A profile's ``server`` is an HTTP URL such as ``http://localhost:4501``; :func:`grpc_target`
turns it (or a plain ``host:port``) into a gRPC target, ``https://`` meaning TLS.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from llama_mesh.client._exceptions import ConfigError

DEFAULT_ADDRESS = "127.0.0.1:4501"
DEFAULT_PORT = 4501
DEFAULT_PROFILE_NAME = "default"
ENV_ADDRESS = "LLAMA_MESH_ADDRESS"
ENV_API_KEY = "LLAMA_MESH_API_KEY"
ENV_TLS_CA = "LLAMA_MESH_TLS_CA"


def default_config_path() -> Path:
    """``$XDG_CONFIG_HOME/llamactl/config.yaml`` (``~/.config/...``), as Llama Deploy 0.8."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "llamactl" / "config.yaml"


@dataclass(frozen=True, slots=True)
class Profile:
    """One llamactl profile (the 0.8 fields)."""

    server: str = "http://localhost:4501"
    insecure: bool = False
    timeout: float = 120.0


@dataclass(slots=True)
class ConfigFile:
    """The llamactl profile file; :meth:`write` saves it in 0.8's layout."""

    path: Path
    current_profile: str = DEFAULT_PROFILE_NAME
    profiles: dict[str, Profile] = field(default_factory=lambda: {DEFAULT_PROFILE_NAME: Profile()})

    @classmethod
    def load(cls, path: Path | None = None) -> ConfigFile:
        """The file at ``path`` (default location when None); defaults when it does not exist."""
        path = path or default_config_path()
        if not path.exists():
            return cls(path=path)
        try:
            raw = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from exc
        return cls._parse(path, raw)

    @classmethod
    def _parse(cls, path: Path, raw: Any) -> ConfigFile:
        if raw is None:
            return cls(path=path)
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        profiles_raw = raw.get("profiles") or {}
        if not isinstance(profiles_raw, dict):
            raise ConfigError(f"{path}: 'profiles' must be a mapping of name to profile")
        profiles = {str(k): _profile(path, str(k), v) for k, v in profiles_raw.items()}
        current = raw.get("current_profile", DEFAULT_PROFILE_NAME)
        if not isinstance(current, str):
            raise ConfigError(f"{path}: 'current_profile' must be a string")
        return cls(path=path, current_profile=current, profiles=profiles)

    def profile(self, name: str | None = None) -> Profile:
        """The named profile (the current one when None); :class:`ConfigError` if absent."""
        name = name or self.current_profile
        if name not in self.profiles:
            raise ConfigError(f"Profile {name} does not exist.")
        return self.profiles[name]

    def write(self) -> None:
        """Save the file (creating its directory)."""
        data = {
            "current_profile": self.current_profile,
            "profiles": {
                name: {"server": p.server, "insecure": p.insecure, "timeout": p.timeout}
                for name, p in self.profiles.items()
            },
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(yaml.safe_dump(data, sort_keys=True))


def _profile(path: Path, name: str, raw: Any) -> Profile:
    where = f"{path}: profiles.{name}"
    if raw is None:
        return Profile()
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping")
    unknown = sorted(set(raw) - {"server", "insecure", "timeout"})
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]} is not a profile setting")
    profile = Profile()
    if "server" in raw:
        if not isinstance(raw["server"], str):
            raise ConfigError(f"{where}.server must be a URL string")
        profile = replace(profile, server=raw["server"])
    if "insecure" in raw:
        if not isinstance(raw["insecure"], bool):
            raise ConfigError(f"{where}.insecure must be true or false")
        profile = replace(profile, insecure=raw["insecure"])
    if "timeout" in raw:
        timeout = raw["timeout"]
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
            raise ConfigError(f"{where}.timeout must be a positive number of seconds")
        profile = replace(profile, timeout=float(timeout))
    return profile


def grpc_target(server: str) -> tuple[str, bool | None]:
    """The gRPC target of a server URL or address, and whether its scheme asks for TLS.

    ``http://host:port`` -> ``host:port`` (no TLS); ``https://host`` -> ``host:443`` (TLS);
    ``host:port`` and gRPC targets (``dns:///...``, ``unix:...``) pass unchanged (TLS unsaid);
    a bare ``host`` gets the default port 4501.
    """
    server = server.strip()
    if not server:
        raise ConfigError("the server address is empty")
    lowered = server.lower()
    if lowered.startswith(("http://", "https://")):
        parts = urlsplit(server)
        tls = parts.scheme.lower() == "https"
        if not parts.hostname:
            raise ConfigError(f"no host in server URL {server!r}")
        try:
            port = parts.port or (443 if tls else 80)
        except ValueError as exc:
            raise ConfigError(f"bad port in server URL {server!r}") from exc
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        return f"{host}:{port}", tls
    if lowered.startswith(("dns:", "ipv4:", "ipv6:", "unix:")):
        return server, None
    if "://" in server:
        raise ConfigError(f"unsupported scheme in server address {server!r}")
    if server.endswith("]") or ":" not in server:
        return f"{server}:{DEFAULT_PORT}", None
    return server, None


@dataclass(frozen=True, slots=True)
class ConnectionSettings:
    """Everything needed to open a channel, resolved once."""

    target: str = DEFAULT_ADDRESS
    tls: bool = False
    root_certificates: bytes | None = None
    api_key: str | None = None
    timeout: float | None = None


def resolve_settings(
    address: str | None = None,
    *,
    api_key: str | None = None,
    tls: bool | None = None,
    root_certificates: bytes | None = None,
    timeout: float | None = None,
    profile: str | None = None,
    config_path: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> ConnectionSettings:
    """Apply the precedence explicit > environment > profile file > default, field by field."""
    env = os.environ if environ is None else environ
    chosen: Profile | None = None
    path = config_path or default_config_path()
    if path.exists():
        chosen = ConfigFile.load(path).profile(profile)
    elif profile not in (None, DEFAULT_PROFILE_NAME):
        raise ConfigError(f"Profile {profile} does not exist (no config file at {path}).")
    server = address or env.get(ENV_ADDRESS) or (chosen.server if chosen else DEFAULT_ADDRESS)
    target, scheme_tls = grpc_target(server)
    ca_path = env.get(ENV_TLS_CA)
    if root_certificates is None and ca_path:
        try:
            root_certificates = Path(ca_path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"{ENV_TLS_CA}: cannot read {ca_path}: {exc}") from exc
    if tls is None:
        tls = bool(scheme_tls) or root_certificates is not None
    if timeout is None and chosen is not None:
        timeout = chosen.timeout
    if timeout is not None and timeout <= 0:
        raise ConfigError("timeout must be a positive number of seconds")
    return ConnectionSettings(
        target=target,
        tls=tls,
        root_certificates=root_certificates,
        api_key=api_key or env.get(ENV_API_KEY) or None,
        timeout=timeout,
    )
