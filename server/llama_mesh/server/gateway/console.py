"""The web console's static files, served by Envoy itself as direct responses.

The console (``console_files/``: HTML, CSS and JavaScript modules, no build step) is a client of
the ``/v1`` JSON API and its server-sent events, and of nothing else: it has no route of its
own into the API server. Each file becomes one route whose body is the file, read when the
gateway's configuration is rendered; ``/`` answers ``index.html``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["CONSOLE_DIR", "CONSOLE_PREFIX", "console_routes", "largest_console_file"]

CONSOLE_DIR = Path(__file__).resolve().parent / "console_files"
CONSOLE_PREFIX = "/console/"
_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
}
# Scripts and styles only from the gateway itself; no inline script can run, and the page
# talks to nothing but its own origin.
_SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}


def _files() -> list[Path]:
    return sorted(p for p in CONSOLE_DIR.iterdir() if p.suffix in _CONTENT_TYPES)


def largest_console_file() -> int:
    """The size in bytes of the largest console file (Envoy caps direct response bodies)."""
    return max(p.stat().st_size for p in _files())


def _route(name: str, match: dict[str, Any], path: Path) -> dict[str, Any]:
    headers = {"content-type": _CONTENT_TYPES[path.suffix], **_SECURITY_HEADERS}
    return {
        "name": name,
        "match": {**match, "headers": [{"name": ":method", "string_match": {"exact": "GET"}}]},
        "direct_response": {
            "status": 200,
            "body": {"inline_string": path.read_text(encoding="utf-8")},
        },
        "response_headers_to_add": [
            {"header": {"key": key, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
            for key, value in headers.items()
        ],
    }


def console_routes() -> list[dict[str, Any]]:
    """Envoy routes for ``GET /`` (the console's page) and ``GET /console/<file>``."""
    routes = [_route("console-index", {"path": "/"}, CONSOLE_DIR / "index.html")]
    routes += [
        _route(f"console-{path.name}", {"path": CONSOLE_PREFIX + path.name}, path)
        for path in _files()
    ]
    return routes
