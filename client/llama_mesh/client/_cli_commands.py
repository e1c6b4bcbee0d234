"""``llamactl`` resource commands: deployments, services, tasks, sessions and send-event."""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Any

import click

from llama_mesh.client._cli_output import emit, emit_result, note, to_json
from llama_mesh.client._cli_state import call, pass_state
from llama_mesh.client._client import AsyncClient
from llama_mesh.client._models import Deployment, Service, Session, Task, TaskStatus

_deployment_option = click.option("-d", "--deployment", required=True, help="Deployment name")


@click.group()
def deployments() -> None:
    """List, inspect, reload and delete deployments."""


@deployments.command("list")
@click.pass_context
def deployments_list(ctx: click.Context) -> None:
    """List deployments."""
    state = pass_state(ctx)
    emit(call(state, lambda c: c.deployments.list()), state.fmt, item_type=Deployment)


@deployments.command("get")
@click.argument("name")
@click.pass_context
def deployments_get(ctx: click.Context, name: str) -> None:
    """Show a deployment and its services."""
    state = pass_state(ctx)
    emit(call(state, lambda c: c.deployments.get(name)), state.fmt)


@deployments.command("reload")
@click.argument("name")
@click.pass_context
def deployments_reload(ctx: click.Context, name: str) -> None:
    """Re-sync sources and restart the workers of a deployment."""
    state = pass_state(ctx)
    emit(call(state, lambda c: c.deployments.reload(name)), state.fmt)


@deployments.command("delete")
@click.argument("name")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation")
@click.pass_context
def deployments_delete(ctx: click.Context, name: str, yes: bool) -> None:
    """Stop a deployment's workers and forget it."""
    state = pass_state(ctx)
    if not yes:
        if not sys.stdin.isatty():
            raise click.UsageError("not a terminal: pass --yes to delete without confirmation")
        click.confirm(f"Delete deployment '{name}'?", abort=True, err=True)
    call(state, lambda c: c.deployments.delete(name))
    note(f"Deployment '{name}' deleted.")


@click.group()
def services() -> None:
    """Inspect the workflow services of a deployment."""


@services.command("list")
@_deployment_option
@click.pass_context
def services_list(ctx: click.Context, deployment: str) -> None:
    """List a deployment's services and the health of their replicas."""
    state = pass_state(ctx)
    emit(call(state, lambda c: c.services.list(deployment)), state.fmt, item_type=Service)


@click.group()
def sessions() -> None:
    """Manage sessions for a given deployment."""


@sessions.command("create")
@_deployment_option
@click.pass_context
def sessions_create(ctx: click.Context, deployment: str) -> None:
    """Create a session."""
    state = pass_state(ctx)
    emit(call(state, lambda c: c.sessions.create(deployment)), state.fmt)


@sessions.command("list")
@_deployment_option
@click.pass_context
def sessions_list(ctx: click.Context, deployment: str) -> None:
    """List a deployment's sessions."""
    state = pass_state(ctx)
    emit(call(state, lambda c: c.sessions.list(deployment)), state.fmt, item_type=Session)


@sessions.command("get")
@_deployment_option
@click.argument("session_id")
@click.pass_context
def sessions_get(ctx: click.Context, deployment: str, session_id: str) -> None:
    """Show a session and its tasks."""
    state = pass_state(ctx)
    emit(call(state, lambda c: c.sessions.get(deployment, session_id)), state.fmt)


@sessions.command("delete")
@_deployment_option
@click.argument("session_id")
@click.pass_context
def sessions_delete(ctx: click.Context, deployment: str, session_id: str) -> None:
    """Delete a session and its stored workflow context."""
    state = pass_state(ctx)
    call(state, lambda c: c.sessions.delete(deployment, session_id))
    note(f"Session '{session_id}' deleted.")


@click.group()
def tasks() -> None:
    """List, inspect, cancel and follow tasks."""


@tasks.command("list")
@_deployment_option
@click.option("--session", help="Only this session's tasks")
@click.option("--status", type=click.Choice([s.value for s in TaskStatus]), help="Only these")
@click.pass_context
def tasks_list(
    ctx: click.Context, deployment: str, session: str | None, status: str | None
) -> None:
    """List a deployment's tasks, newest first."""
    state = pass_state(ctx)
    found = call(state, lambda c: c.tasks.list(deployment, session=session, status=status))
    emit(found, state.fmt, item_type=Task)


@tasks.command("get")
@_deployment_option
@click.argument("task_id")
@click.pass_context
def tasks_get(ctx: click.Context, deployment: str, task_id: str) -> None:
    """Show a task with its status, result or error."""
    state = pass_state(ctx)
    emit(call(state, lambda c: c.tasks.get(deployment, task_id)), state.fmt)


@tasks.command("result")
@_deployment_option
@click.argument("task_id")
@click.pass_context
def tasks_result(ctx: click.Context, deployment: str, task_id: str) -> None:
    """Wait for a task to finish and print its result.

    Exit status 3 when the task failed or was cancelled.
    """
    state = pass_state(ctx)
    emit_result(call(state, lambda c: c.tasks.result(deployment, task_id)), state.output)


@tasks.command("cancel")
@_deployment_option
@click.argument("task_id")
@click.option("--reason", default="", help="Recorded as the task's error message")
@click.pass_context
def tasks_cancel(ctx: click.Context, deployment: str, task_id: str, reason: str) -> None:
    """Cancel a queued or running task.

    Prints the task as it is afterwards: cancelled, or the state it reached first (still
    running only when its worker did not stop it within a few seconds).
    """
    state = pass_state(ctx)
    emit(call(state, lambda c: c.tasks.cancel(deployment, task_id, reason=reason)), state.fmt)


@tasks.command("events")
@_deployment_option
@click.argument("task_id")
@click.option("--from-index", type=click.IntRange(min=0), default=0, help="First event index")
@click.option("-f", "--follow", is_flag=True, help="Keep streaming until the task finishes")
@click.pass_context
def tasks_events(
    ctx: click.Context, deployment: str, task_id: str, from_index: int, follow: bool
) -> None:
    """Print a task's events as JSON lines.

    Without --follow, the events written so far (of a running task, or one waiting for an
    answer: the question it asks); with it, every event until the final one.
    """

    async def run(client: AsyncClient) -> None:
        limit: int | None = None
        if not follow:
            task = await client.tasks.get(deployment, task_id)
            if not task.is_final:
                limit = task.event_count  # only the events that exist now
                if from_index >= limit:
                    return
        events = client.tasks.events(deployment, task_id, from_index=from_index)
        async with contextlib.aclosing(events):
            async for event in events:
                click.echo(to_json(event))
                if limit is not None and event.index + 1 >= limit:
                    return

    call(pass_state(ctx), run)


def _json_object(ctx: click.Context, param: click.Parameter, value: str) -> dict[str, Any]:
    try:
        data = json.loads(value)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise click.BadParameter("must be a JSON object")
    return data


@click.command("send-event")
@_deployment_option
@click.argument("task_id")
@click.option("--type", "event_type", required=True, help="Event class, e.g. HumanResponseEvent")
@click.option("--data", default="{}", callback=_json_object, help="Event fields as JSON object")
@click.pass_context
def send_event(
    ctx: click.Context, deployment: str, task_id: str, event_type: str, data: dict[str, Any]
) -> None:
    """Send an event into a running task (human in the loop)."""
    call(pass_state(ctx), lambda c: c.tasks.send_event(deployment, task_id, event_type, data))
    note(f"Event {event_type} sent to task {task_id}.")
