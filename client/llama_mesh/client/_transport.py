"""The gRPC channel of a client, and the seam where gRPC errors become :class:`ApiError`.

Every RPC of the SDK goes through :meth:`Transport.unary` or :meth:`Transport.stream`: they
add the bearer token, apply the timeout to unary calls, and translate ``AioRpcError`` with
:func:`~llama_mesh.client._exceptions._map_rpc_error` (nowhere else catches gRPC errors).
The channel is opened on first use, so a client can be built outside a running event loop.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import grpc

from llama_mesh.client._config import ConnectionSettings
from llama_mesh.client._exceptions import _map_rpc_error
from llama_mesh.v1 import apiserver_pb2_grpc

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
_CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Reconnect quickly after a server restart (the default backoff grows to two minutes).
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
)

_UNSET: Any = object()


class Transport:
    """One channel to the ``ApiServer`` service; closed by :meth:`close`."""

    def __init__(self, settings: ConnectionSettings) -> None:
        self.settings = settings
        self._channel: grpc.aio.Channel | None = None
        self._stub: Any = None
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {settings.api_key}"),) if settings.api_key else ()
        )

    def _get_stub(self) -> Any:
        if self._stub is None:
            s = self.settings
            if s.tls:
                credentials = grpc.ssl_channel_credentials(
                    root_certificates=s.root_certificates,
                    private_key=s.private_key,
                    certificate_chain=s.certificate_chain,
                )
                channel = grpc.aio.secure_channel(s.target, credentials, options=_CHANNEL_OPTIONS)
            else:
                channel = grpc.aio.insecure_channel(s.target, options=_CHANNEL_OPTIONS)
            self._channel = channel
            self._stub = apiserver_pb2_grpc.ApiServerStub(channel)
        return self._stub

    async def unary(
        self,
        method: str,
        request: Any,
        *,
        timeout: float | None = _UNSET,
        wait_for_ready: bool = False,
    ) -> Any:
        """Call a unary ``ApiServer`` method; ``timeout`` defaults to the settings' one."""
        call = getattr(self._get_stub(), method)
        try:
            return await call(
                request,
                metadata=self._metadata,
                timeout=self.settings.timeout if timeout is _UNSET else timeout,
                wait_for_ready=wait_for_ready,
            )
        except grpc.aio.AioRpcError as exc:
            raise _map_rpc_error(exc) from exc

    async def stream(self, method: str, request: Any) -> AsyncGenerator[Any, None]:
        """The responses of a server-streaming ``ApiServer`` method (no deadline)."""
        call = getattr(self._get_stub(), method)(request, metadata=self._metadata)
        try:
            async for response in call:
                yield response
        except grpc.aio.AioRpcError as exc:
            raise _map_rpc_error(exc) from exc
        finally:
            call.cancel()

    async def close(self) -> None:
        """Close the channel (idempotent); calls in flight are cancelled."""
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            await channel.close()
