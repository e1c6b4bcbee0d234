"""Run one task's workflow: restore context, stream events, take input, save context.

Nothing here knows about queues: the worker hands in callbacks and an input iterator; nor
about one workflow library: the workflow's :class:`~.families.WorkflowFamily` names the
classes to look for.
"""

from __future__ import annotations

import asyncio
import json
import logging
import traceback
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from llama_mesh.server.aio import cancel_and_wait
from llama_mesh.server.domain import HumanEvent, JsonValue, TaskError, TaskStatus
from llama_mesh.server.errors import MeshError
from llama_mesh.server.queues.errors import MessageTooLargeError, QueueError
from llama_mesh.server.service.events import build_event, event_data, qualified_name, to_json_value
from llama_mesh.server.service.families import WorkflowFamily, family_of

logger = logging.getLogger(__name__)

EventSink = Callable[[str, dict[str, JsonValue]], Awaitable[None]]
"""Receives each streamed event as ``(type, data)``, in order."""

REJECTED_EVENT_TYPE = "llama_mesh.EventRejected"
"""Type of the stream event that reports an input event the workflow could not take."""


@dataclass(frozen=True, slots=True)
class CancelRequest:
    """Stop the task; ``reason`` becomes its error message."""

    reason: str


TaskInput = HumanEvent | CancelRequest

ContextKept = Literal["always", "unless_blank", "never"]
"""Which context a run hands back to be stored: every one, one a later run could resume
(not blank: some state, or work pending), or none (the session ends with the task)."""


@dataclass(frozen=True, slots=True)
class RunOutcome:
    """How a run ended, and the context to save for the session."""

    status: TaskStatus
    result: JsonValue = None
    error: TaskError | None = None
    context_json: bytes | None = None
    """The context to store for the session, as ``keep_context`` asked (``None``: none)."""


async def run_workflow(
    workflow: object,
    kwargs: dict[str, JsonValue],
    *,
    context_json: bytes | None,
    on_event: EventSink,
    inputs: AsyncIterator[TaskInput],
    timeout: float | None = None,
    on_input_required: Callable[[], None] | None = None,
    keep_context: ContextKept = "always",
) -> RunOutcome:
    """Run ``workflow`` with ``kwargs`` to the end and say how it ended.

    Never raises for a workflow's own failure: exceptions, timeouts and cancellation
    become the outcome's status and error. ``on_input_required`` is called when the
    workflow writes an ``InputRequiredEvent`` (it is about to wait for an input). The
    context after the run is serialized only as ``keep_context`` needs.
    """
    try:
        family = family_of(workflow)
        handler = family.start(workflow, json.loads(context_json) if context_json else None, kwargs)
    except Exception as exc:
        return RunOutcome(TaskStatus.FAILED, error=_error_of(exc))

    cancelled: list[CancelRequest] = []

    async def pump_inputs() -> None:
        async for item in inputs:
            if isinstance(item, CancelRequest):
                cancelled.append(item)
                await handler.cancel_run()
                return
            try:
                handler.ctx.send_event(build_event(item, workflow))
            except MeshError as exc:
                logger.warning("rejected input event %s: %s", item.type, exc.message)
                await on_event(REJECTED_EVENT_TYPE, {"type": item.type, "error": exc.message})

    async def stream() -> JsonValue:
        async for event in handler.stream_events():
            if isinstance(event, family.input_required_event) and on_input_required is not None:
                on_input_required()
            if not isinstance(event, family.stop_event):
                await on_event(qualified_name(event), event_data(event))
        return to_json_value(await handler)

    pump = asyncio.create_task(pump_inputs())
    try:
        async with asyncio.timeout(timeout):
            result = await stream()
        outcome = RunOutcome(TaskStatus.SUCCEEDED, result=result)
    except family.cancelled_error:
        reason = cancelled[0].reason if cancelled else "cancelled"
        outcome = RunOutcome(TaskStatus.CANCELLED, error=TaskError("Cancelled", reason))
    except TimeoutError:
        await handler.cancel_run()
        outcome = RunOutcome(
            TaskStatus.FAILED,
            error=TaskError("TimeoutError", f"the task did not finish within {timeout} s"),
        )
    except MessageTooLargeError as exc:
        # Too large now is too large on every delivery: fail once, saying why.
        await handler.cancel_run()
        error = TaskError(
            "MessageTooLarge",
            f"an event of the task is {exc.size} bytes, more than the message queue's limit "
            f"of {exc.limit} bytes ({exc.limit_name}): it cannot be published",
        )
        outcome = RunOutcome(TaskStatus.FAILED, error=error)
    except QueueError:
        # The broker failed, not the workflow: let the worker give the task back.
        await handler.cancel_run()
        raise
    except family.timeout_error as exc:
        outcome = RunOutcome(TaskStatus.FAILED, error=TaskError("WorkflowTimeoutError", str(exc)))
    except Exception as exc:
        outcome = RunOutcome(TaskStatus.FAILED, error=_error_of(exc))
    finally:
        await _stop(pump)
    if keep_context == "never":
        return outcome
    return RunOutcome(
        outcome.status,
        outcome.result,
        outcome.error,
        _saved_context(handler.ctx, family, workflow, keep_blank=keep_context == "always"),
    )


async def _stop(task: asyncio.Task[None]) -> None:
    await cancel_and_wait(task)
    if not task.cancelled() and task.exception() is not None:
        logger.warning("the input pump of a task failed: %s", task.exception())


def _error_of(exc: BaseException) -> TaskError:
    return TaskError(
        type=type(exc).__name__,
        message=str(exc) or type(exc).__name__,
        traceback="".join(traceback.format_exception(exc)),
    )


def _saved_context(
    ctx: Any, family: WorkflowFamily, workflow: object, *, keep_blank: bool
) -> bytes | None:
    """``ctx`` serialized, or ``None`` when it cannot be or is blank and not to be kept."""
    try:
        data = ctx.to_dict()
        if not keep_blank and _is_blank(family, workflow, data):
            return None
        return json.dumps(data).encode()
    except Exception as exc:
        logger.warning("could not serialize the workflow context: %s", exc)
        return None


_RUN_COUNTERS = frozenset(
    {
        "stream_seq",
        "work_item_seq",
        "invocation_seq",
        "journal_seq",
        "elapsed_alive",
        "last_alive_stamp",
    }
)
"""Context fields that only count or time what has run; a fresh context restarts them."""

_EMPTY_STATES: tuple[dict[str, Any], ...] = (
    {},
    {
        "store_type": "in_memory",
        "state_type": "DictState",
        "state_module": "workflows.context.state_store",
        "state_data": {"_data": {}},
    },
)

_blank_contexts: weakref.WeakKeyDictionary[object, dict[str, Any]] = weakref.WeakKeyDictionary()


def _essence(data: dict[str, Any]) -> dict[str, Any]:
    essence = {k: v for k, v in data.items() if k not in _RUN_COUNTERS}
    if essence.get("state") in _EMPTY_STATES:
        essence["state"] = {}
    return essence


def _is_blank(family: WorkflowFamily, workflow: object, data: dict[str, Any]) -> bool:
    """Whether ``data`` (a context after a run) equals a fresh context of ``workflow`` but
    for run counters: an empty state store and no queued, running or awaited work."""
    blank = _blank_contexts.get(workflow)
    if blank is None:
        try:
            blank = _essence(family.fresh_context(workflow))
        except Exception:
            return False
        _blank_contexts[workflow] = blank
    return _essence(data) == blank
