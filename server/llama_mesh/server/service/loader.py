"""Import a service's workflow object from its source directory."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from workflows import Workflow

from llama_mesh.server.errors import InvalidArgumentError


def load_workflow(source_dir: Path, path: str) -> Workflow:
    """The ``Workflow`` named by ``path`` (``dir/module:attr`` or ``module:attr``).

    ``dir`` is relative to ``source_dir`` and is put first on ``sys.path``, so the
    service's own modules import as they do when run by hand. A ``Workflow`` subclass
    (rather than an instance) is instantiated without arguments.
    """
    location, sep, attr = path.rpartition(":")
    if not sep or not location or not attr:
        raise InvalidArgumentError(f"service path '{path}' must look like 'dir/module:attr'")
    module_path = Path(location)
    module_dir = (source_dir / module_path.parent).resolve()
    module_name = module_path.name.removesuffix(".py")
    if str(module_dir) not in sys.path:
        sys.path.insert(0, str(module_dir))
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise InvalidArgumentError(
            f"cannot import module '{module_name}' from {module_dir}: {type(exc).__name__}: {exc}"
        ) from exc
    obj = getattr(module, attr, None)
    if obj is None:
        raise InvalidArgumentError(f"module '{module_name}' has no attribute '{attr}'")
    if isinstance(obj, type) and issubclass(obj, Workflow):
        obj = obj()
    if not isinstance(obj, Workflow):
        raise InvalidArgumentError(
            f"'{path}' is a {type(obj).__name__}, not a workflows.Workflow instance"
        )
    return obj
