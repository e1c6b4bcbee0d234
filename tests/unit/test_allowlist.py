"""Allow-lists compared by parsed parts: walking-around attempts refused, legitimate forms
admitted, for git sources and for ``python-dependencies`` alike."""

from __future__ import annotations

from pathlib import Path

import pytest

from llama_mesh.server.allowlist import SourcePolicy, parse_url
from llama_mesh.server.dependencies import (
    DependencyError,
    DependencyNotAllowedError,
    confine_dependencies,
)
from llama_mesh.server.deployment_config import SourceConfig
from llama_mesh.server.sources import SourceNotAllowedError, check_source

PREFIX = "http://host/allowed/"

WALK_AROUNDS = [
    "http://host/allowed/%2e%2e/evil.git",
    "http://host/allowed/.%2e/evil.git",
    "http://host/allowed/%2E%2E/evil.git",
    "http://host/allowed/../evil.git",
    "http://host/allowed/sub/../../evil.git",
    "http://host/allowed@other/evil.git",
    "http://host@other/allowed/evil.git",
    "http://host:x@other/allowed/evil.git",
    "http://user@host/allowed/evil.git",
    "http://host/allowedX/evil.git",
    "http://host/allowed%2F..%2Fevil.git",
    "http://host/allowed/x%2F..%2F..%2Fevil.git",
    "http://host/allowed/x%5C..%5C..%5Cevil.git",
    "http://host/allowed\\..\\evil.git",
    "http://host\\@other/allowed/evil.git",
    "http://host/allowed/%00/evil.git",
    "http://host/allowed/ evil.git",
    "http://host:8080/allowed/evil.git",
    "https://host/allowed/evil.git",
    "git://host/allowed/evil.git",
    "http://other/allowed/evil.git",
    "http://host.other/allowed/evil.git",
    "http://%68ost/allowed/evil.git",
    "http://host/../allowed/evil.git",
    "http://host/Allowed/evil.git",
    "http://host/evil.git",
    "git@host:allowed/evil.git",
    "file:///allowed/evil.git",
    "/allowed/evil.git",
    "../allowed/evil.git",
    "http:/host/allowed/evil.git",
]

LEGITIMATE = [
    ("http://host/allowed/x.git", "http://host/allowed/x.git"),
    ("HTTP://HOST/allowed/x.git", "http://host/allowed/x.git"),
    ("http://host:80/allowed/x.git", "http://host/allowed/x.git"),
    ("http://host./allowed/x.git", "http://host/allowed/x.git"),
    ("http://host/allowed/sub/../x.git", "http://host/allowed/x.git"),
    ("http://host/allowed//x.git", "http://host/allowed/x.git"),
    ("http://host/allowed/./x.git", "http://host/allowed/x.git"),
    ("http://host/allowed/my%20repo.git", "http://host/allowed/my%20repo.git"),
    ("http://host/allowed/%78.git", "http://host/allowed/x.git"),
    ("http://host/allowed/a%40b.git", "http://host/allowed/a%40b.git"),
    ("http://host/allowed", "http://host/allowed"),
]


@pytest.mark.parametrize("url", WALK_AROUNDS)
def test_git_walk_arounds_are_refused(url: str) -> None:
    """Each attempt to leave ``http://host/allowed/`` (encoded dots, userinfo, a sibling
    with the same text prefix, another port, scheme or host, encoded separators) is refused
    before anything is fetched."""
    policy = SourcePolicy(allowed_git_prefixes=(PREFIX,))
    with pytest.raises(SourceNotAllowedError) as refused:
        check_source(SourceConfig("git", url), base_path=Path("/"), policy=policy)
    assert "--allow-git-prefix" in str(refused.value) or "cannot be checked" in str(refused.value)


@pytest.mark.parametrize(("url", "canonical"), LEGITIMATE)
def test_git_legitimate_forms_are_admitted_in_canonical_form(url: str, canonical: str) -> None:
    """Spellings of a URL under the prefix are admitted, and what is cloned is the
    canonical form that was checked."""
    for prefix in (PREFIX, "http://host/allowed", "HTTP://Host:80/allowed/"):
        policy = SourcePolicy(allowed_git_prefixes=(prefix,))
        checked = check_source(SourceConfig("git", f"{url}@v1"), base_path=Path("/"), policy=policy)
        assert checked == SourceConfig("git", f"{canonical}@v1")


@pytest.mark.parametrize(
    ("prefix", "admitted", "refused"),
    [
        (
            "https://user@git.example.com/org/",
            ["https://user@git.example.com/org/x.git"],
            ["https://git.example.com/org/x.git", "https://other@git.example.com/org/x.git"],
        ),
        (
            "https://bücher.example/",
            ["https://xn--bcher-kva.example/x.git", "https://BÜCHER.example/x.git"],
            ["https://bucher.example/x.git"],
        ),
        (
            "http://[::1]:8000/repos/",
            ["http://[0:0::1]:8000/repos/x.git"],
            ["http://[::2]:8000/repos/x.git", "http://[::1]/repos/x.git"],
        ),
        (
            "git@github.com:org/",
            ["git@github.com:org/repo.git", "git@GitHub.com:org/sub/../repo.git"],
            [
                "git@github.com:org-other/repo.git",
                "git@github.com:org/../x.git",
                "git@evil.com:org/x.git",
                "ssh://git@github.com/org/x.git",
                "git@github.com:/org/x.git",
            ],
        ),
    ],
)
def test_userinfo_idna_ipv6_and_scp_prefixes(
    prefix: str, admitted: list[str], refused: list[str]
) -> None:
    """Userinfo must equal the prefix's; hosts compare IDNA-encoded and lowercased, IPv6
    addresses compressed; scp-like addresses match only scp-like prefixes."""
    policy = SourcePolicy(allowed_git_prefixes=(prefix,))
    for url in admitted:
        check_source(SourceConfig("git", url), base_path=Path("/"), policy=policy)
    for url in refused:
        with pytest.raises(SourceNotAllowedError):
            check_source(SourceConfig("git", url), base_path=Path("/"), policy=policy)


def test_local_git_sources_follow_symlinks_and_local_roots(tmp_path: Path) -> None:
    """A ``file:`` or path git source is resolved on disk: a symlink under the prefix that
    points elsewhere is refused, and with local roots set it must lie inside one."""
    (tmp_path / "repos" / "ok.git").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "repos" / "link.git").symlink_to(tmp_path / "elsewhere")
    prefixed = SourcePolicy(allowed_git_prefixes=(str(tmp_path / "repos"),))
    rooted = SourcePolicy(allowed_local_roots=(tmp_path / "repos",))
    for policy in (prefixed, rooted):
        for url in (str(tmp_path / "repos" / "ok.git"), (tmp_path / "repos" / "ok.git").as_uri()):
            check_source(SourceConfig("git", url), base_path=tmp_path, policy=policy)
        for url in (
            str(tmp_path / "repos" / "link.git"),
            f"{(tmp_path / 'repos').as_uri()}/%2e%2e/elsewhere",
            (tmp_path / "elsewhere").as_uri(),
        ):
            with pytest.raises(SourceNotAllowedError):
                check_source(SourceConfig("git", url), base_path=tmp_path, policy=policy)


def test_bad_prefixes_are_refused_at_start() -> None:
    """A prefix that cannot be parsed, or has a query, is an error naming the option."""
    for prefix in ("not a url", "https://host/x?y=1", "http://host/a%2Fb"):
        with pytest.raises(ValueError, match="--allow-git-prefix"):
            SourcePolicy(allowed_git_prefixes=(prefix,))


def test_without_a_policy_git_sources_are_used_as_written() -> None:
    """No allow-list: nothing to confine, the source is not rewritten."""
    source = SourceConfig("git", "https://host/a/../b.git@main")
    assert check_source(source, base_path=Path("/"), policy=SourcePolicy()) == source


def test_parse_url_normalises_parts() -> None:
    """Scheme and host lowercased, IDNA, default port explicit, segments decoded."""
    url = parse_url("HTTPS://User@Bücher.Example.:443/a/%7Eb/./c/../d")
    assert (url.scheme, url.userinfo, url.host, url.port, url.segments) == (
        "https",
        "User",
        "xn--bcher-kva.example",
        443,
        ("a", "~b", "d"),
    )


# -- python-dependencies ----------------------------------------------------------------------


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, Path, SourcePolicy]:
    """An allowed root holding the service (``root/app``) and a shared package, a package
    outside it, and a policy with that root and one URL prefix."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    for pkg in (root / "app" / "lib", root / "shared" / "pkg", outside / "pkg"):
        pkg.mkdir(parents=True)
    (root / "app" / "link").symlink_to(outside / "pkg")
    policy = SourcePolicy(
        allowed_local_roots=(root,), allowed_git_prefixes=("https://pkgs.example/ok/",)
    )
    return root, outside, policy


def _confine(deps: list[str], app: Path, policy: SourcePolicy) -> tuple[str, ...]:
    return confine_dependencies(
        deps, root=app, policy=policy, key_path="services.svc.python-dependencies"
    )


REFUSED_DEPENDENCIES = [
    "{outside}/pkg",
    "../../outside/pkg",
    "./link",
    "file://{outside}/pkg",
    "file://localhost{outside}/pkg",
    "evil @ file://{outside}/pkg",
    "evil @ {outside}/pkg",
    "evil@../../outside/pkg",
    "git+file://{outside}/pkg",
    "evil @ git+file://{outside}/pkg",
    "https://evil.example/evil.whl",
    "evil @ https://evil.example/evil.tar.gz",
    "https://pkgs.example/ok/%2e%2e/evil.whl",
    "https://pkgs.example/ok@evil.example/evil.whl",
    "https://pkgs.example/okay/evil.whl",
    "git+https://evil.example/r.git@main",
    "evil @ git+https://pkgs.example/ok/.%2e/r.git",
    "hg+https://evil.example/r",
    "ok @ https://pkgs.example/ok/x.tar.gz#subdirectory=../../..",
    "-e {outside}/pkg",
    "--editable={outside}/pkg",
    "-r /etc/requirements.txt",
    "--index-url https://evil.example/simple",
    "--extra-index-url=https://evil.example/simple",
    "-i https://evil.example/simple",
    "-f https://evil.example/links",
    "--find-links=https://evil.example/links",
    "  -e .",
    "foo --index-url https://evil.example/simple",
    "ftp://evil.example/x.whl",
    "file:relative/pkg",
]


@pytest.mark.parametrize("dep", REFUSED_DEPENDENCIES)
def test_dependency_walk_arounds_are_refused(
    dep: str, layout: tuple[Path, Path, SourcePolicy]
) -> None:
    """Paths, ``file:`` and direct URLs, VCS URLs, direct references and installer options
    outside the allow-lists are refused with an error naming the entry."""
    root, outside, policy = layout
    entry = dep.format(outside=outside)
    with pytest.raises(DependencyError) as refused:
        _confine(["httpx", entry], root / "app", policy)
    assert f"services.svc.python-dependencies[1] {entry.strip()!r}" in str(refused.value)


@pytest.mark.parametrize(
    ("dep", "expected"),
    [
        ("httpx>=0.27", "httpx>=0.27"),
        ('pkg[extra]; python_version > "3.8"', 'pkg[extra]; python_version > "3.8"'),
        ("./lib", "{root}/app/lib"),
        ("lib", "lib"),
        ("lib/../lib", "{root}/app/lib"),
        ("{root}/shared/pkg", "{root}/shared/pkg"),
        ("../shared/pkg", "{root}/shared/pkg"),
        ("mylib @ ./lib", "mylib @ file://{root}/app/lib"),
        ("file://{root}/shared/pkg", "file://{root}/shared/pkg"),
        ("https://pkgs.example/ok/x.whl", "https://pkgs.example/ok/x.whl"),
        ("HTTPS://PKGS.example:443/ok/a/../x.whl", "https://pkgs.example/ok/x.whl"),
        (
            "x @ https://pkgs.example/ok/x.whl#sha256=ab",
            "x @ https://pkgs.example/ok/x.whl#sha256=ab",
        ),
        ("git+https://pkgs.example/ok/r.git@v1", "git+https://pkgs.example/ok/r.git@v1"),
        (
            "r @ git+https://pkgs.example/ok/r.git@v1#subdirectory=sub",
            "r @ git+https://pkgs.example/ok/r.git@v1#subdirectory=sub",
        ),
    ],
)
def test_dependency_legitimate_forms_are_admitted(
    dep: str, expected: str, layout: tuple[Path, Path, SourcePolicy]
) -> None:
    """Index requirements, paths inside the service or an allowed root, and URLs within a
    prefix are admitted, in the canonical form that was checked."""
    root, _, policy = layout
    (checked,) = _confine([dep.format(root=root)], root / "app", policy)
    assert checked == expected.format(root=root)


def test_a_git_prefix_alone_refuses_no_local_path_and_a_root_alone_no_url(
    layout: tuple[Path, Path, SourcePolicy],
) -> None:
    """Each list confines its own kind: local roots confine paths and ``file:`` URLs,
    URL prefixes confine URLs (``git+file:`` URLs are both); without a policy nothing but
    installer options is refused."""
    root, outside, _ = layout
    roots_only = SourcePolicy(allowed_local_roots=(root,))
    _confine(["https://evil.example/x.whl"], root / "app", roots_only)
    with pytest.raises(DependencyNotAllowedError):
        _confine([str(outside / "pkg")], root / "app", roots_only)
    prefixes_only = SourcePolicy(allowed_git_prefixes=("https://pkgs.example/ok/",))
    assert _confine([str(outside / "pkg")], root / "app", prefixes_only) == (str(outside / "pkg"),)
    with pytest.raises(DependencyNotAllowedError):
        _confine([f"git+{(outside / 'pkg').as_uri()}"], root / "app", prefixes_only)
    open_policy = SourcePolicy()
    assert _confine(["https://evil.example/x.whl"], root / "app", open_policy) == (
        "https://evil.example/x.whl",
    )
    with pytest.raises(DependencyNotAllowedError, match="installer options"):
        _confine(["-e ."], root / "app", open_policy)
