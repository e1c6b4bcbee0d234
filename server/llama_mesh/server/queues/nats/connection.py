"""Reaching NATS: the login, the connection both roles share, and its availability.

:func:`connect_nats` opens a :class:`NatsConnection`; the broker
(:meth:`NatsBroker.open <llama_mesh.server.queues.nats.broker.NatsBroker.open>`) and the
state store (:class:`~llama_mesh.server.queues.nats.state.NatsStateStore`) are opened on it,
one connection backing both (the server's own) or either alone (a worker's control plane).
The connection closes with the last role opened on it, or with :meth:`NatsConnection.close`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import ssl
import urllib.parse
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Final

import nats.errors
from nats.aio.client import Client as NATS

from llama_mesh.server.aio import cancel_and_wait
from llama_mesh.server.queues.errors import MessageTooLargeError, QueueUnavailableError
from llama_mesh.server.queues.nats.feeds import NatsRole

logger = logging.getLogger(__name__)

REQUEST_TIMEOUT: Final = 5.0
"""How long one JetStream API request waits for its answer."""
_DRAIN_TIMEOUT: Final = 5.0
_HEADER_ROOM: Final = 1024
"""Bytes of a message's ``max_payload`` left for its headers (message id, expected
revision): NATS counts them too."""

TOKEN_RE: Final = re.compile(r"^[A-Za-z0-9_-]+$")
"""One name token: a prefix, a bucket."""


class NatsConnection:
    """One NATS connection and the roles opened on it. Create it with :func:`connect_nats`.

    ``prefix`` names everything this mesh keeps on the server (streams, buckets), and
    ``replicas`` is how many cluster nodes hold each stream and bucket it creates.
    """

    def __init__(self, nc: NATS, *, prefix: str = "mesh", replicas: int = 1) -> None:
        if not TOKEN_RE.match(prefix):
            raise ValueError(f"invalid prefix {prefix!r}: one token of [A-Za-z0-9_-]")
        self.nc = nc
        self.js = nc.jetstream(timeout=REQUEST_TIMEOUT)
        self.prefix = prefix
        self.replicas = replicas
        self.closed = False
        self._roles: list[NatsRole] = []
        self._availability: list[Callable[[str | None], None]] = []

    def attach(self, role: NatsRole) -> None:
        """Track a role opened on this connection."""
        if self.closed:
            raise QueueUnavailableError("the NATS connection is closed")
        self._roles.append(role)

    async def detach(self, role: NatsRole) -> None:
        """A role closed: close the connection when it was the last one."""
        if role in self._roles:
            self._roles.remove(role)
        if not self._roles:
            await self.close()

    def check_size(self, data: bytes, what: str) -> None:
        """Refuse ``data`` larger than NATS takes in one message (the server's
        ``max_payload``, less room for headers) with an error naming both sizes; NATS itself
        would refuse it with no sizes, or close the connection."""
        limit = self.nc.max_payload - _HEADER_ROOM
        if len(data) > limit:
            raise MessageTooLargeError(what, len(data), limit)

    def on_availability(self, listener: Callable[[str | None], None]) -> None:
        """Call ``listener(reason)`` when the connection is lost, ``listener(None)`` when it
        is back."""
        self._availability.append(listener)

    def on_disconnected(self) -> None:
        """Called by the connection when it is lost (it then reconnects by itself)."""
        for listener in self._availability:
            listener("the connection to NATS is lost; reconnecting")

    def on_reconnected(self) -> None:
        """Called by the connection after a reconnect: let every role recover at once."""
        for role in list(self._roles):
            role.on_reconnected()
        for listener in self._availability:
            listener(None)

    async def close(self) -> None:
        """Close every role and disconnect; idempotent."""
        if self.closed:
            return
        self.closed = True
        for role in list(self._roles):
            await role.close()
        self._roles.clear()
        nc = self.nc
        if nc.is_connected:
            try:
                await asyncio.wait_for(nc.drain(), _DRAIN_TIMEOUT)
            except Exception as exc:
                logger.debug("draining the NATS connection failed: %r", exc)
        elif not nc.is_closed:
            # nats-py flushes commands buffered while disconnected into the dead socket on
            # close, and skips the rest of its cleanup when that fails: drop them first.
            nc._pending.clear()
            nc._pending_data_size = 0
        if not nc.is_closed:
            try:
                await nc.close()
            except Exception as exc:
                logger.debug("closing the NATS connection failed: %r", exc)


async def _unless(stop: asyncio.Event, work: Coroutine[Any, Any, None]) -> None:
    """Await ``work``, unless ``stop`` is set first: then cancel it and raise
    ``TimeoutError`` (what giving up on a connection looks like)."""
    working = asyncio.ensure_future(work)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({working, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        if not working.done():
            await cancel_and_wait(working)
    if not working.cancelled():
        working.result()
        return
    raise TimeoutError


NATS_URL_VARIABLE: Final = "LLAMA_MESH_NATS_URL"
"""The environment variable that gives a worker process the NATS URL(s)."""


@dataclass(frozen=True, slots=True)
class NatsLogin:
    """How to reach NATS besides its URL: a user credentials file (JWT and seed), the CA
    to trust for TLS, and a client certificate for a server that requires one (mTLS).

    A user and password go in the URL itself (``nats://user:password@host:port``).
    """

    creds: Path | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError(
                "nats_tls_cert, nats_tls_key (--nats-tls-cert, --nats-tls-key): set both or neither"
            )

    VARIABLES: ClassVar[dict[str, str]] = {
        "creds": "LLAMA_MESH_NATS_CREDS",
        "tls_ca": "LLAMA_MESH_NATS_TLS_CA",
        "tls_cert": "LLAMA_MESH_NATS_TLS_CERT",
        "tls_key": "LLAMA_MESH_NATS_TLS_KEY",
    }
    """The environment variable of each field: read by ``serve`` and the worker command,
    set for the worker processes a server starts."""

    @classmethod
    def setting(cls, name: str) -> str | None:
        """The value of field ``name``'s variable; an empty one counts as unset."""
        return os.environ.get(cls.VARIABLES[name]) or None

    _OPTION_HELP: ClassVar[dict[str, str]] = {
        "creds": "user credentials file (JWT and seed)",
        "tls_ca": "CA to trust for TLS",
        "tls_cert": "client certificate, for a NATS that requires one (mTLS)",
        "tls_key": "client certificate's key",
    }

    @classmethod
    def add_options(cls, parser: argparse.ArgumentParser) -> None:
        """``--nats-creds`` and ``--nats-tls-*`` (defaults from :attr:`VARIABLES`), for
        :meth:`from_options`."""
        for name, what in cls._OPTION_HELP.items():
            parser.add_argument(
                f"--nats-{name.replace('_', '-')}",
                type=Path,
                default=cls.setting(name),
                help=f"NATS {what} (default: ${cls.VARIABLES[name]})",
            )

    @classmethod
    def from_options(cls, args: argparse.Namespace) -> NatsLogin:
        """The login :meth:`add_options` parsed."""
        return cls(args.nats_creds, args.nats_tls_ca, args.nats_tls_cert, args.nats_tls_key)

    def environment(self) -> dict[str, str]:
        """The variables that hand this login to a worker process."""
        return {
            variable: str(getattr(self, name))
            for name, variable in self.VARIABLES.items()
            if getattr(self, name) is not None
        }

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> NatsLogin:
        """The login :meth:`environment` described."""
        values = {name: environ.get(variable) for name, variable in cls.VARIABLES.items()}
        return cls(**{name: Path(v) for name, v in values.items() if v})

    def tls_context(self) -> ssl.SSLContext | None:
        """The TLS settings for the connection, or ``None`` to leave them to the URL."""
        if self.tls_ca is None and self.tls_cert is None:
            return None
        context = ssl.create_default_context(cafile=str(self.tls_ca) if self.tls_ca else None)
        if self.tls_cert is not None and self.tls_key is not None:
            context.load_cert_chain(self.tls_cert, self.tls_key)
        return context


def redact_url(urls: str) -> str:
    """``urls`` (comma-separated) with any password replaced by ``***``, for logs."""

    def redact(url: str) -> str:
        parts = urllib.parse.urlsplit(url)
        if parts.password is None:
            return url
        netloc = f"{parts.username}:***@{parts.hostname}"
        if parts.port is not None:
            netloc += f":{parts.port}"
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))

    return ",".join(redact(url) for url in urls.split(","))


async def connect_nats(
    servers: str | list[str],
    *,
    name: str = "llama-mesh",
    login: NatsLogin | None = None,
    token: str | None = None,
    replicas: int = 1,
    prefix: str = "mesh",
    connect_timeout: float = 10.0,
) -> NatsConnection:
    """Connect to NATS; a :class:`NatsConnection` to open the broker and the state store on.

    The connection reconnects forever once established (a restarted server is picked up);
    the first connection must succeed within ``connect_timeout`` seconds, else
    :class:`QueueUnavailableError`.
    """

    errors: list[Exception] = []
    refused = asyncio.Event()

    async def on_error(exc: Exception) -> None:
        logger.warning("NATS connection error: %r", exc)
        if connection is None:
            errors.append(exc)
            if "authorization violation" in str(exc).lower():
                refused.set()  # trying again with the same login cannot help

    async def on_disconnected() -> None:
        if connection is not None and connection.closed:
            logger.debug("disconnected from NATS (closing)")
        else:
            logger.warning("disconnected from NATS; reconnecting")
            if connection is not None:
                connection.on_disconnected()

    async def on_reconnected() -> None:
        url = nc.connected_url
        logger.info("reconnected to NATS at %s", redact_url(url.geturl()) if url else "?")
        if connection is not None:
            connection.on_reconnected()

    connection: NatsConnection | None = None
    nc = NATS()
    try:
        async with asyncio.timeout(connect_timeout):
            await _unless(
                refused,
                nc.connect(
                    servers,
                    name=name,
                    user_credentials=str(login.creds) if login and login.creds else None,
                    tls=login.tls_context() if login else None,
                    token=token,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=1,
                    connect_timeout=2,
                    error_cb=on_error,
                    disconnected_cb=on_disconnected,
                    reconnected_cb=on_reconnected,
                ),
            )
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        with contextlib.suppress(Exception):
            await nc.close()
        where = redact_url(servers if isinstance(servers, str) else ",".join(servers))
        cause = f"{errors[-1]!r}" if errors else repr(exc)
        if refused.is_set():
            cause = f"NATS refused the login (check the user, password or credentials): {cause}"
        raise QueueUnavailableError(f"cannot connect to NATS at {where}: {cause}") from exc
    connection = NatsConnection(nc, prefix=prefix, replicas=replicas)
    return connection
