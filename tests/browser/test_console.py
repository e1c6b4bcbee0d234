"""The web console in a real browser (headless chromium), against a real server and gateway.

Each test opens the console at the gateway's ``/``, enters the API key as a person would,
and drives the page; expectations auto-wait (generous timeouts, no sleeps).
"""

from __future__ import annotations

from pathlib import Path

import httpx
from playwright.async_api import Page, expect

from llama_mesh.server.app import MeshServer
from llama_mesh.server.auth import ApiKeys
from tests.browser.conftest import screenshot_path
from tests.fixtures.mesh import TESTAPP, MeshFactory

USER = "console-user-key"
ADMIN = "console-admin-key"
WAIT = 90_000
"""Milliseconds an expectation waits: a loaded machine runs workflows slowly."""


async def serve(mesh_factory: MeshFactory) -> MeshServer:
    return await mesh_factory(
        gateway=True, deploy=(TESTAPP,), api_keys=ApiKeys(user=(USER,), admin=(ADMIN,))
    )


def url(server: MeshServer) -> str:
    assert server.gateway_url is not None
    return server.gateway_url.rstrip("/")


async def open_console(page: Page, server: MeshServer, key: str = ADMIN, at: str = "") -> None:
    """Loads the console, enters the key, and goes to ``#<at>``."""
    await page.goto(url(server) + "/")
    await page.fill("#api-key", key)
    await page.click("text=Use key")
    if at:
        await page.goto(f"{url(server)}/#{at}")


async def run_from_form(page: Page, service: str, input_json: str) -> None:
    """Runs a task of ``testapp`` from the deployment page's form; lands on the task page."""
    await page.select_option("#run-service", service)
    await page.fill("#run-input", input_json)
    await page.click("#run-form button[type=submit]")
    await expect(page.locator("#task-status")).to_be_visible(timeout=WAIT)


async def shoot(page: Page, name: str) -> None:
    path = screenshot_path(name)
    if path is not None:
        await page.screenshot(path=str(path))


async def test_console_files_come_from_the_gateway(mesh_factory: MeshFactory) -> None:
    """``GET /`` is the console's page and its modules are JavaScript, with a strict CSP;
    the API keys guard the API, not these static files; other methods on ``/`` stay a 404."""
    server = await serve(mesh_factory)
    async with httpx.AsyncClient(base_url=url(server)) as http:
        index = await http.get("/")
        assert index.status_code == 200
        assert index.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in index.headers["content-security-policy"]
        assert '<script type="module" src="/console/app.js">' in index.text
        script = await http.get("/console/app.js")
        assert script.status_code == 200
        assert script.headers["content-type"].startswith("text/javascript")
        assert "innerHTML" not in script.text
        assert (await http.post("/", content=b"")).status_code == 404
        assert (await http.get("/console/nope.js")).status_code == 404


async def test_deployments_page_lists_the_deployment(mesh_factory: MeshFactory, page: Page) -> None:
    """The deployments page shows testapp, ready, with its services and their health."""
    server = await serve(mesh_factory)
    await open_console(page, server)
    row = page.locator("tr[data-deployment=testapp]")
    await expect(row).to_contain_text("READY", timeout=WAIT)
    await expect(row).to_contain_text("echo:")
    await expect(row).to_contain_text("healthy")
    await shoot(page, "deployments")


async def test_running_a_task_from_the_form_shows_its_result(
    mesh_factory: MeshFactory, page: Page
) -> None:
    """The deployment page shows its deploy progress; service and JSON input from the form
    run a task; its page shows input and result, and it is listed among the deployment's
    tasks (filtered by status) and under its session."""
    server = await serve(mesh_factory)
    await open_console(page, server, at="/d/testapp")
    await expect(page.locator("#run-service option[value=echo]")).to_have_count(1, timeout=WAIT)
    await expect(page.locator("#progress")).to_contain_text("starting 2 replica(s) of slow")
    await expect(page.locator("#progress")).to_contain_text("ready  [READY]")
    await page.fill("#run-input", '{"message": "from the browser"}')
    await shoot(page, "deployment")
    await run_from_form(page, "echo", '{"message": "from the browser"}')
    await expect(page.locator("#task-result")).to_contain_text(
        '"echo: from the browser"', timeout=WAIT
    )
    await expect(page.locator("#task-status")).to_have_text("SUCCEEDED")
    await expect(page.locator("#task-details")).to_contain_text('"message": "from the browser"')
    await shoot(page, "task")
    await page.click("text=testapp")
    await page.select_option("#task-filter", "SUCCEEDED")
    await expect(page.locator("#tasks tbody tr")).to_have_count(1, timeout=WAIT)
    await expect(page.locator("#tasks tbody tr")).to_contain_text("echo")
    task_id = await page.locator("#tasks tbody tr").get_attribute("data-task")
    assert task_id
    await expect(page.locator("#sessions")).to_contain_text(task_id)


async def test_the_task_list_follows_the_watch_without_reloading(
    mesh_factory: MeshFactory, page: Page
) -> None:
    """A task created elsewhere (by the API) after the deployment page opened appears in its
    task list, and its status change (cancelled) shows, with no reload and without the page
    ever polling the task list; the services table shows each service's queue depth."""
    server = await serve(mesh_factory)
    listings: list[str] = []
    page.on(
        "request",
        lambda request: listings.append(request.url) if "/tasks?" in request.url else None,
    )
    await open_console(page, server, at="/d/testapp")
    echo = page.locator("#services tbody tr", has_text="echo").first
    await expect(echo.locator("td.queue-depth")).to_have_text("0", timeout=WAIT)
    await expect(page.locator("#services thead")).to_contain_text("Queue depth")
    headers = {"authorization": f"Bearer {ADMIN}"}
    async with httpx.AsyncClient(base_url=url(server), headers=headers, timeout=60) as http:
        created = await http.post(
            "/v1/deployments/testapp/tasks",
            json={"service_id": "slow", "input": {"seconds": 3600}},
        )
        assert created.status_code == 200, created.text
        task_id = created.json()["task"]["task_id"]
        row = page.locator(f'#tasks tbody tr[data-task="{task_id}"]')
        await expect(row).to_contain_text("slow", timeout=WAIT)
        cancelled = await http.post(f"/v1/deployments/testapp/tasks/{task_id}:cancel", json={})
        assert cancelled.status_code == 200, cancelled.text
    await expect(row).to_contain_text("CANCELLED", timeout=WAIT)
    assert listings == []


async def test_a_failed_task_shows_its_traceback(mesh_factory: MeshFactory, page: Page) -> None:
    """A workflow that raises: the page shows the error and its traceback, line by line."""
    server = await serve(mesh_factory)
    await open_console(page, server, at="/d/testapp")
    await run_from_form(page, "fails", '{"message": "no luck"}')
    await expect(page.locator("#task-status")).to_have_text("FAILED", timeout=WAIT)
    await expect(page.locator("#task-error")).to_contain_text("ValueError: no luck")
    traceback = await page.locator("#task-traceback").inner_text()
    assert "Traceback" in traceback and len(traceback.splitlines()) > 2


async def test_streamed_events_all_arrive(mesh_factory: MeshFactory, page: Page) -> None:
    """A streaming task's events are listed in order, ending with its result."""
    server = await serve(mesh_factory)
    await open_console(page, server, at="/d/testapp")
    await run_from_form(page, "stream", '{"count": 3}')
    events = page.locator("#events li")
    await expect(events).to_have_count(4, timeout=WAIT)
    for i in range(3):
        await expect(events.nth(i)).to_contain_text(f'"step": {i}')
    await expect(events.nth(3)).to_contain_text("RESULT")
    await expect(page.locator("#task-result")).to_contain_text('"ticks": 3')


async def test_events_arrive_while_it_runs_and_cancel_stops_it(
    mesh_factory: MeshFactory, page: Page
) -> None:
    """A long task's first event shows while the task still runs (the stream is live); the
    Cancel button cancels it, and the page shows it cancelled."""
    server = await serve(mesh_factory)
    await open_console(page, server, at="/d/testapp")
    await run_from_form(page, "slow", '{"seconds": 3600}')
    await expect(page.locator("#events li[data-type$=Tick]")).to_have_count(1, timeout=WAIT)
    await expect(page.locator("#task-status")).to_have_text("RUNNING")
    await expect(page.locator("#stream-state")).to_have_text("live")
    await page.click("#cancel")
    await expect(page.locator("#task-status")).to_have_text("CANCELLED", timeout=WAIT)
    await expect(page.locator("#events")).to_contain_text("CANCELLED")
    await expect(page.locator("#cancel")).to_be_disabled()


async def test_human_in_the_loop_is_answered_from_the_page(
    mesh_factory: MeshFactory, page: Page
) -> None:
    """An InputRequiredEvent shows a text box; what is typed there reaches the workflow."""
    server = await serve(mesh_factory)
    await open_console(page, server, at="/d/testapp")
    await run_from_form(page, "hitl", "{}")
    await expect(page.locator("#answer")).to_contain_text("name?", timeout=WAIT)
    await page.fill("#answer-text", "ann")
    await shoot(page, "input-required")
    await page.click("text=Send answer")
    await expect(page.locator("#task-result")).to_contain_text('"hi ann"', timeout=WAIT)
    await expect(page.locator("#answer")).to_be_empty()


async def test_a_wrong_api_key_shows_a_clear_message(mesh_factory: MeshFactory, page: Page) -> None:
    """No key, then a wrong key: the page says so and lists nothing; the right key works."""
    server = await serve(mesh_factory)
    await page.goto(url(server) + "/")
    error = page.locator("#error")
    await expect(error).to_contain_text("This server needs an API key", timeout=WAIT)
    await page.fill("#api-key", "not-a-key")
    await page.click("text=Use key")
    await expect(error).to_contain_text("The API key was refused", timeout=WAIT)
    await expect(page.locator("tr[data-deployment]")).to_have_count(0)
    await page.fill("#api-key", USER)
    await page.click("text=Use key")
    await expect(page.locator("tr[data-deployment=testapp]")).to_be_visible(timeout=WAIT)
    await expect(error).to_be_hidden()


async def test_a_user_key_cannot_delete_and_an_admin_key_can(
    mesh_factory: MeshFactory, page: Page
) -> None:
    """Delete needs an admin key: with a user key the page explains it; with an admin key
    the deployment goes away."""
    server = await serve(mesh_factory)
    page.on("dialog", lambda dialog: dialog.accept())
    await open_console(page, server, key=USER)
    row = page.locator("tr[data-deployment=testapp]")
    await row.locator("text=Delete").click(timeout=WAIT)
    await expect(page.locator("#error")).to_contain_text("admin key is needed", timeout=WAIT)
    await page.fill("#api-key", ADMIN)
    await page.click("text=Use key")
    await row.locator("text=Delete").click(timeout=WAIT)
    await expect(row).to_have_count(0, timeout=WAIT)


async def test_a_deployment_created_from_an_uploaded_file_shows_why_it_failed(
    mesh_factory: MeshFactory, page: Page, tmp_path: Path
) -> None:
    """Create uploads a YAML file; a deployment that fails says why, and the list shows it
    failed with the reason; Reload asks the server again."""
    server = await serve(mesh_factory)
    broken = tmp_path / "broken.yml"
    broken.write_text(
        "name: broken\nservices:\n  svc:\n    name: Svc\n    source: {type: local, name: .}\n"
        "    path: nope:workflow\n"
    )
    await open_console(page, server)
    await expect(page.locator("tr[data-deployment=testapp]")).to_be_visible()
    await page.set_input_files("#deployment-file", str(broken))
    await page.click("text=Create")
    await expect(page.locator("#error")).to_contain_text("no module 'nope'")
    row = page.locator("tr[data-deployment=broken]")
    await expect(row).to_contain_text("FAILED")
    await expect(row).to_contain_text("no module 'nope'")
    await row.locator("text=Reload").click()
    await expect(page.locator("#error")).to_contain_text("broken")
