"""The deployment YAML parser: valid files, defaults, aliases, and every class of error."""

from __future__ import annotations

import pickle
import textwrap
from types import MappingProxyType

import pytest

from llama_mesh.server.deployment_config import (
    DeploymentConfig,
    DeploymentConfigError,
    MessageQueueConfig,
    ServiceConfig,
    SourceConfig,
    parse_deployment_config,
    redact_secrets,
)
from llama_mesh.server.errors import FailedPreconditionError
from llama_mesh.server.orchestrator import choose_service

FULL_08 = """\
name: MyDeployment

control-plane:
  port: 8000
  host: localhost
  internal_host: 0.0.0.0
  internal_port: 8001
  running: true
  cors_origins: ["*"]
  topic_namespace: llama_deploy
  state_store_uri: redis://localhost:6379
  use_tls: false

message-queue:
  type: simple
  host: "127.0.0.1"
  port: 8001

default-service: myworkflow

services:
  myworkflow:
    # A python workflow available in a git repo
    name: My Python Workflow
    source:
      type: git
      name: https://github.com/myorg/myrepo.git@v1.2
    path: src/python/app:workflow
    port: 1313
    host: localhost
    python-dependencies:
      - "llama-index-core<1"
      - "llama-index-llms-openai"
    env:
      VAR_1: x
      VAR_2: y
    env-files:
      - ./.env

  another-workflow:
    name: My LITS Workflow
    source:
      type: local
      name: src
    path: src/workflow:echo_workflow
    ts-dependencies:
      "@llamaindex/core": "^0.2.0"

ui:
  name: My Nextjs App
  source:
    type: local
    name: ui
  path: src/ui
"""

MINIMAL = """\
name: echo
services:
  echo:
    name: Echo
    source:
      type: local
      name: src
    path: src/workflow:echo_workflow
"""


def parse(text: str) -> DeploymentConfig:
    return parse_deployment_config(textwrap.dedent(text), source_name="deployment.yml")


def error_of(text: str) -> DeploymentConfigError:
    with pytest.raises(DeploymentConfigError) as info:
        parse(text)
    return info.value


def with_service_lines(*lines: str) -> str:
    """MINIMAL with extra lines in service ``echo`` (they start on line 9)."""
    return MINIMAL + "".join(f"    {line}\n" for line in lines)


def test_full_08_file_parses() -> None:
    """A Llama Deploy 0.8 file with every section parses into the typed objects."""
    config = parse(FULL_08)
    assert config.name == "MyDeployment"
    assert config.default_service == "myworkflow"
    assert list(config.services) == ["myworkflow", "another-workflow"]
    svc = config.services["myworkflow"]
    assert svc.id == "myworkflow"
    assert svc.name == "My Python Workflow"
    assert svc.source == SourceConfig("git", "https://github.com/myorg/myrepo.git@v1.2")
    assert svc.path == "src/python/app:workflow"
    assert svc.module_path == "src/python/app"
    assert svc.attr == "workflow"
    assert svc.python_dependencies == ("llama-index-core<1", "llama-index-llms-openai")
    assert dict(svc.env) == {"VAR_1": "x", "VAR_2": "y"}
    assert svc.env_files == ("./.env",)
    assert config.message_queue == MessageQueueConfig(
        "simple", MappingProxyType({"host": "127.0.0.1", "port": 8001})
    )
    assert config.message_queue.supported
    assert config.control_plane["port"] == 8000
    assert config.control_plane["cors_origins"] == ("*",)
    assert config.ui is not None and config.ui.path == "src/ui" and config.ui.id == "ui"
    assert config.raw_yaml == FULL_08


def test_defaults_of_a_minimal_file() -> None:
    """Optional sections default to None/empty and the extensions to 1, 1, None, 2."""
    config = parse(MINIMAL)
    assert config.default_service is None
    assert config.message_queue is None
    assert dict(config.control_plane) == {}
    assert config.ui is None
    svc = config.services["echo"]
    assert (svc.replicas, svc.max_concurrent_tasks, svc.timeout, svc.max_retries) == (1, 1, None, 2)
    assert svc.python_dependencies == () and svc.env_files == () and dict(svc.env) == {}


def test_extensions_are_parsed() -> None:
    """replicas, max-concurrent-tasks, timeout (int or float seconds) and max-retries."""
    config = parse(
        with_service_lines(
            "replicas: 3", "max-concurrent-tasks: 4", "timeout: 2.5", "max-retries: 0"
        )
    )
    svc = config.services["echo"]
    assert (svc.replicas, svc.max_concurrent_tasks, svc.timeout, svc.max_retries) == (3, 4, 2.5, 0)
    assert parse(with_service_lines("timeout: 30")).services["echo"].timeout == 30.0


def test_config_objects_are_immutable() -> None:
    """The dataclasses are frozen and their mappings are read-only."""
    config = parse(FULL_08)
    with pytest.raises(AttributeError):
        config.name = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.services["x"] = config.services["myworkflow"]  # type: ignore[index]
    with pytest.raises(TypeError):
        config.services["myworkflow"].env["A"] = "b"  # type: ignore[index]


def test_aliases_location_and_import_path() -> None:
    """``source.location`` (0.9) and ``import-path`` are aliases of ``name`` and ``path``."""
    config = parse(
        """\
        name: d
        services:
          s:
            name: S
            source: {type: local, location: src}
            import-path: src/wf:workflow
        """
    )
    assert config.services["s"].source == SourceConfig("local", "src")
    assert config.services["s"].path == "src/wf:workflow"


def test_alias_and_key_both_set_is_an_error() -> None:
    """Setting both ``name`` and ``location`` is ambiguous and refused."""
    err = error_of(MINIMAL.replace("name: src", "name: src\n      location: src"))
    assert err.key_path == "services.echo.source"
    assert err.line == 8
    assert "'name' and its alias 'location' are both set" in err.message


def test_error_str_names_file_line_and_key_path() -> None:
    """str() reads ``file:line: key.path: message`` with the underscore suggestion."""
    err = error_of(with_service_lines("python_dependencies: []"))
    assert str(err) == (
        "deployment.yml:9: services.echo: unknown key 'python_dependencies' "
        "(did you mean 'python-dependencies'?)"
    )
    assert (err.key_path, err.line) == ("services.echo", 9)
    assert isinstance(err, ValueError)


@pytest.mark.parametrize(
    ("key", "suggestion"),
    [
        ("default_service", "default-service"),
        ("message_queue", "message-queue"),
        ("control_plane", "control-plane"),
        ("servics", "services"),
    ],
)
def test_top_level_unknown_keys_suggest(key: str, suggestion: str) -> None:
    """Unknown top-level keys are errors naming the closest known key."""
    err = error_of(MINIMAL + f"{key}: x\n")
    assert err.key_path == ""
    assert err.line == 9
    assert err.message == f"unknown key {key!r} (did you mean {suggestion!r}?)"


def test_unknown_key_without_close_match_lists_known_keys() -> None:
    """An unknown key with no close match lists the keys that are allowed."""
    err = error_of(MINIMAL.replace("      name: src", "      name: src\n      zzz: 1"))
    assert err.key_path == "services.echo.source"
    assert "expected one of: location, name, type" in err.message


def test_control_plane_keys_keep_08_spelling() -> None:
    """control-plane keys are 0.8's underscored names; a hyphenated one suggests it."""
    err = error_of("name: d\ncontrol-plane:\n  internal-host: x\n" + MINIMAL[len("name: echo\n") :])
    assert err.key_path == "control-plane"
    assert err.line == 3
    assert "did you mean 'internal_host'?" in err.message


@pytest.mark.parametrize(
    ("text", "key_path", "line", "fragment"),
    [
        ("name: d\n", "", 1, "missing required key 'services'"),
        ("name: 'my deployment'\n", "name", 1, "NATS subject token"),
        ("name: ''\n", "name", 1, "must not be empty"),
        ("name: 12\n", "name", 1, 'quote it to use it as text: "12"'),
        ("name: [a]\n", "name", 1, "expected a string, got a list"),
    ],
)
def test_document_level_errors(text: str, key_path: str, line: int, fragment: str) -> None:
    """Missing keys, empty or bad names and wrong types name the key and the line."""
    err = error_of(text)
    assert (err.key_path, err.line) == (key_path, line)
    assert fragment in err.message


@pytest.mark.parametrize(
    ("extra", "key_path", "fragment"),
    [
        ('replicas: "two"', "services.echo.replicas", "expected an integer, got a string"),
        ("replicas: 0", "services.echo.replicas", "must be at least 1"),
        ("replicas: 1.5", "services.echo.replicas", "expected an integer"),
        ("replicas: true", "services.echo.replicas", "expected an integer, got a boolean"),
        ("max-concurrent-tasks: 0", "services.echo.max-concurrent-tasks", "at least 1"),
        ("max-retries: -1", "services.echo.max-retries", "must be at least 0"),
        ("max-retries: 101", "services.echo.max-retries", "must be at most 100, got 101"),
        (
            "max-concurrent-tasks: 1000000",
            "services.echo.max-concurrent-tasks",
            "must be at most 1000, got 1000000",
        ),
        ("timeout: 604801", "services.echo.timeout", "at most 604800 seconds"),
        ("timeout: 1.0e+300", "services.echo.timeout", "at most 604800 seconds"),
        ("timeout: 0", "services.echo.timeout", "greater than 0"),
        ("timeout: .inf", "services.echo.timeout", "finite"),
        ("timeout: soon", "services.echo.timeout", "expected a number"),
        ("env: {A: 1}", "services.echo.env.A", "got an integer; quote the value"),
        ("env: {A: yes}", "services.echo.env.A", "got a boolean"),
        ("env: {A: null}", "services.echo.env.A", "got null"),
        ("env: {1A: x}", "services.echo.env", "invalid environment variable name"),
        ("env: [A]", "services.echo.env", "expected a mapping, got a list"),
        ("env-files: .env", "services.echo.env-files", "expected a list of strings"),
        ("python-dependencies: [1]", "services.echo.python-dependencies[0]", "expected a string"),
        (
            "python-dependencies: ['--index-url=x']",
            "services.echo.python-dependencies[0]",
            "options",
        ),
        ("port: http", "services.echo.port", "expected an integer"),
        ("host: 1", "services.echo.host", "expected a string"),
        ("ts-dependencies: [a]", "services.echo.ts-dependencies", "expected a mapping"),
    ],
)
def test_service_value_errors(extra: str, key_path: str, fragment: str) -> None:
    """Each wrongly typed or out-of-range service value names its key path and line."""
    err = error_of(with_service_lines(extra))
    assert err.key_path == key_path
    assert err.line == 9
    assert fragment in err.message


@pytest.mark.parametrize(
    ("path", "fragment"),
    [
        ("src/workflow", "exactly one ':'"),
        ("src/workflow:a:b", "exactly one ':'"),
        ("src/workflow:1abc", "not a Python identifier"),
        ("src/workflow:class", "not a Python identifier"),
        ("/abs/workflow:wf", "stay inside"),
        ("../up/workflow:wf", "stay inside"),
        ("src/workflow.py:wf", "without '.py'"),
        ("src/my-module:wf", "not a Python module name"),
    ],
)
def test_invalid_workflow_paths(path: str, fragment: str) -> None:
    """``path`` must be ``dir/module:attr`` with a module name and an identifier."""
    err = error_of(MINIMAL.replace("src/workflow:echo_workflow", path))
    assert (err.key_path, err.line) == ("services.echo.path", 8)
    assert fragment in err.message


def test_dotted_module_and_bare_module_paths_are_valid() -> None:
    """``module:attr`` and ``dir/pkg.module:attr`` are accepted and split by the helpers."""
    svc = parse(MINIMAL.replace("src/workflow:echo_workflow", "pkg.mod:wf")).services["echo"]
    assert (svc.module_path, svc.attr) == ("pkg.mod", "wf")


def test_workflow_service_requires_path_but_ui_does_not() -> None:
    """A service without ``path`` is an error; the ui's path is optional and free-form."""
    err = error_of(MINIMAL.replace("    path: src/workflow:echo_workflow\n", ""))
    assert (err.key_path, err.line) == ("services.echo", 4)
    assert "missing required key 'path'" in err.message
    config = parse(MINIMAL + "ui:\n  name: UI\n  source: {type: local, name: ui}\n")
    assert config.ui is not None and config.ui.path is None
    with pytest.raises(ValueError, match="has no path"):
        _ = config.ui.module_path


def test_ui_port_is_read_and_checked() -> None:
    """The ui's ``port`` is kept (the port its process is told to listen on); one that is
    not a port number is an error naming the key; a null one means a free port."""
    ui = "ui:\n  name: UI\n  source: {type: local, name: ui}\n"
    config = parse(MINIMAL + ui + "  port: 3001\n")
    assert config.ui is not None and config.ui.port == 3001
    config = parse(MINIMAL + ui + "  port:\n")
    assert config.ui is not None and config.ui.port is None
    err = error_of(MINIMAL + ui + "  port: 70000\n")
    assert err.key_path == "ui.port"


def test_source_errors() -> None:
    """docker sources are refused clearly; unknown types get a suggestion; name is required."""
    err = error_of(MINIMAL.replace("type: local", "type: docker"))
    assert (err.key_path, err.line) == ("services.echo.source.type", 6)
    assert "'docker' is not supported" in err.message
    err = error_of(MINIMAL.replace("type: local", "type: locl"))
    assert "did you mean 'local'?" in err.message
    err = error_of(MINIMAL.replace("      name: src\n", ""))
    assert (err.key_path, err.line) == ("services.echo.source", 6)
    assert "missing required key 'name'" in err.message


def test_service_id_must_be_a_subject_token() -> None:
    """Service ids become NATS subject tokens: dots and spaces are refused."""
    err = error_of(MINIMAL.replace("  echo:", "  my.echo:"))
    assert (err.key_path, err.line) == ("services", 3)
    assert "invalid service id 'my.echo'" in err.message


def test_default_service_naming_no_service_is_a_warning() -> None:
    """default-service naming no service is accepted (as Llama Deploy 0.8.1 does) with a
    warning naming it, its line and a suggestion; the config has no default then."""
    config = parse(MINIMAL + "default-service: ech\n")
    assert config.default_service is None
    assert config.unknown_default_service == "ech"
    (warning,) = config.warnings
    assert warning.startswith("deployment.yml:9: default-service: no service with id 'ech'")
    assert "(did you mean 'echo'?)" in warning
    good = parse(MINIMAL + "default-service: echo\n")
    assert (good.default_service, good.unknown_default_service, good.warnings) == ("echo", None, ())


def test_task_needing_a_default_service_that_names_no_service_is_refused() -> None:
    """Every path that picks a service (ApiServer, ControlPlane.RecordTask) goes through
    choose_service: with no service named, a default-service naming none is a
    FailedPreconditionError naming it; a service named explicitly still works. Since the
    MINIMAL deployment has one service, this also pins that the unknown default is not
    silently replaced by the only service."""
    config = parse(MINIMAL + "default-service: ech\n")
    with pytest.raises(FailedPreconditionError, match="'ech', names no service") as info:
        choose_service(config, None)
    assert info.value.reason == "DEFAULT_SERVICE_NOT_FOUND"
    assert choose_service(config, "echo") == "echo"


def test_no_services_is_a_warning() -> None:
    """An empty services mapping is accepted (as 0.8.1 does) with a warning."""
    config = parse("services: {}\nname: d\n")
    assert dict(config.services) == {}
    assert config.warnings == (
        "deployment.yml:1: services: no services: this deployment runs nothing",
    )


def test_message_queue_types() -> None:
    """nats/simple/rabbitmq/redis are run, the latter two with their fields checked;
    aws/kafka/solace parse with their fields kept unchecked, each with a warning; an unknown
    type is an error."""
    nats = parse(MINIMAL + "message-queue: {type: nats, url: 'nats://h:4222'}\n").message_queue
    assert nats == MessageQueueConfig("nats", MappingProxyType({"url": "nats://h:4222"}))
    redis = parse(MINIMAL + "message-queue:\n  type: redis\n  host: redis\n  port: 6379\n")
    assert redis.message_queue is not None and redis.message_queue.supported
    assert dict(redis.message_queue.fields) == {"host": "redis", "port": 6379}
    assert redis.warnings == ()
    assert nats is not None and nats.supported
    kafka = parse(MINIMAL + "message-queue: {type: kafka, url: 'k:9092', extra: [1]}\n")
    assert kafka.message_queue == MessageQueueConfig(
        "kafka", MappingProxyType({"url": "k:9092", "extra": (1,)})
    )
    assert kafka.message_queue is not None and not kafka.message_queue.supported
    assert kafka.warnings == (
        "deployment.yml:9: message-queue.type: llama-mesh does not run 'kafka' queues: "
        "this deployment's tasks go over the server's own broker",
    )
    err = error_of(MINIMAL + "message-queue: {type: kafak}\n")
    assert (err.key_path, err.line) == ("message-queue.type", 9)
    assert "unknown message-queue type 'kafak' (did you mean 'kafka'?)" in err.message
    err = error_of(MINIMAL + "message-queue:\n  type: rabbitmq\n  exchange-name: x\n")
    assert (err.key_path, err.line) == ("message-queue", 11)
    assert "did you mean 'exchange_name'?" in err.message
    err = error_of(MINIMAL + "message-queue:\n  type: simple\n  port: '8001'\n")
    assert (err.key_path, err.line) == ("message-queue.port", 11)
    err = error_of(MINIMAL + "message-queue:\n  host: x\n")
    assert "missing required key 'type'" in err.message


def test_simple_queue_client_kwargs_are_free_form() -> None:
    """``client_kwargs`` of the simple queue keeps any nested YAML value, read-only."""
    config = parse(MINIMAL + "message-queue:\n  type: simple\n  client_kwargs: {a: [1, x]}\n")
    assert config.message_queue is not None
    assert config.message_queue.fields["client_kwargs"] == {"a": (1, "x")}


def test_duplicate_keys_are_errors() -> None:
    """A key given twice in a mapping is an error naming both lines."""
    err = error_of(with_service_lines("name: Again"))
    assert (err.key_path, err.line) == ("services.echo", 9)
    assert err.message == "duplicate key 'name' (first on line 4)"


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("", 1, "empty document"),
        ("# only a comment\n", 1, "empty document"),
        ("- a\n- b\n", 1, "must be a mapping, got a list"),
        ("just text\n", 1, "must be a mapping, got a string"),
        ("name: d\nservices: [\n", 3, "invalid YAML"),
        ("name: d\n  bad: indent\n", 2, "invalid YAML"),
        ("a: 1\n---\nb: 2\n", 2, "invalid YAML"),
        ("name: *nope\n", 1, "invalid YAML"),
        ("<<: {name: d}\n", 1, "merge keys"),
        ("? [a]\n: b\n", 1, "keys must be strings"),
        ("1: x\n", 1, "keys must be strings"),
    ],
)
def test_malformed_documents(text: str, line: int, fragment: str) -> None:
    """Malformed or non-mapping documents raise DeploymentConfigError with a line."""
    err = error_of(text)
    assert err.line == line
    assert fragment in err.message


def test_errors_quote_no_other_file_and_no_secret() -> None:
    """A file that is not a deployment (a password file) is described without its text; an
    ``env`` value of the wrong type is not quoted (it may be a secret); other quoted values
    are shortened."""
    for text in ("root:*:19000:0:99999:7:::\n", "root:*:19000:0:99999:7::\ndaemon:*:1::\n"):
        assert "root" not in error_of(text).message
    assert error_of("root:*:1:2\nx\n").message == "the document must be a mapping, got a string"
    secret = error_of(with_service_lines("env: {TOKEN: 8675309123}"))
    assert "8675309123" not in str(secret)
    long = error_of(with_service_lines(f"replicas: {'x' * 200}"))
    assert "x" * 37 + "..." in long.message and "x" * 41 not in long.message


def test_bytes_input_and_bad_utf8() -> None:
    """UTF-8 bytes (with or without BOM) parse; other bytes are an error with the line."""
    assert parse_deployment_config(MINIMAL.encode()).name == "echo"
    assert parse_deployment_config(b"\xef\xbb\xbf" + MINIMAL.encode()).name == "echo"
    with pytest.raises(DeploymentConfigError) as info:
        parse_deployment_config(b"name: d\nservices: \xff\n", source_name="x.yml")
    assert info.value.line == 2
    assert str(info.value).startswith("x.yml:2: not valid UTF-8")


def test_null_optional_sections_count_as_absent() -> None:
    """``ui:``, ``message-queue:``, ``default-service:`` and ``control-plane:`` may be null."""
    config = parse(MINIMAL + "ui:\nmessage-queue:\ndefault-service:\ncontrol-plane:\n")
    assert config.ui is None and config.message_queue is None and config.default_service is None
    assert dict(config.control_plane) == {}


def test_alias_bomb_in_free_form_value_is_bounded() -> None:
    """Exponential YAML aliases in a free-form value hit a size limit, not the memory."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 12)]
    bomb = "\n".join("    " + line for line in lines)
    err = error_of(MINIMAL + f"message-queue:\n  type: simple\n  client_kwargs:\n{bomb}\n")
    assert "nested too deeply or too large" in err.message


def test_recursive_alias_is_an_error() -> None:
    """A self-referencing alias in a free-form value is an error, not a RecursionError."""
    text = MINIMAL + "message-queue:\n  type: simple\n  client_kwargs: &k {self: *k}\n"
    assert "nested too deeply" in error_of(text).message


def test_error_pickles() -> None:
    """DeploymentConfigError survives pickling (it crosses process boundaries)."""
    err = error_of(with_service_lines("replicas: 0"))
    copy = pickle.loads(pickle.dumps(err))
    assert (str(copy), copy.key_path, copy.line) == (str(err), err.key_path, err.line)


def test_service_config_can_be_built_directly() -> None:
    """ServiceConfig has defaults so other modules and tests can build one in code."""
    svc = ServiceConfig(id="s", name="S", source=SourceConfig("local", "."), path="wf:w")
    assert (svc.replicas, svc.max_retries, svc.module_path, svc.attr) == (1, 2, "wf", "w")


def test_shown_yaml_hides_passwords_and_nothing_else() -> None:
    """The API shows a deployment file with the password of every URL and every
    ``*password:`` value replaced; the rest of the text, comments included, is unchanged."""
    text = (
        "message-queue:\n"
        "  type: rabbitmq\n"
        "  url: amqp://guest:s3cr%40t@rabbit:5672/vh  # the broker\n"
        "  password: hunter2\n"
        "services:\n"
        "  a:\n"
        "    env:\n"
        '      DB: "postgres://u:pw@db/x"\n'
        "      REDIS_PASSWORD: abc\n"
        '      PAGE: "http://host/path@x"\n'
    )
    shown = redact_secrets(text)
    for secret in ("s3cr%40t", "hunter2", ":pw@", "abc"):
        assert secret not in shown
    assert shown == (
        "message-queue:\n"
        "  type: rabbitmq\n"
        "  url: amqp://guest:***@rabbit:5672/vh  # the broker\n"
        '  password: "***"\n'
        "services:\n"
        "  a:\n"
        "    env:\n"
        '      DB: "postgres://u:***@db/x"\n'
        '      REDIS_PASSWORD: "***"\n'
        '      PAGE: "http://host/path@x"\n'
    )
