"""How ``llamactl`` prints data: human tables on a terminal, JSON, YAML or JSON lines otherwise.

Data goes to stdout; messages and progress go to stderr (``note``). Dataclasses of the SDK are
turned into JSON-able values by :func:`jsonable` (enums by value, datetimes as ISO 8601).
"""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Literal

import click
import yaml

from llama_mesh.client._models import Deployment, Service, Session, Task

Format = Literal["table", "json", "yaml", "jsonl"]
FORMATS: tuple[Format, ...] = ("table", "json", "yaml", "jsonl")

Column = tuple[str, Callable[[Any], object]]


def jsonable(value: Any) -> Any:
    """A value ``json.dumps`` accepts, for dataclasses, enums, datetimes and containers."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return jsonable(value.value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def to_json(value: Any, *, indent: int | None = None) -> str:
    """``value`` as JSON text."""
    return json.dumps(jsonable(value), indent=indent, ensure_ascii=False)


def note(message: str) -> None:
    """A message for the user (stderr), never part of the data."""
    click.echo(message, err=True)


def _when(value: datetime | None) -> str:
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S") if value else "-"


TABLES: dict[type, list[Column]] = {
    Deployment: [
        ("NAME", lambda d: d.name),
        ("STATUS", lambda d: d.status.value),
        ("SERVICES", lambda d: f"{sum(s.healthy for s in d.services)}/{len(d.services)} healthy"),
        ("DEFAULT", lambda d: d.default_service or "-"),
        ("GENERATION", lambda d: d.generation),
        ("UPDATED", lambda d: _when(d.updated_at)),
    ],
    Service: [
        ("ID", lambda s: s.id),
        ("NAME", lambda s: s.name),
        ("HEALTHY", lambda s: "yes" if s.healthy else "no"),
        ("REPLICAS", lambda s: f"{len(s.instances)}/{s.replicas}"),
        ("PATH", lambda s: s.path),
    ],
    Task: [
        ("TASK ID", lambda t: t.task_id),
        ("STATUS", lambda t: t.status.value),
        ("SERVICE", lambda t: t.service_id),
        ("SESSION", lambda t: t.session_id),
        ("CREATED", lambda t: _when(t.created_at)),
    ],
    Session: [
        ("SESSION ID", lambda s: s.session_id),
        ("TASKS", lambda s: len(s.task_ids)),
        ("CREATED", lambda s: _when(s.created_at)),
    ],
}


def table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> str:
    """Left-aligned columns separated by two spaces, headers first."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def _detail(item: Any) -> str:
    """One object as ``field: value`` lines (nested objects summarised)."""
    rows: list[tuple[str, str]] = []
    for f in dataclasses.fields(item):
        value = getattr(item, f.name)
        if f.name in ("config_yaml", "traceback"):
            continue
        if isinstance(value, tuple) and value and dataclasses.is_dataclass(value[0]):
            text = f"{len(value)}"
        elif isinstance(value, datetime) or value is None:
            text = _when(value)
        elif isinstance(value, enum.Enum):
            text = str(value.value)
        elif dataclasses.is_dataclass(value) or isinstance(value, dict | list | tuple):
            text = to_json(value)
        else:
            text = str(value) if value != "" else "-"
        rows.append((f.name, text))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name.ljust(width)}  {text}" for name, text in rows)


def emit(data: Any, fmt: Format, *, item_type: type | None = None) -> None:
    """Print one object or a list of objects in ``fmt`` on stdout."""
    if fmt == "json":
        click.echo(to_json(data, indent=2))
    elif fmt == "yaml":
        click.echo(yaml.safe_dump(jsonable(data), sort_keys=False, allow_unicode=True), nl=False)
    elif fmt == "jsonl":
        for item in data if isinstance(data, list) else [data]:
            click.echo(to_json(item))
    elif isinstance(data, list):
        columns = TABLES[item_type or (type(data[0]) if data else Task)]
        click.echo(table([[get(i) for _, get in columns] for i in data], [h for h, _ in columns]))
    elif dataclasses.is_dataclass(data):
        click.echo(_detail(data))
        if isinstance(data, Deployment) and data.services:
            click.echo("")
            emit(list(data.services), fmt, item_type=Service)
    else:
        click.echo(str(data))


def emit_result(result: Any, fmt: Format | None) -> None:
    """A task result as Llama Deploy 0.8 printed it: strings as text, the rest as JSON.

    An explicit ``-o json|jsonl|yaml`` prints strings in that format too.
    """
    if fmt == "yaml":
        click.echo(yaml.safe_dump(jsonable(result), allow_unicode=True), nl=False)
    elif isinstance(result, str) and fmt not in ("json", "jsonl"):
        click.echo(result)
    else:
        click.echo(to_json(result, indent=2 if fmt == "json" else None))
