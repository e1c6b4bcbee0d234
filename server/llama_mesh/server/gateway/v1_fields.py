"""The rules of ``v1_fields.lua``: which JSON fields each ``/v1`` method's body may have.

Read from the descriptor set the transcoder uses: for every ``ApiServer`` method whose
``google.api.http`` rule (or additional binding) takes the whole request as its body
(``body: "*"``), the method, a Lua pattern of its path, and the request message's field
names in both spellings the transcoder accepts (``service_id`` and ``serviceId``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2
from google.protobuf.message import DecodeError

V1_SERVICE = "llama_mesh.v1.ApiServer"
_LUA_SOURCE = "v1_fields.lua"
_LUA_MAGIC = re.compile(r"([\^$()%.\[\]*+\-?])")
_VARIABLE = re.compile(r"\{[^}]*\}")


@dataclass(frozen=True, slots=True)
class BodyRule:
    """One method and path whose JSON body is the request message."""

    method: str
    template: str
    names: tuple[str, ...]
    """The request message's field names, as the proto spells them."""

    @property
    def fields(self) -> tuple[str, ...]:
        """Every key the body may have: :attr:`names` and their lowerCamelCase JSON names."""
        return tuple(sorted({*self.names, *(_json_name(n) for n in self.names)}))

    @property
    def pattern(self) -> str:
        """A Lua pattern matching the request paths of :attr:`template`."""
        parts = _VARIABLE.split(self.template)
        literal = [_LUA_MAGIC.sub(r"%\1", part) for part in parts]
        return "^" + "[^/]+".join(literal) + "$"


def _bindings(rule: http_pb2.HttpRule) -> list[http_pb2.HttpRule]:
    return [rule, *rule.additional_bindings]


def _json_name(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def body_rules(descriptor_path: Path) -> list[BodyRule]:
    """The rules of every ``/v1`` method of the descriptor set that takes a JSON body."""
    files = descriptor_pb2.FileDescriptorSet.FromString(descriptor_path.read_bytes()).file
    messages = {f".{f.package}.{m.name}": m for f in files for m in f.message_type}
    rules: list[BodyRule] = []
    for file in files:
        for service in file.service:
            if f"{file.package}.{service.name}" != V1_SERVICE:
                continue
            for method in service.method:
                http = method.options.Extensions[annotations_pb2.http]
                names = tuple(f.name for f in messages[method.input_type].field)
                for binding in _bindings(http):
                    verb = binding.WhichOneof("pattern")
                    if binding.body != "*" or verb not in ("post", "put", "patch"):
                        continue
                    template = getattr(binding, verb)
                    rules.append(BodyRule(verb.upper(), template, tuple(names)))
    return rules


def _lua_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def lua_source(descriptor_path: Path) -> str:
    """The filter's Lua code, with its rules for the methods of ``descriptor_path``."""
    try:
        rules = body_rules(descriptor_path)
    except (OSError, DecodeError):
        rules = []  # the transcoder cannot load it either: Envoy refuses it, saying why
    lines = ["V1_BODY_RULES = {"]
    for rule in rules:
        fields = ", ".join(f"[{_lua_string(name)}] = true" for name in rule.fields)
        listing = ", ".join(rule.names)
        lines.append(
            f"  {{method = {_lua_string(rule.method)}, pattern = {_lua_string(rule.pattern)}, "
            f"template = {_lua_string(rule.template)}, listing = {_lua_string(listing)}, "
            f"fields = {{{fields}}}}},"
        )
    lines.append("}")
    code = resources.files(__package__).joinpath(_LUA_SOURCE).read_text(encoding="utf-8")
    return "\n".join(lines) + "\n\n" + code
