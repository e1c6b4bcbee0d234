"""How a NATS queue's consumer pulls: one pull request for the free slots, not one per
message, each message still handed out as soon as it arrives."""

from __future__ import annotations

import json

import nats
from nats.aio.msg import Msg

from llama_mesh.server.nats_server import NatsServer
from llama_mesh.server.queues.broker import ConsumerOptions, Delivery
from tests.fixtures.brokers import nats_roles
from tests.helpers import aclose, assert_eventually, next_within

WAIT = 10.0


async def test_one_pull_request_asks_for_every_free_slot(nats_server: NatsServer) -> None:
    """Twenty queued messages, twenty free slots: the pull requests (watched on their
    subject from another connection) ask for twenty at once, and all twenty arrive
    unsettled; a slot freed later brings the next message."""
    connection, broker, _ = await nats_roles(nats_server.url)
    watcher = await nats.connect(nats_server.url)
    asked: list[int] = []

    async def on_request(msg: Msg) -> None:
        asked.append(json.loads(msg.data)["batch"])

    await watcher.subscribe("$JS.API.CONSUMER.MSG.NEXT.>", cb=on_request)
    await watcher.flush()
    it = broker.consume_tasks("pulled", ConsumerOptions(max_in_flight=20))
    try:
        for i in range(21):
            await broker.publish_task("pulled", f"m{i}".encode(), msg_id=f"id{i}")
        held: list[Delivery] = [await next_within(it, WAIT) for _ in range(20)]
        assert sorted(d.data for d in held) == sorted(f"m{i}".encode() for i in range(20))
        assert asked[0] == 20
        assert len(asked) <= 2  # a second only should the first expire before all twenty came
        await held[0].ack()
        last = await next_within(it, WAIT)
        assert last.data == b"m20"
        await assert_eventually(lambda: asked[-1] == 1)  # the one slot freed, asked for
    finally:
        await aclose(it)
        await watcher.close()
        await connection.close()
