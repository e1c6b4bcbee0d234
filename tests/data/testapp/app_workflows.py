"""Workflows the tests deploy: each pins one behaviour of the mesh."""

import asyncio
import os

from workflows import Context, Workflow, step
from workflows.events import (
    Event,
    HumanResponseEvent,
    InputRequiredEvent,
    StartEvent,
    StopEvent,
)


class Tick(Event):
    """One streamed step."""

    step: int


class Note(Event):
    """A streamed text."""

    text: str


class Echo(Workflow):
    """Returns ``message`` (``repeat`` times; with ``as_event``, streams it as a Note and
    returns "sent"); ``env`` returns an environment variable of the worker."""

    @step
    async def run_it(self, ctx: Context, ev: StartEvent) -> StopEvent:
        if ev.get("env"):
            return StopEvent(result=os.environ.get(str(ev.get("env")), "<unset>"))
        text = str(ev.get("message", "")) * int(ev.get("repeat", 1))
        if ev.get("as_event"):
            ctx.write_event_to_stream(Note(text=text))
            return StopEvent(result="sent")
        return StopEvent(result=f"echo: {text}")


class Stream(Workflow):
    """Streams ``count`` ticks, then returns how many."""

    @step
    async def run_it(self, ctx: Context, ev: StartEvent) -> StopEvent:
        count = int(ev.get("count", 3))
        for i in range(count):
            ctx.write_event_to_stream(Tick(step=i))
            await asyncio.sleep(float(ev.get("delay", 0)))
        return StopEvent(result={"ticks": count})


class Hitl(Workflow):
    """Asks for a name, greets it."""

    @step
    async def ask(self, ev: StartEvent) -> InputRequiredEvent:
        return InputRequiredEvent(prefix="name?")

    @step
    async def answer(self, ev: HumanResponseEvent) -> StopEvent:
        return StopEvent(result=f"hi {ev.response}")


class Tally(Workflow):
    """Keeps a total in the session's context."""

    @step
    async def add(self, ctx: Context, ev: StartEvent) -> StopEvent:
        total = int(await ctx.store.get("total", default=0)) + int(ev.get("amount", 1))
        await ctx.store.set("total", total)
        return StopEvent(result=total)


class Slow(Workflow):
    """Sleeps ``seconds`` then returns ``tag``: for kill, cancel and concurrency tests."""

    @step
    async def run_it(self, ctx: Context, ev: StartEvent) -> StopEvent:
        ctx.write_event_to_stream(Tick(step=0))
        await asyncio.sleep(float(ev.get("seconds", 1)))
        return StopEvent(result={"tag": ev.get("tag"), "pid": os.getpid()})


class Fails(Workflow):
    """Raises with the given message."""

    @step
    async def run_it(self, ev: StartEvent) -> StopEvent:
        raise ValueError(str(ev.get("message", "boom")))


class Crashy(Workflow):
    """Kills its own worker process: a task no replica can finish.

    Never in the process whose pid is ``spare_pid`` (the test runner's own, in case the
    service runs in-process).
    """

    @step
    async def run_it(self, ev: StartEvent) -> StopEvent:
        if os.getpid() != int(ev.get("spare_pid", 0)):
            os._exit(17)
        return StopEvent(result="spared")


echo = Echo(timeout=60)
stream = Stream(timeout=60)
hitl = Hitl(timeout=120)
tally = Tally(timeout=60)
slow = Slow(timeout=300)
fails = Fails(timeout=60)
crashy = Crashy(timeout=60)
