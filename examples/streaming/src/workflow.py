"""Counts to ``steps``, streaming one ``Tick`` event per step."""

import asyncio

from workflows import Context, Workflow, step
from workflows.events import Event, StartEvent, StopEvent


class Tick(Event):
    """One step done."""

    step: int
    of: int


class StreamingWorkflow(Workflow):
    """Streams ``steps`` ticks, ``delay`` seconds apart."""

    @step
    async def count(self, ctx: Context, ev: StartEvent) -> StopEvent:
        steps = int(ev.get("steps", 3))
        delay = float(ev.get("delay", 0.05))
        for i in range(1, steps + 1):
            ctx.write_event_to_stream(Tick(step=i, of=steps))
            await asyncio.sleep(delay)
        return StopEvent(result=f"counted to {steps}")


streaming_workflow = StreamingWorkflow(timeout=300)
