"""An echo workflow: returns the message it is given, after streaming one progress event."""

from workflows import Context, Workflow, step
from workflows.events import Event, StartEvent, StopEvent


class Progress(Event):
    """Streamed before the answer."""

    message: str


class EchoWorkflow(Workflow):
    """Echoes ``message``."""

    @step
    async def echo(self, ctx: Context, ev: StartEvent) -> StopEvent:
        message = str(ev.get("message", ""))
        ctx.write_event_to_stream(Progress(message=f"echoing {message!r}"))
        return StopEvent(result=f"Message received: {message}")


echo_workflow = EchoWorkflow(timeout=60)
