"""What every ``llamactl`` command shares: the global options, and running one SDK call.

:func:`call` runs a coroutine with a connected :class:`AsyncClient` and turns SDK errors into
exit statuses: 1 for API and configuration errors (``Error: <message>`` on stderr), 3 when a
task failed or was cancelled, 130 on Ctrl-C. Usage errors (2) are click's own.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import click

from llama_mesh.client._cli_output import FORMATS, Format, note
from llama_mesh.client._client import AsyncClient
from llama_mesh.client._config import ConfigFile
from llama_mesh.client._exceptions import LlamaMeshError, TaskFailedError, UnavailableError

T = TypeVar("T")

EXIT_API_ERROR = 1
EXIT_USAGE = 2
EXIT_TASK_FAILED = 3
EXIT_INTERRUPTED = 130


class CliError(click.ClickException):
    """An API or configuration error: ``Error: <message>`` on stderr, exit status 1."""

    exit_code = EXIT_API_ERROR


class TaskFailedExit(CliError):
    """A task failed or was cancelled: exit status 3."""

    exit_code = EXIT_TASK_FAILED


@dataclass(frozen=True, slots=True)
class State:
    """The global options of ``llamactl`` (``ctx.obj`` of every command)."""

    config_path: Path | None = None
    profile: str | None = None
    server: str | None = None
    insecure: bool = False
    timeout: float | None = None
    api_key: str | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    output: Format | None = None

    @property
    def fmt(self) -> Format:
        """The output format: ``-o``, else a table on a terminal and JSON otherwise."""
        if self.output is not None:
            return self.output
        return "table" if sys.stdout.isatty() else "json"

    def client(self) -> AsyncClient:
        """A client configured by the options, the environment and the profile file."""
        client = AsyncClient(
            self.server,
            api_key=self.api_key,
            tls_ca=self.tls_ca,
            tls_cert=self.tls_cert,
            tls_key=self.tls_key,
            timeout=self.timeout,
            profile=self.profile,
            config_path=self.config_path,
        )
        insecure = self.insecure or self._profile_insecure()
        if insecure and client.settings.tls:
            note(
                "warning: --insecure cannot disable certificate checks for gRPC; "
                "trust the server's CA with --tls-ca (or LLAMA_MESH_TLS_CA) instead"
            )
        return client

    def _profile_insecure(self) -> bool:
        try:
            config = ConfigFile.load(self.config_path)
            return config.profile(self.profile).insecure
        except LlamaMeshError:
            return False

    def config_file(self) -> ConfigFile:
        """The llamactl profile file (defaults when it does not exist yet)."""
        try:
            return ConfigFile.load(self.config_path)
        except LlamaMeshError as exc:
            raise CliError(str(exc)) from exc


def call(state: State, action: Callable[[AsyncClient], Awaitable[T]]) -> T:
    """Run ``action`` with a client for ``state``; SDK errors become exit statuses."""

    target: list[str] = []

    async def run() -> T:
        async with state.client() as client:
            target.append(client.settings.target)
            return await action(client)

    try:
        return asyncio.run(run())
    except TaskFailedError as exc:
        raise TaskFailedExit(str(exc)) from exc
    except UnavailableError as exc:
        if exc.domain:  # the server itself said so (e.g. its message queue is down)
            raise CliError(str(exc)) from exc
        raise CliError(f"cannot reach the server at {target[0]}: {exc.message}") from exc
    except LlamaMeshError as exc:
        raise CliError(str(exc)) from exc
    except KeyboardInterrupt:
        note("Interrupted.")
        raise click.exceptions.Exit(EXIT_INTERRUPTED) from None


def _set_output(ctx: click.Context, param: click.Parameter, value: Format | None) -> None:
    if value is not None:
        ctx.obj = replace(pass_state(ctx), output=value)


def add_output_option(command: click.Command, *, skip: tuple[click.Command, ...] = ()) -> None:
    """Give every command below ``command`` its own ``-o/--output``, so that the output
    format may come after the command too (``llamactl deployments list -o json``); given
    in both places, the one after the command wins. ``skip``: commands that parse their
    own arguments."""
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            add_output_option(sub, skip=skip)
        return
    if command in skip or any(p.name == "output" for p in command.params):
        return
    option = click.Option(
        ["-o", "--output"],
        type=click.Choice(FORMATS),
        expose_value=False,
        callback=_set_output,
        help="Output format, as the global -o (table, json, yaml or jsonl)",
    )
    command.params.append(option)


def pass_state(ctx: click.Context) -> State:
    """The :class:`State` of the root command."""
    state = ctx.find_object(State)
    return state if state is not None else State()
