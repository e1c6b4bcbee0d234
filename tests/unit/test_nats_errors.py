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
