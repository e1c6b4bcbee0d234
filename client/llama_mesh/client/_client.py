"""``AsyncClient``: the asynchronous SDK of the llama-mesh ``ApiServer``.

::

    async with AsyncClient("127.0.0.1:4501", api_key="...") as client:
        print(await client.run("quickstart", message="hi"))
        task = await client.tasks.create("quickstart", {"message": "hi"})
        async for event in client.tasks.events("quickstart", task.task_id):
            print(event.index, event.type, event.data)
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import Any, Self

from llama_mesh.client._config import ConnectionSettings, resolve_settings
from llama_mesh.client._models import ServerStatus, Task
from llama_mesh.client._resources import Deployments, Services, Sessions, Tasks, result_of
from llama_mesh.client._transport import Transport
from llama_mesh.v1 import apiserver_pb2


class AsyncClient:
    """A connection to a llama-mesh server; an async context manager.

    Args:
        address: ``host:port`` or an ``http(s)://`` URL; else ``LLAMA_MESH_ADDRESS``, the
            llamactl profile's ``server``, or ``127.0.0.1:4501``.
        api_key: sent as ``authorization: Bearer <key>``; else ``LLAMA_MESH_API_KEY``.
        tls: use TLS; ``None`` decides from the address (``https://``), a CA file and a
            client certificate.
        root_certificates: PEM bytes of the CA to trust (else the system's).
        tls_ca: the CA to trust as a PEM file, instead of ``root_certificates``; else
            ``LLAMA_MESH_TLS_CA``, else the profile's ``tls_ca``.
        tls_cert: a PEM client certificate to present (for a server requiring mTLS), with
            ``tls_key``, its PEM private key (both or neither); else ``LLAMA_MESH_TLS_CERT``
            and ``LLAMA_MESH_TLS_KEY``, else the profile's ``tls_cert`` and ``tls_key``.
        tls_key: see ``tls_cert``.
        timeout: seconds allowed to every unary call (streams have none); else the
            profile's timeout, else unlimited.
        profile: the llamactl profile to read (else the file's current profile).
        config_path: the llamactl profile file (else ``~/.config/llamactl/config.yaml``).
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        api_key: str | None = None,
        tls: bool | None = None,
        root_certificates: bytes | None = None,
        tls_ca: str | Path | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        timeout: float | None = None,
        profile: str | None = None,
        config_path: Path | None = None,
    ) -> None:
        settings = resolve_settings(
            address,
            api_key=api_key,
            tls=tls,
            root_certificates=root_certificates,
            tls_ca=tls_ca,
            tls_cert=tls_cert,
            tls_key=tls_key,
            timeout=timeout,
            profile=profile,
            config_path=config_path,
        )
        self._transport = Transport(settings)
        self.deployments = Deployments(self._transport)
        """Create, inspect, reload and delete deployments."""
        self.services = Services(self._transport)
        """The workflow services of a deployment."""
        self.tasks = Tasks(self._transport)
        """Create, inspect, cancel and follow tasks."""
        self.sessions = Sessions(self._transport)
        """Create, list, inspect and delete sessions."""

    @classmethod
    async def connect(cls, address: str | None = None, **options: Any) -> AsyncClient:
        """A client whose server answered ``status()`` (so address and API key work)."""
        client = cls(address, **options)
        try:
            await client.status()
        except BaseException:
            await client.close()
            raise
        return client

    @property
    def settings(self) -> ConnectionSettings:
        """Where and how this client connects."""
        return self._transport.settings

    async def status(self) -> ServerStatus:
        """The server's health, version and deployments."""
        response = await self._transport.unary("GetStatus", apiserver_pb2.GetStatusRequest())
        return ServerStatus._from_proto(response)

    async def wait_ready(self, timeout: float) -> ServerStatus:
        """``status()`` once the server accepts connections, waiting up to ``timeout`` seconds.

        The call waits for the channel to connect instead of failing fast, so a server that
        is still starting is waited for; :class:`DeadlineExceededError` when it takes longer.
        """
        response = await self._transport.unary(
            "GetStatus", apiserver_pb2.GetStatusRequest(), timeout=timeout, wait_for_ready=True
        )
        return ServerStatus._from_proto(response)

    async def run(
        self,
        deployment: str,
        *,
        service: str | None = None,
        session: str | None = None,
        **input: Any,
    ) -> Any:
        """Run a task with ``input`` as keyword arguments and return its result.

        Raises :class:`TaskFailedError` (with the task) when the workflow failed or the task
        was cancelled.
        """
        return result_of(await self.run_task(deployment, input, service=service, session=session))

    async def run_task(
        self,
        deployment: str,
        input: dict[str, Any] | None = None,
        *,
        service: str | None = None,
        session: str | None = None,
    ) -> Task:
        """Run a task and return it once finished, whatever its outcome (no exception)."""
        request = apiserver_pb2.RunTaskRequest(
            deployment=deployment, service_id=service or "", session_id=session or ""
        )
        if input:
            request.input.update(input)
        response = await self._transport.unary("RunTask", request)
        return Task._from_proto(response.task)

    async def close(self) -> None:
        """Close the connection (idempotent)."""
        await self._transport.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
