"""The NATS adapter's one error-translation seam: every nats-py error becomes a QueueError."""

from __future__ import annotations

import nats.errors
import nats.js.errors
import pytest

from llama_mesh.server.queues.errors import (
    KeyExistsError,
    QueueError,
    QueueUnavailableError,
    RevisionMismatchError,
)
from llama_mesh.server.queues.nats import translate_error


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (nats.js.errors.KeyWrongLastSequenceError(), RevisionMismatchError),
        (nats.js.errors.APIError(code=400, err_code=10071), RevisionMismatchError),
        (nats.errors.ConnectionClosedError(), QueueUnavailableError),
        (nats.errors.NoServersError(), QueueUnavailableError),
        (nats.errors.TimeoutError(), QueueUnavailableError),
        (nats.errors.NoRespondersError(), QueueUnavailableError),
        (nats.js.errors.ServiceUnavailableError(), QueueUnavailableError),
        (ConnectionRefusedError(), QueueUnavailableError),
        (nats.js.errors.BadRequestError(), QueueError),
        (nats.errors.MaxPayloadError(), QueueError),
    ],
)
def test_nats_errors_translate_into_the_queue_error_tree(
    error: Exception, expected: type[QueueError]
) -> None:
    """Every nats-py error maps into QueueError; revision conflicts honour ``conflict``."""
    translated = translate_error(error)
    assert type(translated) is expected
    if expected is RevisionMismatchError:
        assert type(translate_error(error, conflict=KeyExistsError)) is KeyExistsError
    assert translate_error(ValueError("mine")).__class__ is ValueError


def test_a_full_store_is_named_and_unavailable() -> None:
    """JetStream refusing a write for want of space says so (a repr of nats-py's error says
    nothing), and is unavailable: the same write may succeed once space is freed."""
    full = nats.js.errors.ServiceUnavailableError(
        code=503, err_code=10023, description="insufficient resources"
    )
    translated = translate_error(full)
    assert type(translated) is QueueUnavailableError
    assert "out of storage (insufficient resources, error 10023)" in str(translated)
    assert "max_file_store" in str(translated)


def test_jetstream_errors_carry_their_description() -> None:
    """Any other JetStream API error keeps the server's description and error code."""
    offline = nats.js.errors.ServiceUnavailableError(
        code=503, err_code=10118, description="stream is offline"
    )
    assert str(translate_error(offline)) == "NATS is unavailable: stream is offline (error 10118)"
    bad = nats.js.errors.BadRequestError(code=400, err_code=10058, description="stream name in use")
    assert type(translate_error(bad)) is QueueError
    assert str(translate_error(bad)) == "NATS error: stream name in use (error 10058)"
