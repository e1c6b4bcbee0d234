"""Bringing a service's source onto disk, and reading the service's declared environment.

Two source types, as in Llama Deploy 0.8:

* ``local``: ``name`` is a directory relative to the deployment's ``base_path`` (the directory
  of the deployment file). It is used in place, never copied: the server runs on the machine
  that holds it, so a copy would only go stale. It must resolve (following ``..`` and
  symlinks) to a directory inside ``base_path``.
* ``git``: ``name`` is a clone URL with an optional ``@ref`` (branch or tag) suffix. It is
  cloned shallowly into ``dest``; a re-sync removes ``dest`` and clones afresh.

:func:`sync_source` returns the service's *root*: the directory that the service's ``path``
(``dir/module:attr``) and ``env-files`` are relative to. For git that is the clone. For local
sources it is ``base_path`` itself, exactly as in 0.8, where ``path: src/workflow:wf`` goes with
``source: {type: local, name: src}`` (0.8 copied ``base_path/src`` to ``<deployment dir>/src``
and resolved paths against ``<deployment dir>``; with ``--local`` that directory *was*
``base_path``).

Errors are :class:`SourceError` (a ``ValueError``) with a message meant for the user.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
from pathlib import Path

from llama_mesh.server.allowlist import LocationError, NotAllowedError, parse_url
from llama_mesh.server.allowlist import SourcePolicy as SourcePolicy  # noqa: PLC0414 (re-export)
from llama_mesh.server.children import kill_and_wait
from llama_mesh.server.deployment_config import ServiceConfig, SourceConfig

logger = logging.getLogger(__name__)

GIT_TIMEOUT = 300.0
"""Seconds a ``git clone`` may take."""

_ENV_LINE = re.compile(r"(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "$": "$"}
_STDERR_TAIL = 2000
_GIT_PROTOCOLS = "file:git:http:https:ssh"


class SourceError(ValueError):
    """A service source cannot be used: refused by policy, missing, or failed to clone."""


class SourceNotAllowedError(SourceError):
    """A source the server's policy refuses: outside the allowed roots or git prefixes."""


async def sync_source(
    source: SourceConfig,
    *,
    base_path: Path,
    dest: Path,
    policy: SourcePolicy,
    local: bool = False,
    clone_timeout: float = GIT_TIMEOUT,
) -> Path:
    """Make ``source`` available on disk and return the service's root directory.

    Args:
        source: the service's ``source`` section.
        base_path: the directory of the deployment file; local sources are relative to it.
        dest: where a git source is cloned (removed first when it exists). Unused for local
            sources.
        policy: what the server accepts.
        local: 0.8's "use local sources in place" flag. Local sources are always used in
            place here, so it changes nothing; it is accepted for the compatible API.
        clone_timeout: seconds the git clone may take.

    Raises:
        SourceError: refused by ``policy``, escaping ``base_path``, missing, or clone failed.
    """
    del local  # local sources are always used in place, see the module docstring
    if source.type == "local":
        return _local_root(source.name, base_path, policy)
    url, ref = parse_git_source(check_source(source, base_path=base_path, policy=policy).name)
    await _clone(url, ref, dest, clone_timeout)
    return dest


def check_source(source: SourceConfig, *, base_path: Path, policy: SourcePolicy) -> SourceConfig:
    """``source`` as it will be fetched, when ``policy`` admits it; nothing is fetched.

    A git URL is checked (and then cloned) in its canonical form when an allow-list applies
    to it (see :mod:`llama_mesh.server.allowlist`); without one it is used as written.

    Raises:
        SourceNotAllowedError: refused by ``policy`` or escaping ``base_path``.
        SourceError: a git source that cannot be parsed.
    """
    if source.type == "local":
        _local_root(source.name, base_path, policy, must_exist=False)
        return source
    url, ref = parse_git_source(source.name)
    if policy.allowed_git_prefixes is None and policy.allowed_local_roots is None:
        return source
    what = f"git source {url!r}"
    try:
        parsed = parse_url(url)
    except LocationError as exc:
        remote = "://" in url and not url.lower().startswith("file:")
        if remote and policy.allowed_git_prefixes is None:
            return source  # only local code is confined, and this names none
        raise SourceNotAllowedError(f"{what} cannot be checked against the policy: {exc}") from None
    try:
        canonical = policy.check_url(parsed, what).text()
    except NotAllowedError as exc:
        raise SourceNotAllowedError(str(exc)) from None
    return SourceConfig("git", canonical if ref is None else f"{canonical}@{ref}")


def parse_git_source(name: str) -> tuple[str, str | None]:
    """Split ``URL[@ref]`` into the URL and the ref.

    The ref is what follows the last ``@`` when that ``@`` comes after the last ``/`` and
    after the host (the ``user@host`` of ``scheme://user@host/`` and of scp-like
    ``user@host:path``), so ``git@host:org/repo.git``, ``git@host:repo.git`` and
    ``https://user@host/repo.git`` have no ref, while ``git@host:org/repo.git@main`` and
    ``https://host/repo.git@v1.2`` do. Refs containing ``/`` are therefore not supported.
    """
    url, ref = name, None
    scheme = name.find("://")
    colon, first_slash = name.find(":"), name.find("/")
    if scheme != -1:
        host_end = name.find("/", scheme + 3)
        host_end = len(name) if host_end == -1 else host_end
    elif colon != -1 and (first_slash == -1 or colon < first_slash):
        host_end = colon  # scp-like user@host:path
    else:
        host_end = 0
    at = name.rfind("@")
    if at > max(name.rfind("/"), host_end):
        url, ref = name[:at], name[at + 1 :]
        if not ref:
            raise SourceError(f"git source {name!r} has an empty ref after '@'")
    if not url or url.startswith("-") or (ref is not None and ref.startswith("-")):
        raise SourceError(f"invalid git source {name!r}")
    return url, ref


def _local_root(
    name: str, base_path: Path, policy: SourcePolicy, *, must_exist: bool = True
) -> Path:
    base = base_path.resolve()
    target = (base / name).resolve()
    if not target.is_relative_to(base):
        raise SourceNotAllowedError(
            f"local source {name!r} resolves to {target}, outside the deployment directory {base}"
        )
    try:
        # base, not just target: the service's path and env-files are relative to base
        policy.check_path(base, f"the deployment directory of local source {name!r}")
    except NotAllowedError as exc:
        raise SourceNotAllowedError(str(exc)) from None
    if not must_exist:
        return base
    if not target.is_dir():
        what = "is not a directory" if target.exists() else "does not exist"
        raise SourceError(f"local source {name!r} ({target}) {what}")
    return base


async def _clone(url: str, ref: str | None, dest: Path, seconds: float) -> None:
    await asyncio.to_thread(_prepare, dest)
    branch = [] if ref is None else ["--branch", ref]
    argv = ["git", "clone", "--quiet", "--depth", "1", *branch, "--", url, str(dest)]
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_ALLOW_PROTOCOL": _GIT_PROTOCOLS}
    where = url if ref is None else f"{url}@{ref}"
    logger.info("cloning %s into %s", where, dest)
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
    except OSError as exc:
        raise SourceError(f"cannot run git: {exc}") from exc
    try:
        async with asyncio.timeout(seconds):
            _, stderr = await proc.communicate()
    except TimeoutError:
        await kill_and_wait(proc)
        await asyncio.to_thread(_remove, dest)
        raise SourceError(f"git clone of {where!r} timed out after {seconds:g}s") from None
    except BaseException:  # cancelled: do not leave git running
        await asyncio.shield(kill_and_wait(proc))
        raise
    if proc.returncode != 0:
        await asyncio.to_thread(_remove, dest)
        tail = stderr.decode("utf-8", "replace").strip()[-_STDERR_TAIL:]
        raise SourceError(f"git clone of {where!r} failed (exit {proc.returncode}): {tail}")


def _prepare(dest: Path) -> None:
    _remove(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path)


def resolve_env(service: ServiceConfig, *, base_dir: Path) -> dict[str, str]:
    """The variables a service declares: its ``env``, overridden by its ``env-files``.

    This is only the service's own variables; the caller chooses the base environment.
    Precedence follows Llama Deploy 0.8, whose e2e tests pin it: values from ``env-files``
    override ``env`` (and later files override earlier ones).

    Args:
        service: the service.
        base_dir: the service's root (from :func:`sync_source`); env files are relative to
            it and must stay inside it.

    Raises:
        SourceError: an env file escapes ``base_dir``, is missing, or has a bad line (the
            message names the file and the line).
    """
    result = dict(service.env)
    base = base_dir.resolve()
    for name in service.env_files:
        path = (base / name).resolve()
        if not path.is_relative_to(base):
            raise SourceNotAllowedError(f"env file {name!r} resolves to {path}, outside {base}")
        result.update(read_env_file(path))
    return result


def read_env_file(path: Path) -> dict[str, str]:
    """Parse a dotenv file: ``KEY=VALUE``, ``export KEY=VALUE``, comments, quoted values.

    Unquoted values end at `` #`` (a comment) and are stripped; single-quoted values are
    literal; double-quoted values understand ``\\n \\t \\r \\" \\\\ \\$``. Values span one
    line and ``${VAR}`` is not expanded.

    Errors name the file and the line but never quote the file: an env file holds secrets,
    and a path that names some other file (``/etc/shadow``) must not leak it through the
    error, which is stored with the deployment and shown to its users.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise SourceError(f"env file {path} does not exist") from None
    except UnicodeDecodeError:
        raise SourceError(f"env file {path} is not UTF-8 text") from None
    except OSError as exc:
        raise SourceError(f"cannot read env file {path}: {exc.strerror or 'error'}") from None
    values: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        match = _ENV_LINE.fullmatch(stripped)
        if match is None:
            raise SourceError(f"{path}:{number}: expected KEY=VALUE (the line is not shown)")
        try:
            values[match[1]] = _env_value(match[2])
        except ValueError as exc:
            raise SourceError(f"{path}:{number}: {exc}") from None
    return values


def _env_value(raw: str) -> str:
    if raw[:1] in ("'", '"'):
        quote = raw[0]
        chars: list[str] = []
        i = 1
        while i < len(raw) and raw[i] != quote:
            if quote == '"' and raw[i] == "\\" and i + 1 < len(raw):
                chars.append(_ESCAPES.get(raw[i + 1], "\\" + raw[i + 1]))
                i += 2
                continue
            chars.append(raw[i])
            i += 1
        if i >= len(raw):
            raise ValueError(f"unterminated {quote} quote")
        rest = raw[i + 1 :].strip()
        if rest and not rest.startswith("#"):
            raise ValueError("unexpected text after the closing quote")
        value = "".join(chars)
    else:
        value = re.split(r"(?:^|\s)#", raw, maxsplit=1)[0].strip()
    if "\x00" in value:
        raise ValueError("NUL characters are not allowed")
    return value
