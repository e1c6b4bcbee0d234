"""``llamactl``: the command line of llama-mesh (Llama Deploy 0.8's verbs, and more).

Global options come first (``llamactl -s http://host:4501 -o json status``); ``-o`` is also
accepted after the command (``llamactl deployments list -o json``). Data goes to
stdout, messages and progress to stderr. Exit statuses: 0 ok, 1 API or configuration error,
2 usage error, 3 task failed or cancelled. ``serve`` and ``worker`` need the server package
(``llama-mesh``), imported only when they run.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
import yaml

from llama_mesh.client import __version__
from llama_mesh.client._cli_commands import deployments, send_event, services, sessions, tasks
from llama_mesh.client._cli_config import config
from llama_mesh.client._cli_output import FORMATS, emit, emit_result, note
from llama_mesh.client._cli_state import CliError, State, add_output_option, call, pass_state
from llama_mesh.client._client import AsyncClient
from llama_mesh.client._config import ENV_API_KEY, ENV_TLS_CA, ENV_TLS_CERT, ENV_TLS_KEY
from llama_mesh.client._exceptions import ConfigError, DeadlineExceededError, LlamaMeshError
from llama_mesh.client._models import Deployment, ServerStatus
from llama_mesh.client._resources import read_deployment_file

PROGRESS_GRACE = 2.0
"""Seconds ``deploy`` waits for the last progress line after the deployment is ready."""

_PEM = click.Path(exists=True, dir_okay=False, path_type=Path)


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, invoke_without_command=True)
@click.version_option(__version__, prog_name="llamactl")
@click.option("-c", "--config", "config_path", type=Path, help="Path to the llamactl config file")
@click.option("-p", "--profile", help="Configuration profile to use")
@click.option("-s", "--server", help="API server URL (http://host:4501) or host:port")
@click.option("-k", "--insecure", is_flag=True, default=False, help="Skip TLS verification")
@click.option("-t", "--timeout", type=click.FloatRange(min=0, min_open=True), help="Seconds")
@click.option("--api-key", envvar=ENV_API_KEY, show_envvar=True, help="Bearer token")
@click.option("--tls-ca", type=_PEM, help=f"PEM CA to trust [else {ENV_TLS_CA}]")
@click.option(
    "--tls-cert", type=_PEM, help=f"PEM client certificate, for mTLS [else {ENV_TLS_CERT}]"
)
@click.option("--tls-key", type=_PEM, help=f"PEM key of --tls-cert [else {ENV_TLS_KEY}]")
@click.option(
    "-o",
    "--output",
    type=click.Choice(FORMATS),
    help="Output format [default: table on a terminal, else json]",
)
@click.pass_context
def llamactl(  # noqa: PLR0917 (one parameter per global option)
    ctx: click.Context,
    config_path: Path | None,
    profile: str | None,
    server: str | None,
    insecure: bool,
    timeout: float | None,
    api_key: str | None,
    tls_ca: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    output: Any,
) -> None:
    """Deploy and run LlamaIndex workflows on a llama-mesh server."""
    if (tls_cert is None) != (tls_key is None):
        raise click.UsageError("--tls-cert and --tls-key: give both or neither")
    ctx.obj = State(
        config_path=config_path,
        profile=profile,
        server=server,
        insecure=insecure,
        timeout=timeout,
        api_key=api_key or None,
        tls_ca=tls_ca,
        tls_cert=tls_cert,
        tls_key=tls_key,
        output=output,
    )
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


@llamactl.command()
@click.pass_context
def status(ctx: click.Context) -> None:
    """Print the API server status."""
    state = pass_state(ctx)
    result: ServerStatus = call(state, lambda c: c.status())
    if state.fmt != "table":
        emit(result, state.fmt)
        return
    if not result.healthy:
        click.echo("llama-mesh is unhealthy.")
        ctx.exit(1)
    click.echo(f"llama-mesh {result.version} is up and running ({result.message_queue}).")
    if result.deployments:
        click.echo("\nActive deployments:")
        for name in result.deployments:
            click.echo(f"- {name}")
    else:
        click.echo("\nCurrently there are no active deployments")


@llamactl.command()
@click.option("--reload", is_flag=True, help="Replace a deployment of the same name")
@click.option(
    "--base-path",
    type=click.Path(file_okay=False, resolve_path=True, path_type=Path),
    help="Directory local sources are relative to [default: the file's directory]",
)
@click.option("--local", is_flag=True, help="Use local sources in place instead of copying")
@click.argument(
    "deployment_file",
    type=click.Path(exists=True, dir_okay=False, resolve_path=True, path_type=Path),
)
@click.pass_context
def deploy(
    ctx: click.Context, reload: bool, base_path: Path | None, local: bool, deployment_file: Path
) -> None:
    """Create or reload a deployment; progress is shown on stderr."""
    state = pass_state(ctx)
    try:
        text = read_deployment_file(deployment_file)
    except ConfigError as exc:
        raise CliError(str(exc)) from exc

    async def run(client: AsyncClient) -> Deployment:
        progress = asyncio.create_task(_show_progress(client, _deployment_name(text)))
        try:
            deployment = await client.deployments.create(
                deployment_file,
                base_path=base_path or deployment_file.parent,
                reload=reload,
                local=local,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(progress), PROGRESS_GRACE)
            return deployment
        finally:
            progress.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await progress

    deployment = call(state, run)
    if state.fmt == "table":
        click.echo(f"Deployment successful: {deployment.name}")
    else:
        emit(deployment, state.fmt)


def _deployment_name(text: str) -> str | None:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    name = data.get("name") if isinstance(data, dict) else None
    return name if isinstance(name, str) and name else None


async def _show_progress(client: AsyncClient, name: str | None) -> None:
    """Print progress lines on stderr; best effort (a new deployment may have none yet)."""
    if name is None:
        return
    with contextlib.suppress(LlamaMeshError):
        async for line in client.deployments.progress(name):
            note(f"{name}: {line}")


@llamactl.command()
@click.option("-d", "--deployment", required=True, help="Deployment name")
@click.option(
    "-a",
    "--arg",
    "args",
    multiple=True,
    type=(str, str),
    help="'key value' argument to pass to the task, e.g. '-a age 30'",
)
@click.option("-s", "--service", help="Service name")
@click.option("-i", "--session-id", help="Session ID")
@click.option(
    "--no-wait",
    is_flag=True,
    help="Print the task id at once instead of waiting for the result "
    "(the whole task with -o json|yaml|jsonl)",
)
@click.pass_context
def run(  # noqa: PLR0917 (one parameter per option)
    ctx: click.Context,
    deployment: str,
    args: tuple[tuple[str, str], ...],
    service: str | None,
    session_id: str | None,
    no_wait: bool,
) -> None:
    """Run a task and print its result.

    Exit status 3 when the task fails. With --no-wait the task is only queued: follow it
    with 'llamactl tasks events --follow' or 'llamactl tasks result'.
    """
    state = pass_state(ctx)
    if no_wait:
        task = call(
            state,
            lambda c: c.tasks.create(deployment, dict(args), service=service, session=session_id),
        )
        if state.output in (None, "table"):
            click.echo(task.task_id)
        else:
            emit(task, state.fmt)
        return
    result = call(
        state, lambda c: c.run(deployment, service=service, session=session_id, **dict(args))
    )
    emit_result(result, state.output)


@llamactl.command()
@click.option(
    "--timeout",
    "wait_timeout",
    type=float,
    default=30.0,
    show_default=True,
    help="Seconds to wait for the server",
)
@click.pass_context
def wait(ctx: click.Context, wait_timeout: float) -> None:
    """Wait until the server answers.

    Exit status 0 once it does, 1 when it did not within the timeout.
    """
    state = pass_state(ctx)
    try:
        result: ServerStatus = call(state, lambda c: c.wait_ready(wait_timeout))
    except CliError as exc:
        if isinstance(exc.__cause__, DeadlineExceededError):
            raise CliError(f"the server did not answer within {wait_timeout:g} s") from exc
        raise
    if not result.healthy:
        raise CliError("the server answered but is unhealthy")
    note(f"llama-mesh {result.version} is ready")


_PASS_THROUGH: dict[str, Any] = {
    "context_settings": {"ignore_unknown_options": True, "allow_extra_args": True},
    "add_help_option": False,
}


@llamactl.command(**_PASS_THROUGH)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def serve(ctx: click.Context, args: tuple[str, ...]) -> None:
    """Run the server in the foreground.

    Its options: llamactl serve --help.
    """
    module = _server_module("llama_mesh.server.serve", "serve")
    ctx.exit(module.main(list(args), prog="llamactl serve"))


@llamactl.command(**_PASS_THROUGH)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def worker(ctx: click.Context, args: tuple[str, ...]) -> None:
    """Run one worker of a service, anywhere NATS is reachable.

    Its options: llamactl worker --help.
    """
    module = _server_module("llama_mesh.server.service.__main__", "worker")
    ctx.exit(module.main(list(args), prog="llamactl worker"))


def _server_module(name: str, command: str) -> Any:
    """Import a module of the server package, or explain how to get it."""
    import importlib

    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and (exc.name == name or name.startswith(exc.name + ".")):
            raise CliError(
                f"llamactl {command} needs the server: install llama-mesh to run the server "
                "(pip install 'llama-mesh-client[server]')"
            ) from exc
        raise CliError(f"llamactl {command}: the server cannot be imported: {exc}") from exc


llamactl.add_command(config)
llamactl.add_command(deployments)
llamactl.add_command(services)
llamactl.add_command(sessions)
llamactl.add_command(tasks)
llamactl.add_command(send_event)
add_output_option(llamactl, skip=(serve, worker))


def main(argv: Sequence[str] | None = None) -> None:
    """The ``llamactl`` console script."""
    llamactl.main(args=list(argv) if argv is not None else None, prog_name="llamactl")


if __name__ == "__main__":
    main(sys.argv[1:])
