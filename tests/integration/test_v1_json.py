"""The ``/v1`` JSON surface through the real gateway: request bodies with fields the method
does not have are refused with 400 naming the field (the transcoder alone drops them and
runs the request without them), both JSON spellings of a field are accepted, and the
Llama Deploy 0.8 routes stay as tolerant as 0.8 was."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
import pytest_asyncio

from tests.fixtures.mesh import TESTAPP, running_mesh

pytestmark = pytest.mark.asyncio(loop_scope="module")

APP = "testapp"


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def http(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of a gateway in front of a server running testapp, shared by the
    module's tests (they only send requests)."""
    data_dir = tmp_path_factory.mktemp("v1-json")
    async with running_mesh(data_dir, queue="inprocess", gateway=True, deploy=(TESTAPP,)) as server:
        assert server.gateway_url is not None
        async with httpx.AsyncClient(base_url=server.gateway_url, timeout=30) as client:
            yield client


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        (f"/v1/deployments/{APP}/tasks", {"inputs": {"message": "x"}}, "inputs"),
        (f"/v1/deployments/{APP}/tasks:run", {"input": {}, "service": "echo"}, "service"),
        (f"/v1/deployments/{APP}/sessions", {"session_id": "s"}, "session_id"),
    ],
)
async def test_unknown_body_field_is_refused(
    http: httpx.AsyncClient, path: str, body: dict[str, object], field: str
) -> None:
    """A /v1 body with a field the method does not have: 400, INVALID_ARGUMENT, the
    field named in the message; nothing runs."""
    before = (await http.get(f"/v1/deployments/{APP}/tasks")).json()
    response = await http.post(path, json=body)
    assert response.status_code == 400, response.text
    error = response.json()
    assert error["code"] == 3, error
    assert error["message"].startswith(f"unknown field '{field}' in the request body of POST")
    assert (await http.get(f"/v1/deployments/{APP}/tasks")).json() == before


async def test_both_spellings_of_a_field_are_accepted(http: httpx.AsyncClient) -> None:
    """Proto names and their lowerCamelCase JSON names both work; values deeper than the
    top level (the task's input) are the workflow's and are not checked."""
    for service_key in ("service_id", "serviceId"):
        body = {"input": {"message": "m", "anything": 1}, service_key: "echo"}
        response = await http.post(f"/v1/deployments/{APP}/tasks:run", json=body)
        assert response.status_code == 200, response.text
        task = response.json()["task"]
        assert (task["service_id"], task["result"]) == ("echo", "echo: m")


async def test_08_routes_ignore_unknown_fields(http: httpx.AsyncClient) -> None:
    """The Llama Deploy 0.8 routes accept extra fields, as 0.8 did."""
    body = {"input": '{"message": "m"}', "service_id": "echo", "extra": 2}
    response = await http.post(f"/deployments/{APP}/tasks/run", json=body)
    assert response.status_code == 200, response.text
    assert response.json() == "echo: m"
