"""Three workflows as Llama Deploy 0.8 users write them, on llama_index.core.workflow."""

from llama_index.core.workflow import (
    Context,
    Event,
    HumanResponseEvent,
    InputRequiredEvent,
    StartEvent,
    StopEvent,
    Workflow,
    step,
)


class Progress(Event):
    """Streamed while the echo runs."""

    step: int


class EchoWorkflow(Workflow):
    """Streams three progress events, then echoes ``message``."""

    @step
    async def run_step(self, ctx: Context, ev: StartEvent) -> StopEvent:
        message = str(ev.get("message", ""))
        for i in range(3):
            ctx.write_event_to_stream(Progress(step=i))
        if message == "fail":
            raise ValueError("asked to fail")
        return StopEvent(result=f"Message received: {message}")


class GreeterWorkflow(Workflow):
    """Human in the loop: asks for a name, greets whoever answers."""

    @step
    async def ask(self, ev: StartEvent) -> InputRequiredEvent:
        return InputRequiredEvent(prefix="What is your name?")

    @step
    async def greet(self, ev: HumanResponseEvent) -> StopEvent:
        return StopEvent(result=f"Hello, {ev.response}!")


class CounterWorkflow(Workflow):
    """Counts its runs in the session's context."""

    @step
    async def count(self, ctx: Context, ev: StartEvent) -> StopEvent:
        runs = int(await ctx.get("runs", default=0)) + 1
        await ctx.set("runs", runs)
        return StopEvent(result=str(runs))


echo_workflow = EchoWorkflow(timeout=60)
greeter_workflow = GreeterWorkflow(timeout=600)
counter_workflow = CounterWorkflow(timeout=60)
