"""Adds ``amount`` to a total kept in the session's workflow context."""

from workflows import Context, Workflow, step
from workflows.events import StartEvent, StopEvent


class TallyWorkflow(Workflow):
    """The total survives from one run to the next in the same session."""

    @step
    async def add(self, ctx: Context, ev: StartEvent) -> StopEvent:
        total = int(await ctx.store.get("total", default=0)) + int(ev.get("amount", 1))
        await ctx.store.set("total", total)
        return StopEvent(result={"total": total})


tally_workflow = TallyWorkflow(timeout=60)
