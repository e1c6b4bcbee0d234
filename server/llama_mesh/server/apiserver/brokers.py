"""The broker of each deployment: chosen from its YAML when it is deployed, opened then,
closed when it is deleted or a reload moves it to another broker.

The server's own broker (its NATS, or the in-process broker) carries the server's own
topics (deployment progress) and every deployment that names no other broker; it is never
closed here. See :mod:`llama_mesh.server.queues.selection` for the choice itself.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from llama_mesh.server.deployment_config import DeploymentConfig
from llama_mesh.server.errors import FailedPreconditionError
from llama_mesh.server.queues.broker import Broker
from llama_mesh.server.queues.errors import QueueError
from llama_mesh.server.queues.selection import BrokerChoice, select_broker
from llama_mesh.server.queues.state import StateStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DeploymentBroker:
    """A deployment's broker: the choice (handed to worker processes) and the open broker
    (handed to in-process workers)."""

    choice: BrokerChoice
    broker: Broker


class DeploymentBrokers:
    """Opens, hands out and closes the brokers of the deployments this server runs.

    ``default`` is the broker of deployments that name none (or ``nats``/``simple``); the
    server's environment gives the ``RABBITMQ_*`` and ``REDIS_*`` fallbacks;
    ``availability(component, reason)`` hears when an external broker goes away
    (``reason``) and comes back (``None``), as the server's health does of NATS.
    """

    def __init__(
        self,
        own: Broker,
        state_store: StateStore,
        *,
        default: BrokerChoice | None = None,
        availability: Callable[[str, str | None], None] | None = None,
    ) -> None:
        self.own = own
        self._state_store = state_store
        self._default = default or BrokerChoice()
        self._availability = availability
        self._current: dict[str, DeploymentBroker] = {}

    def of(self, deployment: str) -> Broker:
        """The broker ``deployment`` runs on; the server's own for one that runs nowhere
        (yet): being deployed, failed, or unknown."""
        current = self._current.get(deployment)
        return self.own if current is None else current.broker

    def choice(self, deployment: str) -> BrokerChoice:
        """The broker choice of ``deployment`` (the default for one that runs nowhere)."""
        current = self._current.get(deployment)
        return self._default if current is None else current.choice

    async def open(self, config: DeploymentConfig) -> DeploymentBroker:
        """The broker ``config`` names, opened (the running one when it is the same).

        Raises:
            InvalidArgumentError: its ``message-queue`` settings are wrong.
            FailedPreconditionError: this server lacks the broker's extra, or the broker
                cannot be reached (the message names it, password hidden).
        """
        choice = select_broker(config.message_queue, os.environ, self._default)
        current = self._current.get(config.name)
        if current is not None and current.choice == choice:
            return current
        try:
            if choice.settings is None:
                broker = self.own
            else:
                broker = await choice.connect(state_store=self._state_store)
        except QueueError as exc:
            # Never a silent fallback to another broker: the deploy fails, naming this one.
            raise FailedPreconditionError(
                f"cannot connect to the deployment's broker, {choice.describe()}: {exc}",
                reason="DEPLOY_FAILED",
            ) from exc
        if broker is not self.own:
            logger.info("deployment %s runs on %s", config.name, choice.describe())
            self._watch(config.name, choice, broker)
        return DeploymentBroker(choice, broker)

    def install(self, deployment: str, opened: DeploymentBroker) -> DeploymentBroker | None:
        """Make ``opened`` the broker of ``deployment``; the one it replaces, which the
        caller closes with :meth:`discard` once nothing uses it any more."""
        previous = self._current.get(deployment)
        self._current[deployment] = opened
        return previous

    async def discard(self, deployment: str, opened: DeploymentBroker | None) -> None:
        """Close ``opened`` unless it is the one ``deployment`` runs on: a reload's that
        failed, or the one a reload replaced."""
        current = self._current.get(deployment)
        if opened is not None and (current is None or current.broker is not opened.broker):
            await self._close(deployment, opened)

    async def close(self, deployment: str) -> None:
        """Close the broker of ``deployment`` (deleted, or failed) and forget it."""
        current = self._current.pop(deployment, None)
        if current is not None:
            await self._close(deployment, current)

    async def close_all(self) -> None:
        """Close every deployment's broker (the server stops)."""
        for deployment in list(self._current):
            await self.close(deployment)

    async def _close(self, deployment: str, opened: DeploymentBroker) -> None:
        if opened.broker is self.own:
            return
        try:
            await opened.broker.close()
        except Exception as exc:
            logger.warning("closing the broker of %s failed: %r", deployment, exc)
        if self._availability is not None:
            self._availability(_component(deployment), None)

    def _watch(self, deployment: str, choice: BrokerChoice, broker: Broker) -> None:
        listener = self._availability
        if listener is None:
            return
        component = _component(deployment)

        def changed(reason: str | None) -> None:
            current = self._current.get(deployment)
            if current is None or current.broker is not broker:
                return  # not (or no longer) the deployment's broker
            listener(component, None if reason is None else f"{choice.describe()}: {reason}")

        broker.on_availability(changed)


def _component(deployment: str) -> str:
    """The health component of a deployment's broker."""
    return f"broker:{deployment}"
