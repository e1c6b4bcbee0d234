"""Records in the store that do not parse, and ids that cannot be ids, through the gateway.

A real nats-server holds the store; records are written straight into its key-value
buckets (``mesh_<bucket>``), as an older version, a bug or another client of NATS could.
Pinned here:

* a listing (tasks, sessions, deployments) skips a record it cannot read and answers 200;
* reading that one record alone is a 400 FAILED_PRECONDITION with reason
  ``RECORD_UNREADABLE`` naming its key (and ``detail`` on 0.8 paths), never a 500;
* the API server's one watch of task records outlives such a record (tasks still finish);
* a session whose record cannot be read can still be deleted;
* a malformed task or session id, in a path, a query or a body, is a 400 naming the field.

Tests that write records start their own server with the one service they run (echo); the
malformed ids, which change nothing, share one server for the module.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import nats
import pytest
import pytest_asyncio
from nats.js.kv import KeyValue

from llama_mesh.server import convert
from llama_mesh.server.app import MeshServer
from llama_mesh.server.domain import Task
from llama_mesh.server.nats_server import NatsServer
from tests.fixtures.mesh import TESTAPP, MeshFactory, deploy_testapp, partial_testapp, running_mesh

APP = "testapp"
TIMEOUT = 60.0
GARBAGE = b"\xff\xfe\x00 not a protobuf record \x07"


@dataclass
class Store:
    """The server behind its gateway, an HTTP client, and raw access to its buckets."""

    server: MeshServer
    http: httpx.AsyncClient
    js: Any

    async def bucket(self, name: str) -> KeyValue:
        bucket: KeyValue = await self.js.key_value(f"mesh_{name}")
        return bucket


@pytest.fixture
async def store(nats_server: NatsServer, mesh_factory: MeshFactory) -> AsyncIterator[Store]:
    """testapp's echo on a real nats-server behind a real gateway, and a raw NATS connection."""
    server = await mesh_factory(queue="nats", nats_url=nats_server.url, gateway=True)
    await deploy_testapp(server, "echo")
    assert server.gateway_url is not None
    connection = await nats.connect(nats_server.url)
    try:
        async with httpx.AsyncClient(base_url=server.gateway_url, timeout=TIMEOUT) as http:
            yield Store(server, http, connection.jetstream())
    finally:
        await connection.close()


def assert_unreadable(response: httpx.Response, key: str, *, compat: bool) -> None:
    """A 400 FAILED_PRECONDITION / RECORD_UNREADABLE naming ``key``, quoting no content."""
    described = f"{response.status_code}: {response.text}"
    assert response.status_code == 400, described
    body = response.json()
    assert body["code"] == 9, described
    assert [d["reason"] for d in body["details"]] == ["RECORD_UNREADABLE"], described
    assert f"'{key}'" in body["message"], described
    assert "not a protobuf" not in response.text
    assert ("detail" in body) is compat, described


async def test_an_unreadable_task_is_skipped_in_listings_and_a_clear_error_alone(
    store: Store,
) -> None:
    """Garbage, and a valid record of another task, under task keys: both listings answer
    200 with the readable tasks; GET of either is a 400 naming its key on both surfaces;
    the task watch survives (a task run afterwards finishes)."""
    done = await store.http.post(f"/v1/deployments/{APP}/tasks:run", json={"input": {}})
    assert done.status_code == 200, done.text
    good = done.json()["task"]["task_id"]
    tasks = await store.bucket("tasks")
    await tasks.put(f"{APP}.garbage-task", GARBAGE)
    other = Task(
        task_id="someone-else", deployment=APP, service_id="echo", session_id="s", input={}
    )
    await tasks.put(f"{APP}.misfiled-task", convert.task_to_proto(other).SerializeToString())

    v1 = await store.http.get(f"/v1/deployments/{APP}/tasks")
    assert v1.status_code == 200, v1.text
    assert [t["task_id"] for t in v1.json()["tasks"]] == [good]
    compat = await store.http.get(f"/deployments/{APP}/tasks")
    assert compat.status_code == 200, compat.text
    assert [t["task_id"] for t in compat.json()] == [good]

    for task_id in ("garbage-task", "misfiled-task"):
        alone = await store.http.get(f"/v1/deployments/{APP}/tasks/{task_id}")
        assert_unreadable(alone, f"{APP}.{task_id}", compat=False)
    result = await store.http.get(f"/deployments/{APP}/tasks/garbage-task/results")
    assert_unreadable(result, f"{APP}.garbage-task", compat=True)

    after = await store.http.post(
        f"/v1/deployments/{APP}/tasks:run", json={"input": {"message": "still"}}
    )
    assert after.status_code == 200, after.text
    assert after.json()["task"]["result"] == "echo: still"


async def test_an_unreadable_session_is_skipped_read_alone_as_an_error_and_deletable(
    store: Store,
) -> None:
    """Garbage under a session key: listings answer 200 without it; GET of it (and of
    its tasks) is a 400 naming its key; deleting it works."""
    made = await store.http.post(f"/v1/deployments/{APP}/sessions", json={})
    assert made.status_code == 200, made.text
    good = made.json()["session"]["session_id"]
    sessions = await store.bucket("sessions")
    await sessions.put(f"{APP}.garbage-session", GARBAGE)

    v1 = await store.http.get(f"/v1/deployments/{APP}/sessions")
    assert v1.status_code == 200, v1.text
    assert [s["session_id"] for s in v1.json()["sessions"]] == [good]
    compat = await store.http.get(f"/deployments/{APP}/sessions")
    assert compat.status_code == 200, compat.text
    assert [s["session_id"] for s in compat.json()] == [good]

    key = f"{APP}.garbage-session"
    alone = await store.http.get(f"/deployments/{APP}/sessions/garbage-session")
    assert_unreadable(alone, key, compat=True)
    its_tasks = await store.http.get(
        f"/v1/deployments/{APP}/tasks", params={"session_id": "garbage-session"}
    )
    assert_unreadable(its_tasks, key, compat=False)

    deleted = await store.http.delete(f"/v1/deployments/{APP}/sessions/garbage-session")
    assert deleted.status_code == 200, deleted.text
    gone = await store.http.get(f"/v1/deployments/{APP}/sessions/garbage-session")
    assert gone.status_code == 404, gone.text


async def test_an_unreadable_deployment_record_is_skipped_and_a_clear_error_alone(
    store: Store,
) -> None:
    """Garbage over the running deployment's record: the listing answers 200 without it,
    GET of it is a 400 naming it; redeploying it (reload) writes a good record again."""
    deployments = await store.bucket("deployments")
    await deployments.put(APP, GARBAGE)

    listing = await store.http.get("/v1/deployments")
    assert listing.status_code == 200, listing.text
    assert listing.json()["deployments"] == []
    alone = await store.http.get(f"/v1/deployments/{APP}")
    assert_unreadable(alone, APP, compat=False)

    await store.server.mesh.deployments.create(
        partial_testapp("echo"), base_path=str(TESTAPP.parent), reload=True, local=True
    )
    again = await store.http.get(f"/v1/deployments/{APP}")
    assert again.status_code == 200, again.text


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def http(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the gateway of testapp on a nats-server, shared by the module's tests."""
    data_dir = tmp_path_factory.mktemp("bad-records")
    options: dict[str, Any] = {"queue": "nats", "gateway": True, "deploy": (TESTAPP,)}
    async with running_mesh(data_dir, **options) as server:
        assert server.gateway_url is not None
        async with httpx.AsyncClient(base_url=server.gateway_url, timeout=TIMEOUT) as client:
            yield client


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize(
    ("method", "path", "body", "field"),
    [
        ("GET", f"/v1/deployments/{APP}/tasks?session_id=a%20b", None, "session id"),
        ("GET", f"/v1/deployments/{APP}/tasks?session_id=a.b", None, "session id"),
        ("GET", f"/v1/deployments/{APP}/tasks/a%20b", None, "task id"),
        ("GET", f"/v1/deployments/{APP}/sessions/a%2Ab", None, "session id"),
        ("DELETE", f"/v1/deployments/{APP}/sessions/a%20b", None, "session id"),
        ("POST", f"/v1/deployments/{APP}/tasks", {"session_id": "a b"}, "session id"),
        ("POST", f"/v1/deployments/{APP}/tasks/a.b:cancel", {}, "task id"),
        ("GET", f"/deployments/{APP}/sessions/a%20b", None, "session id"),
        ("POST", f"/deployments/{APP}/sessions/delete?session_id=a%20b", None, "session id"),
        ("GET", f"/deployments/{APP}/tasks/a%20b/results", None, "task id"),
        (
            "POST",
            f"/deployments/{APP}/tasks/create",
            {"input": "{}", "session_id": "a b"},
            "session id",
        ),
    ],
)
async def test_a_malformed_id_is_400_naming_the_field(
    http: httpx.AsyncClient, method: str, path: str, body: dict[str, Any] | None, field: str
) -> None:
    """An id that cannot be one (a space, a dot, a star) is a 400 INVALID_ARGUMENT whose
    message names the field, wherever it comes."""
    response = await http.request(method, path, json=body)
    assert response.status_code == 400, response.text
    error = response.json()
    assert error["code"] == 3, response.text
    assert f"invalid {field}" in error["message"], response.text
