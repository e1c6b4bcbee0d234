"""Where the client connects, and how: resolved once into a frozen :class:`ConnectionSettings`.

Each setting comes from the first of: an explicit argument, the environment
(``LLAMA_MESH_ADDRESS``, ``LLAMA_MESH_API_KEY``, ``LLAMA_MESH_TLS_CA``, ``LLAMA_MESH_TLS_CERT``
with ``LLAMA_MESH_TLS_KEY``), the llamactl profile file (Llama Deploy 0.8's
``~/.config/llamactl/config.yaml``: ``current_profile`` and ``profiles: {name: {server,
insecure, timeout}}``, plus the optional ``tls_ca``, ``tls_cert`` and ``tls_key``), the
default ``127.0.0.1:4501``. A client certificate and its key come as a pair, from one place.

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
ENV_TLS_CERT = "LLAMA_MESH_TLS_CERT"
ENV_TLS_KEY = "LLAMA_MESH_TLS_KEY"
_TLS_FIELDS = ("tls_ca", "tls_cert", "tls_key")


def default_config_path() -> Path:
    """``$XDG_CONFIG_HOME/llamactl/config.yaml`` (``~/.config/...``), as Llama Deploy 0.8."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "llamactl" / "config.yaml"


@dataclass(frozen=True, slots=True)
class Profile:
    """One llamactl profile: the 0.8 fields, and PEM paths for TLS (saved only when set).

    ``tls_ca`` is the CA to trust; ``tls_cert`` and ``tls_key`` the client certificate (both
    or neither). A relative path is relative to the profile file's directory.
    """

    server: str = "http://localhost:4501"
    insecure: bool = False
    timeout: float = 120.0
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None


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
            "profiles": {name: profile_vars(p) for name, p in self.profiles.items()},
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(yaml.safe_dump(data, sort_keys=True))


def profile_vars(profile: Profile) -> dict[str, Any]:
    """A profile's settings as saved: the 0.8 fields, and the TLS paths that are set."""
    data: dict[str, Any] = {
        "server": profile.server,
        "insecure": profile.insecure,
        "timeout": profile.timeout,
    }
    for key in _TLS_FIELDS:
        if getattr(profile, key) is not None:
            data[key] = getattr(profile, key)
    return data


def _profile(path: Path, name: str, raw: Any) -> Profile:
    where = f"{path}: profiles.{name}"
    if raw is None:
        return Profile()
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping")
    unknown = sorted(set(raw) - {"server", "insecure", "timeout", *_TLS_FIELDS})
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
    for key in _TLS_FIELDS:
        if raw.get(key) is not None:
            if not isinstance(raw[key], str) or not raw[key]:
                raise ConfigError(f"{where}.{key} must be the path of a PEM file")
            profile = replace(profile, **{key: raw[key]})
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
    """Everything needed to open a channel, resolved once.

    ``root_certificates`` is the CA to trust, ``certificate_chain`` and ``private_key`` the
    client certificate presented to a server that requires one (mTLS); all PEM bytes.
    """

    target: str = DEFAULT_ADDRESS
    tls: bool = False
    root_certificates: bytes | None = None
    api_key: str | None = None
    timeout: float | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = field(default=None, repr=False)


def _read_pem(where: str, path: str | Path, base: Path | None = None) -> bytes:
    """The bytes of a PEM file (relative to ``base`` when given); :class:`ConfigError` naming
    ``where`` the path came from when it cannot be read."""
    full = Path(path).expanduser()
    if base is not None:
        full = base / full
    try:
        return full.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {path}: {exc}") from exc


def _client_pair(
    names: tuple[str, str],
    cert: str | Path | None,
    key: str | Path | None,
    *,
    prefix: str = "",
    base: Path | None = None,
) -> tuple[bytes, bytes] | None:
    """The client certificate and key named by one source (both or neither, else an error)."""
    if not cert and not key:
        return None
    if not cert or not key:
        raise ConfigError(f"{prefix}{names[0]} and {names[1]}: set both or neither")
    return (
        _read_pem(prefix + names[0], cert, base),
        _read_pem(prefix + names[1], key, base),
    )


def resolve_settings(
    address: str | None = None,
    *,
    api_key: str | None = None,
    tls: bool | None = None,
    root_certificates: bytes | None = None,
    tls_ca: str | Path | None = None,
    tls_cert: str | Path | None = None,
    tls_key: str | Path | None = None,
    timeout: float | None = None,
    profile: str | None = None,
    config_path: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> ConnectionSettings:
    """Apply the precedence explicit > environment > profile file > default, field by field.

    The CA comes from ``root_certificates`` (bytes) or ``tls_ca`` (a path), else
    ``LLAMA_MESH_TLS_CA``, else the profile's ``tls_ca``. The client certificate and key come
    as a pair from the first source that names either: the arguments, the environment, the
    profile.
    """
    env = os.environ if environ is None else environ
    chosen: Profile | None = None
    where = ""  # the chosen profile, in error messages
    path = config_path or default_config_path()
    if path.exists():
        config = ConfigFile.load(path)
        chosen = config.profile(profile)
        where = f"{path}: profiles.{profile or config.current_profile}."
    elif profile not in (None, DEFAULT_PROFILE_NAME):
        raise ConfigError(f"Profile {profile} does not exist (no config file at {path}).")
    server = address or env.get(ENV_ADDRESS) or (chosen.server if chosen else DEFAULT_ADDRESS)
    target, scheme_tls = grpc_target(server)
    if root_certificates is not None and tls_ca:
        raise ConfigError("root_certificates and tls_ca: give one or the other")
    if root_certificates is None:
        if tls_ca:
            root_certificates = _read_pem("tls_ca", tls_ca)
        elif ca_path := env.get(ENV_TLS_CA):
            root_certificates = _read_pem(ENV_TLS_CA, ca_path)
        elif chosen is not None and chosen.tls_ca:
            root_certificates = _read_pem(f"{where}tls_ca", chosen.tls_ca, path.parent)
    pair = _client_pair(("tls_cert", "tls_key"), tls_cert, tls_key)
    if pair is None:
        env_pair = (env.get(ENV_TLS_CERT), env.get(ENV_TLS_KEY))
        pair = _client_pair((ENV_TLS_CERT, ENV_TLS_KEY), *env_pair)
    if pair is None and chosen is not None:
        pair = _client_pair(
            ("tls_cert", "tls_key"),
            chosen.tls_cert,
            chosen.tls_key,
            prefix=where,
            base=path.parent,
        )
    certificate_chain, private_key = pair or (None, None)
    if tls is None:
        tls = bool(scheme_tls) or root_certificates is not None or pair is not None
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
        certificate_chain=certificate_chain,
        private_key=private_key,
    )
