"""Which broker a deployment runs on, and opening it.

A deployment's YAML names its broker in ``message-queue`` (Llama Deploy 0.8's section):

* no section, ``nats`` or ``simple``: the default broker: the server's own (its NATS, or the
  in-process broker with ``--queue inprocess``), or the one ``serve --broker URL`` (env
  :data:`BROKER_URL_VARIABLE`) names;
* ``rabbitmq`` / ``redis``: that broker, from the section's fields with 0.8's environment
  fallbacks (``RABBITMQ_*``, ``REDIS_*``);
* ``aws``, ``kafka``, ``solace``: accepted with a warning, on the server's own broker
  (whatever the default).

Each external broker kind is one entry of :data:`_KINDS`; its module is imported only when a
deployment asks for it, so a server without the extra runs every other deployment and fails
that one with a message naming the ``pip install`` that helps.

The server hands a worker process its deployment's choice through the environment
(:data:`BROKER_VARIABLE`, credentials included, like the NATS URL); ``llamactl worker`` on
another host makes the same choice from the deployment's stored YAML and its own
environment, or takes ``--broker URL``.
"""

from __future__ import annotations

import importlib
import json
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Final, Protocol

from llama_mesh.server.deployment_config import MessageQueueConfig
from llama_mesh.server.errors import FailedPreconditionError, InvalidArgumentError
from llama_mesh.server.queues.broker import Broker
from llama_mesh.server.queues.state import StateStore

BROKER_VARIABLE: Final = "LLAMA_MESH_BROKER"
"""The environment variable that gives a worker process its deployment's broker
(:meth:`BrokerChoice.to_json`)."""
BROKER_URL_VARIABLE: Final = "LLAMA_MESH_BROKER_URL"
"""The environment variable of ``--broker``: the default broker's URL."""
OWN: Final = "own"
"""The kind of the server's own broker."""
DEDUP_TTL: Final = 120.0
"""Seconds a broker that cannot deduplicate by itself remembers a message id (NATS's
duplicate window)."""

_OWN_TYPES: Final = frozenset({"nats", "simple"})
"""``message-queue`` types that run on the default broker."""


class BrokerSettings(Protocol):
    """What selection needs of an external broker's settings class."""

    @property
    def redacted_url(self) -> str: ...

    def to_json(self) -> str: ...


async def _connect_rabbitmq(module: ModuleType, settings: Any, state_store: StateStore) -> Broker:
    # RabbitMQ does not deduplicate by message id: a state-store bucket remembers them.
    dedup = await state_store.kv("rabbitmq_dedup", ttl=DEDUP_TTL)
    broker: Broker = await module.connect_rabbitmq(settings, dedup=dedup)
    return broker


async def _connect_redis(module: ModuleType, settings: Any, state_store: StateStore) -> Broker:
    del state_store
    broker: Broker = await module.connect_redis(settings)
    return broker


@dataclass(frozen=True, slots=True)
class _Kind:
    """One external broker kind: where its code lives and how to open it."""

    name: str
    """The ``message-queue`` type, the pip extra and the kind of a :class:`BrokerChoice`."""
    module: str
    settings_class: str
    schemes: tuple[str, ...]
    """URL schemes ``--broker`` takes for it."""
    connect: Callable[[ModuleType, Any, StateStore], Awaitable[Broker]]

    def load(self) -> ModuleType:
        """Its module; a clear error when the extra is not installed."""
        try:
            return importlib.import_module(self.module)
        except ImportError as exc:
            raise FailedPreconditionError(
                f"this server cannot run {self.name} brokers: install them with "
                f"pip install 'llama-mesh[{self.name}]' ({exc})"
            ) from exc

    def settings_from_config(self, fields: Mapping[str, object], environ: Mapping[str, str]) -> Any:
        settings_class = getattr(self.load(), self.settings_class)
        try:
            return settings_class.from_config(fields, environ)
        except ValueError as exc:
            raise InvalidArgumentError(
                f"message-queue ({self.name}): {exc}", reason="INVALID_DEPLOYMENT"
            ) from exc

    def settings_from_json(self, text: str) -> Any:
        return getattr(self.load(), self.settings_class).from_json(text)


_KINDS: Final = {
    kind.name: kind
    for kind in (
        _Kind(
            "rabbitmq",
            "llama_mesh.server.queues.rabbitmq",
            "RabbitMqSettings",
            ("amqp", "amqps"),
            _connect_rabbitmq,
        ),
        _Kind(
            "redis",
            "llama_mesh.server.queues.redis",
            "RedisSettings",
            ("redis", "rediss"),
            _connect_redis,
        ),
    )
}


@dataclass(frozen=True, slots=True)
class BrokerChoice:
    """The broker a deployment runs on: the server's own (``kind == OWN``), or an external
    one with its settings (credentials included: never log it, log :attr:`redacted_url`)."""

    kind: str = OWN
    settings: BrokerSettings | None = None

    @property
    def redacted_url(self) -> str:
        """Where the broker is, password hidden; ``""`` for the server's own."""
        return "" if self.settings is None else self.settings.redacted_url

    def describe(self) -> str:
        """The broker in a message: ``rabbitmq at amqp://user:***@host/``."""
        if self.settings is None:
            return "the server's own broker"
        return f"{self.kind} at {self.redacted_url}"

    def to_json(self) -> str:
        """This choice for a worker process (:data:`BROKER_VARIABLE`)."""
        settings = None if self.settings is None else self.settings.to_json()
        return json.dumps({"kind": self.kind, "settings": settings})

    @classmethod
    def from_json(cls, text: str) -> BrokerChoice:
        """The choice :meth:`to_json` described."""
        try:
            data = json.loads(text)
            kind, settings = data["kind"], data["settings"]
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"${BROKER_VARIABLE} is not a broker choice: {exc!r}") from exc
        if kind == OWN:
            return cls()
        if kind not in _KINDS:
            raise ValueError(f"${BROKER_VARIABLE} names an unknown broker kind {kind!r}")
        return cls(kind, _KINDS[kind].settings_from_json(settings))

    @classmethod
    def from_url(cls, url: str, environ: Mapping[str, str]) -> BrokerChoice:
        """The broker at ``url`` (``serve --broker``): its scheme says which kind."""
        scheme = urllib.parse.urlsplit(url).scheme
        for kind in _KINDS.values():
            if scheme in kind.schemes:
                return cls(kind.name, kind.settings_from_config({"url": url}, environ))
        schemes = ", ".join(f"{s}://" for k in _KINDS.values() for s in k.schemes)
        raise InvalidArgumentError(f"--broker: {scheme or url!r} is not a broker URL ({schemes})")

    async def connect(self, *, state_store: StateStore) -> Broker:
        """Open the external broker; :class:`QueueError` when it cannot be reached.
        (The server's own is open already: ask only when :attr:`settings` is set.)"""
        if self.settings is None:
            raise ValueError("the server's own broker is not opened here")
        kind = _KINDS[self.kind]
        return await kind.connect(kind.load(), self.settings, state_store)


def select_broker(
    config: MessageQueueConfig | None, environ: Mapping[str, str], default: BrokerChoice
) -> BrokerChoice:
    """The broker of a deployment whose ``message-queue`` section is ``config``: ``default``
    for none, ``nats`` or ``simple``; the server's own for the types llama-mesh does not run
    (the parser warned); else the one it names, its settings from the section's fields and
    ``environ``."""
    if config is None or config.type in _OWN_TYPES:
        return default
    kind = _KINDS.get(config.type)
    if kind is None:
        return BrokerChoice()
    return BrokerChoice(kind.name, kind.settings_from_config(config.fields, environ))
