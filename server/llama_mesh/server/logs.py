"""Logging setup for the entrypoints (``serve`` and worker processes), plain or JSON lines.

Library code only calls ``logging.getLogger(__name__)``; records about a task carry
``deployment``, ``task_id`` and ``session_id`` in ``extra``, which the JSON format emits as
fields (and the plain format appends as ``key=value``).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

CONTEXT_FIELDS = ("deployment", "service_id", "task_id", "session_id", "instance_id", "attempt")
"""Record attributes emitted as fields when present."""


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, context fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class PlainFormatter(logging.Formatter):
    """The classic format, with context fields appended as ``key=value``."""

    def __init__(self, prefix: str = "") -> None:
        super().__init__(f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        context = " ".join(
            f"{n}={getattr(record, n)}" for n in CONTEXT_FIELDS if getattr(record, n, None)
        )
        return f"{text} [{context}]" if context else text


def configure_logging(level: str, fmt: str | None = None, *, prefix: str = "") -> None:
    """Configure the root logger for an entrypoint (``fmt``: ``plain`` or ``json``)."""
    fmt = (fmt or os.environ.get("LLAMA_MESH_LOG_FORMAT") or "plain").lower()
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else PlainFormatter(prefix))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
