"""Fixtures of the browser tests: Debian's chromium driven by Playwright, a real server.

The browser is the system's ``chromium`` (``./dev test`` installs it when it can), never one
that Playwright downloads. Without it these tests skip, except in CI (``CI=true``), where
they fail: CI must run them.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

# Expectations wait long: a loaded machine starts workers and runs workflows slowly.
expect.set_options(timeout=90_000)

SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs"
"""Where screenshots of the console go when LLAMA_MESH_SCREENSHOTS=1."""


def _chromium() -> str:
    """The system chromium; skips without it, or fails under CI=true."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    reason = "no chromium on PATH (apt-get install chromium; ./dev test does it as root)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"browser tests must run in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """A headless Debian chromium."""
    executable = _chromium()
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=executable,
            headless=True,
            # Containers often run as root without user namespaces; /dev/shm may be tiny.
            args=["--no-sandbox", "--disable-dev-shm-usage"],
        )
        try:
            yield browser
        finally:
            await browser.close()


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    """A fresh page (its own storage) with generous timeouts: the machine may be loaded."""
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(60_000)
    page = await context.new_page()
    try:
        yield page
    finally:
        await context.close()


def screenshot_path(name: str) -> Path | None:
    """``docs/console-<name>.png`` when screenshots are asked for, else None."""
    if os.environ.get("LLAMA_MESH_SCREENSHOTS") != "1":
        return None
    return SCREENSHOTS / f"console-{name}.png"
