"""Property tests of the JSON API through the real gateway (Envoy) in front of a real server.

Requests are generated with hypothesis (no OpenAPI document exists to drive schemathesis):
every route of both surfaces (Llama Deploy 0.8 and ``/v1``) with random path parameters,
methods, query strings, content types and bodies (JSON of any shape, bodies shaped like
the real ones with random values, raw bytes). What is pinned:

* no 5xx but 500 for a workflow that failed (``code`` UNKNOWN with a ``TASK_*`` reason) and
  503/504 for an unavailable upstream;
* every error is JSON with an integer ``code`` and a string ``message``;
* the server stays up (``/status/`` answers 200 after every request), also after oversized
  bodies and garbage bytes on the gateway port and on the raw gRPC port;
* content types (JSON, gRPC-Web, text, multipart, form, missing, garbage) and body sizes
  (just under, at, just over and far over the gateway's limit, with a length or chunked)
  are answered with a 4xx JSON error when wrong, never a 5xx or a reset; raw gRPC on a
  JSON route is answered in gRPC (UNIMPLEMENTED), as a gRPC client expects.

The random requests, and the test that takes the message queue away, have a server of their
own (``own_app``); the other tests send one kind of request each and share one (``app``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from llama_mesh.server.apiserver.mesh import MAX_INPUT_BYTES
from llama_mesh.server.app import MeshServer
from llama_mesh.server.gateway.config import MIB
from llama_mesh.v1 import apiserver_pb2, apiserver_pb2_grpc
from tests.fixtures.mesh import TESTAPP, MeshFactory, running_mesh

APP = "testapp"
REQUEST_TIMEOUT = 15.0
TASK, SESSION, GONE = "<task>", "<session>", "<gone>"
"""Placeholders replaced by a finished task's id, a live session's id and a deleted session's."""


@dataclass
class App:
    """The running server, an HTTP client for its gateway, and ids that exist there."""

    server: MeshServer
    http: httpx.AsyncClient
    ids: dict[str, str] = field(default_factory=dict)


SHARED = pytest.mark.asyncio(loop_scope="module")
"""For tests on the module's shared ``app``: they run in the event loop it runs in."""


@contextlib.asynccontextmanager
async def serving(server: MeshServer) -> AsyncIterator[App]:
    """``server`` (testapp behind a gateway) with a finished task, a live session and a
    deleted one, and a client of its gateway."""
    mesh = server.mesh
    done = await mesh.run_task(APP, service_id="echo", session_id=None, input={"message": "x"})
    session = await mesh.create_session(APP)
    gone = await mesh.create_session(APP)
    await mesh.delete_session(APP, gone.session_id)
    assert server.gateway_url is not None
    async with httpx.AsyncClient(base_url=server.gateway_url, timeout=REQUEST_TIMEOUT) as http:
        yield App(
            server, http, {TASK: done.task_id, SESSION: session.session_id, GONE: gone.session_id}
        )


@pytest.fixture
async def own_app(mesh_factory: MeshFactory) -> AsyncIterator[App]:
    """testapp behind a real gateway (in-process queue), for one test alone."""
    server = await mesh_factory(queue="inprocess", gateway=True, deploy=(TESTAPP,))
    async with serving(server) as app:
        yield app


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def app(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[App]:
    """testapp behind a real gateway (in-process queue), shared by the module's tests."""
    data_dir = tmp_path_factory.mktemp("api-fuzz")
    async with (
        running_mesh(data_dir, queue="inprocess", gateway=True, deploy=(TESTAPP,)) as server,
        serving(server) as shared,
    ):
        yield shared


# -- what a response may be ---------------------------------------------------------------------


def error_reasons(body: dict[str, Any]) -> list[str]:
    """The ``reason`` of each ErrorInfo detail of a JSON error body."""
    details = body.get("details") or []
    return [d.get("reason", "") for d in details if isinstance(d, dict)]


RAW_GRPC = ("application/grpc", "application/grpc+proto")
"""Content types of raw gRPC: Envoy answers such requests in gRPC, whatever the path."""


def is_raw_grpc(content_type: str | None) -> bool:
    """Whether ``content_type`` is raw gRPC's (not gRPC-Web's)."""
    return (content_type or "").split(";")[0].strip().lower() in RAW_GRPC


def assert_grpc_refusal(response: httpx.Response) -> None:
    """A gRPC answer (HTTP 200, trailers-only) with a non-OK ``grpc-status``."""
    described = f"{response.request.url} -> {response.status_code}: {response.headers}"
    assert response.status_code == 200, described
    assert response.headers.get("content-type", "").startswith("application/grpc"), described
    assert response.headers.get("grpc-status", "0") != "0", described


def assert_well_formed(
    response: httpx.Response, method: str, content_type: str | None = None
) -> None:
    """No unexpected 5xx; every error a JSON body with ``code`` and ``message`` (a gRPC
    status for raw gRPC requests)."""
    status = response.status_code
    described = f"{method} {response.request.url} -> {status}: {response.text[:500]!r}"
    if is_raw_grpc(content_type):
        assert_grpc_refusal(response)
        return
    if status < 400 or method == "HEAD":
        assert status < 500 or status in (503, 504), described
        return
    assert response.headers.get("content-type", "").startswith("application/json"), described
    body = response.json()
    assert isinstance(body, dict), described
    assert isinstance(body.get("code"), int) and body["code"] != 0, described
    assert isinstance(body.get("message"), str), described
    if status >= 500:
        assert status in (500, 503, 504), described
    if status == 500:  # only a workflow's own failure (TaskFailedError -> UNKNOWN)
        assert body["code"] == 2, described
        assert any(r.startswith("TASK_") for r in error_reasons(body)), described


async def assert_alive(app: App) -> None:
    """The gateway and the server behind it answer ``/status/``."""
    response = await app.http.get("/status/")
    assert response.status_code == 200, response.text
    assert APP in response.json()["deployments"]


# -- strategies -------------------------------------------------------------------------------

ROUTES: list[tuple[str, str]] = [
    ("GET", "/status/"),
    ("GET", "/deployments/"),
    ("GET", "/deployments/{d}"),
    ("POST", "/deployments/create"),
    ("POST", "/deployments/{d}/tasks/run"),
    ("POST", "/deployments/{d}/tasks/create"),
    ("GET", "/deployments/{d}/tasks"),
    ("GET", "/deployments/{d}/tasks/{t}/events"),
    ("POST", "/deployments/{d}/tasks/{t}/events"),
    ("GET", "/deployments/{d}/tasks/{t}/results"),
    ("GET", "/deployments/{d}/sessions"),
    ("GET", "/deployments/{d}/sessions/{s}"),
    ("POST", "/deployments/{d}/sessions/create"),
    ("POST", "/deployments/{d}/sessions/delete"),
    ("GET", "/v1/status"),
    ("GET", "/v1/deployments"),
    ("POST", "/v1/deployments"),
    ("GET", "/v1/deployments/{d}"),
    ("DELETE", "/v1/deployments/{x}"),
    ("POST", "/v1/deployments/{x}:reload"),
    ("GET", "/v1/deployments/{d}/progress"),
    ("GET", "/v1/deployments/{d}/services"),
    ("POST", "/v1/deployments/{d}/tasks:run"),
    ("POST", "/v1/deployments/{d}/tasks"),
    ("GET", "/v1/deployments/{d}/tasks"),
    ("GET", "/v1/deployments/{d}/tasks/{t}"),
    ("POST", "/v1/deployments/{d}/tasks/{t}:cancel"),
    ("GET", "/v1/deployments/{d}/tasks/{t}/events"),
    ("POST", "/v1/deployments/{d}/tasks/{t}/events"),
    ("POST", "/v1/deployments/{d}/sessions"),
    ("GET", "/v1/deployments/{d}/sessions"),
    ("GET", "/v1/deployments/{d}/sessions/{s}"),
    ("DELETE", "/v1/deployments/{d}/sessions/{s}"),
]
"""Every route; ``{x}`` is a deployment that may not be testapp (deleting or reloading it
would take the fixture away from later examples)."""

short_text = st.text(max_size=16)
segments = st.one_of(
    short_text.map(lambda text: urllib.parse.quote(text, safe="")),
    st.sampled_from(["", "-", "..", ".", "%2F", "%00", "a.b", "a:b", "x" * 200, "%C3%A9", "%zz"]),
)
"""Path segments, percent-encoded; every escape decodes to valid UTF-8 (see
test_invalid_utf8_in_path_or_query_is_400 for the others)."""
known_deployments = st.sampled_from([APP, APP, APP, APP, "nope", "TestApp"])
deployments = st.one_of(known_deployments, known_deployments, known_deployments, segments)
other_deployments = st.one_of(st.sampled_from(["nope", "other"]), segments).filter(
    lambda d: urllib.parse.unquote(d).strip("/") != APP
)
known_tasks = st.sampled_from([TASK, TASK, TASK, "missing", TASK + "x"])
task_ids = st.one_of(known_tasks, known_tasks, known_tasks, segments)
known_sessions = st.sampled_from([SESSION, SESSION, GONE, "missing"])
session_ids = st.one_of(known_sessions, known_sessions, known_sessions, segments)

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**64), max_value=2**64),
    st.floats(allow_nan=False, allow_infinity=False),
    short_text,
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(short_text, children, max_size=4)
    ),
    max_leaves=20,
)
SAFE_INPUT_KEYS = ["message", "amount", "env", "x", ""]
"""Workflow arguments that cannot make a task run long (no `seconds`, `count`, `delay`)."""
workflow_inputs = st.dictionaries(st.sampled_from(SAFE_INPUT_KEYS), json_values, max_size=3)
SAFE_SERVICES = ["echo", "fails", "tally", "stream", "nope", "", "hitl "]
"""Services a task may name (not `slow`, `limited` or `hitl`, which wait)."""
services = st.one_of(
    st.sampled_from(SAFE_SERVICES),
    short_text.filter(lambda s: s.strip() not in {"slow", "limited", "hitl", "crashy"}),
)
field_values: dict[str, st.SearchStrategy[Any]] = {
    "input": st.one_of(workflow_inputs, workflow_inputs.map(json.dumps), short_text, json_values),
    "service_id": st.one_of(services, json_values),
    "session_id": st.one_of(session_ids, json_values),
    "task_id": st.one_of(task_ids, json_values),
    "event_obj_str": st.one_of(
        short_text,
        st.builds(
            lambda name, value: json.dumps({"qualified_name": name, "value": value}),
            st.sampled_from(["HumanResponseEvent", "x.Y", ""]),
            json_values,
        ),
    ),
    "type": st.one_of(st.sampled_from(["HumanResponseEvent", "StopEvent"]), short_text),
    "data": json_values,
    "reason": short_text,
    "config_yaml": st.one_of(
        short_text,
        st.sampled_from(["name: [", "name: x\nservices: {}\n", "services: 1", "- 1"]),
    ),
    "base_path": st.sampled_from(["", ".", "/", "/nonexistent", "../.."]),
    "reload": st.one_of(st.booleans(), json_values),
    "local": st.one_of(st.booleans(), json_values),
    "from_index": st.one_of(st.integers(-5, 10), json_values),
    "page_size": st.one_of(st.integers(-5, 2000), json_values),
    "page_token": st.one_of(short_text, json_values),
    "status": st.one_of(st.integers(-1, 9), st.sampled_from(["TASK_STATUS_RUNNING", "x"])),
}
shaped_bodies = st.dictionaries(
    st.sampled_from(sorted(field_values)), st.none(), max_size=4
).flatmap(lambda keys: st.fixed_dictionaries({k: field_values[k] for k in keys}))
shaped = shaped_bodies.map(lambda b: json.dumps(b).encode())
bodies = st.one_of(
    shaped,
    shaped,
    shaped,
    st.none(),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=200),
    st.sampled_from([b"", b"{", b'{"input": ', b"\xff\xfe", b"null", b"[]", b'""']),
)
query_values = st.one_of(
    short_text, st.integers(-5, 10).map(str), st.sampled_from(["true", "false", SESSION])
)
queries = st.dictionaries(
    st.sampled_from(
        [
            *("session_id", "reload", "base_path", "local", "page_size", "page_token"),
            *("from_index", "status", "service_id", "task_id", "x", ""),
        ]
    ),
    query_values,
    max_size=3,
)
content_types = st.sampled_from(
    [
        None,
        "application/json",
        "application/json",
        "application/json",
        "application/json; charset=utf-8",
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "multipart/form-data",
        "application/octet-stream",
        "garbage",
        "application/grpc-web",
        "application/grpc-web+proto",
        "application/grpc-web-text",
        "application/grpc-web+json",
        "application/grpc",
        "application/json-seq",
        "",
    ]
)
methods = st.sampled_from(["GET", "POST", "DELETE", "PUT", "PATCH", "HEAD", "OPTIONS"])


@dataclass(frozen=True)
class Call:
    """One generated HTTP request (ids still as placeholders)."""

    method: str
    path: str
    query: dict[str, str]
    content_type: str | None
    body: bytes | None


def _fill(template: str, d: str, x: str, t: str, s: str) -> str:
    return template.replace("{d}", d).replace("{x}", x).replace("{t}", t).replace("{s}", s)


@st.composite
def calls(draw: st.DrawFn) -> Call:
    """A request to one of the routes (its own method, or another one), or a random path."""
    method, template = draw(st.sampled_from(ROUTES))
    if draw(st.integers(0, 9)) == 0:
        method = draw(methods)
    if draw(st.integers(0, 19)) == 0:
        prefix = draw(st.sampled_from(["/", "/v1/", "/deployments/", "/v1/deployments/"]))
        parts = draw(st.lists(segments, max_size=5))
        template = prefix + "/".join(parts)
    deployment = draw(deployments)
    if template.endswith("/progress"):
        # Progress of a name nobody deployed waits, by design, for a deploy to start; an
        # invalid name is test_progress_of_an_invalid_name_is_400.
        deployment = APP
    path = _fill(template, deployment, draw(other_deployments), draw(task_ids), draw(session_ids))
    body = draw(bodies) if method in {"POST", "PUT", "PATCH", "DELETE"} else None
    return Call(method, path, draw(queries), draw(content_types), body)


def _resolve(text: str, ids: dict[str, str]) -> str:
    for placeholder, value in ids.items():
        text = text.replace(urllib.parse.quote(placeholder, safe="%"), value)
        text = text.replace(placeholder, value)
    return text


async def send(app: App, call: Call) -> httpx.Response:
    """Send ``call`` with its placeholders replaced by the fixture's ids."""
    query = {k: _resolve(v, app.ids) for k, v in call.query.items()}
    body = call.body
    if body is not None:
        body = _resolve(body.decode("utf-8", "surrogateescape"), app.ids).encode(
            "utf-8", "surrogateescape"
        )
    headers = {"content-type": call.content_type} if call.content_type is not None else {}
    url = _resolve(call.path, app.ids)
    return await app.http.request(call.method, url, params=query, content=body, headers=headers)


# -- tests ------------------------------------------------------------------------------------


@given(call=calls())
@example(call=Call("POST", f"/deployments/{APP}/tasks/run", {}, "application/json", b'{"input": '))
@example(call=Call("GET", f"/v1/deployments/{APP}/tasks", {"page_token": "!!"}, None, None))
@example(call=Call("GET", f"/v1/deployments/{APP}/tasks", {"page_size": "-1"}, None, None))
@example(
    call=Call("GET", f"/v1/deployments/{APP}/tasks/{TASK}/events", {"from_index": "-1"}, None, None)
)
@example(
    call=Call(
        "POST",
        f"/deployments/{APP}/tasks/run",
        {},
        "application/json",
        json.dumps({"input": json.dumps({"message": "boom"}), "service_id": "fails"}).encode(),
    )
)
@example(
    call=Call(
        "POST",
        f"/deployments/{APP}/tasks/{TASK}/events",
        {},
        "application/json",
        json.dumps({"event_obj_str": "{}", "service_id": "hitl"}).encode(),
    )
)
@settings(
    max_examples=300,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
async def test_random_requests_get_json_errors_and_no_unexpected_5xx(
    own_app: App, call: Call
) -> None:
    """Any request to any route: a success, a 4xx, 500 only for a workflow's failure, or
    503/504; every error is JSON with ``code`` and ``message``; the server stays up."""
    response = await send(own_app, call)
    assert_well_formed(response, call.method, call.content_type)
    await assert_alive(own_app)


@dataclass(frozen=True)
class RawResponse:
    """An HTTP/1.1 response read off a socket."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def post_streaming(
    port: int,
    path: str,
    body: bytes,
    *,
    chunked: bool = False,
    content_type: str | None = "application/json",
) -> RawResponse:
    """POST ``body`` over a raw connection, reading the response while still uploading.

    A client library that writes the whole body before reading fails with a reset when the
    gateway refuses early (HTTP/1.1 lets a server stop reading and close); this one, like
    browsers and curl, stops uploading once the answer is there. ``chunked`` sends the body
    in chunks instead of with a length.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {len(body)}"
    typed = f"Content-Type: {content_type}\r\n" if content_type is not None else ""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{typed}{framing}\r\nConnection: close\r\n\r\n"
    ).encode()

    async def upload() -> None:
        writer.write(head)
        for start in range(0, len(body), 256 * 1024):
            piece = body[start : start + 256 * 1024]
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            await writer.drain()
        if chunked:
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    uploading = asyncio.create_task(upload())
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT):
            raw = await reader.readuntil(b"\r\n\r\n")
            status_line, *header_lines = raw.decode("latin-1").split("\r\n")
            headers = {}
            for line in header_lines:
                if line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            content = await reader.readexactly(int(headers.get("content-length", "0")))
    finally:
        uploading.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await uploading
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return RawResponse(int(status_line.split()[1]), headers, content)


def _gateway_port(app: App) -> int:
    assert app.server.gateway_url is not None
    port = urllib.parse.urlsplit(app.server.gateway_url).port
    assert port is not None
    return port


SIZED_BODIES = {
    f"/v1/deployments/{APP}/tasks": (b'{"input": {"message": "', b'"}}'),
    f"/deployments/{APP}/tasks/create": (b'{"input": "{\\"message\\": \\"', b'\\"}"}'),
}
"""Task routes of both surfaces, with the JSON around a long message of their bodies."""


def sized(path: str, size: int) -> bytes:
    """A valid task body for ``path`` of exactly ``size`` bytes."""
    prefix, suffix = SIZED_BODIES[path]
    body = prefix + b"x" * (size - len(prefix) - len(suffix)) + suffix
    json.loads(body)
    return body


LIMIT = 8 * MIB
"""The gateway's default cap on request bodies."""


@SHARED
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize(
    ("size", "over"),
    [
        (LIMIT - 1, False),
        (LIMIT, False),
        (LIMIT + 1, True),
        (LIMIT + 64 * 1024, True),
        (4 * LIMIT, True),
    ],
    ids=["just-under", "at", "just-over", "over", "much-over"],
)
async def test_body_sizes_around_the_limit_are_4xx_json(
    app: App, size: int, over: bool, chunked: bool
) -> None:
    """Bodies up to the gateway's limit reach the server (whose own input limit makes
    them a 400); beyond it they are a 413 naming the limit, with a length or chunked, on
    both surfaces; never a 5xx or a reset; the server stays up."""
    port = _gateway_port(app)
    for path in SIZED_BODIES:
        body = sized(path, size)
        response = await post_streaming(port, path, body, chunked=chunked)
        described = f"{path} {len(body)} bytes: {response.status} {response.body[:300]!r}"
        assert response.headers.get("content-type") == "application/json", described
        error = response.json()
        if over:
            assert (response.status, error["code"]) == (413, 8), described
            assert str(LIMIT) in error["message"], described
        else:
            assert response.status == 400, described
            assert "the limit is" in error["message"], described
    await assert_alive(app)


NOT_JSON = [
    "application/grpc-web",
    "application/grpc-web+proto",
    "application/grpc-web-text",
    "text/plain",
    "text/plain;charset=UTF-8",
    "multipart/form-data; boundary=x",
    "application/x-www-form-urlencoded",
    "garbage",
    "",
    None,
]
"""Content types a JSON route refuses (``None``: no content type, with a body)."""


@SHARED
@pytest.mark.parametrize("content_type", NOT_JSON)
@pytest.mark.parametrize(
    "path",
    [
        f"/v1/deployments/{APP}/tasks:run",
        f"/deployments/{APP}/tasks/run",
        "/v1/deployments",
        f"/deployments/{APP}/sessions/create",
    ],
)
async def test_wrong_content_types_are_415_json(
    app: App, path: str, content_type: str | None
) -> None:
    """A JSON route called with another content type (or none, with a body) is a 415 JSON
    error that says what to send, never the 503 of a gRPC-Web request sent upstream; no
    task is created."""
    before = len(await app.server.mesh.list_tasks(APP))
    body = b'{"input": {"message": "x"}}'
    response = await post_streaming(_gateway_port(app), path, body, content_type=content_type)
    described = f"{content_type!r} -> {response.status}: {response.body[:300]!r}"
    assert response.status == 415, described
    assert response.headers.get("content-type") == "application/json", described
    error = response.json()
    assert error["code"] == 3, described
    assert "application/json" in error["message"], described
    assert len(await app.server.mesh.list_tasks(APP)) == before


@SHARED
@pytest.mark.parametrize("content_type", RAW_GRPC)
async def test_raw_grpc_on_a_json_route_is_a_grpc_error(app: App, content_type: str) -> None:
    """Raw gRPC sent to a JSON route gets a gRPC answer (UNIMPLEMENTED: no such method),
    not a 5xx, and no task is created."""
    before = len(await app.server.mesh.list_tasks(APP))
    response = await app.http.post(
        f"/v1/deployments/{APP}/tasks:run",
        content=b"\x00\x00\x00\x00\x00",
        headers={"content-type": content_type},
    )
    assert_grpc_refusal(response)
    assert response.headers["grpc-status"] == str(grpc.StatusCode.UNIMPLEMENTED.value[0])
    assert len(await app.server.mesh.list_tasks(APP)) == before


HUGE = json.dumps({"input": {"message": "x" * (20 * MIB)}}).encode()
"""A 20 MB JSON body: over the gateway's 8 MiB cap."""


@SHARED
async def test_oversized_body_is_413_json(app: App) -> None:
    """A 20 MB JSON body is refused with 413 and a JSON status body on both surfaces; the
    server stays up."""
    port = _gateway_port(app)
    response = await post_streaming(port, f"/v1/deployments/{APP}/tasks:run", HUGE)
    assert response.status == 413
    assert response.headers["content-type"] == "application/json"
    error = response.json()
    assert error["code"] == 8  # RESOURCE_EXHAUSTED
    assert isinstance(error["message"], str) and error["message"]
    compat = await post_streaming(port, f"/deployments/{APP}/tasks/run", HUGE)
    assert compat.status == 413
    assert compat.json()["detail"] == compat.json()["message"]
    await assert_alive(app)


@SHARED
async def test_oversized_body_error_names_the_limit(app: App) -> None:
    """The 413 for a too-large body says what the limit is."""
    response = await post_streaming(_gateway_port(app), f"/v1/deployments/{APP}/tasks:run", HUGE)
    assert response.status == 413
    message = response.json()["message"]
    assert str(8 * MIB) in message or "8 MiB" in message, message


@SHARED
async def test_input_over_the_server_limit_is_rejected_naming_it(app: App) -> None:
    """A task input under the gateway's cap but over the server's is a 4xx JSON error that
    names the server's limit, and no task is created."""
    before = len(await app.server.mesh.list_tasks(APP))
    big = {"input": {"message": "x" * (MAX_INPUT_BYTES + 1024)}}
    response = await app.http.post(f"/v1/deployments/{APP}/tasks", json=big)
    assert response.status_code in (400, 413), response.text
    assert str(MAX_INPUT_BYTES) in response.json()["message"]
    assert len(await app.server.mesh.list_tasks(APP)) == before
    await assert_alive(app)


@SHARED
async def test_non_standard_json_in_0_8_input_is_400_and_poisons_nothing(app: App) -> None:
    """0.8 task input text with NaN, Infinity or a lone surrogate escape is a 400 (as on
    /v1, where the gateway's JSON parser refuses them), and listing tasks still works."""
    statuses = {}
    for text in ('{"message": NaN}', '{"a": [-Infinity]}', '{"message": "\\ud800"}'):
        response = await app.http.post(f"/deployments/{APP}/tasks/create", json={"input": text})
        statuses[text] = response.status_code
    listed = await app.http.get(f"/v1/deployments/{APP}/tasks")
    assert (statuses, listed.status_code) == (dict.fromkeys(statuses, 400), 200)


@SHARED
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", f"/v1/deployments/{APP}/tasks/%80"),
        ("GET", f"/v1/deployments/{APP}/tasks?page_token=%80"),
        ("GET", "/deployments/%E9"),
        ("POST", f"/deployments/{APP}/sessions/delete?session_id=%FF"),
    ],
)
async def test_invalid_utf8_in_path_or_query_is_400(app: App, method: str, path: str) -> None:
    """A path or query parameter that is not UTF-8 once percent-decoded is a 400 JSON error."""
    response = await app.http.request(method, path)
    assert response.status_code == 400, response.text
    assert response.json()["code"] == 3


@SHARED
@pytest.mark.parametrize(
    ("route", "field_name"),
    [
        pytest.param(f"/deployments/{APP}/tasks/create", "input", id="task-input"),
        pytest.param(f"/deployments/{APP}/tasks/{TASK}/events", "event_obj_str", id="event"),
    ],
)
async def test_pathological_json_text_is_400(app: App, route: str, field_name: str) -> None:
    """JSON text the decoder gives up on (too deeply nested, too long a number) inside a 0.8
    request is a 400, like any other malformed JSON text."""
    for text in ("[" * 100_000, '{"qualified_name": "E", "value": {"n": ' + "9" * 5000 + "}}"):
        body = {field_name: text, "service_id": "echo"}
        response = await app.http.post(_resolve(route, app.ids), json=body)
        assert response.status_code == 400, (text[:20], response.status_code, response.text)


@SHARED
@pytest.mark.parametrize("name", ["%3A", "a.b", "%20", "a*"])
async def test_progress_of_an_invalid_name_is_400(app: App, name: str) -> None:
    """Asking for the deploy progress of a name that cannot be a deployment is a 400."""
    response = await app.http.get(f"/v1/deployments/{name}/progress", timeout=3.0)
    assert response.status_code == 400, response.text
    assert response.json()["code"] == 3


async def test_unavailable_message_queue_is_503(own_app: App) -> None:
    """With the message queue gone, requests that need it are 503 UNAVAILABLE (retryable),
    not 500 INTERNAL."""
    await own_app.server.state_store.close()
    response = await own_app.http.get(f"/v1/deployments/{APP}/tasks")
    assert response.status_code == 503, response.text
    assert response.json()["code"] == 14


GARBAGE = [
    b"\x00" * 64,
    b"\xff" * 4096,
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\xff" * 64,
    b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n",
    b"POST /v1/deployments HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 100,  # a TLS ClientHello
]


async def _send_raw(port: int, payload: bytes) -> None:
    """Write ``payload`` to 127.0.0.1:``port``, read whatever comes back for a moment, close."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        with contextlib.suppress(TimeoutError, ConnectionError):
            await asyncio.wait_for(reader.read(65536), 0.5)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


@SHARED
async def test_garbage_bytes_on_both_ports_harm_nothing(app: App) -> None:
    """Garbage written to the gateway's port and to the raw gRPC port (half-open, bad
    preambles, absurd lengths, TLS to a plaintext port) leaves both serving."""
    server = app.server
    gateway_port = _gateway_port(app)
    for payload in GARBAGE:
        await _send_raw(gateway_port, payload)
        await _send_raw(server.grpc_port, payload)
    await assert_alive(app)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = apiserver_pb2_grpc.ApiServerStub(channel)
        status = await stub.GetStatus(apiserver_pb2.GetStatusRequest(), timeout=REQUEST_TIMEOUT)
    assert APP in status.deployments
    task = await app.http.post(
        f"/v1/deployments/{APP}/tasks:run", json={"input": {"message": "ok"}}
    )
    assert task.status_code == 200
    assert task.json()["task"]["result"] == "echo: ok"
