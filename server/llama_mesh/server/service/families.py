"""Workflow families: what the runner needs from each library that defines a ``Workflow``.

A worker runs ``workflows.Workflow`` objects (package ``llama-index-workflows``; the
``llama_index.core.workflow`` of llama-index-core from 0.12.4x on re-exports it: 1.x up to
0.13, 2.x from 0.14), and the ``Workflow`` of an older llama-index-core (0.12.15, say) that a
deployment pins in its ``python-dependencies``. The two have the same shape
(``run(ctx=..., **kwargs)`` returns a handler with ``ctx``, ``stream_events()`` and
``cancel_run()``; ``Context.to_dict`` / ``Context.from_dict``) but their own classes for
events, contexts and errors.
:class:`WorkflowFamily` names those classes once per library; :func:`family_of` tells which
family a workflow object belongs to. The runner and the event decoding speak only to a
family, never to one library directly.

Llama Deploy 0.8 workflows keep session state with ``await ctx.get(key, default=...)`` and
``await ctx.set(key, value)``, which llama-index-workflows 2 dropped for ``ctx.store``;
importing this module gives ``workflows.Context`` those two back, over ``ctx.store``.

The older library is never imported here: its family is built from the modules the
service's own code imported, so a worker without it pays nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import workflows
import workflows.errors
import workflows.events

from llama_mesh.server.errors import InvalidArgumentError

LEGACY_PACKAGE = "llama_index.core.workflow"
"""The package of llama-index-core 0.12's own workflows."""


@dataclass(frozen=True, slots=True)
class WorkflowFamily:
    """The classes of one workflow library, and how to reach a step's accepted events."""

    name: str
    workflow: type[Any]
    context: type[Any]
    event: type[Any]
    stop_event: type[Any]
    input_required_event: type[Any]
    cancelled_error: type[BaseException]
    timeout_error: type[BaseException]
    events_module: ModuleType
    """Where the library's own events (``HumanResponseEvent`` ...) live."""
    step_config: Callable[[Any], Any]
    """The step configuration of a step function (its ``accepted_events``)."""

    def owns(self, obj: object) -> bool:
        """Whether ``obj`` is a workflow of this family (an instance, or a subclass)."""
        if isinstance(obj, type):
            return issubclass(obj, self.workflow)
        return isinstance(obj, self.workflow)

    def start(self, workflow: Any, context_data: dict[str, Any] | None, kwargs: Any) -> Any:
        """Start a run (from a saved context when given); returns the run's handler."""
        ctx = self.context.from_dict(workflow, context_data) if context_data else None
        return workflow.run(ctx=ctx, **kwargs)

    def fresh_context(self, workflow: Any) -> dict[str, Any]:
        """What a context of ``workflow`` that never ran saves."""
        data: dict[str, Any] = self.context(workflow).to_dict()
        return data

    def accepted_events(self, workflow: Any) -> list[type[Any]]:
        """The event classes the steps of ``workflow`` accept."""
        classes: list[type[Any]] = []
        for step in workflow._get_steps().values():
            for accepted in getattr(self.step_config(step), "accepted_events", None) or []:
                if isinstance(accepted, type) and issubclass(accepted, self.event):
                    classes.append(accepted)
        return classes


WORKFLOWS = WorkflowFamily(
    name="llama-index-workflows",
    workflow=workflows.Workflow,
    context=workflows.Context,
    event=workflows.events.Event,
    stop_event=workflows.events.StopEvent,
    input_required_event=workflows.events.InputRequiredEvent,
    cancelled_error=workflows.errors.WorkflowCancelledByUser,
    timeout_error=workflows.errors.WorkflowTimeoutError,
    events_module=workflows.events,
    step_config=lambda step: getattr(step, "_step_config", None),
)
"""``workflows.Workflow``, which current ``llama_index.core.workflow`` re-exports."""


async def _context_get(self: workflows.Context, key: str, default: Any = ...) -> Any:
    """``ctx.get(key, default)`` of llama-index-core 0.12: ``ctx.store.get``."""
    return await self.store.get(key, default)


async def _context_set(
    self: workflows.Context, key: str, value: Any, make_private: bool = False
) -> None:
    """``ctx.set(key, value)`` of llama-index-core 0.12: ``ctx.store.set`` (``make_private``
    is accepted and the value stored in the shared state all the same)."""
    await self.store.set(key, value)


def _restore_context_state_api() -> None:
    """Give ``workflows.Context`` back the ``get``/``set`` coroutines llama-index-workflows
    2 removed: Llama Deploy 0.8 workflows keep their session state with them. The values
    land in ``ctx.store``, so they are saved and restored with the session's context."""
    if not hasattr(workflows.Context, "get"):
        workflows.Context.get = _context_get  # type: ignore[attr-defined]
    if not hasattr(workflows.Context, "set"):
        workflows.Context.set = _context_set  # type: ignore[attr-defined]


_restore_context_state_api()

_legacy: dict[int, WorkflowFamily] = {}


def _legacy_family() -> WorkflowFamily | None:
    """The family of the llama-index-core workflows imported in this process, if they are
    not ``workflows`` re-exported (llama-index-core 0.12.x)."""
    package = sys.modules.get(LEGACY_PACKAGE)
    if package is None:
        return None
    cached = _legacy.get(id(package))
    if cached is not None:
        return cached
    workflow = getattr(package, "Workflow", None)
    if not isinstance(workflow, type) or issubclass(workflow, workflows.Workflow):
        return None
    events = sys.modules[f"{LEGACY_PACKAGE}.events"]
    errors = sys.modules[f"{LEGACY_PACKAGE}.errors"]
    family = WorkflowFamily(
        name="llama-index-core",
        workflow=workflow,
        context=package.Context,
        event=events.Event,
        stop_event=events.StopEvent,
        input_required_event=events.InputRequiredEvent,
        cancelled_error=errors.WorkflowCancelledByUser,
        timeout_error=errors.WorkflowTimeoutError,
        events_module=events,
        step_config=lambda step: getattr(step, "__step_config", None),
    )
    _legacy[id(package)] = family
    return family


def family_of(obj: object) -> WorkflowFamily:
    """The family of a workflow object or class.

    Raises:
        InvalidArgumentError: ``obj`` is no workflow this worker can run.
    """
    if WORKFLOWS.owns(obj):
        return WORKFLOWS
    legacy = _legacy_family()
    if legacy is not None and legacy.owns(obj):
        return legacy
    what = obj.__name__ if isinstance(obj, type) else type(obj).__name__
    raise InvalidArgumentError(
        f"a {what} is not a workflow: expected a workflows.Workflow "
        "(or llama_index.core.workflow.Workflow)"
    )
