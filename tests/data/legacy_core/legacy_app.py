"""Workflows written against llama-index-core 0.12.15 (``ctx.get``/``ctx.set`` state)."""

import asyncio

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
    step: int


class Echo(Workflow):
    """Streams ``count`` Progress events, then echoes ``message``; ``fail`` raises."""

    @step
    async def run_step(self, ctx: Context, ev: StartEvent) -> StopEvent:
        for i in range(int(ev.get("count", 2))):
            ctx.write_event_to_stream(Progress(step=i))
        message = str(ev.get("message", ""))
        if message == "fail":
            raise ValueError("asked to fail")
        return StopEvent(result=f"echo: {message}")


class Greeter(Workflow):
    @step
    async def ask(self, ev: StartEvent) -> InputRequiredEvent:
        return InputRequiredEvent(prefix="Name?")

    @step
    async def greet(self, ev: HumanResponseEvent) -> StopEvent:
        return StopEvent(result=f"Hello, {ev.response}!")


class Counter(Workflow):
    @step
    async def count(self, ctx: Context, ev: StartEvent) -> StopEvent:
        runs = int(await ctx.get("runs", default=0)) + 1
        await ctx.set("runs", runs)
        return StopEvent(result=runs)


class Slow(Workflow):
    """Sleeps ``seconds``: longer than its own timeout, it times out."""

    @step
    async def sleep(self, ev: StartEvent) -> StopEvent:
        await asyncio.sleep(float(ev.get("seconds", 60)))
        return StopEvent(result="awake")


echo = Echo(timeout=60)
greeter = Greeter(timeout=600)
counter = Counter(timeout=60)
slow = Slow(timeout=2)
