"""The RabbitMQ broker's error-translation seam: a lost connection is unavailability, whichever
aio-pika/aiormq exception says so. Needs the ``rabbitmq`` extra; no server."""

from __future__ import annotations

import aiormq.exceptions
import pytest

from llama_mesh.server.queues.errors import QueueError, QueueUnavailableError
from llama_mesh.server.queues.rabbitmq import translate_error

CONNECTION = '<Connection: "amqp://mesh:******@127.0.0.1:5672/" at 0x7f00>'


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        # aiormq's Connection.channel() on a connection lost meanwhile (a broker restart):
        (RuntimeError(f"{CONNECTION} closed"), QueueUnavailableError),
        (RuntimeError(f"{CONNECTION} connection closed"), QueueUnavailableError),
        # aiormq's rejection of an RPC still waiting when its channel closed without a reason:
        (Exception(), QueueUnavailableError),
        (aiormq.exceptions.ChannelInvalidStateError("closed"), QueueUnavailableError),
        (aiormq.exceptions.ConnectionClosed(320, "CONNECTION_FORCED"), QueueUnavailableError),
    ],
)
def test_rabbitmq_errors_translate_into_the_queue_error_tree(
    error: Exception, expected: type[QueueError]
) -> None:
    """A lost connection or channel is QueueUnavailableError (a worker gives its task back);
    a RuntimeError that is not about a closed connection is left as it is."""
    assert type(translate_error(error)) is expected
    assert type(translate_error(RuntimeError("the workflow's own"))) is RuntimeError
    assert type(translate_error(Exception("the workflow's own"))) is Exception
