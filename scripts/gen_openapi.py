"""The OpenAPI 3 document of the gateway's JSON API, built from the compiled protos.

``build_document(descriptor_set)`` reads a ``FileDescriptorSet`` compiled with
``--include_source_info`` (for the comments) and returns the document as plain data;
scripts/gen.py writes it to ``server/llama_mesh/server/gateway/openapi.json``.

What it describes, from the ``google.api.http`` rules of three services:

* ``LlamaDeployApi``: the Llama Deploy 0.8 API server routes, on the gateway's port;
* ``ApiServer``: ``/v1``, on the gateway's port (and the other services the gateway
  transcodes there: ``Probes``);
* ``ControlPlane``: the 0.8 control plane routes, served on each deployment's
  ``control-plane.port``; their path items carry their own ``servers`` entry (that port).

and the two documentation routes Envoy serves itself (``/openapi.json``, ``/docs``).

How the JSON looks is how Envoy's transcoder prints it (see gateway/config.py): proto field
names, every field present, enums as names, 64-bit integers as strings, the well-known types
in their proto3 JSON forms. Responses that carry a ``google.api.HttpBody`` as
``response_body`` are bare JSON (``application/json``), or NDJSON for streams; other server
streams are newline-delimited JSON, except the routes the gateway frames as Server-Sent
Events (``SSE_PATH_REGEX``). The shape of a bare JSON answer is read from its
HttpBody field's comment (``_Builder._bare_json``). Errors are ``google.rpc.Status`` JSON,
plus FastAPI's ``detail`` outside ``/v1/`` (compat_errors.lua).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from google.api import annotations_pb2, field_behavior_pb2, http_pb2
from google.protobuf import descriptor_pb2

from llama_mesh.server.auth import OPEN_PREFIXES, needs_admin
from llama_mesh.server.gateway.config import SSE_PATH_REGEX, TRANSCODED_SERVICES
from llama_mesh.server.gateway.control_planes import (
    CONTROL_PLANE_SERVICE,
    DEFAULT_CONTROL_PLANE_PORT,
    DEPLOYMENT_HEADER,
)
from llama_mesh.server.gateway.docs import DOCS_PATH, OPENAPI_PATH

__all__ = ["OpenApiError", "build_document"]

OPENAPI_VERSION = "3.0.3"
PACKAGE = "llama_mesh.v1"
HTTP_BODY = "google.api.HttpBody"
V1_PREFIX = "/v1/"
TAGS = {
    "llama_mesh.v1.LlamaDeployApi": "Llama Deploy 0.8 API server",
    "llama_mesh.v1.ApiServer": "v1",
    CONTROL_PLANE_SERVICE: "Llama Deploy 0.8 control plane",
    "llama_mesh.v1.Probes": "Probes",
}
DOCS_TAG = "Documentation"
# Request fields the gateway fills in itself on a control plane port (the listener's
# DEPLOYMENT_HEADER wins over them): not parameters a client sends there.
CONTROL_PLANE_IMPLIED_FIELDS = frozenset({"deployment"})
# Raw (google.api.HttpBody) request bodies: what the route accepts, by method.
RAW_REQUEST_BODIES: dict[str, dict[str, Any]] = {
    "llama_mesh.v1.LlamaDeployApi.CreateDeployment": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["config_file"],
                "properties": {
                    "config_file": {
                        "type": "string",
                        "format": "binary",
                        "description": "The deployment YAML file.",
                    }
                },
            }
        }
    },
}
# Well-known types in their proto3 JSON forms.
WELL_KNOWN: dict[str, dict[str, Any]] = {
    "google.protobuf.Struct": {
        "type": "object",
        "additionalProperties": True,
        "description": "Any JSON object.",
    },
    "google.protobuf.Value": {"nullable": True, "description": "Any JSON value."},
    "google.protobuf.ListValue": {"type": "array", "items": {}, "description": "A JSON list."},
    "google.protobuf.Timestamp": {
        "type": "string",
        "format": "date-time",
        "description": "RFC 3339 time, e.g. `2026-01-02T03:04:05.678Z`.",
    },
    "google.protobuf.Duration": {
        "type": "string",
        "pattern": r"^-?[0-9]+(\.[0-9]+)?s$",
        "description": "Seconds with an `s` suffix, e.g. `1.5s`.",
    },
    "google.protobuf.Empty": {"type": "object", "properties": {}},
    "google.protobuf.FieldMask": {"type": "string", "description": "Comma-separated paths."},
    "google.protobuf.Any": {
        "type": "object",
        "required": ["@type"],
        "properties": {"@type": {"type": "string"}},
        "additionalProperties": True,
    },
    "google.protobuf.DoubleValue": {"type": "number", "format": "double", "nullable": True},
    "google.protobuf.FloatValue": {"type": "number", "format": "float", "nullable": True},
    "google.protobuf.Int64Value": {"type": "string", "format": "int64", "nullable": True},
    "google.protobuf.UInt64Value": {"type": "string", "format": "uint64", "nullable": True},
    "google.protobuf.Int32Value": {"type": "integer", "format": "int32", "nullable": True},
    "google.protobuf.UInt32Value": {"type": "integer", "format": "int64", "nullable": True},
    "google.protobuf.BoolValue": {"type": "boolean", "nullable": True},
    "google.protobuf.StringValue": {"type": "string", "nullable": True},
    "google.protobuf.BytesValue": {"type": "string", "format": "byte", "nullable": True},
}
_F = descriptor_pb2.FieldDescriptorProto
SCALARS: dict[int, dict[str, Any]] = {
    _F.TYPE_DOUBLE: {"type": "number", "format": "double"},
    _F.TYPE_FLOAT: {"type": "number", "format": "float"},
    _F.TYPE_INT32: {"type": "integer", "format": "int32"},
    _F.TYPE_SINT32: {"type": "integer", "format": "int32"},
    _F.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    _F.TYPE_UINT32: {"type": "integer", "format": "int64", "minimum": 0},
    _F.TYPE_FIXED32: {"type": "integer", "format": "int64", "minimum": 0},
    # proto3 JSON prints 64-bit integers as strings (and accepts numbers too).
    _F.TYPE_INT64: {"type": "string", "format": "int64"},
    _F.TYPE_SINT64: {"type": "string", "format": "int64"},
    _F.TYPE_SFIXED64: {"type": "string", "format": "int64"},
    _F.TYPE_UINT64: {"type": "string", "format": "uint64"},
    _F.TYPE_FIXED64: {"type": "string", "format": "uint64"},
    _F.TYPE_BOOL: {"type": "boolean"},
    _F.TYPE_STRING: {"type": "string"},
    _F.TYPE_BYTES: {"type": "string", "format": "byte"},
}
_TEMPLATE_VARIABLE = re.compile(r"\{([^}=]+)(?:=[^}]*)?\}")
_VERBS = ("get", "put", "post", "delete", "patch")
_ROUTE_PREFIX = re.compile(r"^`[A-Z]+ [^`]*`(?::\s*|$)")
_BACKQUOTED = re.compile(r"`([A-Za-z][A-Za-z0-9_]*)`")
_SECURITY_SCHEME = "apiKey"


class OpenApiError(Exception):
    """The protos cannot be described (an unknown type, a clash of routes, ...)."""


@dataclass
class _Message:
    full_name: str
    proto: descriptor_pb2.DescriptorProto
    comment: str
    field_comments: dict[str, str]


@dataclass
class _Enum:
    full_name: str
    proto: descriptor_pb2.EnumDescriptorProto
    comment: str
    value_comments: dict[str, str]


@dataclass
class _Method:
    service: str
    proto: descriptor_pb2.MethodDescriptorProto
    comment: str

    @property
    def full_name(self) -> str:
        return f"{self.service}.{self.proto.name}"


@dataclass
class _Index:
    messages: dict[str, _Message] = field(default_factory=dict)
    enums: dict[str, _Enum] = field(default_factory=dict)
    services: dict[str, tuple[str, list[_Method]]] = field(default_factory=dict)


def _clean(comment: str) -> str:
    """A proto comment as Markdown: lines stripped of their leading space, paragraphs kept."""
    lines = [line[1:] if line.startswith(" ") else line for line in comment.strip("\n").split("\n")]
    return "\n".join(lines).strip()


def _comments(file: descriptor_pb2.FileDescriptorProto) -> dict[tuple[int, ...], str]:
    return {
        tuple(loc.path): _clean(loc.leading_comments)
        for loc in file.source_code_info.location
        if loc.leading_comments
    }


def _index(descriptor_set: descriptor_pb2.FileDescriptorSet) -> _Index:
    index = _Index()
    for file in descriptor_set.file:
        comments = _comments(file)
        prefix = f".{file.package}" if file.package else ""

        def add_messages(
            messages: Any, scope: str, path: tuple[int, ...], comments: dict[tuple[int, ...], str]
        ) -> None:
            for i, message in enumerate(messages):
                here = (*path, i)
                name = f"{scope}.{message.name}"
                index.messages[name] = _Message(
                    name[1:],
                    message,
                    comments.get(here, ""),
                    {f.name: comments.get((*here, 2, j), "") for j, f in enumerate(message.field)},
                )
                add_messages(message.nested_type, name, (*here, 3), comments)
                add_enums(message.enum_type, name, (*here, 4), comments)

        def add_enums(
            enums: Any, scope: str, path: tuple[int, ...], comments: dict[tuple[int, ...], str]
        ) -> None:
            for i, enum in enumerate(enums):
                here = (*path, i)
                name = f"{scope}.{enum.name}"
                index.enums[name] = _Enum(
                    name[1:],
                    enum,
                    comments.get(here, ""),
                    {v.name: comments.get((*here, 2, j), "") for j, v in enumerate(enum.value)},
                )

        add_messages(file.message_type, prefix, (4,), comments)
        add_enums(file.enum_type, prefix, (5,), comments)
        for i, service in enumerate(file.service):
            methods = [
                _Method(f"{file.package}.{service.name}", m, comments.get((6, i, 2, j), ""))
                for j, m in enumerate(service.method)
            ]
            index.services[f"{file.package}.{service.name}"] = (
                comments.get((6, i), ""),
                methods,
            )
    return index


class _Schemas:
    """Component schemas of the messages and enums that operations reach."""

    def __init__(self, index: _Index) -> None:
        self._index = index
        self.components: dict[str, Any] = {}

    @staticmethod
    def component_name(full_name: str) -> str:
        """``Task`` for our package's types, the full name (``google.rpc.Status``) otherwise."""
        if full_name.startswith(f"{PACKAGE}."):
            return full_name[len(PACKAGE) + 1 :]
        return full_name

    def ref(self, full_name: str) -> dict[str, Any]:
        """A ``$ref`` to the component of message or enum ``full_name`` (defined on first use)."""
        if full_name in WELL_KNOWN:
            return dict(WELL_KNOWN[full_name])
        name = self.component_name(full_name)
        if name not in self.components:
            self.components[name] = {}  # placeholder: recursive messages end here
            self.components[name] = self._define(full_name)
        return {"$ref": f"#/components/schemas/{name}"}

    def _define(self, full_name: str) -> dict[str, Any]:
        key = f".{full_name}"
        if key in self._index.enums:
            enum = self._index.enums[key]
            values = [v.name for v in enum.proto.value]
            lines = [enum.comment, ""] if enum.comment else []
            lines += [f"- `{v}`: {enum.value_comments.get(v, '')}".rstrip(": ") for v in values]
            return {"type": "string", "enum": values, "description": "\n".join(lines)}
        if key not in self._index.messages:
            raise OpenApiError(f"{full_name}: not in the descriptor set")
        message = self._index.messages[key]
        return self.object_schema(message, message.proto.field, description=message.comment)

    def object_schema(
        self,
        message: _Message,
        fields: Any,
        *,
        description: str = "",
    ) -> dict[str, Any]:
        """An object schema of ``fields`` of ``message`` (all of them, or those of a body)."""
        properties: dict[str, Any] = {}
        required: list[str] = []
        for f in fields:
            properties[f.name] = self.field_schema(f, message.field_comments.get(f.name, ""))
            if _is_required(f):
                required.append(f.name)
        schema: dict[str, Any] = {"type": "object", "properties": properties}
        if required:
            schema["required"] = required
        if description:
            schema["description"] = description
        return schema

    def field_schema(self, f: descriptor_pb2.FieldDescriptorProto, comment: str) -> dict[str, Any]:
        """The schema of one field's JSON value, with its comment as the description."""
        entry = self._map_entry(f)
        if entry is not None:
            key, value = entry.field
            schema: dict[str, Any] = {
                "type": "object",
                "additionalProperties": self._single(value),
            }
            if key.type != _F.TYPE_STRING:
                schema["x-key-type"] = SCALARS[key.type]["type"]
        elif f.label == _F.LABEL_REPEATED:
            schema = {"type": "array", "items": self._single(f)}
        else:
            schema = self._single(f)
        if "$ref" in schema and (comment or f.proto3_optional):
            # OpenAPI 3.0 ignores siblings of $ref: wrap it to keep the description.
            schema = {"allOf": [schema]}
        if f.proto3_optional:
            # Unset, it is absent from transcoded JSON, and null in the 0.8 routes' bare JSON
            # (0.8's Optional fields).
            schema["nullable"] = True
        if comment:
            schema["description"] = comment
        return schema

    def _map_entry(self, f: descriptor_pb2.FieldDescriptorProto) -> Any:
        if f.label != _F.LABEL_REPEATED or f.type != _F.TYPE_MESSAGE:
            return None
        entry = self._index.messages.get(f.type_name)
        if entry is None or not entry.proto.options.map_entry:
            return None
        return entry.proto

    def _single(self, f: descriptor_pb2.FieldDescriptorProto) -> dict[str, Any]:
        if f.type in (_F.TYPE_MESSAGE, _F.TYPE_ENUM):
            return self.ref(f.type_name.lstrip("."))
        if f.type not in SCALARS:
            raise OpenApiError(f"{f.name}: field type {f.type} has no JSON form here")
        return dict(SCALARS[f.type])


def _is_required(f: descriptor_pb2.FieldDescriptorProto) -> bool:
    behaviors = f.options.Extensions[field_behavior_pb2.field_behavior]
    return field_behavior_pb2.REQUIRED in behaviors


def _rules(method: _Method) -> Iterator[http_pb2.HttpRule]:
    options = method.proto.options
    if not options.HasExtension(annotations_pb2.http):
        return
    rule = options.Extensions[annotations_pb2.http]
    yield rule
    yield from rule.additional_bindings


def _verb_and_template(rule: http_pb2.HttpRule, method: str) -> tuple[str, str]:
    pattern = rule.WhichOneof("pattern")
    if pattern in _VERBS:
        return str(pattern), str(getattr(rule, pattern))
    raise OpenApiError(f"{method}: HTTP rule {pattern!r} is not described (only {_VERBS})")


def http_routes(
    descriptor_set: descriptor_pb2.FileDescriptorSet, services: tuple[str, ...]
) -> list[tuple[str, str, str]]:
    """``(service, http method, OpenAPI path)`` of every ``google.api.http`` binding."""
    index = _index(descriptor_set)
    routes = []
    for service in services:
        for method in index.services[service][1]:
            for rule in _rules(method):
                verb, template = _verb_and_template(rule, method.full_name)
                routes.append((service, verb, _openapi_path(template)))
    return routes


def _openapi_path(template: str) -> str:
    """``/v1/{name=deployments/*}:x`` -> ``/v1/{name}:x`` (OpenAPI paths name variables only)."""
    return _TEMPLATE_VARIABLE.sub(lambda m: "{" + m.group(1) + "}", template)


def _is_sse(verb: str, path: str) -> bool:
    """Whether the gateway frames this route's stream as Server-Sent Events."""
    sample = _TEMPLATE_VARIABLE.sub("x", path)
    return verb == "get" and re.fullmatch(SSE_PATH_REGEX, sample) is not None


class _Builder:
    def __init__(self, index: _Index) -> None:
        self.index = index
        self.schemas = _Schemas(index)
        self.paths: dict[str, dict[str, Any]] = {}

    def add_service(self, service: str) -> None:
        _, methods = self.index.services[service]
        for method in methods:
            for n, rule in enumerate(_rules(method)):
                verb, template = _verb_and_template(rule, method.full_name)
                path = _openapi_path(template)
                item = self.paths.setdefault(path, {})
                if verb in item:
                    raise OpenApiError(f"{verb.upper()} {path}: bound twice ({method.full_name})")
                if service == CONTROL_PLANE_SERVICE:
                    item["servers"] = [_control_plane_server()]
                item[verb] = self._operation(method, rule, verb, path, n)

    def _operation(
        self, method: _Method, rule: http_pb2.HttpRule, verb: str, path: str, n: int
    ) -> dict[str, Any]:
        request = self._message(method.proto.input_type)
        response = self._message(method.proto.output_type)
        fields = {f.name: f for f in request.proto.field}
        path_fields = _TEMPLATE_VARIABLE.findall(path)
        implied = CONTROL_PLANE_IMPLIED_FIELDS if method.service == CONTROL_PLANE_SERVICE else set()
        for name in path_fields:
            if name not in fields:
                raise OpenApiError(f"{method.full_name}: {{{name}}} is not a request field")
        parameters = [
            {
                "name": name,
                "in": "path",
                "required": True,
                "schema": self.schemas.field_schema(fields[name], ""),
                **_description(request.field_comments.get(name, "")),
            }
            for name in path_fields
        ]
        rest = [
            f
            for f in request.proto.field
            if f.name not in path_fields and f.name not in implied and f.name != rule.body
        ]
        operation: dict[str, Any] = {
            "tags": [_tag(method.service)],
            "operationId": f"{method.service.rsplit('.', 1)[-1]}_{method.proto.name}"
            + (f"_{n}" if n else ""),
            "summary": _summary(method.comment, method.proto.name),
            "description": _operation_description(method),
        }
        if _is_open(method):
            operation["security"] = []
        if rule.body != "*":
            parameters += self._query_parameters(request, rest, "")
        if parameters:
            operation["parameters"] = parameters
        if rule.body:
            operation["requestBody"] = self._request_body(method, request, rule.body, rest)
        operation["responses"] = {
            "200": self._success(method, response, rule.response_body, verb, path),
            "default": {
                "$ref": "#/components/responses/"
                + ("Error" if path.startswith(V1_PREFIX) else "CompatError")
            },
        }
        return operation

    def _message(self, type_name: str) -> _Message:
        if type_name not in self.index.messages:
            raise OpenApiError(f"{type_name.lstrip('.')}: not in the descriptor set")
        return self.index.messages[type_name]

    def _query_parameters(self, message: _Message, fields: Any, prefix: str) -> list[Any]:
        """Query parameters of ``fields``: scalars, enums, repeated scalars, and the fields of
        nested messages by dotted name, as the transcoder reads them."""
        parameters: list[dict[str, Any]] = []
        for f in fields:
            name = prefix + f.name
            if f.type == _F.TYPE_MESSAGE and f.type_name.lstrip(".") not in WELL_KNOWN:
                nested = self._message(f.type_name)
                if f.label == _F.LABEL_REPEATED:
                    continue  # maps and lists of messages cannot be sent as query parameters
                parameters += self._query_parameters(nested, nested.proto.field, f"{name}.")
                continue
            if f.type_name.lstrip(".") in ("google.protobuf.Struct", "google.protobuf.ListValue"):
                continue
            schema = self.schemas.field_schema(f, "")
            parameter: dict[str, Any] = {
                "name": name,
                "in": "query",
                "schema": schema,
                **_description(message.field_comments.get(f.name, "")),
            }
            if f.label == _F.LABEL_REPEATED:
                parameter |= {"style": "form", "explode": True}
            if _is_required(f):
                parameter["required"] = True
            parameters.append(parameter)
        return parameters

    def _request_body(
        self, method: _Method, request: _Message, body: str, rest: Any
    ) -> dict[str, Any]:
        if body == "*":
            schema = self.schemas.object_schema(request, rest)
            required = "required" in schema
            return {"required": required, "content": {"application/json": {"schema": schema}}}
        body_field = next((f for f in request.proto.field if f.name == body), None)
        if body_field is None:
            raise OpenApiError(f"{method.full_name}: body {body!r} is not a request field")
        comment = request.field_comments.get(body, "")
        if body_field.type_name.lstrip(".") == HTTP_BODY:
            if method.full_name not in RAW_REQUEST_BODIES:
                raise OpenApiError(
                    f"{method.full_name}: a raw (HttpBody) request body; say what it accepts "
                    "in RAW_REQUEST_BODIES"
                )
            return {
                "required": True,
                "content": RAW_REQUEST_BODIES[method.full_name],
                **_description(comment),
            }
        schema = self.schemas.field_schema(body_field, "")
        return {
            "required": _is_required(body_field),
            "content": {"application/json": {"schema": schema}},
            **_description(comment),
        }

    def _bare_json(self, comment: str) -> dict[str, Any]:
        """The schema of a bare JSON answer, read from its HttpBody field's comment: the first
        message of this package it names in backquotes (`` `X` `` or `` `X`s ``) is the shape,
        in "a list of" them, "an object of" them by key, or alone; "`null`" makes it nullable;
        "a JSON string" is a string. Anything else is any JSON value."""
        for name in _BACKQUOTED.findall(comment):
            if f".{PACKAGE}.{name}" not in self.index.messages:
                continue
            item = self.schemas.ref(f"{PACKAGE}.{name}")
            if "list of" in comment:
                return {"type": "array", "items": item}
            if "object of" in comment:
                return {"type": "object", "additionalProperties": item}
            if "`null`" in comment:
                return {"allOf": [item], "nullable": True}
            return item
        if "JSON string" in comment:
            return {"type": "string"}
        return {"nullable": True}

    def _success(
        self, method: _Method, response: _Message, response_body: str, verb: str, path: str
    ) -> dict[str, Any]:
        streaming = method.proto.server_streaming
        if response_body:
            body_field = next((f for f in response.proto.field if f.name == response_body), None)
            if body_field is None:
                raise OpenApiError(f"{method.full_name}: response_body {response_body!r} unknown")
            comment = response.field_comments.get(response_body, "")
            if body_field.type_name.lstrip(".") == HTTP_BODY:
                if streaming:
                    return {
                        "description": "A stream of JSON lines (NDJSON). " + comment,
                        "content": {
                            "application/x-ndjson": {
                                "schema": {"type": "string", "format": "ndjson"}
                            }
                        },
                    }
                return {
                    "description": comment or "Bare JSON.",
                    "content": {"application/json": {"schema": self._bare_json(comment)}},
                }
            schema = self.schemas.field_schema(body_field, "")
            description = comment
        else:
            schema = self.schemas.ref(response.full_name)
            description = response.comment
        if not streaming:
            return {
                "description": description or "OK.",
                "content": {"application/json": {"schema": schema}},
            }
        name = _Schemas.component_name(response.full_name)
        if _is_sse(verb, path):
            return {
                "description": (
                    f"Server-Sent Events: one `data: <JSON>` frame per `{name}` message "
                    f"(the schema below), each ending in a blank line. {description}"
                ).strip(),
                "content": {
                    "text/event-stream": {"schema": {"type": "string"}},
                    "application/json": {"schema": schema},
                },
            }
        return {
            "description": (
                f"A stream of `{name}` messages (the schema below), one JSON object per "
                f"line. {description}"
            ).strip(),
            "content": {"application/json": {"schema": schema}},
        }


def _description(text: str) -> dict[str, str]:
    return {"description": text} if text else {}


def _summary(comment: str, name: str) -> str:
    """The first sentence of a comment, without the leading method name; for a comment that
    starts by naming its route (`` `GET /x`: ...``, the 0.8 routes), the method name in words
    (the comment is the operation's description)."""
    first = comment.split("\n\n", maxsplit=1)[0].replace("\n", " ")
    first = first.split(". ")[0].rstrip(".")
    if first.startswith(f"{name} is "):
        first = first[len(name) + 4 :]
    elif first.startswith(f"{name} "):
        first = first[len(name) + 1 :]
    if not first or _ROUTE_PREFIX.match(first):
        first = " ".join(re.findall(r"[A-Z][a-z0-9]*", name)).lower()
    return first[:1].upper() + first[1:]


def _tag(service: str) -> str:
    return TAGS.get(service, service.rsplit(".", 1)[-1])


def _is_open(method: _Method) -> bool:
    """Whether anyone may call ``method``, with or without an API key (auth.py)."""
    return f"/{method.service}/{method.proto.name}".startswith(OPEN_PREFIXES)


def _operation_description(method: _Method) -> str:
    if _is_open(method):
        key = "Needs no API key."
    elif needs_admin(f"/{method.service}/{method.proto.name}"):
        key = "**Needs an admin API key.**"
    else:
        key = "Needs an API key (user or admin)."
    return f"{method.comment}\n\n{key} gRPC: `{method.full_name}`."


def _control_plane_server() -> dict[str, Any]:
    return {
        "url": "{scheme}://{host}:{port}",
        "description": (
            "A deployment's Llama Deploy 0.8 control plane: its `control-plane.port` on the "
            "gateway's host (each deployment its own port; the port names the deployment). "
            "Another port is another origin: to try these routes from the /docs page, allow "
            "its origin with `llamactl serve --cors-origin`."
        ),
        "variables": {
            "scheme": {"default": "http", "enum": ["http", "https"]},
            "host": {"default": "127.0.0.1"},
            "port": {"default": str(DEFAULT_CONTROL_PLANE_PORT)},
        },
    }


def _documentation_paths() -> dict[str, Any]:
    def page(
        operation_id: str, description: str, media: str, schema: dict[str, Any]
    ) -> dict[str, Any]:
        return {
            "get": {
                "tags": [DOCS_TAG],
                "operationId": operation_id,
                "summary": description,
                "description": f"{description} Served by the gateway itself; needs no API key.",
                "security": [],
                "responses": {
                    "200": {"description": "OK.", "content": {media: {"schema": schema}}}
                },
            }
        }

    return {
        OPENAPI_PATH: page(
            "Gateway_GetOpenApiDocument",
            "OpenAPI document of this API.",
            "application/json",
            {"type": "object"},
        ),
        DOCS_PATH: page(
            "Gateway_GetDocsPage",
            "Interactive API documentation (Swagger UI).",
            "text/html",
            {"type": "string"},
        ),
    }


def _status_schemas(schemas: _Schemas) -> dict[str, Any]:
    status = schemas.component_name("google.rpc.Status")
    compat = {
        "allOf": [
            {"$ref": f"#/components/schemas/{status}"},
            {
                "type": "object",
                "required": ["detail"],
                "properties": {
                    "detail": {
                        "type": "string",
                        "description": "FastAPI's error field, as Llama Deploy 0.8 sent it: "
                        "the same text as `message`.",
                    }
                },
            },
        ]
    }
    return {"CompatStatus": compat}


INTRODUCTION = """\
The JSON API of llama-mesh, as its gateway (Envoy) serves it, transcoded from the gRPC services
of the `llama_mesh.v1` protos:

- **Llama Deploy 0.8 API server** routes (`/status/`, `/deployments/...`): path for path and
  shape for shape those of Llama Deploy 0.8, so that its `llamactl` and `Client` work unchanged;
- **v1** (`/v1/...`): what 0.8 lacks (task status and errors, cancel, typed events as
  Server-Sent Events with resume, services with health, pagination);
- **Llama Deploy 0.8 control plane** routes: served on each deployment's own
  `control-plane.port` (8000 by default), not on the gateway's main port; the port tells which
  deployment a request is for.

**API keys.** When the server has API keys, every route except `/openapi.json`, `/docs` and the
probes (`/healthz`, `/readyz`) needs one: `Authorization: Bearer <key>` (the *Authorize* button
here). User keys run tasks and read; admin keys also create, reload and delete deployments. A
server started without keys (it then listens on 127.0.0.1 only) accepts requests without one.

**JSON.** Field names as in the protos (`snake_case`), every field present, enums as their
names, 64-bit integers as strings, timestamps as RFC 3339 strings.

**Errors** are JSON: `{"code": <google.rpc.Code>, "message": "...", "details": [...]}`, with a
`google.rpc.ErrorInfo` in `details` whose `reason` a program can match; outside `/v1/` the body
also has FastAPI's `detail` (the message), as Llama Deploy 0.8 sent it. The HTTP status follows
the gRPC code (404 for NOT_FOUND, 400 for INVALID_ARGUMENT, 401, 403, 409, 503, ...).

**Streams** end with an explicit final message (a result or an error).
"""


def build_document(
    descriptor_set: descriptor_pb2.FileDescriptorSet, *, version: str
) -> dict[str, Any]:
    """The OpenAPI document of every JSON route the gateway serves."""
    index = _index(descriptor_set)
    builder = _Builder(index)
    services = (*TRANSCODED_SERVICES, CONTROL_PLANE_SERVICE)
    for service in services:
        if service not in index.services:
            raise OpenApiError(f"{service}: not in the descriptor set")
        builder.add_service(service)
    schemas = builder.schemas
    schemas.ref("google.rpc.Status")
    schemas.ref("google.rpc.ErrorInfo")  # what `details` carries
    paths = {**_documentation_paths(), **dict(sorted(builder.paths.items()))}
    component_schemas = {**schemas.components, **_status_schemas(schemas)}
    tags = [
        {
            "name": _tag(service),
            "description": index.services[service][0]
            + (
                f"\n\nServed on each deployment's `control-plane.port` (see this path's "
                f"servers), which sets the `{DEPLOYMENT_HEADER}` header."
                if service == CONTROL_PLANE_SERVICE
                else ""
            ),
        }
        for service in services
    ]
    tags.append({"name": DOCS_TAG, "description": "This document and its interactive page."})
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "llama-mesh", "version": version, "description": INTRODUCTION},
        "servers": [{"url": "/", "description": "The gateway (`llamactl serve`: port 4501)."}],
        "security": [{_SECURITY_SCHEME: []}],
        "tags": tags,
        "paths": paths,
        "components": {
            "schemas": dict(sorted(component_schemas.items())),
            "responses": {
                "Error": {
                    "description": "An error (`/v1/` routes): `google.rpc.Status` as JSON.",
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/google.rpc.Status"}
                        }
                    },
                },
                "CompatError": {
                    "description": "An error (Llama Deploy 0.8 routes): `google.rpc.Status` "
                    "as JSON, plus FastAPI's `detail`.",
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/CompatStatus"}
                        }
                    },
                },
            },
            "securitySchemes": {
                _SECURITY_SCHEME: {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A llama-mesh API key (`llamactl serve --api-key` / "
                    "`--admin-key`), sent as `Authorization: Bearer <key>`.",
                }
            },
        },
    }
