"""``RabbitMqSettings``: Llama Deploy 0.8's RabbitMQ fields, environment fallbacks, the URL
built from its parts, redaction, JSON round trips and clear errors for bad values."""

from __future__ import annotations

import pytest

from llama_mesh.server.queues.rabbitmq import RabbitMqSettings

PARTS = {"username": "mesh", "password": "p@ss:word", "host": "mq.example", "port": 5673}


def test_defaults_are_llama_deploys() -> None:
    settings = RabbitMqSettings.from_config({}, {})
    assert settings.url == "amqp://guest:guest@localhost/"
    assert settings.exchange_name == "llama-deploy"


def test_file_fields_win_over_the_environment_which_wins_over_defaults() -> None:
    environ = {"RABBITMQ_URL": "amqp://env:e@env-host/", "rabbitmq_exchange_name": "from-env"}
    assert RabbitMqSettings.from_config({}, environ) == RabbitMqSettings(
        url="amqp://env:e@env-host/", exchange_name="from-env"
    )
    fields = {"url": "amqps://file:f@file-host:5671/vh", "exchange_name": "from-file"}
    assert RabbitMqSettings.from_config(fields, environ) == RabbitMqSettings(
        url="amqps://file:f@file-host:5671/vh", exchange_name="from-file"
    )


def test_url_is_built_from_its_parts_percent_encoded() -> None:
    fields = {**PARTS, "vhost": "team/a", "url": "amqp://ignored@elsewhere/"}
    assert (
        RabbitMqSettings.from_config(fields, {}).url
        == "amqp://mesh:p%40ss%3Aword@mq.example:5673/team%2Fa"
    )
    secure = RabbitMqSettings.from_config({**PARTS, "port": None, "secure": True}, {})
    assert secure.url == "amqps://mesh:p%40ss%3Aword@mq.example/"


def test_url_parts_come_from_the_environment_too() -> None:
    environ = {
        "RABBITMQ_USERNAME": "u",
        "RABBITMQ_PASSWORD": "pw",
        "RABBITMQ_HOST": "h",
        "RABBITMQ_PORT": "5999",
        "RABBITMQ_SECURE": "yes",
    }
    assert RabbitMqSettings.from_config({"host": "file-host"}, environ).url == (
        "amqps://u:pw@file-host:5999/"
    )


def test_incomplete_parts_keep_the_url() -> None:
    fields = {"username": "u", "host": "h", "url": "amqp://x:y@z/"}
    assert RabbitMqSettings.from_config(fields, {}).url == "amqp://x:y@z/"


def test_redacted_url_hides_only_the_password() -> None:
    settings = RabbitMqSettings.from_config(PARTS, {})
    assert settings.redacted_url == "amqp://mesh:***@mq.example:5673/"
    assert "p%40ss" not in repr(settings)
    assert RabbitMqSettings(url="amqp://h/").redacted_url == "amqp://h/"


def test_json_round_trip() -> None:
    settings = RabbitMqSettings.from_config({**PARTS, "exchange_name": "dep-1"}, {})
    assert RabbitMqSettings.from_json(settings.to_json()) == settings


@pytest.mark.parametrize(
    "text", ["not json", "[]", '{"url": "amqp://h/"}', '{"url": 1, "exchange_name": "x"}']
)
def test_from_json_refuses_anything_else(text: str) -> None:
    with pytest.raises(ValueError, match="rabbitmq settings"):
        RabbitMqSettings.from_json(text)


@pytest.mark.parametrize(
    ("fields", "environ", "named"),
    [
        ({**PARTS, "port": "abc"}, {}, "port: expected a port number"),
        ({**PARTS, "port": 70000}, {}, "port: expected a port number"),
        ({**PARTS, "port": True}, {}, "port: expected a port number"),
        (PARTS | {"port": None}, {"RABBITMQ_PORT": "x1"}, "RABBITMQ_PORT: expected a port"),
        ({"url": "http://h/"}, {}, "url: unknown scheme 'http'"),
        ({"url": "amqp://h:notaport/"}, {}, "url: not a valid AMQP URL"),
        ({"url": "amqp:///vhost"}, {}, "url: has no host"),
        ({"secure": "maybe"}, {}, "secure: expected true or false"),
        ({}, {"RABBITMQ_SECURE": "2"}, "RABBITMQ_SECURE: expected true or false"),
        ({"host": 5}, {}, "host: expected a string"),
        ({"exchange_name": "amq.direct"}, {}, "exchange_name: 'amq.direct' is not a valid"),
        ({"exchange_name": "a b"}, {}, "exchange_name: 'a b' is not a valid"),
        ({"queue": "x"}, {}, "unknown rabbitmq message-queue field"),
    ],
)
def test_bad_values_name_their_field(
    fields: dict[str, object], environ: dict[str, str], named: str
) -> None:
    with pytest.raises(ValueError, match=named):
        RabbitMqSettings.from_config(fields, environ)
