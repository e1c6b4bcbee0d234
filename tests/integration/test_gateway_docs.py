"""/openapi.json and /docs through a real Envoy: served by the gateway itself, without an API key
(while the API behind it needs one), and the /docs page's assets all load."""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import urljoin

import httpx
from openapi_schema_validator import OAS30Validator

from llama_mesh.server.auth import ApiKeys
from llama_mesh.server.gateway import Gateway
from llama_mesh.server.gateway.docs import DOCS_PATH, OPENAPI_DOCUMENT, OPENAPI_PATH
from llama_mesh.server.ports import free_port
from tests.fixtures.envoy import StartGateway
from tests.fixtures.mesh import TESTAPP, MeshFactory

USER = "user-key-0123456789abcdef"
TIMEOUT = 30.0


def referenced_urls(html: str, scripts: str) -> set[str]:
    """The URLs a page loads: its `src=` and `href=` attributes, and the gateway paths its
    scripts give Swagger UI to load (`url: "/..."`)."""
    urls = set(re.findall(r'(?:src|href)="([^"]+)"', html))
    urls |= set(re.findall(r'\burl:\s*"(/[^"]*)"', scripts))
    return urls


async def test_openapi_json_is_served_without_a_key(mesh_factory: MeshFactory) -> None:
    """GET /openapi.json answers the committed document (application/json) without an API key,
    while the API itself answers 401 without one, on a server that has keys."""
    server = await mesh_factory(gateway=True, api_keys=ApiKeys(user=(USER,)))
    assert server.gateway_url is not None
    async with httpx.AsyncClient(base_url=server.gateway_url, timeout=TIMEOUT) as http:
        response = await http.get(OPENAPI_PATH)
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        assert response.json() == json.loads(OPENAPI_DOCUMENT.read_text(encoding="utf-8"))
        page = await http.get(DOCS_PATH)
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert (await http.get("/v1/status")).status_code == 401
        keyed = await http.get("/v1/status", headers={"authorization": f"Bearer {USER}"})
        assert keyed.status_code == 200


async def test_docs_page_assets_all_load(start_gateway: StartGateway) -> None:
    """Every URL the /docs page references (stylesheet, icon, scripts, and the document the
    start script loads) answers 200 with a fitting content type, from Envoy alone: the
    gateway's upstream here is a port nothing listens on."""
    gateway: Gateway = await start_gateway(free_port())
    async with httpx.AsyncClient(base_url=gateway.url, timeout=TIMEOUT) as http:
        page = await http.get(DOCS_PATH)
        assert page.status_code == 200
        assert "swagger-ui" in page.text
        scripts = re.findall(r'<script src="([^"]+)"', page.text)
        assert scripts, "the page loads no script"
        script_text = "\n".join([(await http.get(src)).text for src in scripts])
        urls = referenced_urls(page.text, script_text)
        assert OPENAPI_PATH in urls and any(u.endswith(".css") for u in urls)
        for url in sorted(urls):
            response = await http.get(urljoin(f"{gateway.url}{DOCS_PATH}", url))
            assert response.status_code == 200, url
            kind = response.headers["content-type"]
            if url.endswith(".js"):
                assert kind.startswith("text/javascript"), (url, kind)
            elif url.endswith(".css"):
                assert kind.startswith("text/css"), (url, kind)
            elif url.endswith(".png"):
                assert kind == "image/png" and response.content.startswith(b"\x89PNG")
            else:
                assert kind == "application/json", (url, kind)
        # The bundle really is Swagger UI (not an error body with a 200).
        bundle = next(u for u in urls if u.endswith("swagger-ui-bundle.js"))
        assert "SwaggerUIBundle" in (await http.get(bundle)).text
        # The API itself has no upstream here: only Envoy's own routes answered.
        assert (await http.get("/v1/status")).status_code == 503
        # Only GET is served; other methods get the gateway's JSON 404.
        post = await http.post(OPENAPI_PATH)
        assert post.status_code == 404 and post.json()["code"] == 5


# -- real responses match the document ------------------------------------------------------


def strict(document: dict[str, Any], schema: Any, depth: int = 0, *, close: bool = True) -> Any:
    """``schema`` with every ``$ref`` inlined and every message object closed
    (``additionalProperties: false``), so that a field the document does not name fails; the
    parts of a composition (``allOf`` of several) stay open, as each names only some fields."""
    assert depth < 20, "recursive schema"
    if isinstance(schema, list):
        return [strict(document, item, depth, close=close) for item in schema]
    if not isinstance(schema, dict):
        return schema
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return strict(document, document["components"]["schemas"][name], depth + 1, close=close)
    out = {
        key: strict(document, value, depth, close=not (key == "allOf" and len(value) > 1))
        for key, value in schema.items()
    }
    if close and "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


class Described:
    """Checks gateway responses against the document's schema for their route."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.checked: set[tuple[str, str]] = set()

    def schema(self, verb: str, template: str, media: str, status: int) -> Any:
        operation = self.document["paths"][template][verb]
        response = operation["responses"]["200" if status == 200 else "default"]
        if "$ref" in response:
            response = self.document["components"]["responses"][response["$ref"].rsplit("/")[-1]]
        return strict(self.document, response["content"][media]["schema"])

    def check(self, response: httpx.Response, verb: str, template: str) -> Any:
        """Validate ``response`` (JSON) against the schema of ``verb template``; its body."""
        media = response.headers["content-type"]
        body = response.json()
        OAS30Validator(self.schema(verb, template, media, response.status_code)).validate(body)
        self.checked.add((verb, template))
        return body

    def check_lines(self, lines: list[Any], verb: str, template: str, media: str) -> None:
        """Validate each message of a stream against the route's message schema."""
        validator = OAS30Validator(self.schema(verb, template, media, 200))
        for line in lines:
            validator.validate(line)
        self.checked.add((verb, template))


async def test_real_responses_match_the_document(mesh_factory: MeshFactory) -> None:
    """Responses of a real server through the gateway validate against the document's schemas,
    closed to undocumented fields: probes, v1 and 0.8 routes, errors, the SSE and NDJSON
    streams."""
    document = json.loads(OPENAPI_DOCUMENT.read_text(encoding="utf-8"))
    described = Described(document)
    server = await mesh_factory(gateway=True, deploy=(TESTAPP,))
    assert server.gateway_url is not None
    async with httpx.AsyncClient(base_url=server.gateway_url, timeout=TIMEOUT) as http:
        check = described.check
        check(await http.get("/healthz"), "get", "/healthz")
        check(await http.get("/readyz"), "get", "/readyz")
        check(await http.get("/v1/status"), "get", "/v1/status")
        check(await http.get("/v1/deployments"), "get", "/v1/deployments")
        check(await http.get("/v1/deployments/testapp"), "get", "/v1/deployments/{name}")
        services = "/v1/deployments/{deployment}/services"
        check(await http.get("/v1/deployments/testapp/services"), "get", services)
        run = await http.post(
            "/v1/deployments/testapp/tasks:run", json={"service_id": "stream", "input": {}}
        )
        task = check(run, "post", "/v1/deployments/{deployment}/tasks:run")["task"]
        tasks = "/v1/deployments/{deployment}/tasks"
        check(await http.get("/v1/deployments/testapp/tasks"), "get", tasks)
        one = f"/v1/deployments/testapp/tasks/{task['task_id']}"
        check(await http.get(one), "get", tasks + "/{task_id}")
        events = await http.get(f"{one}/events")
        assert events.headers["content-type"] == "text/event-stream"
        frames = [json.loads(f[len("data: ") :]) for f in events.text.split("\n\n") if f]
        assert frames and all(f["event"]["task_id"] == task["task_id"] for f in frames)
        described.check_lines(frames, "get", tasks + "/{task_id}/events", "application/json")
        progress = await http.get("/v1/deployments/testapp/progress")
        lines = [json.loads(line) for line in progress.text.splitlines() if line]
        assert lines and lines[-1]["done"] is True
        described.check_lines(
            lines, "get", "/v1/deployments/{name}/progress", progress.headers["content-type"]
        )
        sessions = "/v1/deployments/{deployment}/sessions"
        created = check(
            await http.post("/v1/deployments/testapp/sessions", json={}), "post", sessions
        )
        check(await http.get("/v1/deployments/testapp/sessions"), "get", sessions)
        session = f"/v1/deployments/testapp/sessions/{created['session']['session_id']}"
        check(await http.get(session), "get", sessions + "/{session_id}")
        check(await http.delete(session), "delete", sessions + "/{session_id}")
        missing = await http.get("/v1/deployments/nope")
        assert missing.status_code == 404
        check(missing, "get", "/v1/deployments/{name}")

        check(await http.get("/status/"), "get", "/status")
        check(await http.get("/deployments/"), "get", "/deployments")
        name = "/deployments/{deployment_name}"
        check(await http.get("/deployments/testapp"), "get", name)
        result = await http.post("/deployments/testapp/tasks/run", json={"input": "{}"})
        assert check(result, "post", name + "/tasks/run") == "echo: "
        created_task = await http.post("/deployments/testapp/tasks/create", json={"input": "{}"})
        definition = check(created_task, "post", name + "/tasks/create")
        check(await http.get("/deployments/testapp/tasks"), "get", name + "/tasks")
        results = await http.get(
            f"/deployments/testapp/tasks/{definition['task_id']}/results",
            params={"session_id": definition["session_id"]},
        )
        check(results, "get", name + "/tasks/{task_id}/results")
        compat_session = check(
            await http.post("/deployments/testapp/sessions/create"),
            "post",
            name + "/sessions/create",
        )
        check(await http.get("/deployments/testapp/sessions"), "get", name + "/sessions")
        check(
            await http.get(f"/deployments/testapp/sessions/{compat_session['session_id']}"),
            "get",
            name + "/sessions/{session_id}",
        )
        deleted = await http.post(
            "/deployments/testapp/sessions/delete",
            params={"session_id": compat_session["session_id"]},
        )
        check(deleted, "post", name + "/sessions/delete")
        compat_missing = await http.get("/deployments/nope")
        assert compat_missing.status_code == 404
        assert check(compat_missing, "get", name)["detail"]
    assert len(described.checked) == 26  # every route exercised above


async def test_control_plane_responses_match_the_document(mesh_factory: MeshFactory) -> None:
    """On a deployment's control plane port (the `servers` of those paths), the 0.8 control
    plane routes answer as the document describes them, NDJSON result stream included."""
    document = json.loads(OPENAPI_DOCUMENT.read_text(encoding="utf-8"))
    described = Described(document)
    server = await mesh_factory(gateway=True, control_planes=True)
    text = TESTAPP.read_text()
    assert "port: 8000" in text
    await server.mesh.deployments.create(
        text.replace("port: 8000", f"port: {free_port()}").encode(),
        base_path=str(TESTAPP.parent),
        reload=False,
        local=True,
    )
    control_planes = server.mesh.deployments.control_planes
    assert control_planes is not None
    port = control_planes.served["testapp"]
    assert document["paths"]["/services"]["servers"][0]["url"] == "{scheme}://{host}:{port}"
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=TIMEOUT) as http:
        check = described.check
        check(await http.get("/"), "get", "/")
        check(await http.get("/queue_config"), "get", "/queue_config")
        check(await http.get("/services"), "get", "/services")
        check(await http.get("/services/echo"), "get", "/services/{service_name}")
        session = check(await http.post("/sessions/create"), "post", "/sessions/create")
        check(await http.get("/sessions"), "get", "/sessions")
        one = "/sessions/{session_id}"
        check(await http.get(f"/sessions/{session}"), "get", one)
        task_id = check(
            await http.post(f"/sessions/{session}/tasks", json={"input": "{}"}),
            "post",
            one + "/tasks",
        )
        check(await http.get(f"/sessions/{session}/tasks"), "get", one + "/tasks")
        check(await http.get(f"/sessions/{session}/current_task"), "get", one + "/current_task")
        stream = await http.get(f"/sessions/{session}/tasks/{task_id}/result_stream")
        assert stream.status_code == 200
        streamed = document["paths"][one + "/tasks/{task_id}/result_stream"]["get"]
        assert stream.headers["content-type"] in streamed["responses"]["200"]["content"]
        assert json.loads(stream.text.splitlines()[-1]) == {"result": "echo: "}
        result = await http.get(f"/sessions/{session}/tasks/{task_id}/result")
        check(result, "get", one + "/tasks/{task_id}/result")
        check(await http.get(f"/sessions/{session}/state"), "get", one + "/state")
        check(await http.post(f"/sessions/{session}/delete"), "post", one + "/delete")
        missing = await http.get("/sessions/nope")
        assert missing.status_code == 404
        assert check(missing, "get", one)["detail"]
    assert len(described.checked) == 13  # every route exercised above
