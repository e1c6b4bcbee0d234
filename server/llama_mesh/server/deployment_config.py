"""The deployment YAML: frozen configuration objects and their strict parser.

The schema is Llama Deploy 0.8's (``name``, ``control-plane``, ``message-queue``,
``default-service``, ``services``, ``ui``) with llama-mesh's per-service extensions
(``replicas``, ``max-concurrent-tasks``, ``timeout``, ``max-retries``). Deployment and service
keys are hyphenated; ``control-plane`` and ``message-queue`` keep 0.8's underscored field names.
Unknown keys are errors with a did-you-mean hint. Where Llama Deploy 0.8.1 accepted a file
that llama-mesh cannot honour as written (a ``default-service`` naming no service, a
message-queue type the server does not run, no services), the file is accepted and the
config carries a warning for the deploy progress (:attr:`DeploymentConfig.warnings`).

The parser walks PyYAML's composed node tree (not ``safe_load``'s result) so that every error
names the key path and the line it is about::

    deployment.yml:7: services.echo: unknown key 'python_dependencies' (did you mean ...?)

Whatever the input (malformed YAML, wrong types, duplicate keys, bytes that are not UTF-8),
:func:`parse_deployment_config` returns a :class:`DeploymentConfig` or raises
:class:`DeploymentConfigError`, never another exception.
"""

from __future__ import annotations

import difflib
import keyword
import logging
import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, cast

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

logger = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")
"""Deployment names and service ids: they become NATS subject tokens."""

SUPPORTED_QUEUE_TYPES = frozenset({"nats", "simple", "rabbitmq", "redis"})
"""Message-queue types the server runs as written (``nats`` and ``simple`` on its default
broker, see :mod:`llama_mesh.server.queues.selection`); the others parse, with a warning."""

_T = "tag:yaml.org,2002:"
_STR, _INT, _FLOAT, _BOOL, _NULL, _MAP, _SEQ = (
    _T + t for t in ("str", "int", "float", "bool", "null", "map", "seq")
)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MAX_DEPTH = 32
_MAX_NODES = 10_000
_MAX_QUOTED = 40
_KEY_LIKE = re.compile(r"[A-Za-z0-9_.-]{1,63}")
MAX_CONCURRENT_TASKS = 1000
"""Most tasks one replica may run at once (``max-concurrent-tasks``)."""
MAX_RETRIES = 100
"""Most redeliveries of a task (``max-retries``)."""
MAX_TIMEOUT = 7 * 24 * 3600.0
"""Longest ``timeout`` in seconds (a week); leave ``timeout`` out for the workflow's own."""


def _kinds(spec: str) -> dict[str, str]:
    """``"host:str port:int?"`` -> ``{"host": "str", "port": "int?"}``."""
    return dict(item.split(":") for item in spec.split())


# Field kinds of the free-form sections: str, int, number, bool, str-list, str-map, any-map;
# a trailing "?" also accepts null. The keys are those of Llama Deploy 0.8's pydantic models.
_CONTROL_PLANE_FIELDS = _kinds(
    "services_store_key:str tasks_store_key:str session_store_key:str step_interval:number "
    "host:str port:int internal_host:str? internal_port:int? running:bool "
    "cors_origins:str-list? topic_namespace:str state_store_uri:str? use_tls:bool"
)
_QUEUE_FIELDS = {
    "nats": _kinds("url:str"),
    "simple": _kinds("host:str port:int client_kwargs:any-map raise_exceptions:bool use_ssl:bool"),
    "rabbitmq": _kinds(
        "url:str exchange_name:str username:str? password:str? host:str? port:int? "
        "vhost:str? secure:bool?"
    ),
    "redis": _kinds(
        "url:str host:str? port:int? db:int? username:str? password:str? ssl:bool? "
        "exclusive_mode:bool"
    ),
}
_UNCHECKED_QUEUES = ("aws", "kafka", "solace")
"""Llama Deploy 0.8 queue types llama-mesh never runs: their fields are kept unchecked."""
_TOP_KEYS = ("name", "control-plane", "message-queue", "default-service", "services", "ui")
_SOURCE_KEYS = ("type", "name", "location")
_SERVICE_KEYS = (
    *("name", "source", "path", "import-path", "python-dependencies", "env", "env-files"),
    *("host", "port", "ts-dependencies"),
    *("replicas", "max-concurrent-tasks", "timeout", "max-retries"),
)


class DeploymentConfigError(ValueError):
    """The deployment YAML is invalid; ``str()`` reads ``source:line: key.path: message``.

    Attributes:
        message: what is wrong, without location.
        key_path: dotted path of the offending key (``services.echo.replicas``), or of the
            mapping holding an unknown key; empty for document-level problems.
        line: 1-based line number, or None when unknown.
        source_name: the file name the document came from.
    """

    def __init__(
        self,
        message: str,
        *,
        key_path: str = "",
        line: int | None = None,
        source_name: str = "<deployment>",
    ) -> None:
        self.message = message
        self.key_path = key_path
        self.line = line
        self.source_name = source_name
        where = source_name if line is None else f"{source_name}:{line}"
        super().__init__(f"{where}: {key_path}: {message}" if key_path else f"{where}: {message}")

    def __reduce__(self) -> tuple[Any, ...]:
        kwargs = {"key_path": self.key_path, "line": self.line, "source_name": self.source_name}
        return (_rebuild_error, (self.message, kwargs))


def _rebuild_error(message: str, kwargs: dict[str, Any]) -> DeploymentConfigError:
    return DeploymentConfigError(message, **kwargs)


@dataclass(frozen=True, slots=True)
class SourceConfig:
    """Where a service's code comes from: a local directory or a git URL (``url@ref``)."""

    type: Literal["local", "git"]
    name: str


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    """One service of a deployment (also used for the ``ui``, whose ``path`` is a directory)."""

    id: str
    name: str
    source: SourceConfig
    path: str | None = None
    python_dependencies: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    env_files: tuple[str, ...] = ()
    replicas: int = 1
    max_concurrent_tasks: int = 1
    timeout: float | None = None
    max_retries: int = 2
    port: int | None = None
    """The ``ui``'s port (accepted and unused on workflow services)."""

    @property
    def module_path(self) -> str:
        """The part of ``path`` before ``:`` (``dir/module``); ValueError when path is unset."""
        return self._split_path()[0]

    @property
    def attr(self) -> str:
        """The attribute holding the workflow (after ``:``); ValueError when path is unset."""
        return self._split_path()[1]

    def _split_path(self) -> tuple[str, str]:
        if self.path is None:
            raise ValueError(f"service {self.id!r} has no path")
        module, _, attr = self.path.partition(":")
        return module, attr


@dataclass(frozen=True, slots=True)
class MessageQueueConfig:
    """The ``message-queue`` section: its ``type`` and the other fields as written."""

    type: Literal["nats", "simple", "rabbitmq", "redis", "aws", "kafka", "solace"]
    fields: Mapping[str, object] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def supported(self) -> bool:
        """Whether llama-mesh runs this queue type (``nats``, ``simple``, ``rabbitmq``,
        ``redis``); the others run on the server's own broker."""
        return self.type in SUPPORTED_QUEUE_TYPES


@dataclass(frozen=True, slots=True)
class DeploymentConfig:
    """A parsed deployment file."""

    name: str
    services: Mapping[str, ServiceConfig]
    default_service: str | None = None
    message_queue: MessageQueueConfig | None = None
    control_plane: Mapping[str, object] = field(default_factory=lambda: MappingProxyType({}))
    ui: ServiceConfig | None = None
    raw_yaml: str = ""
    unknown_default_service: str | None = None
    """A ``default-service`` naming no service (``default_service`` is then None): a task
    that needs the default is refused naming it."""
    warnings: tuple[str, ...] = ()
    """What was accepted but will not work as written, one line each (``file:line: key:
    message``), for the deploy progress."""


def parse_deployment_config(
    text: str | bytes, *, source_name: str = "<deployment>"
) -> DeploymentConfig:
    """Parse and validate a deployment YAML document.

    Raises:
        DeploymentConfigError: for any problem, with the key path and line it concerns.
    """
    return _Parser(source_name).parse(text)


_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^\s:/@'\"]*:)[^\s@/'\"]+@")
_PASSWORD_LINE = re.compile(
    r"^(\s*(?:-\s+)?[\"']?[A-Za-z_]*password[\"']?\s*:[ \t]*)(?=\S)(?![|>#])(.*)$",
    re.IGNORECASE | re.MULTILINE,
)


def redact_secrets(config_yaml: str) -> str:
    """``config_yaml`` as the API shows it: the password of every URL (``scheme://user:***@``)
    and the value of every ``*password:`` key replaced by ``***``. A deployment file may name
    its broker with credentials (``message-queue.url``, ``password``), and anyone allowed to
    read deployments is not thereby allowed to log in to the broker."""
    text = _URL_PASSWORD.sub(r"\1***@", config_yaml)
    return _PASSWORD_LINE.sub(r'\1"***"', text)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _line(node: Node) -> int:
    return int(node.start_mark.line) + 1


def _describe(node: Node, *, quote: bool = True) -> str:
    """What ``node`` is, for an error; with ``quote``, a scalar's text, shortened.

    Errors quote only values the document gives for keys the schema knows; a document that
    is not a mapping at all (another kind of file: a password file, a ``.env``) is described
    without its text, and so are ``env`` values, which are often secrets.
    """
    if isinstance(node, MappingNode | SequenceNode):
        kind = "a mapping" if isinstance(node, MappingNode) else "a list"
        return kind if node.tag in (_MAP, _SEQ) else f"{kind} tagged {node.tag}"
    if node.tag == _NULL:
        return "null"
    kinds = {_STR: "a string", _INT: "an integer", _FLOAT: "a number", _BOOL: "a boolean"}
    kinds[_T + "timestamp"] = "a date"
    kind = kinds.get(node.tag, f"a value tagged {node.tag}")
    if not quote:
        return kind
    text = str(node.value)
    shown = text if len(text) <= _MAX_QUOTED else text[: _MAX_QUOTED - 3] + "..."
    return f"{kind} ({shown!r})"


def _key(key: str) -> str:
    """A key for an error: quoted when it looks like one, else not shown (the "key" of a
    file that is no deployment file is a line of that file)."""
    return repr(key) if _KEY_LIKE.fullmatch(key) else "(not shown: not a key name)"


def _suggest(word: str, choices: Collection[str]) -> str:
    for alt in (word.replace("_", "-"), word.replace("-", "_"), word.lower()):
        if alt != word and alt in choices:
            return f" (did you mean {alt!r}?)"
    close = difflib.get_close_matches(word, sorted(choices), n=1)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (expected one of: {', '.join(sorted(choices))})"


_Entries = dict[str, tuple[Node, Node]]


class _Parser:
    """One parse: the source name for errors and a budget against alias bombs."""

    def __init__(self, source_name: str) -> None:
        self._source = source_name
        self._constructor = yaml.constructor.SafeConstructor()
        self._budget = _MAX_NODES
        self._warnings: list[str] = []

    def _warn(self, node: Node, path: str, message: str) -> None:
        where = f"{self._source}:{_line(node)}"
        self._warnings.append(f"{where}: {path}: {message}" if path else f"{where}: {message}")

    def _error(self, node: Node | None, path: str, message: str) -> DeploymentConfigError:
        line = None if node is None else _line(node)
        return DeploymentConfigError(message, key_path=path, line=line, source_name=self._source)

    # -- document ---------------------------------------------------------------------------

    def parse(self, text: str | bytes) -> DeploymentConfig:
        raw = self._decode(text)
        root = self._compose(raw)
        top = self._entries(root, "")
        self._reject_unknown(top, _TOP_KEYS, "")
        name = self._identifier(self._require(top, root, "", "name"), "name", "deployment name")
        services_node = self._require(top, root, "", "services")
        services_entries = self._entries(services_node, "services")
        if not services_entries:
            self._warn(services_node, "services", "no services: this deployment runs nothing")
        services: dict[str, ServiceConfig] = {}
        for sid, (key_node, value) in services_entries.items():
            self._identifier(key_node, "services", "service id")
            services[sid] = self._service(sid, value, _join("services", sid), workflow=True)
        default = self._optional(top, "default-service")
        default_service = None if default is None else self._str(default, "default-service")
        unknown_default = None
        if default is not None and default_service not in services:
            unknown_default, default_service = default_service, None
            hint = _suggest(cast(str, unknown_default), services) if services else ""
            self._warn(
                default,
                "default-service",
                f"no service with id {unknown_default!r}{hint}: "
                "tasks that name no service will be refused",
            )
        cp = self._optional(top, "control-plane")
        mq = self._optional(top, "message-queue")
        ui = self._optional(top, "ui")
        return DeploymentConfig(
            name=name,
            services=MappingProxyType(services),
            default_service=default_service,
            message_queue=None if mq is None else self._message_queue(mq),
            control_plane=self._fields(cp, "control-plane", _CONTROL_PLANE_FIELDS),
            ui=None if ui is None else self._service("ui", ui, "ui", workflow=False),
            raw_yaml=raw,
            unknown_default_service=unknown_default,
            warnings=tuple(self._warnings),
        )

    def _decode(self, text: str | bytes) -> str:
        if isinstance(text, str):
            return text
        try:
            return text.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            line = text[: exc.start].count(b"\n") + 1
            raise DeploymentConfigError(
                f"not valid UTF-8 (byte {exc.start})", line=line, source_name=self._source
            ) from None

    def _compose(self, raw: str) -> Node:
        try:
            root = yaml.compose(raw, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = None if mark is None else mark.line + 1
            message = " ".join(p for p in (exc.context, exc.problem) if p) or "invalid YAML"
            raise DeploymentConfigError(
                f"invalid YAML: {message}", line=line, source_name=self._source
            ) from None
        except yaml.reader.ReaderError as exc:
            line = raw[: exc.position].count("\n") + 1
            char = exc.character if isinstance(exc.character, int) else ord(exc.character)
            raise DeploymentConfigError(
                f"invalid YAML: {exc.reason} (#x{char:04x})",
                line=line,
                source_name=self._source,
            ) from None
        except (yaml.YAMLError, RecursionError) as exc:
            message = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            raise DeploymentConfigError(
                f"invalid YAML: {message}", source_name=self._source
            ) from None
        if root is None:
            raise DeploymentConfigError("empty document", line=1, source_name=self._source)
        if not isinstance(root, MappingNode):
            what = _describe(root, quote=False)
            raise self._error(root, "", f"the document must be a mapping, got {what}")
        return cast(Node, root)

    # -- sections ---------------------------------------------------------------------------

    def _service(self, sid: str, node: Node, path: str, *, workflow: bool) -> ServiceConfig:
        entries = self._entries(node, path)
        self._reject_unknown(entries, _SERVICE_KEYS, path)
        name = self._str(self._require(entries, node, path, "name"), _join(path, "name"))
        source = self._source_config(self._require(entries, node, path, "source"), path)
        path_node = self._alias(entries, path, "path", "import-path")
        if path_node is None and workflow:
            raise self._error(node, path, "missing required key 'path' (dir/module:attribute)")
        deps = self._optional(entries, "python-dependencies")
        env = self._optional(entries, "env")
        env_files = self._optional(entries, "env-files")
        for key, kind in (("host", "str?"), ("port", "int?"), ("ts-dependencies", "str-map?")):
            if key in entries:
                self._typed(kind, entries[key][1], _join(path, key))
        port = None
        if not workflow and "port" in entries and entries["port"][1].tag != _NULL:
            port = self._int_key(entries, path, "port", 0, minimum=1, maximum=65535)
        timeout = self._optional(entries, "timeout")
        return ServiceConfig(
            id=sid,
            port=port,
            name=name,
            source=source,
            path=None
            if path_node is None
            else self._import_path(path_node, entries, path, workflow),
            python_dependencies=() if deps is None else self._dependencies(deps, path),
            env=self._str_map(env, _join(path, "env"), env=True),
            env_files=()
            if env_files is None
            else self._str_list(env_files, _join(path, "env-files")),
            replicas=self._int_key(entries, path, "replicas", 1, minimum=1),
            max_concurrent_tasks=self._int_key(
                entries, path, "max-concurrent-tasks", 1, minimum=1, maximum=MAX_CONCURRENT_TASKS
            ),
            timeout=None if timeout is None else self._seconds(timeout, _join(path, "timeout")),
            max_retries=self._int_key(
                entries, path, "max-retries", 2, minimum=0, maximum=MAX_RETRIES
            ),
        )

    def _source_config(self, node: Node, service_path: str) -> SourceConfig:
        path = _join(service_path, "source")
        entries = self._entries(node, path)
        self._reject_unknown(entries, _SOURCE_KEYS, path)
        type_node = self._require(entries, node, path, "type")
        kind = self._str(type_node, _join(path, "type"))
        if kind == "docker":
            raise self._error(
                type_node,
                _join(path, "type"),
                "source type 'docker' is not supported (use local or git)",
            )
        if kind not in ("local", "git"):
            message = f"unknown source type {kind!r}{_suggest(kind, ('local', 'git'))}"
            raise self._error(type_node, _join(path, "type"), message)
        name_node = self._alias(entries, path, "name", "location")
        if name_node is None:
            raise self._error(node, path, "missing required key 'name'")
        return SourceConfig(
            cast(Literal["local", "git"], kind), self._str(name_node, _join(path, "name"))
        )

    def _message_queue(self, node: Node) -> MessageQueueConfig:
        path = "message-queue"
        entries = self._entries(node, path)
        type_node = self._require(entries, node, path, "type")
        kind = self._str(type_node, _join(path, "type"))
        known = (*_QUEUE_FIELDS, *_UNCHECKED_QUEUES)
        if kind not in known:
            message = f"unknown message-queue type {kind!r}{_suggest(kind, known)}"
            raise self._error(type_node, _join(path, "type"), message)
        if kind not in SUPPORTED_QUEUE_TYPES:
            self._warn(
                type_node,
                _join(path, "type"),
                f"llama-mesh does not run {kind!r} queues: this deployment's tasks go over "
                "the server's own broker",
            )
        del entries["type"]
        fields: Mapping[str, object]
        if kind in _UNCHECKED_QUEUES:
            plain = {k: self._plain(v, _join(path, k), depth=0) for k, (_, v) in entries.items()}
            fields = MappingProxyType(plain)
        else:
            fields = self._fields_of(entries, path, _QUEUE_FIELDS[kind])
        return MessageQueueConfig(cast(Any, kind), fields)

    def _fields(
        self, node: Node | None, path: str, kinds: Mapping[str, str]
    ) -> Mapping[str, object]:
        if node is None:
            return MappingProxyType({})
        return self._fields_of(self._entries(node, path), path, kinds)

    def _fields_of(
        self, entries: _Entries, path: str, kinds: Mapping[str, str]
    ) -> Mapping[str, object]:
        self._reject_unknown(entries, kinds, path)
        return MappingProxyType(
            {
                key: self._typed(kinds[key], value, _join(path, key))
                for key, (_, value) in entries.items()
            }
        )

    # -- values -----------------------------------------------------------------------------

    def _typed(self, kind: str, node: Node, path: str) -> object:
        if kind.endswith("?"):
            if isinstance(node, ScalarNode) and node.tag == _NULL:
                return None
            kind = kind[:-1]
        if kind == "str":
            return self._str(node, path)
        if kind == "int":
            return self._int(node, path, minimum=None)
        if kind == "number":
            return self._number(node, path)
        if kind == "bool":
            if isinstance(node, ScalarNode) and node.tag == _BOOL:
                return self._scalar(node, path)
            raise self._error(node, path, f"expected true or false, got {_describe(node)}")
        if kind == "str-list":
            return self._str_list(node, path)
        if kind == "str-map":
            return self._str_map(node, path, env=False)
        self._entries(node, path)  # "any-map": a mapping of anything
        return self._plain(node, path, depth=0)

    def _str(self, node: Node, path: str) -> str:
        if isinstance(node, ScalarNode) and node.tag == _STR:
            value = str(node.value)
            if not value.strip():
                raise self._error(node, path, "must not be empty")
            if "\x00" in value:
                raise self._error(node, path, "must not contain NUL characters")
            return value
        hint = ""
        if isinstance(node, ScalarNode) and node.tag.startswith(_T) and node.value:  # 1, yes, ~
            hint = f'; quote it to use it as text: "{node.value}"'
        raise self._error(node, path, f"expected a string, got {_describe(node)}{hint}")

    def _int(
        self, node: Node, path: str, *, minimum: int | None, maximum: int | None = None
    ) -> int:
        if not (isinstance(node, ScalarNode) and node.tag == _INT):
            raise self._error(node, path, f"expected an integer, got {_describe(node)}")
        value = cast(int, self._scalar(node, path))
        if minimum is not None and value < minimum:
            raise self._error(node, path, f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise self._error(node, path, f"must be at most {maximum}, got {value}")
        return value

    def _int_key(
        self,
        entries: _Entries,
        path: str,
        key: str,
        default: int,
        *,
        minimum: int,
        maximum: int | None = None,
    ) -> int:
        if key not in entries:
            return default
        return self._int(entries[key][1], _join(path, key), minimum=minimum, maximum=maximum)

    def _number(self, node: Node, path: str) -> float:
        if not (isinstance(node, ScalarNode) and node.tag in (_INT, _FLOAT)):
            raise self._error(node, path, f"expected a number, got {_describe(node)}")
        try:
            value = float(cast(float, self._scalar(node, path)))
        except OverflowError:
            raise self._error(node, path, "number out of range") from None
        if not math.isfinite(value):
            raise self._error(node, path, "must be a finite number")
        return value

    def _seconds(self, node: Node, path: str) -> float:
        value = self._number(node, path)
        if value <= 0:
            raise self._error(
                node, path, f"must be a number of seconds greater than 0, got {value}"
            )
        if value > MAX_TIMEOUT:
            raise self._error(
                node, path, f"must be at most {MAX_TIMEOUT:.0f} seconds (a week), got {value:g}"
            )
        return value

    def _str_list(self, node: Node, path: str) -> tuple[str, ...]:
        if not (isinstance(node, SequenceNode) and node.tag == _SEQ):
            raise self._error(node, path, f"expected a list of strings, got {_describe(node)}")
        return tuple(self._str(item, f"{path}[{i}]") for i, item in enumerate(node.value))

    def _str_map(self, node: Node | None, path: str, *, env: bool) -> Mapping[str, str]:
        if node is None:
            return MappingProxyType({})
        result: dict[str, str] = {}
        for key, (key_node, value) in self._entries(node, path).items():
            if env and not _ENV_NAME.fullmatch(key):
                message = f"invalid environment variable name {_key(key)} (letters, digits, '_')"
                raise self._error(key_node, path, message)
            if isinstance(value, ScalarNode) and value.tag == _STR:
                result[key] = str(value.value)  # empty strings are fine here
                if "\x00" in result[key]:
                    raise self._error(value, _join(path, key), "must not contain NUL characters")
            elif env:  # a variable's value may be a secret: not quoted
                what = _describe(value, quote=False)
                message = f"expected a string, got {what}; quote the value to use it as text"
                raise self._error(value, _join(path, key), message)
            else:
                result[key] = self._str(value, _join(path, key))  # raises with a quoting hint
        return MappingProxyType(result)

    def _dependencies(self, node: Node, service_path: str) -> tuple[str, ...]:
        path = _join(service_path, "python-dependencies")
        deps = self._str_list(node, path)
        for i, dep in enumerate(deps):
            if dep.strip().startswith("-"):
                message = f"{dep!r}: installer options are not allowed, only requirement specifiers"
                raise self._error(cast(Node, node.value[i]), f"{path}[{i}]", message)
        return tuple(dep.strip() for dep in deps)

    def _import_path(self, node: Node, entries: _Entries, service_path: str, workflow: bool) -> str:
        key = "path" if "path" in entries else "import-path"
        path = _join(service_path, key)
        value = self._str(node, path)
        if not workflow:  # the ui's path is a directory
            return value
        module, sep, attr = value.partition(":")
        problem = None
        parts = module.replace("\\", "/").split("/")
        if not sep or ":" in attr:
            problem = "must contain exactly one ':' (dir/module:attribute)"
        elif not attr.isidentifier() or keyword.iskeyword(attr):
            problem = f"{attr!r} after ':' is not a Python identifier"
        elif module.startswith("/") or ".." in parts:
            problem = "must be relative to the service source and stay inside it"
        elif module.endswith(".py"):
            problem = "name the module without '.py' (dir/module:attribute)"
        elif not all(p.isidentifier() for p in parts[-1].split(".")):
            problem = f"{parts[-1]!r} before ':' is not a Python module name"
        if problem:
            raise self._error(node, path, f"invalid path {value!r}: {problem}")
        return value

    def _identifier(self, node: Node, path: str, what: str) -> str:
        value = self._str(node, path)
        if not NAME_PATTERN.fullmatch(value):
            message = (
                f"invalid {what} {_key(value)}: use 1-63 letters, digits, '_' or '-', "
                "starting with a letter or digit (it becomes a NATS subject token)"
            )
            raise self._error(node, path, message)
        return value

    def _scalar(self, node: ScalarNode, path: str) -> object:
        c = self._constructor
        try:
            if node.tag == _STR:
                return str(node.value)
            if node.tag == _INT:
                return c.construct_yaml_int(node)
            if node.tag == _FLOAT:
                return c.construct_yaml_float(node)
            if node.tag == _BOOL:
                return c.construct_yaml_bool(node)
            if node.tag == _NULL:
                return None
        except (ValueError, KeyError, OverflowError, yaml.YAMLError):
            raise self._error(node, path, f"invalid value {node.value!r} for {node.tag}") from None
        raise self._error(node, path, f"unsupported value: {_describe(node)}")

    def _plain(self, node: Node, path: str, *, depth: int) -> object:
        self._budget -= 1
        if depth > _MAX_DEPTH or self._budget < 0:
            raise self._error(node, path, "value is nested too deeply or too large")
        if isinstance(node, ScalarNode):
            return self._scalar(node, path)
        if isinstance(node, SequenceNode) and node.tag == _SEQ:
            items = enumerate(node.value)
            return tuple(self._plain(n, f"{path}[{i}]", depth=depth + 1) for i, n in items)
        return MappingProxyType(
            {
                key: self._plain(value, _join(path, key), depth=depth + 1)
                for key, (_, value) in self._entries(node, path).items()
            }
        )

    # -- mappings ---------------------------------------------------------------------------

    def _entries(self, node: Node, path: str) -> _Entries:
        if not (isinstance(node, MappingNode) and node.tag == _MAP):
            raise self._error(node, path, f"expected a mapping, got {_describe(node)}")
        entries: _Entries = {}
        for key_node, value_node in node.value:
            if key_node.tag == _T + "merge":
                raise self._error(key_node, path, "YAML merge keys ('<<') are not supported")
            if not (isinstance(key_node, ScalarNode) and key_node.tag == _STR):
                hint = "; quote it" if isinstance(key_node, ScalarNode) else ""
                raise self._error(
                    key_node, path, f"keys must be strings, got {_describe(key_node)}{hint}"
                )
            key = str(key_node.value)
            if key in entries:
                first = _line(entries[key][0])
                message = f"duplicate key {_key(key)} (first on line {first})"
                raise self._error(key_node, path, message)
            entries[key] = (key_node, value_node)
        return entries

    def _reject_unknown(self, entries: _Entries, known: Collection[str], path: str) -> None:
        for key, (key_node, _) in entries.items():
            if key not in known:
                hint = _suggest(key, known) if _KEY_LIKE.fullmatch(key) else ""
                raise self._error(key_node, path, f"unknown key {_key(key)}{hint}")

    def _require(self, entries: _Entries, node: Node, path: str, key: str) -> Node:
        if key not in entries:
            raise self._error(node, path, f"missing required key {key!r}")
        return entries[key][1]

    def _optional(self, entries: _Entries, key: str) -> Node | None:
        """The value of an optional key; an explicit null counts as absent."""
        if key not in entries:
            return None
        value = entries[key][1]
        if isinstance(value, ScalarNode) and value.tag == _NULL:
            return None
        return value

    def _alias(self, entries: _Entries, path: str, key: str, alias: str) -> Node | None:
        if key in entries and alias in entries:
            alias_key = entries[alias][0]
            raise self._error(alias_key, path, f"{key!r} and its alias {alias!r} are both set")
        return self._optional(entries, key if key in entries else alias)
