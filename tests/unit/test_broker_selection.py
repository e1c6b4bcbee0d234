"""Which broker a deployment's ``message-queue`` section selects, without the broker extras.

The choice of RabbitMQ and Redis from their fields and environment variables is pinned by
``test_broker_selection_with_extras.py``, which needs their modules.
"""

from __future__ import annotations

import json
import sys

import pytest

from llama_mesh.server.deployment_config import (
    SUPPORTED_QUEUE_TYPES,
    MessageQueueConfig,
    parse_deployment_config,
)
from llama_mesh.server.errors import FailedPreconditionError, InvalidArgumentError
from llama_mesh.server.queues.selection import (
    BROKER_VARIABLE,
    OWN,
    BrokerChoice,
    select_broker,
)

EXTERNAL = {"rabbitmq": "amqp://user:secret@h:5672/", "redis": "redis://:secret@h:6379/0"}
"""Each external broker kind and a URL of it."""


class _Settings:
    """Settings of a broker that is never opened: what a non-default choice carries."""

    redacted_url = "amqp://user:***@elsewhere:5672/"

    def to_json(self) -> str:
        return "{}"


ELSEWHERE = BrokerChoice("rabbitmq", _Settings())
"""A default broker other than the server's own (``serve --broker``)."""


def section(text: str) -> MessageQueueConfig | None:
    yaml = f"name: d\nservices: {{}}\n{text}"
    return parse_deployment_config(yaml).message_queue


@pytest.mark.parametrize("default", [BrokerChoice(), ELSEWHERE], ids=["own", "serve-broker"])
@pytest.mark.parametrize(
    "text",
    ["", "message-queue: {type: nats, url: 'nats://h:4222'}\n", "message-queue: {type: simple}\n"],
    ids=["none", "nats", "simple"],
)
def test_no_section_nats_and_simple_run_on_the_default_broker(
    text: str, default: BrokerChoice
) -> None:
    assert select_broker(section(text), {}, default) is default


@pytest.mark.parametrize("kind", ["aws", "kafka", "solace"])
def test_types_llama_mesh_does_not_run_stay_on_the_servers_own_broker(kind: str) -> None:
    """Whatever the default: the parser's warning says the server's own broker."""
    config = section(f"message-queue: {{type: {kind}, url: 'x://h'}}\n")
    assert config is not None and not config.supported
    assert select_broker(config, {}, ELSEWHERE) == BrokerChoice()


def test_supported_types_are_exactly_those_selection_runs() -> None:
    """``MessageQueueConfig.supported`` (and the parser's warning) tell the truth."""
    assert {"nats", "simple", *EXTERNAL} == SUPPORTED_QUEUE_TYPES


@pytest.mark.parametrize("kind", sorted(EXTERNAL))
def test_a_missing_extra_is_a_clear_error(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the broker's module, naming the broker (in a deployment, with ``--broker``,
    or in a worker's environment) fails with the ``pip install`` that helps."""
    monkeypatch.setitem(sys.modules, f"llama_mesh.server.queues.{kind}", None)
    wanted = rf"pip install 'llama-mesh\[{kind}\]'"
    config = section(f"message-queue: {{type: {kind}, url: '{EXTERNAL[kind]}'}}\n")
    with pytest.raises(FailedPreconditionError, match=wanted):
        select_broker(config, {}, BrokerChoice())
    with pytest.raises(FailedPreconditionError, match=wanted):
        BrokerChoice.from_url(EXTERNAL[kind], {})
    with pytest.raises(FailedPreconditionError, match=wanted):
        BrokerChoice.from_json(json.dumps({"kind": kind, "settings": "{}"}))


def test_a_default_broker_url_of_another_scheme_is_refused() -> None:
    with pytest.raises(InvalidArgumentError, match=r"'http' is not a broker URL.*amqp://"):
        BrokerChoice.from_url("http://h:5672/", {})


def test_the_servers_own_broker_travels_to_a_worker() -> None:
    """A worker process gets its deployment's choice as JSON; the server's own has no
    settings (the worker uses its NATS connection)."""
    own = BrokerChoice()
    assert BrokerChoice.from_json(own.to_json()) == own
    assert (own.kind, own.redacted_url, own.describe()) == (OWN, "", "the server's own broker")
    for garbage in ("", "[]", '{"kind": "own"}', '{"kind": "mq", "settings": null}'):
        with pytest.raises(ValueError, match=BROKER_VARIABLE):
            BrokerChoice.from_json(garbage)


def test_a_choice_describes_its_broker_without_the_password() -> None:
    assert ELSEWHERE.describe() == "rabbitmq at amqp://user:***@elsewhere:5672/"
