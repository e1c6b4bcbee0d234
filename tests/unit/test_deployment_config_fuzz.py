"""Property tests: the deployment parser raises nothing but DeploymentConfigError."""

from __future__ import annotations

from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama_mesh.server.deployment_config import (
    MAX_TIMEOUT,
    DeploymentConfigError,
    parse_deployment_config,
)

KEYS = [
    *("name", "services", "control-plane", "message-queue", "default-service", "ui"),
    *("source", "type", "path", "import-path", "location", "env", "env-files", "replicas"),
    *("python-dependencies", "timeout", "max-retries", "max-concurrent-tasks", "port", "host"),
    *("local", "git", "simple", "nats", "redis", "client_kwargs", "echo", "<<"),
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=20),
    st.sampled_from(["local", "git", "nats", "simple", "a:b", "src/wf:w", "echo", "yes", "1.5"]),
)
keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=10), st.integers(), st.booleans())
nested = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(keys, children, max_size=5)
    ),
    max_leaves=30,
)
identifiers = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,20}", fullmatch=True)
plain_text = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=20
).filter(lambda s: s.strip() != "")


def parse_or_error(data: str | bytes) -> None:
    try:
        parse_deployment_config(data, source_name="fuzz.yml")
    except DeploymentConfigError as exc:
        assert str(exc).startswith("fuzz.yml")
        assert exc.line is None or exc.line >= 1


@given(st.text())
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_arbitrary_text_only_raises_config_errors(text: str) -> None:
    """Any text either parses or raises DeploymentConfigError."""
    parse_or_error(text)


@given(st.text(alphabet="name:services-[]{}&*!|>'\"#%@`,?<\\ \n\t01.~", max_size=80))
@settings(max_examples=500)
def test_yaml_syntax_soup_only_raises_config_errors(text: str) -> None:
    """Text made of YAML punctuation and key fragments parses or raises DeploymentConfigError."""
    parse_or_error(text)
    parse_or_error("name: d\nservices:\n  s:\n    " + text)


@given(st.binary())
@settings(max_examples=300)
def test_arbitrary_bytes_only_raise_config_errors(data: bytes) -> None:
    """Any bytes either parse or raise DeploymentConfigError."""
    parse_or_error(data)


@given(st.dictionaries(keys, nested, max_size=6))
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_arbitrary_yaml_structures_only_raise_config_errors(document: dict[Any, Any]) -> None:
    """Any YAML-able structure, dumped to YAML, parses or raises DeploymentConfigError."""
    parse_or_error(yaml.safe_dump(document))


@given(st.dictionaries(st.sampled_from(KEYS), nested, max_size=8))
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_service_shaped_structures_only_raise_config_errors(service: dict[Any, Any]) -> None:
    """Structures placed where a service goes parse or raise DeploymentConfigError."""
    parse_or_error(yaml.safe_dump({"name": "d", "services": {"s": service}}))


services = st.dictionaries(
    identifiers,
    st.fixed_dictionaries(
        {
            "name": plain_text,
            "source": st.fixed_dictionaries(
                {"type": st.sampled_from(["local", "git"]), "name": plain_text}
            ),
            "path": st.from_regex(r"([a-z_]{1,5}/){0,2}[a-z_]{1,8}:W[a-z_]{0,8}", fullmatch=True),
        },
        optional={
            "python-dependencies": st.lists(
                st.from_regex(r"[a-z][a-z0-9-]{0,10}(==1\.[0-9])?", fullmatch=True), max_size=3
            ),
            "env": st.dictionaries(
                st.from_regex(r"[A-Z_][A-Z0-9_]{0,8}", fullmatch=True),
                st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=10),
            ),
            "env-files": st.lists(plain_text, max_size=2),
            "replicas": st.integers(1, 64),
            "max-concurrent-tasks": st.integers(1, 64),
            "timeout": st.floats(0.001, MAX_TIMEOUT),
            "max-retries": st.integers(0, 10),
        },
    ),
    min_size=1,
    max_size=3,
)


@given(name=identifiers, services=services, data=st.data())
@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
def test_valid_configs_round_trip(
    name: str, services: dict[str, dict[str, Any]], data: st.DataObject
) -> None:
    """A valid document dumped to YAML parses back to the same values, and so does raw_yaml."""
    document: dict[str, Any] = {"name": name, "services": services}
    default = data.draw(st.sampled_from([None, *services]))
    if default is not None:
        document["default-service"] = default
    config = parse_deployment_config(yaml.safe_dump(document, allow_unicode=True, sort_keys=False))
    assert config.name == name
    assert config.default_service == default
    assert list(config.services) == list(services)
    for sid, expected in services.items():
        svc = config.services[sid]
        assert svc.id == sid
        assert svc.name == expected["name"]
        assert svc.source.type == expected["source"]["type"]
        assert svc.source.name == expected["source"]["name"]
        assert svc.path == expected["path"]
        assert svc.python_dependencies == tuple(expected.get("python-dependencies", ()))
        assert dict(svc.env) == expected.get("env", {})
        assert svc.env_files == tuple(expected.get("env-files", ()))
        assert svc.replicas == expected.get("replicas", 1)
        assert svc.max_concurrent_tasks == expected.get("max-concurrent-tasks", 1)
        assert svc.timeout == expected.get("timeout")
        assert svc.max_retries == expected.get("max-retries", 2)
    assert parse_deployment_config(config.raw_yaml) == config
