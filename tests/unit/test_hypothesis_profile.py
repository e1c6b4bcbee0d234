"""The suite's Hypothesis profile: no deadline, chosen by default, overridden by no test."""

from __future__ import annotations

import ast
import os
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import HYPOTHESIS_PROFILE

TESTS = Path(__file__).resolve().parent.parent


def test_suite_profile_has_no_deadline_and_is_loaded() -> None:
    """The registered profile has no deadline, and it is the one in force unless
    ``HYPOTHESIS_PROFILE`` chooses another."""
    assert settings.get_profile(HYPOTHESIS_PROFILE).deadline is None
    if "HYPOTHESIS_PROFILE" in os.environ:
        pytest.skip("HYPOTHESIS_PROFILE chooses another profile for this run")
    assert settings().deadline is None


@given(st.integers())
@settings(max_examples=2)
def test_a_slow_example_is_not_a_failure(number: int) -> None:
    """An example slower than Hypothesis's own 200 ms deadline passes: the suite's profile
    has none, and ``@settings`` without ``deadline`` inherits that."""
    time.sleep(0.3)
    assert isinstance(number, int)


def _deadline_settings(path: Path) -> list[int]:
    """Lines in ``path`` of ``settings(...)`` calls that pass ``deadline``, and of profiles
    registered with a deadline other than None."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        for keyword in node.keywords:
            if keyword.arg != "deadline":
                continue
            if name == "settings" or (name == "register_profile" and not _is_none(keyword.value)):
                lines.append(node.lineno)
    return lines


def _is_none(value: ast.expr) -> bool:
    return isinstance(value, ast.Constant) and value.value is None


def test_no_test_sets_a_deadline() -> None:
    """No test module gives Hypothesis a deadline of its own (the profile decides)."""
    offenders = {
        str(path.relative_to(TESTS)): lines
        for path in sorted(TESTS.rglob("*.py"))
        if (lines := _deadline_settings(path))
    }
    assert offenders == {}
