"""The browser tests find Debian's chromium, and never pass silently without it in CI."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.browser.conftest import _chromium


def test_missing_chromium_fails_in_ci(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """With no chromium on PATH, CI=true makes the browser tests fail, not skip."""
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="browser tests must run in CI"):
        _chromium()


def test_missing_chromium_skips_elsewhere(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Outside CI, a machine without chromium skips the browser tests, saying how to get it."""
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install chromium"):
        _chromium()


def test_chromium_on_path_is_used(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An executable named chromium on PATH is the browser the tests launch."""
    fake = tmp_path / "chromium"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert _chromium() == str(fake)
