"""Every ``google.rpc.ErrorInfo`` reason the server can send is documented for client authors.

The reasons are read from the server's source: each ``reason="..."`` given to an error (or to
a helper that raises one), each error class's ``default_reason``, and ``"TASK_" + status``
for the statuses a finished task can fail with. They must all be in the table of
docs/clients.md and in the ``ApiServer`` comment of apiserver.proto, and the table must list
no reason the server never sends.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from llama_mesh.server.domain import TaskStatus

ROOT = Path(__file__).resolve().parent.parent.parent
SERVER = ROOT / "server" / "llama_mesh" / "server"
CLIENTS_DOC = ROOT / "docs" / "clients.md"
APISERVER_PROTO = ROOT / "proto" / "llama_mesh" / "v1" / "apiserver.proto"
TABLE_ROW = re.compile(r"^\| `([A-Z][A-Z0-9_]+)` \|", re.M)


def _reasons_of(value: ast.expr, where: str) -> set[str]:
    """The reasons a ``reason=`` argument can take; empty for a value passed through."""
    if isinstance(value, ast.Constant) and isinstance(value.value, str):
        return {value.value}
    if isinstance(value, ast.Name | ast.Attribute):
        return set()  # a parameter or an error's own reason, passed on
    if (
        isinstance(value, ast.BinOp)
        and isinstance(value.op, ast.Add)
        and isinstance(value.left, ast.Constant)
        and isinstance(value.left.value, str)
        and ast.unparse(value.right).endswith("status.name")
    ):
        # A finished task that did not succeed.
        return {
            value.left.value + status.name
            for status in TaskStatus
            if status.is_final and status is not TaskStatus.SUCCEEDED
        }
    raise AssertionError(f"{where}: cannot tell which reasons {ast.unparse(value)} gives")


def server_reasons() -> dict[str, str]:
    """Every reason the server's source can send, with one place that sends it."""
    found: dict[str, str] = {}
    for path in sorted(SERVER.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Call):
                for keyword in node.keywords:
                    if keyword.arg == "reason" and _is_error_call(node):
                        for reason in _reasons_of(keyword.value, where):
                            found.setdefault(reason, where)
            elif (
                isinstance(node, ast.Assign)
                and [ast.unparse(t) for t in node.targets] == ["default_reason"]
                and isinstance(node.value, ast.Constant)
            ):
                found.setdefault(str(node.value.value), where)
    return found


def _is_error_call(node: ast.Call) -> bool:
    """Whether a call builds an error or feeds one (not, say, a cancel message's reason)."""
    name = ast.unparse(node.func).rsplit(".", 1)[-1]
    return name.endswith("Error") or name == "parse_json_text"


def test_the_scan_finds_the_reasons_it_should() -> None:
    """The source scan sees literal, default and computed reasons (a scan that found nothing
    would make the other tests pass vacuously)."""
    reasons = server_reasons()
    assert {"DEPLOYMENT_NOT_FOUND", "API_KEY_MISSING", "INVALID_EVENT"} <= set(reasons)
    assert {"INVALID_ARGUMENT", "INTERNAL", "UNAVAILABLE"} <= set(reasons)
    assert {"TASK_FAILED", "TASK_CANCELLED"} <= set(reasons)
    assert "TASK_SUCCEEDED" not in reasons


def test_every_reason_is_in_the_clients_doc() -> None:
    """docs/clients.md's table has a row for every reason the server can send, and no row for
    a reason it never sends."""
    _, _, errors = CLIENTS_DOC.read_text().partition("\n## Errors\n")
    documented = set(TABLE_ROW.findall(errors.split("\n## ", 1)[0]))
    reasons = server_reasons()
    missing = {reason: where for reason, where in reasons.items() if reason not in documented}
    assert missing == {}, "document these in docs/clients.md (## Errors)"
    assert documented - set(reasons) == set(), "documented, but the server never sends them"


def test_every_reason_is_in_the_proto_comment() -> None:
    """The ``ApiServer`` comment of apiserver.proto, which generated clients carry, names every
    reason too."""
    text = APISERVER_PROTO.read_text()
    comment = text[: text.index("service ApiServer")]
    missing = sorted(r for r in server_reasons() if f"`{r}`" not in comment)
    assert missing == []
