"""``RedisSettings``: the ``message-queue: {type: redis}`` fields, ``REDIS_*`` fallbacks, the
URL built from them, its redaction, and clear errors for bad values; and the Redis
broker's error seam."""

from __future__ import annotations

import pytest
import redis.exceptions

from llama_mesh.server.queues.errors import QueueError, QueueUnavailableError
from llama_mesh.server.queues.redis import RedisSettings, translate_error


def test_defaults_are_llama_deploys() -> None:
    """No field and no variable: Llama Deploy 0.8's default URL."""
    settings = RedisSettings.from_config({}, {})
    assert settings.effective_url == "redis://localhost:6379"
    assert settings.exclusive_mode is False


def test_yaml_wins_over_environment_over_defaults() -> None:
    """A YAML field beats its ``REDIS_`` variable; a variable fills a field the YAML lacks."""
    environ = {"REDIS_URL": "redis://env-host:1", "REDIS_EXCLUSIVE_MODE": "true"}
    settings = RedisSettings.from_config({"url": "redis://yaml-host:2"}, environ)
    assert settings.effective_url == "redis://yaml-host:2"
    assert settings.exclusive_mode is True


def test_host_builds_the_url() -> None:
    """host, port, db, username, password and ssl build the URL, and it wins over url."""
    environ = {
        **{"REDIS_HOST": "cache.internal", "REDIS_PORT": "6380", "REDIS_DB": "2"},
        **{"REDIS_USERNAME": "mesh", "REDIS_PASSWORD": "p@ss:word", "REDIS_SSL": "true"},
    }
    settings = RedisSettings.from_config({"url": "redis://ignored:1"}, environ)
    assert settings.effective_url == "rediss://mesh:p%40ss%3Aword@cache.internal:6380/2"
    assert settings.redacted_url == "rediss://mesh:***@cache.internal:6380/2"


@pytest.mark.parametrize(
    ("fields", "url"),
    [
        ({"host": "h"}, "redis://h:6379"),
        ({"host": "h", "password": "secret"}, "redis://:secret@h:6379"),
        ({"host": "h", "port": 7000, "db": 0, "ssl": False}, "redis://h:7000/0"),
    ],
)
def test_host_without_every_field(fields: dict[str, object], url: str) -> None:
    """The port defaults to 6379; a password alone authenticates the default user."""
    assert RedisSettings.from_config(fields, {}).effective_url == url


def test_redacted_url_hides_a_password_in_url() -> None:
    """A password written in ``url`` itself is hidden too; a URL without one is unchanged."""
    settings = RedisSettings.from_config({"url": "redis://:hunter2@h:6379/1"}, {})
    assert settings.redacted_url == "redis://:***@h:6379/1"
    assert "hunter2" not in settings.redacted_url
    assert RedisSettings().redacted_url == "redis://localhost:6379"


@pytest.mark.parametrize(
    ("fields", "environ", "named"),
    [
        ({"host": "h", "port": "abc"}, {}, "port"),
        ({"host": "h"}, {"REDIS_PORT": "abc"}, "REDIS_PORT"),
        ({"host": "h", "port": 70000}, {}, "port"),
        ({"host": "h", "db": -1}, {}, "db"),
        ({"host": "h"}, {"REDIS_SSL": "maybe"}, "REDIS_SSL"),
        ({"exclusive_mode": "yes please"}, {}, "exclusive_mode"),
        ({"url": "http://h:6379"}, {}, "url"),
        ({"hots": "h"}, {}, "hots"),
        ({"password": "secret"}, {}, "password"),
        ({}, {"REDIS_PASSWORD": "secret"}, r"password: .*\(from the environment: REDIS_PASSWORD\)"),
    ],
)
def test_bad_values_name_their_field(
    fields: dict[str, object], environ: dict[str, str], named: str
) -> None:
    """A bad value is a ValueError naming the field (or the variable it came from)."""
    with pytest.raises(ValueError, match=named):
        RedisSettings.from_config(fields, environ)


def test_json_round_trip() -> None:
    """``to_json`` and ``from_json`` hand settings to another process unchanged."""
    settings = RedisSettings(host="h", port=1, password="pw", namespace="deployment-a")
    assert RedisSettings.from_json(settings.to_json()) == settings
    with pytest.raises(ValueError, match="object"):
        RedisSettings.from_json("[]")


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (redis.exceptions.ConnectionError("refused"), QueueUnavailableError),
        (redis.exceptions.TimeoutError("slow"), QueueUnavailableError),
        (redis.exceptions.BusyLoadingError("loading"), QueueUnavailableError),
        (redis.exceptions.ReadOnlyError("replica"), QueueUnavailableError),
        (ConnectionResetError(), QueueUnavailableError),
        (redis.exceptions.ResponseError("NOGROUP"), QueueError),
    ],
)
def test_redis_errors_translate_into_the_queue_error_tree(
    error: Exception, expected: type[QueueError]
) -> None:
    """Every redis-py error maps into QueueError; other exceptions pass through."""
    assert type(translate_error(error)) is expected
    plain = ValueError("not Redis's")
    assert translate_error(plain) is plain
