"""Loading a service's workflow object from its `path`."""

from __future__ import annotations

from pathlib import Path

import pytest

from llama_mesh.server.errors import InvalidArgumentError
from llama_mesh.server.service.loader import load_workflow

WORKFLOW = """
from workflows import Workflow, step
from workflows.events import StartEvent, StopEvent


class W(Workflow):
    @step
    async def go(self, ev: StartEvent) -> StopEvent:
        return StopEvent(result="{answer}")


instance = W()
not_a_workflow = 42
"""


def write(root: Path, relative: str, answer: str) -> None:
    target = root / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(WORKFLOW.replace("{answer}", answer))


async def test_module_named_like_an_installed_package(tmp_path: Path) -> None:
    """A service module called `workflows.py` loads although the `workflows` library is
    imported: the service's file wins for the service, the library stays intact."""
    write(tmp_path, "svc/workflows.py", "mine")
    workflow = load_workflow(tmp_path, "svc/workflows:instance")
    assert await workflow.run() == "mine"
    import workflows

    assert hasattr(workflows, "Workflow")


async def test_class_is_instantiated(tmp_path: Path) -> None:
    """A Workflow subclass named by the path is instantiated without arguments."""
    write(tmp_path, "flows.py", "from class")
    assert await load_workflow(tmp_path, "flows:W").run() == "from class"


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("nothing-here", "must look like"),
        ("missing:instance", "no module 'missing'"),
        ("flows2:absent", "has no attribute 'absent'"),
        ("flows2:not_a_workflow", "not a workflows.Workflow"),
    ],
)
def test_bad_paths_name_the_problem(tmp_path: Path, path: str, message: str) -> None:
    """Each way a path can be wrong is an InvalidArgumentError saying which."""
    write(tmp_path, "flows2.py", "x")
    with pytest.raises(InvalidArgumentError, match=message):
        load_workflow(tmp_path, path)


def test_import_errors_are_reported(tmp_path: Path) -> None:
    """A module that fails to import is reported with the exception it raised."""
    (tmp_path / "broken.py").write_text("import no_such_package_anywhere\n")
    with pytest.raises(InvalidArgumentError, match="ModuleNotFoundError"):
        load_workflow(tmp_path, "broken:w")
