"""Drive the llama_deploy_08 deployment with the Llama Deploy 0.8 Python client.

    pip install llama-deploy==0.8.1
    python client.py [API_SERVER_URL] [CONTROL_PLANE_URL]

Prints what each call returned, as one JSON object. The control plane part (``client.core``)
runs when a CONTROL_PLANE_URL is given.
"""

import asyncio
import json
import sys

from llama_deploy import Client
from llama_deploy.types import TaskDefinition
from llama_index.core.workflow.events import HumanResponseEvent

DEPLOYMENT = "llama_deploy_08"


def task(service_id=None, session_id=None, **kwargs):
    return TaskDefinition(input=json.dumps(kwargs), service_id=service_id, session_id=session_id)


async def api_server(client):
    """The API server routes: ``client.apiserver``."""
    out = {}
    deployment = await client.apiserver.deployments.get(DEPLOYMENT)

    # Run the default service and wait for its result.
    out["echo"] = await deployment.tasks.run(task(message="hello"))

    # Create a task, stream its events, then read its result.
    streamed = await deployment.tasks.create(task("echo_workflow", message="stream"))
    out["events"] = [event async for event in streamed.events()]
    out["streamed_result"] = (await streamed.results()).result

    # Human in the loop: wait for the question, send the answer into the running task.
    greeter = await deployment.tasks.create(task("greeter_workflow"))
    events = greeter.events()
    async for event in events:
        if "prefix" in event:
            out["question"] = event["prefix"]
            break
    await events.aclose()
    await greeter.send_event(HumanResponseEvent(response="Ada"), service_name="greeter_workflow")
    out["greeting"] = (await greeter.results()).result

    # Sessions keep the workflow's context between runs.
    session = await deployment.sessions.create()
    out["counts"] = [
        await deployment.tasks.run(task("counter_workflow", session.session_id)) for _ in range(2)
    ]

    # A failing workflow answers an error.
    try:
        await deployment.tasks.run(task(message="fail"))
    except Exception as exc:  # httpx.HTTPStatusError
        out["failure"] = str(exc)
    return out


async def control_plane(client):
    """The deployment's control plane routes (``control-plane.port``): ``client.core``."""
    out = {}
    out["services"] = sorted(s.id for s in await client.core.services.list())
    session = await client.core.sessions.create()
    out["core_echo"] = await session.run("echo_workflow", message="from the control plane")
    await client.core.sessions.delete(session.id)
    return out


async def main():
    api_url = sys.argv[1] if len(sys.argv) > 1 else "http://localhost:4501"
    control_plane_url = sys.argv[2] if len(sys.argv) > 2 else None
    client = Client(
        api_server_url=api_url,
        control_plane_url=control_plane_url or "http://localhost:8000",
        timeout=60,
    )
    out = await api_server(client)
    if control_plane_url:
        out.update(await control_plane(client))
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main())
