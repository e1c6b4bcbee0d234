"""Where a deployment's code may come from: parsed, normalised URLs and resolved paths.

A :class:`SourcePolicy` holds the server's allow-lists: directories (``--allow-local-root``)
that local code must lie in, and URL prefixes (``--allow-git-prefix``) that remote code must
start with. ``None`` leaves that kind unrestricted.

URLs are never compared as text, which a ``%2e%2e`` segment, a userinfo part or a parser of
another opinion walks around. Each URL is parsed into a :class:`Url`: scheme, userinfo,
host (lowercased, IDNA-encoded, without a trailing dot), port (the scheme's default made
explicit) and path segments (percent-decoded, then ``.`` and ``..`` resolved, empty ones
dropped; a decoded ``/``, ``\\`` or control character, or a ``..`` above the root, is
refused). A URL is within a prefix when scheme, userinfo, host and port are equal and the
prefix's segments begin the URL's, so ``/allowed`` admits ``/allowed/x`` but not
``/allowedX``. Userinfo is admitted only when the prefix has the same. The URL handed on to
git or the installer is the canonical form of what was checked (:meth:`Url.text`), so no
other parser gets a say. ``file:`` URLs name local paths, which are resolved (symlinks
followed) and confined like paths; scp-like ``user@host:path`` addresses match only
prefixes written the same way.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

DEFAULT_PORTS = {"http": 80, "https": 443, "ssh": 22, "git": 9418, "ftp": 21, "scp": 22}
"""Ports made explicit when a URL leaves them out."""

LOCAL_ROOT_OPTION = "--allow-local-root"
URL_PREFIX_OPTION = "--allow-git-prefix"

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
_SCP = re.compile(r"(?:(?P<user>[^@/:\s]+)@)?(?P<host>\[[^\]/]+\]|[^@/:\s\[\]]+):(?P<path>.*)")
_BAD_CHARS = re.compile(r"[\x00-\x20\x7f\\]")
_SEGMENT_SAFE = "!$&'()*+,;=-._~"  # not '@' or ':', which other parsers read as more


class LocationError(ValueError):
    """A URL or path that cannot be understood well enough to be checked."""


class NotAllowedError(ValueError):
    """A URL or path outside the server's allow-lists; the message names the rule."""


@dataclass(frozen=True, slots=True)
class Url:
    """A parsed, normalised URL (see the module docstring)."""

    scheme: str
    userinfo: str | None
    host: str
    port: int | None
    segments: tuple[str, ...]
    query: str = ""
    fragment: str = ""

    @property
    def is_local(self) -> bool:
        """Whether this is a ``file:`` URL (a local path)."""
        return self.scheme == "file"

    @property
    def path(self) -> Path:
        """The local path of a ``file:`` URL."""
        return Path("/", *self.segments)

    def within(self, prefix: Url) -> bool:
        """Whether this URL lies under ``prefix``, compared part by part."""
        return (
            self.scheme == prefix.scheme
            and self.userinfo == prefix.userinfo
            and self.host == prefix.host
            and self.port == prefix.port
            and self.segments[: len(prefix.segments)] == prefix.segments
        )

    def text(self) -> str:
        """The canonical form: what was checked is what is fetched."""
        if self.scheme == "scp":
            user = "" if self.userinfo is None else f"{self.userinfo}@"
            absolute = self.segments[:1] == ("/",)
            rest = "/".join(self.segments[1:] if absolute else self.segments)
            return f"{user}{self.host}:{'/' if absolute else ''}{rest}"
        path = "/" + "/".join(quote(s, safe=_SEGMENT_SAFE) for s in self.segments)
        if self.scheme == "file":
            return f"file://{path}"
        user = "" if self.userinfo is None else f"{quote(self.userinfo, safe=':!$&()*+,;=')}@"
        default = self.port is None or self.port == DEFAULT_PORTS.get(self.scheme)
        port = "" if default else f":{self.port}"
        query = f"?{self.query}" if self.query else ""
        fragment = f"#{self.fragment}" if self.fragment else ""
        return f"{self.scheme}://{user}{self.host}{port}{path}{query}{fragment}"


def parse_url(text: str) -> Url:
    """Parse and normalise a URL, an scp-like ``user@host:path`` or an absolute path.

    An absolute path is taken as the ``file:`` URL of that path.

    Raises:
        LocationError: it is none of those, or has a part that cannot be compared safely.
    """
    if _BAD_CHARS.search(text):
        raise LocationError("contains a space, a backslash or a control character")
    if text.startswith("/"):
        return Url("file", None, "", None, _segments(text, decode=False))
    scheme_end = text.find("://")
    if scheme_end == -1 or not _SCHEME.fullmatch(text[:scheme_end]):
        if text.startswith("file:"):
            raise LocationError("a file: URL must be file:///absolute/path")
        scp = _SCP.fullmatch(text)
        if scp is None or len(scp["host"]) < 2:  # one letter: a Windows drive, not a host
            raise LocationError("not a URL (scheme://host/path), scp-like address or path")
        path = scp["path"]
        segments = _segments(path, decode=False)
        if path.startswith("/"):
            segments = ("/", *segments)
        return Url("scp", scp["user"], _host(scp["host"]), DEFAULT_PORTS["scp"], segments)
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise LocationError(f"malformed URL: {exc}") from None
    scheme = parts.scheme.lower()
    netloc = parts.netloc
    userinfo, at, hostport = netloc.rpartition("@")
    if scheme == "file":
        if at or hostport.lower() not in ("", "localhost") or parts.query or parts.fragment:
            raise LocationError("a file: URL must be file:///absolute/path")
        return Url("file", None, "", None, _segments(parts.path, decode=True))
    if not parts.hostname:
        raise LocationError("the URL names no host")
    host = hostport.rsplit(":", 1)[0] if port is not None or hostport.endswith(":") else hostport
    return Url(
        scheme,
        unquote(userinfo, errors="strict") if at else None,
        _host(host),
        port if port is not None else DEFAULT_PORTS.get(scheme),
        _segments(parts.path, decode=True),
        parts.query,
        parts.fragment,
    )


def _host(raw: str) -> str:
    if raw.startswith("["):
        try:
            return f"[{ipaddress.IPv6Address(raw[1:-1]).compressed}]"
        except ValueError:
            raise LocationError(f"invalid IPv6 address {raw!r}") from None
    if not raw or "%" in raw:
        raise LocationError("the host is empty or percent-encoded")
    host = raw.lower().removesuffix(".")
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:
        raise LocationError(f"invalid host name {raw!r}") from None


def _segments(path: str, *, decode: bool) -> tuple[str, ...]:
    """Decoded path segments with dot segments resolved and empty ones dropped."""
    resolved: list[str] = []
    for raw in path.split("/"):
        try:
            segment = unquote(raw, errors="strict") if decode else raw
        except UnicodeDecodeError:
            raise LocationError("a path segment is not UTF-8 once decoded") from None
        if "/" in segment or (decode and _BAD_CHARS.search(segment.replace(" ", ""))):
            raise LocationError("a path segment decodes to '/', '\\' or a control character")
        if segment in ("", "."):
            continue
        if segment == "..":
            if not resolved:
                raise LocationError("'..' climbs above the root of the path")
            resolved.pop()
            continue
        resolved.append(segment)
    return tuple(resolved)


def resolve_local(url: Url) -> Url:
    """A ``file:`` URL with its path resolved on disk (symlinks followed)."""
    if not url.is_local:
        return url
    return Url("file", None, "", None, _segments(str(url.path.resolve()), decode=False))


@dataclass(frozen=True, slots=True)
class SourcePolicy:
    """Which sources and dependencies a server accepts; ``None`` leaves a kind unrestricted.

    Attributes:
        allowed_local_roots: local code (a local source's deployment directory, ``file:``
            git sources, dependency paths and ``file:`` URLs) must lie inside one of these
            directories, symlinks followed.
        allowed_git_prefixes: URLs of git sources and of dependencies (``git+`` URLs and
            direct archive URLs included) must lie within one of these prefixes, compared
            part by part (see the module docstring). An absolute path is a ``file:`` prefix.
    """

    allowed_local_roots: tuple[Path, ...] | None = None
    allowed_git_prefixes: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for prefix in self.allowed_git_prefixes or ():
            try:
                parsed = parse_url(prefix)
            except LocationError as exc:
                raise ValueError(f"{URL_PREFIX_OPTION} {prefix!r}: {exc}") from None
            if parsed.query or parsed.fragment:
                raise ValueError(f"{URL_PREFIX_OPTION} {prefix!r}: a prefix has no ? or #")

    def _prefixes(self) -> list[Url]:
        return [resolve_local(parse_url(p)) for p in self.allowed_git_prefixes or ()]

    def check_url(self, url: Url, what: str) -> Url:
        """``url`` in canonical form when the URL allow-list admits it (and, for a ``file:``
        URL, the local roots too); raises :class:`NotAllowedError` naming ``what`` and the
        rule otherwise."""
        url = resolve_local(url)
        if self.allowed_git_prefixes is not None and not any(
            url.within(p) for p in self._prefixes()
        ):
            allowed = ", ".join(self.allowed_git_prefixes)
            raise NotAllowedError(
                f"{what} is not allowed: {url.text()} is not within an allowed prefix "
                f"({URL_PREFIX_OPTION}: {allowed})"
            )
        if url.is_local:
            self.check_path(url.path, what)
        return url

    def check_path(self, path: Path, what: str, *, also: Iterable[Path] = ()) -> Path:
        """``path`` resolved when it lies inside an allowed local root (or one of ``also``,
        directories already admitted); raises :class:`NotAllowedError` otherwise."""
        resolved = path.resolve()
        roots = self.allowed_local_roots
        if roots is None:
            return resolved
        if not any(resolved.is_relative_to(r.resolve()) for r in (*roots, *also)):
            allowed = ", ".join(str(r) for r in roots)
            raise NotAllowedError(
                f"{what} resolves to {resolved}, outside the allowed roots "
                f"({LOCAL_ROOT_OPTION}: {allowed})"
            )
        return resolved
