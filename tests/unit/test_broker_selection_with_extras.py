"""Choosing RabbitMQ and Redis from a deployment's fields, the environment and ``--broker``.

These need the brokers' modules (``llama_mesh.server.queues.rabbitmq`` and ``.redis``, the
``rabbitmq`` and ``redis`` extras): they fail where those are missing, as a server would
fail such a deployment. The choice without them is pinned by ``test_broker_selection.py``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from llama_mesh.server.deployment_config import MessageQueueConfig, parse_deployment_config
from llama_mesh.server.queues.selection import BrokerChoice, select_broker

URLS = {
    "rabbitmq": ("amqp://field-user:field-secret@field-host:5673/", "RABBITMQ_URL"),
    "redis": ("redis://:field-secret@field-host:6380/0", "REDIS_URL"),
}
"""Each kind: a URL to name in its section, and the variable 0.8 falls back to."""
ENV_URLS = {
    "rabbitmq": "amqp://env-user:env-secret@env-host:5674/",
    "redis": "redis://:env-secret@env-host:6381/0",
}


def section(text: str) -> MessageQueueConfig | None:
    return parse_deployment_config(f"name: d\nservices: {{}}\n{text}").message_queue


def assert_hides_its_password(choice: BrokerChoice, secret: str) -> None:
    """The URL shown is without the password; what a worker gets carries it."""
    assert secret not in choice.redacted_url and secret not in choice.describe()
    assert secret in choice.to_json()
    again = BrokerChoice.from_json(choice.to_json())
    assert (again.kind, again.redacted_url) == (choice.kind, choice.redacted_url)


@pytest.mark.parametrize("kind", sorted(URLS))
def test_a_section_naming_a_broker_selects_it_from_its_fields(kind: str) -> None:
    url, variable = URLS[kind]
    config = section(f"message-queue: {{type: {kind}, url: '{url}'}}\n")
    # The section's own field wins over the environment.
    choice = select_broker(config, {variable: ENV_URLS[kind]}, BrokerChoice())
    assert choice.kind == kind
    assert "field-host" in choice.redacted_url and "env-host" not in choice.redacted_url
    assert choice.describe().startswith(f"{kind} at ")
    assert_hides_its_password(choice, "field-secret")


@pytest.mark.parametrize("kind", sorted(URLS))
def test_a_section_without_fields_falls_back_to_the_environment(kind: str) -> None:
    _, variable = URLS[kind]
    choice = select_broker(
        section(f"message-queue: {{type: {kind}}}\n"), {variable: ENV_URLS[kind]}, BrokerChoice()
    )
    assert choice.kind == kind and "env-host" in choice.redacted_url
    assert_hides_its_password(choice, "env-secret")


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("amqp://u:secret@h:5672/", "rabbitmq"),
        ("amqps://u:secret@h:5671/", "rabbitmq"),
        ("redis://:secret@h:6379/0", "redis"),
        ("rediss://:secret@h:6379/0", "redis"),
    ],
)
def test_the_default_broker_option_takes_either_kind_by_its_scheme(url: str, kind: str) -> None:
    """``serve --broker URL``: the broker of deployments that name none, nats or simple."""
    default = BrokerChoice.from_url(url, {})
    assert default.kind == kind
    assert_hides_its_password(default, "secret")
    assert select_broker(section("message-queue: {type: simple}\n"), {}, default) is default
    assert select_broker(None, {}, default) is default


README = Path(__file__).resolve().parents[2] / "README.md"
_YAML_BLOCK = re.compile(r"```yaml\n(message-queue:\n.*?)```", re.S)


def test_the_readme_examples_select_the_broker_they_show() -> None:
    """Each ``message-queue`` example of the README's "Message queues" parses, and selects
    the broker at the address it shows, password hidden; a field it leaves out comes from
    the environment."""
    blocks = _YAML_BLOCK.findall(README.read_text())
    choices = [select_broker(section(block), {}, BrokerChoice()) for block in blocks]
    described = sorted(choice.describe() for choice in choices)
    assert described == [
        "rabbitmq at amqp://user:***@rabbitmq:5672/",
        "redis at redis://redis:6379",
    ]
    redis_block = next(block for block in blocks if "type: redis" in block)
    choice = select_broker(section(redis_block), {"REDIS_PORT": "6390"}, BrokerChoice())
    assert choice.redacted_url == "redis://redis:6390"
