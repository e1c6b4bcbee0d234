"""Workflow events to JSON and back: what streams out of a task and what is sent into it.

Out: an event becomes ``(type, data)`` where ``type`` is the qualified class name and
``data`` its fields as a JSON object (extra keyword fields of plain ``Event`` objects are
flattened in).

In: an event arrives as a type name (qualified like
``llama_index.core.workflow.events.HumanResponseEvent``, or bare) and JSON fields, or as
the text llama-index's ``JsonSerializer`` produced (``{"__is_pydantic": true, "value": ..,
"qualified_name": ..}``), which is what Llama Deploy 0.8 clients send. The type is mapped
onto a class that exists in the worker: first the exact class when it is importable here,
then a class of the same name among the events the workflow's steps accept, then the
events of the workflow's own library (its :class:`~.families.WorkflowFamily`).
"""

from __future__ import annotations

import json
import sys
from typing import Any

from llama_mesh.server.domain import HumanEvent, JsonValue
from llama_mesh.server.errors import InvalidArgumentError
from llama_mesh.server.jsontext import parse_json_text
from llama_mesh.server.service.families import WorkflowFamily, family_of


def qualified_name(obj: object) -> str:
    """``module.ClassName`` of an object's class."""
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def to_json_value(value: Any) -> JsonValue:
    """A JSON-ready form of any value a workflow produces (models dumped, rest as text)."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, dict):
        return {str(k): to_json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [to_json_value(v) for v in value]
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return to_json_value(dump(mode="json"))
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return str(value)
    return value


def event_data(event: Any) -> dict[str, JsonValue]:
    """The fields of an event as a JSON object."""
    dumped = event.model_dump(mode="json")
    extra = dumped.pop("_data", None)
    if isinstance(extra, dict):
        dumped.update(extra)
    data = to_json_value(dumped)
    return data if isinstance(data, dict) else {"value": data}


def parse_serialized_event(text: str) -> HumanEvent:
    """An event from llama-index ``JsonSerializer`` text (what 0.8 clients send)."""
    payload = parse_json_text(text, what="event_obj_str", reason="INVALID_EVENT")
    if not isinstance(payload, dict):
        raise InvalidArgumentError("event_obj_str must be a JSON object", reason="INVALID_EVENT")
    if "qualified_name" in payload:
        value = payload.get("value", {})
        if not isinstance(value, dict):
            raise InvalidArgumentError(
                "event_obj_str 'value' must be a JSON object", reason="INVALID_EVENT"
            )
        name = payload["qualified_name"]
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError(
                "event_obj_str 'qualified_name' must be a class name", reason="INVALID_EVENT"
            )
        return HumanEvent(type=name, data=value)
    raise InvalidArgumentError(
        "event_obj_str must carry 'qualified_name' and 'value' (llama-index JsonSerializer form)",
        reason="INVALID_EVENT",
    )


def _import_class(name: str, family: WorkflowFamily) -> type[Any] | None:
    # Only modules already imported in the worker: a client-supplied type name must never
    # make the worker import (and so run) a module it names.
    module_name, _, class_name = name.rpartition(".")
    module = sys.modules.get(module_name) if module_name else None
    if module is None:
        return None
    cls = getattr(module, class_name, None)
    return cls if isinstance(cls, type) and issubclass(cls, family.event) else None


def resolve_event_class(type_name: str, workflow: object) -> type[Any]:
    """The worker's class for an incoming event type; :class:`InvalidArgumentError` if none.

    Only classes of the workflow's own family qualify: a 0.8 client's
    ``llama_index.core.workflow.events.HumanResponseEvent`` becomes the
    ``HumanResponseEvent`` the workflow's library defines.
    """
    family = family_of(workflow)
    exact = _import_class(type_name, family)
    if exact is not None:
        return exact
    bare = type_name.rpartition(".")[2]
    accepted = family.accepted_events(workflow)
    for cls in accepted:
        if cls.__name__ == bare:
            return cls
    builtin = getattr(family.events_module, bare, None)
    if isinstance(builtin, type) and issubclass(builtin, family.event):
        return builtin
    raise InvalidArgumentError(
        f"unknown event type '{type_name}': the workflow accepts "
        + ", ".join(sorted({c.__name__ for c in accepted})),
        reason="UNKNOWN_EVENT_TYPE",
    )


def build_event(event: HumanEvent, workflow: object) -> Any:
    """Instantiate an incoming event as the worker's class; field errors name the field."""
    cls = resolve_event_class(event.type, workflow)
    try:
        return cls.model_validate(event.data)
    except Exception as exc:
        raise InvalidArgumentError(
            f"invalid fields for event {cls.__name__}: {exc}", reason="INVALID_EVENT"
        ) from exc
