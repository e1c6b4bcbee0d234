"""The committed OpenAPI document (gateway/openapi.json): a valid OpenAPI 3 document that
describes exactly the routes the gateway serves, with the JSON shapes Envoy's transcoder prints.

The routes are derived here independently of the generator: from the ``google.api.http`` rules
in the gateway's descriptor set, and from the Envoy route table for what Envoy answers itself.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2
from openapi_spec_validator import validate

from llama_mesh.server.auth import OPEN_PREFIXES
from llama_mesh.server.gateway import (
    DEFAULT_DESCRIPTOR_PATH,
    TRANSCODED_SERVICES,
    GatewayConfig,
    render_envoy_config,
)
from llama_mesh.server.gateway.console import console_routes
from llama_mesh.server.gateway.control_planes import CONTROL_PLANE_SERVICE
from llama_mesh.server.gateway.docs import DOCS_ASSET_PREFIX, OPENAPI_DOCUMENT

VERBS = ("get", "put", "post", "delete", "patch")


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(OPENAPI_DOCUMENT.read_text(encoding="utf-8"))
    return loaded


@pytest.fixture(scope="module")
def descriptor_set() -> descriptor_pb2.FileDescriptorSet:
    assert annotations_pb2.http  # registers the extension the rules are read with
    return descriptor_pb2.FileDescriptorSet.FromString(DEFAULT_DESCRIPTOR_PATH.read_bytes())


def http_rules(
    descriptor_set: descriptor_pb2.FileDescriptorSet,
) -> list[tuple[str, descriptor_pb2.MethodDescriptorProto, http_pb2.HttpRule]]:
    """``(service, method, rule)`` of every binding of the services the gateway transcodes."""
    wanted = (*TRANSCODED_SERVICES, CONTROL_PLANE_SERVICE)
    found = []
    for file in descriptor_set.file:
        for service in file.service:
            name = f"{file.package}.{service.name}"
            if name not in wanted:
                continue
            for method in service.method:
                if not method.options.HasExtension(annotations_pb2.http):
                    continue
                rule = method.options.Extensions[annotations_pb2.http]
                for one in (rule, *rule.additional_bindings):
                    found.append((name, method, one))
    return found


def route_of(rule: http_pb2.HttpRule) -> tuple[str, str]:
    verb = rule.WhichOneof("pattern")
    assert verb is not None
    template = getattr(rule, verb)
    return verb, re.sub(r"\{([^}=]+)(=[^}]*)?\}", r"{\1}", template)


def operations(document: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (verb, path): operation
        for path, item in document["paths"].items()
        for verb, operation in item.items()
        if verb in VERBS
    }


def envoy_own_routes() -> set[tuple[str, str]]:
    """``(method, path)`` of the routes Envoy answers itself (direct responses), except the
    assets of the /docs page (checked by the gateway test: the page loads them) and the web
    console's files (a client of the API, not part of it; tests/browser loads them)."""
    config = render_envoy_config(GatewayConfig(upstream_port=1))
    listener = config["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    console_route_names = {route["name"] for route in console_routes()}
    own = set()
    for route in routes:
        # Envoy's own answers (200); its error replies (405 for a known path asked with a
        # method it does not take) are not routes of their own.
        if route.get("direct_response", {}).get("status") != 200:
            continue
        path = route["match"]["path"]
        (method,) = [
            h["string_match"]["exact"] for h in route["match"]["headers"] if h["name"] == ":method"
        ]
        if route["name"] in console_route_names:
            continue
        if not path.startswith(DOCS_ASSET_PREFIX):
            own.add((method.lower(), path))
    return own


def schema(document: dict[str, Any], ref_or_schema: dict[str, Any]) -> dict[str, Any]:
    ref = ref_or_schema.get("$ref") or (ref_or_schema.get("allOf") or [{}])[0].get("$ref")
    if ref is None:
        return ref_or_schema
    found: dict[str, Any] = document["components"]["schemas"][ref.rsplit("/", 1)[-1]]
    return found


def test_document_is_valid_openapi_3(document: dict[str, Any]) -> None:
    """The document validates against the OpenAPI 3.0 schema (openapi-spec-validator)."""
    assert document["openapi"].startswith("3.0.")
    validate(document)


def test_every_served_route_is_described_and_nothing_else(
    document: dict[str, Any], descriptor_set: descriptor_pb2.FileDescriptorSet
) -> None:
    """The described (method, path) pairs are exactly the http rules the gateway transcodes
    (0.8 API server, /v1, 0.8 control plane) plus the routes Envoy answers itself."""
    served = {route_of(rule) for _, _, rule in http_rules(descriptor_set)}
    own = envoy_own_routes()
    assert own == {("get", "/openapi.json"), ("get", "/docs")}
    assert set(operations(document)) == served | own


def test_operations_name_their_rpc_and_control_plane_routes_their_port(
    document: dict[str, Any], descriptor_set: descriptor_pb2.FileDescriptorSet
) -> None:
    """Each transcoded operation names its RPC; ControlPlane routes (and only they) are served
    on a deployment's control-plane port, which their path item's `servers` says."""
    ops = operations(document)
    for service, method, rule in http_rules(descriptor_set):
        verb, path = route_of(rule)
        operation = ops[(verb, path)]
        assert f"`{service}.{method.name}`" in operation["description"]
        servers = document["paths"][path].get("servers")
        if service == CONTROL_PLANE_SERVICE:
            assert servers is not None and servers[0]["variables"]["port"]["default"] == "8000"
        else:
            assert servers is None


def test_api_key_is_required_except_for_open_routes(
    document: dict[str, Any], descriptor_set: descriptor_pb2.FileDescriptorSet
) -> None:
    """Bearer API keys guard every operation but Envoy's own (/openapi.json, /docs) and the
    RPCs auth.py leaves open (the probes); admin-only RPCs say they need an admin key."""
    scheme = document["components"]["securitySchemes"]["apiKey"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    assert document["security"] == [{"apiKey": []}]
    ops = operations(document)
    open_ops = {key for key, op in ops.items() if op.get("security") == []}
    open_rpcs = {
        route_of(rule)
        for service, method, rule in http_rules(descriptor_set)
        if f"/{service}/{method.name}".startswith(OPEN_PREFIXES)
    }
    assert ("get", "/healthz") in open_rpcs
    assert open_ops == envoy_own_routes() | open_rpcs
    assert "admin API key" in ops[("delete", "/v1/deployments/{name}")]["description"]
    assert "admin API key" not in ops[("post", "/v1/deployments/{deployment}/tasks")]["description"]


def test_request_bodies_follow_the_body_rule(document: dict[str, Any]) -> None:
    """`body: "*"` is the request minus path fields; `body: "field"` is that field's type (other
    fields in the query); no body, no requestBody; the 0.8 upload is multipart `config_file`."""
    ops = operations(document)
    star = ops[("post", "/v1/deployments/{deployment}/tasks:run")]
    body = star["requestBody"]["content"]["application/json"]["schema"]
    assert set(body["properties"]) == {"service_id", "session_id", "input"}
    assert body["properties"]["input"]["type"] == "object"  # google.protobuf.Struct
    assert "parameters" in star and [p["in"] for p in star["parameters"]] == ["path"]

    field = ops[("post", "/deployments/{deployment_name}/tasks/run")]
    ref = field["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert ref.endswith("/LlamaDeployTaskDefinition")
    assert {(p["name"], p["in"]) for p in field["parameters"]} == {
        ("deployment_name", "path"),
        ("session_id", "query"),
    }

    assert "requestBody" not in ops[("post", "/deployments/{deployment_name}/sessions/create")]

    upload = ops[("post", "/deployments/create")]
    form = upload["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["properties"]["config_file"]["format"] == "binary"
    assert {p["name"] for p in upload["parameters"]} == {"base_path", "reload", "local"}


def test_streams_are_described_as_the_gateway_frames_them(document: dict[str, Any]) -> None:
    """The v1 event stream and task watch are text/event-stream (the SSE routes) and no
    other route is, 0.8 streams application/x-ndjson, other v1 streams newline-delimited
    JSON messages."""
    ops = operations(document)

    def content(verb: str, path: str) -> set[str]:
        return set(ops[(verb, path)]["responses"].get("200", {}).get("content", {}))

    sse = {key for key in ops if "text/event-stream" in content(*key)}
    assert sse == {
        ("get", "/v1/deployments/{deployment}/tasks/{task_id}/events"),
        ("get", "/v1/deployments/{deployment}/tasks:watch"),
    }
    watch = ops[("get", "/v1/deployments/{deployment}/tasks:watch")]["responses"]["200"]
    assert watch["description"].startswith("Server-Sent Events: one `data: <JSON>` frame")
    assert watch["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/WatchTasksResponse"
    }
    assert content("get", "/deployments/{deployment_name}/tasks/{task_id}/events") == {
        "application/x-ndjson"
    }
    assert content("get", "/sessions/{session_id}/tasks/{task_id}/result_stream") == {
        "application/x-ndjson"
    }
    progress = ops[("get", "/v1/deployments/{name}/progress")]["responses"]["200"]
    assert "one JSON object per line" in progress["description"]


def test_json_shapes_follow_proto3_json(document: dict[str, Any]) -> None:
    """int64 is a string, Timestamp an RFC 3339 string, Struct an object, Value any JSON, enums
    their names; descriptions come from the proto comments."""
    schemas = document["components"]["schemas"]
    task = schemas["Task"]
    props = task["properties"]
    assert (props["event_count"]["type"], props["event_count"]["format"]) == ("string", "int64")
    assert props["created_at"]["format"] == "date-time"
    assert props["input"]["type"] == "object"
    assert props["result"]["nullable"] is True and "type" not in props["result"]
    assert schema(document, props["status"]) is schemas["TaskStatus"]
    assert "TASK_STATUS_SUCCEEDED" in schemas["TaskStatus"]["enum"]
    assert schemas["TaskStatus"]["type"] == "string"
    assert task["description"] == "Task is one run of a workflow."
    assert props["task_id"]["description"] == "task_id identifies the task."


def test_errors_use_the_gateway_error_shape(document: dict[str, Any]) -> None:
    """Every transcoded operation's error response is google.rpc.Status JSON, with `detail`
    outside /v1/ (as compat_errors.lua adds it)."""
    for (_, path), operation in operations(document).items():
        if operation.get("security") == []:
            continue
        expected = "Error" if path.startswith("/v1/") else "CompatError"
        assert operation["responses"]["default"] == {"$ref": f"#/components/responses/{expected}"}
    status = document["components"]["schemas"]["google.rpc.Status"]["properties"]
    assert set(status) == {"code", "message", "details"}
    compat = document["components"]["schemas"]["CompatStatus"]["allOf"][1]
    assert compat["required"] == ["detail"]
