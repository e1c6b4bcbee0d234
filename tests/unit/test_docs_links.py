"""The documentation's links lead somewhere inside the repository.

Every relative Markdown link in the READMEs, CONTRIBUTING.md, CHANGELOG.md and docs/ names a
file of the repository (not one outside it), and an ``#anchor`` names a heading of that file
(GitHub's slugs).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
DOCS = sorted(
    [
        ROOT / "README.md",
        ROOT / "CONTRIBUTING.md",
        ROOT / "CHANGELOG.md",
        ROOT / "client" / "README.md",
        ROOT / "server" / "README.md",
        ROOT / "deploy" / "helm" / "llama-mesh" / "README.md",
        *(ROOT / "docs").glob("*.md"),
    ]
)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6} (.+)$", re.M)
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def _slug(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_slug(h) for h in HEADING.findall(FENCE.sub("", path.read_text()))}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc: Path) -> None:
    """Each relative link of ``doc`` resolves to a file in the repository, and its anchor, if
    any, to a heading of that file."""
    problems = []
    for target in LINK.findall(FENCE.sub("", doc.read_text())):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path_part, _, anchor = target.partition("#")
        path = (doc.parent / path_part).resolve() if path_part else doc
        if not path.is_relative_to(ROOT) or not path.exists():
            problems.append(f"{target}: no such file in the repository")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            problems.append(f"{target}: no heading #{anchor} in {path.relative_to(ROOT)}")
    assert problems == []


def test_the_package_readmes_are_the_distributions_readmes() -> None:
    """client/ and server/ declare their README.md as the text a package index shows."""
    for package in ("client", "server"):
        assert 'readme = "README.md"' in (ROOT / package / "pyproject.toml").read_text()
        assert (ROOT / package / "README.md").read_text().count("\n") > 20
