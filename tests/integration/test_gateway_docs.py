"""/openapi.json and /docs through a real Envoy: served by the gateway itself, without an API key
(while the API behind it needs one), and the /docs page's assets all load."""

from __future__ import annotations

import json
import re
from urllib.parse import urljoin

import httpx

from llama_mesh.server.auth import ApiKeys
from llama_mesh.server.gateway import Gateway
from llama_mesh.server.gateway.docs import DOCS_PATH, OPENAPI_DOCUMENT, OPENAPI_PATH
from tests.fixtures.envoy import StartGateway
from tests.fixtures.mesh import MeshFactory, free_port

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
