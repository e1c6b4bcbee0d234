"""Asks "What is your name?" and greets whoever answers."""

from workflows import Workflow, step
from workflows.events import HumanResponseEvent, InputRequiredEvent, StartEvent, StopEvent


class GreeterWorkflow(Workflow):
    """Human in the loop: an InputRequiredEvent out, a HumanResponseEvent in."""

    @step
    async def ask(self, ev: StartEvent) -> InputRequiredEvent:
        return InputRequiredEvent(prefix="What is your name?")

    @step
    async def greet(self, ev: HumanResponseEvent) -> StopEvent:
        return StopEvent(result=f"Hello, {ev.response}!")


greeter_workflow = GreeterWorkflow(timeout=600)
