"""Strict parsing of JSON text that clients send inside string fields.

``json.loads`` accepts more than JSON (``NaN``, ``Infinity``) and fails in ways other than
``JSONDecodeError`` (``RecursionError`` for deep nesting, ``ValueError`` for integers past
Python's digit limit); strings may also carry lone surrogates that no protobuf string can
hold. Every one of these is the client's mistake, reported as ``INVALID_ARGUMENT``.
"""

from __future__ import annotations

import json
from typing import NoReturn

from llama_mesh.server.domain import JsonValue
from llama_mesh.server.errors import InvalidArgumentError


def _no_constants(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def parse_json_text(text: str, *, what: str, reason: str) -> JsonValue:
    """The JSON value of ``text``; :class:`InvalidArgumentError` naming ``what`` otherwise."""
    try:
        value = json.loads(text, parse_constant=_no_constants)
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except json.JSONDecodeError as exc:
        raise InvalidArgumentError(
            f"{what} is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})",
            reason=reason,
        ) from exc
    except RecursionError as exc:
        raise InvalidArgumentError(f"{what} is nested too deeply", reason=reason) from exc
    except UnicodeEncodeError as exc:
        raise InvalidArgumentError(
            f"{what} contains a string that is not valid Unicode (a lone surrogate)",
            reason=reason,
        ) from exc
    except ValueError as exc:
        raise InvalidArgumentError(f"{what} is not valid JSON: {exc}", reason=reason) from exc
    return value
