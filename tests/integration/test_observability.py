"""Prometheus metrics and structured logs that operators rely on."""

from __future__ import annotations

import json
import logging
import re

import httpx
import pytest

from llama_mesh.server.logs import JsonFormatter, PlainFormatter
from llama_mesh.server.service.worker import START_NOTICE
from tests.fixtures.mesh import TESTAPP, MeshFactory
from tests.helpers import assert_eventually


async def test_metrics_count_tasks_latencies_and_rpcs(mesh_factory: MeshFactory) -> None:
    """/metrics reports tasks by status, task latencies (run and queue time), queue depth and
    gRPC requests."""
    server = await mesh_factory(metrics_port=0, deploy=(TESTAPP,))
    port = server.metrics_port
    assert port
    mesh = server.mesh
    for _ in range(2):
        await mesh.run_task("testapp", service_id="echo", session_id=None, input={})
    await mesh.run_task("testapp", service_id="fails", session_id=None, input={})

    async def scrape() -> str:
        async with httpx.AsyncClient() as http:
            return (await http.get(f"http://127.0.0.1:{port}/metrics")).text

    async def counted() -> str:
        text = await scrape()
        done = 'llama_mesh_tasks_total{deployment="testapp",service="echo",status="succeeded"} 2.0'
        return text if done in text else ""

    text = await assert_eventually(counted)
    assert 'service="fails",status="failed"} 1.0' in text
    assert 'llama_mesh_task_duration_seconds_count{deployment="testapp",service="echo"} 2.0' in text
    # Quick tasks never show RUNNING; their time in the queue counts all the same.
    assert 'llama_mesh_task_queue_seconds_count{deployment="testapp",service="echo"} 2.0' in text
    assert 'llama_mesh_queue_depth{deployment="testapp",service="echo"} 0.0' in text
    await server.shutdown()  # closes the port: a server started again can have it
    with pytest.raises(httpx.ConnectError):
        await scrape()


async def test_workers_log_one_line_per_quick_task_and_a_running_line_for_long_ones(
    mesh_factory: MeshFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A quick task logs its end only, with its status, time and attempt; one that runs
    past the start notice also logs when it shows RUNNING. Both carry the task's ids."""
    caplog.set_level(logging.INFO, logger="llama_mesh.server.service.worker")
    server = await mesh_factory(deploy=(TESTAPP,))
    quick = await server.mesh.run_task("testapp", service_id="echo", session_id=None, input={})
    slow = await server.mesh.run_task(
        "testapp", service_id="slow", session_id=None, input={"seconds": 0.2}
    )

    def lines(task_id: str) -> list[str]:
        return [r.getMessage() for r in caplog.records if getattr(r, "task_id", "") == task_id]

    # A task's last line follows its acknowledgement, which follows the stored result.
    await assert_eventually(lambda: len(lines(slow.task_id)) == 2)
    *before, end = lines(quick.task_id)
    assert re.fullmatch(r"task succeeded in \d+\.\d ms \(attempt 1\)", end), end
    # On a loaded machine even the echo can outlast the notice; one that ended well inside
    # it must not have logged RUNNING.
    if float(end.split()[3]) < START_NOTICE * 1000 / 2:
        assert before == [], before
    else:
        assert before in ([], ["task running (attempt 1)"]), before
    running, end = lines(slow.task_id)
    assert running == "task running (attempt 1)"
    elapsed = float(end.split()[3])
    assert end.startswith("task succeeded in ") and 200 <= elapsed < 5000, end
    sessions = {getattr(r, "session_id", "") for r in caplog.records if r.getMessage() == end}
    assert sessions == {slow.session_id}


def _record(**extra: object) -> logging.LogRecord:
    record = logging.LogRecord(
        "llama_mesh.test", logging.INFO, __file__, 1, "task %s", ("ok",), None
    )
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_json_logs_carry_task_and_session_ids() -> None:
    """JSON log lines are objects with the message and the task's ids as fields."""
    line = JsonFormatter().format(_record(task_id="t-1", session_id="s-1", deployment="d"))
    entry = json.loads(line)
    assert entry["message"] == "task ok"
    assert (entry["task_id"], entry["session_id"], entry["deployment"]) == ("t-1", "s-1", "d")
    assert entry["level"] == "INFO"


@pytest.mark.parametrize("fields", [{}, {"task_id": "t-9"}])
def test_plain_logs_append_context(fields: dict[str, str]) -> None:
    """Plain log lines end with the context fields as key=value when there are any."""
    line = PlainFormatter().format(_record(**fields))
    assert line.endswith("[task_id=t-9]") == bool(fields)
