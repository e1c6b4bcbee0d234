"""What each ``python-dependencies`` entry is, and whether the server admits it.

Decided before anything is downloaded or built, because installing a local directory, an
archive or a VCS checkout runs its build backend. An entry is one of:

* a requirement on a package index (``httpx>=0.27``, ``pkg[extra]; python_version>"3.10"``):
  always admitted; the index is the server's.
* a direct reference ``name @ URL-or-path`` (PEP 508), a bare URL (``https://host/x.whl``,
  ``file:///x``, ``git+https://host/repo.git@v1``, also ``hg+``, ``svn+``, ``bzr+``) or a path
  (``./lib``, ``/opt/wheels/x.whl``, ``pkg.tar.gz``): confined by the server's
  :class:`~llama_mesh.server.allowlist.SourcePolicy` exactly as sources are. Paths and
  ``file:`` URLs (VCS ones too) must lie inside the service's own code root or an allowed
  local root; other URLs within an allowed URL prefix. A relative path is relative to the
  service's code root (the deployment directory, or the clone of a git source).

Installer options (``-e``, ``-r``, ``--index-url``, ``-f`` ...) are never admitted: they are
not dependencies, and some of them point the installer elsewhere. What is admitted is
handed to the installer in the canonical form that was checked.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement

from llama_mesh.server.allowlist import (
    LocationError,
    NotAllowedError,
    SourcePolicy,
    Url,
    parse_url,
)

_VCS = re.compile(r"(?P<vcs>git|hg|svn|bzr)\+(?P<url>.+)", re.IGNORECASE | re.DOTALL)
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+:")
_OPTION = re.compile(r"\s-")
_ARCHIVES = (".whl", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar", ".zip")


class DependencyError(ValueError):
    """A dependency entry that is not a requirement, a URL or a path."""


class DependencyNotAllowedError(DependencyError):
    """A dependency outside the server's allow-lists; the message names the entry and rule."""


def confine_dependencies(
    dependencies: Sequence[str], *, root: Path, policy: SourcePolicy, key_path: str
) -> tuple[str, ...]:
    """Each entry in the form to install, once ``policy`` admits it.

    Args:
        dependencies: the service's ``python-dependencies``.
        root: the service's code root; relative paths are relative to it, and paths inside
            it are admitted.
        policy: the server's allow-lists.
        key_path: where the list is in the deployment file, for errors
            (``services.echo.python-dependencies``).

    Raises:
        DependencyNotAllowedError: an entry the policy refuses (or an installer option).
        DependencyError: an entry that is none of the forms above.
    """
    return tuple(
        _confine(dep.strip(), root.resolve(), policy, f"{key_path}[{i}] {dep.strip()!r}")
        for i, dep in enumerate(dependencies)
    )


def _confine(dep: str, root: Path, policy: SourcePolicy, what: str) -> str:
    if dep.startswith("-") or _OPTION.search(dep):
        raise DependencyNotAllowedError(
            f"{what}: installer options are not allowed, only requirements, URLs and paths"
        )
    if _URL.match(dep):
        return _location(dep, root, policy, what)
    try:
        requirement: Requirement | None = Requirement(dep)
    except InvalidRequirement:
        requirement = None
    if requirement is not None and requirement.url is not None:
        requirement.url = _location(requirement.url, root, policy, what, as_url=True)
        return str(requirement)
    if requirement is not None and not _looks_like_path(dep):
        return str(requirement)
    if _looks_like_path(dep):
        return _path(dep, root, policy, what)
    raise DependencyError(
        f"{what}: not a requirement (name[extras] version; marker), a URL or a path"
    )


def _looks_like_path(dep: str) -> bool:
    return (
        "/" in dep or "\\" in dep or dep.startswith((".", "~")) or dep.lower().endswith(_ARCHIVES)
    )


def _location(
    text: str, root: Path, policy: SourcePolicy, what: str, *, as_url: bool = False
) -> str:
    """A URL (or, after ``name @``, possibly a path) in the form to install."""
    if not _URL.match(text):
        path = _path(text, root, policy, what)
        return Path(path).as_uri() if as_url else path
    unrestricted = policy.allowed_git_prefixes is None and policy.allowed_local_roots is None
    vcs = _VCS.fullmatch(text)
    body, _, fragment = (vcs["url"] if vcs else text).partition("#")
    _check_fragment(fragment, what)
    ref = None
    if vcs:
        body, at, ref_text = body.rpartition("@") if _has_ref(body) else (body, "", "")
        ref = ref_text if at else None
    try:
        url = parse_url(body)
    except LocationError as exc:
        remote = not body.lower().startswith("file:")
        if unrestricted or (remote and policy.allowed_git_prefixes is None):
            return text  # nothing to confine it to
        raise DependencyNotAllowedError(
            f"{what} cannot be checked against the policy: {exc}"
        ) from None
    if url.scheme == "scp":
        raise DependencyError(f"{what}: not a URL the installer understands")
    if unrestricted:
        return text
    if url.is_local:
        try:
            resolved = policy.check_path(url.path, what, also=(root,))
        except NotAllowedError as exc:
            raise DependencyNotAllowedError(str(exc)) from None
        if policy.allowed_git_prefixes is not None and vcs:
            _check_url(url, policy, what)
        checked = resolved.as_uri()
    else:
        checked = _check_url(url, policy, what)
    prefix = f"{vcs['vcs'].lower()}+" if vcs else ""
    suffix = (f"@{ref}" if ref is not None else "") + (f"#{fragment}" if fragment else "")
    return f"{prefix}{checked}{suffix}"


def _check_url(url: Url, policy: SourcePolicy, what: str) -> str:
    try:
        return policy.check_url(url, what).text()
    except NotAllowedError as exc:
        raise DependencyNotAllowedError(str(exc)) from None


def _has_ref(body: str) -> bool:
    """Whether a VCS URL ends with ``@ref`` (an ``@`` after the last ``/``)."""
    at = body.rfind("@")
    return at > body.rfind("/") and at > body.find("://") + 2


def _check_fragment(fragment: str, what: str) -> None:
    for item in fragment.split("&"):
        key, _, value = item.partition("=")
        if key == "subdirectory" and (value.startswith("/") or ".." in value.split("/")):
            raise DependencyNotAllowedError(f"{what}: subdirectory must stay inside the source")


def _path(text: str, root: Path, policy: SourcePolicy, what: str) -> str:
    path = Path(text).expanduser()
    if not path.is_absolute():
        path = root / path
    try:
        return str(policy.check_path(path, what, also=(root,)))
    except NotAllowedError as exc:
        raise DependencyNotAllowedError(str(exc)) from None
