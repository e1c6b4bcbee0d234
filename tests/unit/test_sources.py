"""Service sources (local in place, git clones from a local repository) and env files."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from types import MappingProxyType

import pytest

from llama_mesh.server.deployment_config import ServiceConfig, SourceConfig
from llama_mesh.server.sources import (
    SourceError,
    SourcePolicy,
    parse_git_source,
    read_env_file,
    resolve_env,
    sync_source,
)

OPEN = SourcePolicy()
needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def git(*args: str, cwd: Path) -> None:
    env = {
        **os.environ,
        **{
            f"GIT_{who}_{what}": val
            for who in ("AUTHOR", "COMMITTER")
            for what, val in (("NAME", "test"), ("EMAIL", "test@example.com"))
        },
    }
    subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True)


@pytest.fixture
def origin(tmp_path: Path) -> str:
    """A bare repository: ``main`` has wf.py 'v2', tag v1 has 'v1', branch feature 'feature'."""
    work = tmp_path / "work"
    work.mkdir()
    git("init", "-q", "-b", "main", cwd=work)
    (work / "wf.py").write_text("v1")
    git("add", "wf.py", cwd=work)
    git("commit", "-q", "-m", "one", cwd=work)
    git("tag", "v1", cwd=work)
    git("checkout", "-q", "-b", "feature", cwd=work)
    (work / "wf.py").write_text("feature")
    git("commit", "-q", "-am", "feature", cwd=work)
    git("checkout", "-q", "main", cwd=work)
    (work / "wf.py").write_text("v2")
    git("commit", "-q", "-am", "two", cwd=work)
    git("clone", "-q", "--bare", str(work), str(tmp_path / "origin.git"), cwd=tmp_path)
    return (tmp_path / "origin.git").as_uri()


def local(name: str) -> SourceConfig:
    return SourceConfig("local", name)


async def test_local_source_is_used_in_place(tmp_path: Path) -> None:
    """A local source is not copied: the root returned is the deployment directory."""
    (tmp_path / "src").mkdir()
    root = await sync_source(local("src"), base_path=tmp_path, dest=tmp_path / "d", policy=OPEN)
    assert root == tmp_path.resolve()
    assert not (tmp_path / "d").exists()
    same = await sync_source(local("."), base_path=tmp_path, dest=tmp_path / "d", policy=OPEN)
    assert same == root


async def test_local_source_absolute_inside_base_is_accepted(tmp_path: Path) -> None:
    """An absolute local source is fine as long as it lies inside the deployment directory."""
    (tmp_path / "src").mkdir()
    source = local(str(tmp_path / "src"))
    assert await sync_source(source, base_path=tmp_path, dest=tmp_path, policy=OPEN) == (
        tmp_path.resolve()
    )


@pytest.mark.parametrize("name", ["../outside", "src/../../outside", "/"])
async def test_local_source_escaping_base_is_refused(tmp_path: Path, name: str) -> None:
    """``..`` (or an absolute path) leading out of the deployment directory is refused."""
    base = tmp_path / "deployment"
    (base / "src").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    with pytest.raises(SourceError, match="outside the deployment directory"):
        await sync_source(local(name), base_path=base, dest=tmp_path / "d", policy=OPEN)


async def test_local_source_symlink_escape_is_refused(tmp_path: Path) -> None:
    """A symlink inside the deployment directory pointing out of it is refused."""
    base = tmp_path / "deployment"
    base.mkdir()
    (tmp_path / "secret").mkdir()
    (base / "src").symlink_to(tmp_path / "secret", target_is_directory=True)
    with pytest.raises(SourceError, match="outside the deployment directory"):
        await sync_source(local("src"), base_path=base, dest=tmp_path / "d", policy=OPEN)


async def test_local_source_missing_or_not_a_directory(tmp_path: Path) -> None:
    """A missing directory, or a file, is refused with a clear message."""
    with pytest.raises(SourceError, match=r"'src' .* does not exist"):
        await sync_source(local("src"), base_path=tmp_path, dest=tmp_path, policy=OPEN)
    (tmp_path / "file").write_text("x")
    with pytest.raises(SourceError, match="is not a directory"):
        await sync_source(local("file"), base_path=tmp_path, dest=tmp_path, policy=OPEN)


async def test_local_allow_list(tmp_path: Path) -> None:
    """With allowed_local_roots set, only deployment directories inside one are accepted."""
    (tmp_path / "a" / "src").mkdir(parents=True)
    (tmp_path / "b" / "src").mkdir(parents=True)
    policy = SourcePolicy(allowed_local_roots=(tmp_path / "a",))
    base_a, base_b = tmp_path / "a", tmp_path / "b"
    assert await sync_source(local("src"), base_path=base_a, dest=tmp_path, policy=policy)
    with pytest.raises(SourceError, match="outside the allowed roots"):
        await sync_source(local("src"), base_path=base_b, dest=tmp_path, policy=policy)


@pytest.mark.parametrize(
    ("name", "url", "ref"),
    [
        ("https://host/org/repo.git", "https://host/org/repo.git", None),
        ("https://host/org/repo.git@v1.2", "https://host/org/repo.git", "v1.2"),
        ("https://user@host/org/repo.git", "https://user@host/org/repo.git", None),
        ("https://user@host/org/repo.git@main", "https://user@host/org/repo.git", "main"),
        ("git@host:org/repo.git", "git@host:org/repo.git", None),
        ("git@host:org/repo.git@main", "git@host:org/repo.git", "main"),
        ("git@host:repo.git", "git@host:repo.git", None),
        ("git@host:repo.git@v2", "git@host:repo.git", "v2"),
        ("https://user@host", "https://user@host", None),
        ("/srv/git/repo.git@v1", "/srv/git/repo.git", "v1"),
        ("file:///tmp/x/origin.git@feature", "file:///tmp/x/origin.git", "feature"),
    ],
)
def test_parse_git_source(name: str, url: str, ref: str | None) -> None:
    """The ref is after the last '@' only when that '@' follows the last '/' and the host."""
    assert parse_git_source(name) == (url, ref)


@pytest.mark.parametrize("name", ["https://h/r.git@", "--upload-pack=x", "https://h/r.git@-x"])
def test_parse_git_source_rejects_empty_and_option_like(name: str) -> None:
    """An empty ref, or a URL or ref that git would read as an option, is refused."""
    with pytest.raises(SourceError):
        parse_git_source(name)


@needs_git
@pytest.mark.parametrize(("ref", "content"), [("v1", "v1"), ("feature", "feature"), (None, "v2")])
async def test_git_clone_of_tag_branch_and_default(
    origin: str, tmp_path: Path, ref: str | None, content: str
) -> None:
    """A tag, a branch, or (no ref) the default branch is cloned into dest."""
    name = origin if ref is None else f"{origin}@{ref}"
    dest = tmp_path / "clone"
    root = await sync_source(SourceConfig("git", name), base_path=tmp_path, dest=dest, policy=OPEN)
    assert root == dest
    assert (dest / "wf.py").read_text() == content


@needs_git
async def test_git_resync_is_a_fresh_clone(origin: str, tmp_path: Path) -> None:
    """An existing dest is removed before cloning again."""
    dest = tmp_path / "clone"
    dest.mkdir()
    (dest / "stale.txt").write_text("old")
    await sync_source(SourceConfig("git", origin), base_path=tmp_path, dest=dest, policy=OPEN)
    assert not (dest / "stale.txt").exists()
    assert (dest / "wf.py").read_text() == "v2"


@needs_git
async def test_git_bad_ref_reports_git_message(origin: str, tmp_path: Path) -> None:
    """A ref that does not exist is a SourceError carrying git's own message."""
    dest = tmp_path / "clone"
    with pytest.raises(SourceError) as info:
        await sync_source(
            SourceConfig("git", f"{origin}@nope"), base_path=tmp_path, dest=dest, policy=OPEN
        )
    assert "nope" in str(info.value)
    assert "not found" in str(info.value)
    assert not dest.exists()


@needs_git
async def test_git_clone_timeout(origin: str, tmp_path: Path) -> None:
    """A clone exceeding its timeout is killed and reported; dest is cleaned up."""
    dest = tmp_path / "clone"
    with pytest.raises(SourceError, match="timed out"):
        await sync_source(
            SourceConfig("git", origin),
            base_path=tmp_path,
            dest=dest,
            policy=OPEN,
            clone_timeout=0,
        )
    assert not dest.exists()


@needs_git
async def test_git_allow_list(origin: str, tmp_path: Path) -> None:
    """allowed_git_prefixes admits matching URLs and refuses others before cloning."""
    allowed = SourcePolicy(allowed_git_prefixes=(tmp_path.as_uri() + "/",))
    dest = tmp_path / "clone"
    await sync_source(SourceConfig("git", origin), base_path=tmp_path, dest=dest, policy=allowed)
    assert (dest / "wf.py").exists()
    other = SourcePolicy(allowed_git_prefixes=("https://github.com/run-llama/",))
    with pytest.raises(SourceError, match="not within an allowed prefix"):
        await sync_source(
            SourceConfig("git", origin), base_path=tmp_path, dest=tmp_path / "x", policy=other
        )
    assert not (tmp_path / "x").exists()
    inside = SourcePolicy(allowed_git_prefixes=((tmp_path / "inside").as_uri(),))
    sneaky = f"{tmp_path.as_uri()}/inside/%2e%2e/origin.git"
    with pytest.raises(SourceError, match="not within an allowed prefix"):
        await sync_source(
            SourceConfig("git", sneaky), base_path=tmp_path, dest=tmp_path / "x", policy=inside
        )


def service(env: dict[str, str] | None = None, env_files: tuple[str, ...] = ()) -> ServiceConfig:
    return ServiceConfig(
        id="s",
        name="S",
        source=SourceConfig("local", "."),
        path="wf:w",
        env=MappingProxyType(env or {}),
        env_files=env_files,
    )


def test_env_file_syntax(tmp_path: Path) -> None:
    """dotenv syntax: export, comments, blank lines, quotes, escapes, inline comments."""
    (tmp_path / ".env").write_text(
        "# a comment\n"
        "\n"
        "PLAIN=value\n"
        "export EXPORTED=yes\n"
        "SPACED = spaced value  \n"
        "INLINE=abc # comment\n"
        "HASH=a#b\n"
        "EMPTY=\n"
        "SINGLE='its $NOT \\n expanded'\n"
        'DOUBLE="line\\nbreak \\"quoted\\" # not a comment" # comment\n'
        "URL=postgres://u:p@h/db?x=1\n"
    )
    assert read_env_file(tmp_path / ".env") == {
        "PLAIN": "value",
        "EXPORTED": "yes",
        "SPACED": "spaced value",
        "INLINE": "abc",
        "HASH": "a#b",
        "EMPTY": "",
        "SINGLE": "its $NOT \\n expanded",
        "DOUBLE": 'line\nbreak "quoted" # not a comment',
        "URL": "postgres://u:p@h/db?x=1",
    }


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("OK=1\nnot a pair\n", ":2: expected KEY=VALUE"),
        ("A='open\n", ":1: unterminated ' quote"),
        ('A="x" trailing\n', ":1: unexpected text after the closing quote"),
        ("1A=x\n", ":1: expected KEY=VALUE"),
    ],
)
def test_env_file_errors_name_file_and_line(tmp_path: Path, content: str, fragment: str) -> None:
    """A malformed env file line is a SourceError naming the file and the line."""
    path = tmp_path / "bad.env"
    path.write_text(content)
    with pytest.raises(SourceError) as info:
        read_env_file(path)
    assert str(info.value).startswith(str(path))
    assert fragment in str(info.value)


def test_env_precedence_files_override_env(tmp_path: Path) -> None:
    """As in Llama Deploy 0.8: env-files override ``env``, later files override earlier."""
    (tmp_path / "a.env").write_text("A=from-a\nB=from-a\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.env").write_text("B=from-b\n")
    svc = service(env={"A": "x", "B": "y", "C": "z"}, env_files=("a.env", "sub/b.env"))
    assert resolve_env(svc, base_dir=tmp_path) == {"A": "from-a", "B": "from-b", "C": "z"}


def test_env_without_files_is_the_env_mapping(tmp_path: Path) -> None:
    """Without env-files the result is exactly the declared ``env`` (no process env)."""
    assert resolve_env(service(env={"K": "v"}), base_dir=tmp_path) == {"K": "v"}


def test_env_file_escape_is_refused(tmp_path: Path) -> None:
    """An env file outside the service root, via ``..`` or a symlink, is refused."""
    base = tmp_path / "svc"
    base.mkdir()
    (tmp_path / "secret.env").write_text("S=1\n")
    with pytest.raises(SourceError, match="outside"):
        resolve_env(service(env_files=("../secret.env",)), base_dir=base)
    (base / "link.env").symlink_to(tmp_path / "secret.env")
    with pytest.raises(SourceError, match="outside"):
        resolve_env(service(env_files=("link.env",)), base_dir=base)


def test_missing_env_file(tmp_path: Path) -> None:
    """A missing env file is a SourceError naming it."""
    with pytest.raises(SourceError, match=r"missing\.env does not exist"):
        resolve_env(service(env_files=("missing.env",)), base_dir=tmp_path)
