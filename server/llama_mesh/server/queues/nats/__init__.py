"""NATS JetStream: the server's own broker and its default state store.

One :class:`NatsConnection` (from :func:`connect_nats`) backs either role or both:

* :mod:`.connection`: reaching NATS (:func:`connect_nats`, :class:`NatsLogin`, the worker's
  :data:`NATS_URL_VARIABLE`, :func:`redact_url`) and the connection's availability;
* :mod:`.errors`: the one error seam (:func:`translate_error`) and retrying through a
  failover;
* :mod:`.feeds`: the iterator machinery shared by both roles;
* :mod:`.broker`: :class:`NatsBroker` (work queues, topics, their streams);
* :mod:`.state`: :class:`NatsStateStore` (key-value buckets and watches).
"""

from llama_mesh.server.queues.nats.broker import NatsBroker
from llama_mesh.server.queues.nats.connection import (
    NATS_URL_VARIABLE,
    NatsConnection,
    NatsLogin,
    connect_nats,
    redact_url,
)
from llama_mesh.server.queues.nats.errors import translate_error
from llama_mesh.server.queues.nats.state import NatsKeyValueStore, NatsStateStore

__all__ = [
    "NATS_URL_VARIABLE",
    "NatsBroker",
    "NatsConnection",
    "NatsKeyValueStore",
    "NatsLogin",
    "NatsStateStore",
    "connect_nats",
    "redact_url",
    "translate_error",
]
