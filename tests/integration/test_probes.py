"""Liveness and readiness probes, 405 for a wrong method, and upload errors, through Envoy.

``/healthz`` and ``/readyz`` need no API key (load balancers and Kubernetes have none); a
known path asked with a method it does not take is a JSON 405 naming the allowed methods;
a deployment file's errors name the file the user uploaded.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from llama_mesh.server.auth import ApiKeys
from tests.fixtures.envoy import StartGateway
from tests.fixtures.fake_apiserver import FakeApiServerHandle, running_fake_apiserver
from tests.fixtures.mesh import MeshFactory

ADMIN = "admin-key-for-probes"


@pytest.fixture
async def upstream() -> AsyncIterator[FakeApiServerHandle]:
    async with running_fake_apiserver() as handle:
        yield handle


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("DELETE", "/status/", "GET"),
        ("PUT", "/deployments/d/tasks/run", "POST"),
        ("PATCH", "/v1/deployments/d", "DELETE, GET"),
        ("POST", "/healthz", "GET"),
    ],
)
async def test_a_wrong_method_on_a_known_path_is_json_405_with_allow(
    start_gateway: StartGateway,
    upstream: FakeApiServerHandle,
    method: str,
    path: str,
    allowed: str,
) -> None:
    """405 (not 404), JSON with the gRPC code UNIMPLEMENTED, and an Allow header."""
    gateway = await start_gateway(upstream.port, cors_origins=("http://allowed.example",))
    async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as http:
        response = await http.request(method, path)
        unknown = await http.request(method, "/no/such/path")

    assert response.status_code == 405
    assert response.headers["allow"] == allowed
    assert response.json()["code"] == 12
    assert response.json()["message"] == "Method Not Allowed"
    assert unknown.status_code == 404


async def test_probes_need_no_api_key_and_say_ready(mesh_factory: MeshFactory) -> None:
    """With API keys on, /healthz and /readyz answer without one (other routes do not)."""
    server = await mesh_factory(gateway=True, api_keys=ApiKeys(admin=(ADMIN,)))
    await server.wait_restored()
    assert server.gateway_url is not None
    async with httpx.AsyncClient(base_url=server.gateway_url, timeout=10) as http:
        health = await http.get("/healthz")
        ready = await http.get("/readyz")
        guarded = await http.get("/deployments/")

    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    assert (ready.status_code, ready.json()) == (200, {"status": "ok", "deployments": 0})
    assert guarded.status_code == 401


async def test_upload_errors_name_the_uploaded_file(mesh_factory: MeshFactory) -> None:
    """A YAML error in an uploaded file names that file; an empty file says it is empty;
    a file that is not UTF-8 is a 400 naming the file and the byte."""
    server = await mesh_factory(gateway=True)
    assert server.gateway_url is not None
    async with httpx.AsyncClient(base_url=server.gateway_url, timeout=30) as http:

        async def upload(name: str, content: bytes) -> httpx.Response:
            return await http.post("/deployments/create", files={"config_file": (name, content)})

        unknown_key = await upload("my-app.yaml", b"name: x\nservices: {}\nbogus: 1\n")
        empty = await upload("blank.yml", b"  \n")
        latin1 = await upload("latin.yml", b"name: caf\xe9\n")
        v1_empty = await http.post("/v1/deployments", json={"config_yaml": " "})

    assert unknown_key.status_code == 400
    assert unknown_key.json()["message"].startswith("my-app.yaml:3: ")
    assert empty.status_code == 400
    assert empty.json()["message"] == "the deployment file blank.yml is empty"
    assert latin1.status_code == 400
    assert latin1.json()["message"].startswith("latin.yml:1: not valid UTF-8")
    assert v1_empty.status_code == 400
    assert v1_empty.json()["message"] == "the deployment file is empty"
