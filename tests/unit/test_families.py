"""Workflow families: the classes the runner uses, and 0.8's ``ctx.get``/``ctx.set``."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import workflows
from workflows import Context, Workflow, step
from workflows.events import StartEvent, StopEvent

from llama_mesh.server.domain import JsonValue, TaskStatus
from llama_mesh.server.errors import InvalidArgumentError
from llama_mesh.server.service.families import WORKFLOWS, family_of
from llama_mesh.server.service.runner import ContextKept, RunOutcome, TaskInput, run_workflow


class Counter(Workflow):
    """Counts its runs with the 0.8-era ``ctx.get``/``ctx.set``."""

    @step
    async def count(self, ctx: Context, ev: StartEvent) -> StopEvent:
        runs = int(await ctx.get("runs", default=0)) + 1  # type: ignore[attr-defined]
        await ctx.set("runs", runs, make_private=False)  # type: ignore[attr-defined]
        if ev.get("peek_missing"):
            await ctx.get("never_set")  # type: ignore[attr-defined]
        return StopEvent(result={"runs": runs, "store": await ctx.store.get("runs")})


class Echo(Workflow):
    """Keeps nothing: its context after a run is a fresh one but for run counters."""

    @step
    async def echo(self, ev: StartEvent) -> StopEvent:
        return StopEvent(result=ev.get("message"))


async def _no_inputs() -> AsyncIterator[TaskInput]:
    return
    yield


async def _ignore(type_name: str, data: dict[str, JsonValue]) -> None:
    pass


async def _run(
    workflow: Workflow, context: bytes | None, keep: ContextKept = "always", **kwargs: Any
) -> RunOutcome:
    return await run_workflow(
        workflow,
        kwargs,
        context_json=context,
        on_event=_ignore,
        inputs=_no_inputs(),
        keep_context=keep,
    )


def test_workflows_objects_and_classes_are_of_the_workflows_family() -> None:
    """A ``workflows.Workflow`` instance or subclass is of the llama-index-workflows family;
    anything else is refused naming its type."""
    assert family_of(Counter()) is WORKFLOWS
    assert family_of(Counter) is WORKFLOWS
    assert WORKFLOWS.workflow is workflows.Workflow
    with pytest.raises(InvalidArgumentError, match="a str is not a workflow"):
        family_of("Counter")


async def test_ctx_get_and_set_keep_session_state_in_the_store() -> None:
    """``await ctx.get(key, default=...)`` / ``await ctx.set(key, value)`` (0.8 workflows)
    read and write ``ctx.store``, so the value survives in the saved session context; a key
    never set, without default, fails the run."""
    workflow = Counter(timeout=30)
    first = await _run(workflow, None)
    assert first.status is TaskStatus.SUCCEEDED
    assert first.result == {"runs": 1, "store": 1}
    assert first.context_json is not None
    second = await _run(workflow, first.context_json)
    assert second.result == {"runs": 2, "store": 2}
    assert json.loads(second.context_json or b"{}")
    failed = await _run(workflow, None, peek_missing=True)
    assert failed.status is TaskStatus.FAILED
    assert failed.error is not None


async def test_a_run_hands_back_only_the_context_it_is_asked_to_keep() -> None:
    """``keep_context``: "always" serializes any context; "unless_blank" one with state
    (Counter's) but not a fresh one (Echo's); "never" none, whatever the run left."""
    counter, echo = Counter(timeout=30), Echo(timeout=30)
    cases: list[tuple[Workflow, ContextKept, bool]] = [
        (echo, "always", True),
        (echo, "unless_blank", False),
        (counter, "unless_blank", True),
        (counter, "never", False),
        (echo, "never", False),
    ]
    for workflow, keep, kept in cases:
        outcome = await _run(workflow, None, keep, message="hi")
        assert outcome.status is TaskStatus.SUCCEEDED, outcome.error
        assert (outcome.context_json is not None) is kept, (type(workflow).__name__, keep)
