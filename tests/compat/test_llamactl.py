"""The released Llama Deploy 0.8.1 ``llamactl``, unchanged, against the gateway.

Every ``llamactl`` start imports llama-index (seconds of CPU), so the commands run once per
module, in four rounds of concurrent processes (a round waits for what it needs from the
one before: a deployment, a session id, a rewritten source), and each test below checks
the transcript of the commands it is about.
"""

from __future__ import annotations

import asyncio
import re

import pytest
import pytest_asyncio

from tests.compat.conftest import Llamactl, write_shout_deployment

pytestmark = [pytest.mark.compat, pytest.mark.asyncio(loop_scope="module")]

SECOND = "shout-cli"
"""The second deployment, created by ``llamactl deploy``."""
SESSION_ID = re.compile(r"session_id='([^']+)'")

Result = tuple[int, str, str]
Transcript = dict[str, Result]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def transcript(llamactl: Llamactl, tmp_path_factory: pytest.TempPathFactory) -> Transcript:
    """Exit code, stdout and stderr of every command, by name."""
    config = write_shout_deployment(tmp_path_factory.mktemp("llamactl") / "app", SECOND)
    out: Transcript = {}

    async def round_(**commands: tuple[str, ...]) -> None:
        results = await asyncio.gather(*(llamactl(*args) for args in commands.values()))
        out.update(zip(commands, results, strict=True))

    await round_(
        status=("status",),
        run_default=("run", "-d", "testapp", "-a", "message", "hi"),
        session=("sessions", "create", "-d", "testapp"),
        run_fails=("run", "-d", "testapp", "-s", "fails", "-a", "message", "kaboom"),
        run_unknown=("run", "-d", "nope", "-a", "message", "hi"),
        deploy=("deploy", str(config)),
    )
    found = SESSION_ID.search(out["session"][1])
    session = found.group(1) if found else "no-session-printed"
    tally = ("run", "-d", "testapp", "-s", "tally", "-i", session, "-a", "amount")
    await round_(
        run_second=("run", "-d", SECOND, "-a", "message", "hi"),
        deploy_existing=("deploy", str(config)),
        tally_first=(*tally, "3"),
    )
    write_shout_deployment(config.parent, SECOND, tag="v2")
    await round_(
        deploy_reload=("deploy", "--reload", str(config)),
        tally_second=(*tally, "4"),
    )
    await round_(run_reloaded=("run", "-d", SECOND, "-a", "message", "hi"))
    return out


def succeeded(transcript: Transcript, name: str) -> str:
    """The stdout of a command that exited 0 (fails with its output otherwise)."""
    code, stdout, stderr = transcript[name]
    assert code == 0, f"{name}: exit {code}\n{stdout}\n{stderr}"
    return stdout


def failed(transcript: Transcript, name: str) -> str:
    """The stderr of a command that exited non-zero (click's ``Error: ...``)."""
    code, stdout, stderr = transcript[name]
    assert code != 0, f"{name} unexpectedly succeeded:\n{stdout}"
    assert stderr.startswith("Error: "), stderr
    return stderr


async def test_status(transcript: Transcript) -> None:
    """``llamactl status`` says the server is up and lists testapp."""
    stdout = succeeded(transcript, "status")
    assert stdout.startswith("LlamaDeploy is up and running.")
    assert "Active deployments:" in stdout
    assert "- testapp" in stdout.splitlines()


async def test_run(transcript: Transcript) -> None:
    """``llamactl run -d testapp -a message hi`` prints the default service's result."""
    assert succeeded(transcript, "run_default") == "echo: hi\n"


async def test_run_failing_workflow(transcript: Transcript) -> None:
    """A workflow that raises makes ``llamactl run`` exit non-zero with an error message
    naming the HTTP 500 (0.8.1's ``llamactl`` prints the status line, not the body)."""
    stderr = failed(transcript, "run_fails")
    assert "500" in stderr


async def test_run_unknown_deployment(transcript: Transcript) -> None:
    """``llamactl run -d nope`` exits non-zero with the 404 in its message."""
    stderr = failed(transcript, "run_unknown")
    assert "404" in stderr


async def test_sessions_create(transcript: Transcript) -> None:
    """``llamactl sessions create -d testapp`` prints a ``SessionDefinition``."""
    stdout = succeeded(transcript, "session")
    assert SESSION_ID.match(stdout), stdout
    assert stdout.rstrip("\n").endswith("task_ids=[] state={}")


async def test_run_in_session(transcript: Transcript) -> None:
    """``llamactl run -s tally -i SESSION`` twice: the session keeps the workflow's
    context, so the total grows (3, then 3 + 4)."""
    assert succeeded(transcript, "tally_first") == "3\n"
    assert succeeded(transcript, "tally_second") == "7\n"


async def test_deploy(transcript: Transcript) -> None:
    """``llamactl deploy FILE`` creates a second deployment from a local directory (a
    ``workflows`` workflow), which then runs; deploying it again without ``--reload``
    fails (409)."""
    assert succeeded(transcript, "deploy") == f"Deployment successful: {SECOND}\n"
    assert succeeded(transcript, "run_second") == "v1: hi\n"
    assert "409" in failed(transcript, "deploy_existing")


async def test_deploy_reload(transcript: Transcript) -> None:
    """``llamactl deploy --reload FILE`` replaces the deployment with its new source: the
    rewritten workflow answers afterwards."""
    assert succeeded(transcript, "deploy_reload") == f"Deployment successful: {SECOND}\n"
    assert succeeded(transcript, "run_reloaded") == "v2: hi\n"
