"""The RabbitMQ broker's error-translation seam: a lost connection is unavailability, whichever
aio-pika/aiormq exception says so. Needs the ``rabbitmq`` extra; no server."""

from __future__ import annotations

import aiormq.exceptions
import pytest
from pamqp import commands

from llama_mesh.server.queues.errors import QueueError, QueueUnavailableError
from llama_mesh.server.queues.rabbitmq import _not_stored, translate_error

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


def test_a_nacked_or_returned_publish_is_tried_again() -> None:
    """A publish RabbitMQ nacked (nothing stored: a quorum queue without its leader yet, seen
    just after a restart) is published again; an operation cut off by a lost connection
    (anything may have been stored) is not."""
    nacked = aiormq.exceptions.DeliveryError(None, commands.Basic.Nack(delivery_tag=1))
    translated = translate_error(nacked)
    assert isinstance(translated, QueueUnavailableError)
    translated.__cause__ = nacked
    assert _not_stored(translated)
    cut_off = translate_error(Exception())
    assert isinstance(cut_off, QueueError)
    cut_off.__cause__ = Exception()
    assert not _not_stored(cut_off)
