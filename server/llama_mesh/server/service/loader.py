"""Import a service's workflow object from its source directory."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

from llama_mesh.server.errors import InvalidArgumentError
from llama_mesh.server.service.families import family_of


def load_workflow(source_dir: Path, path: str) -> Any:
    """The workflow named by ``path`` (``dir/module:attr`` or ``module:attr``).

    ``dir`` is relative to ``source_dir`` and is put first on ``sys.path``, so the
    service's own modules import as they do when run by hand. The module itself is loaded
    from its file, so a service module may share its name with an installed package (a
    ``workflows.py`` next to the ``workflows`` library). A ``Workflow`` subclass (rather than
    an instance) is instantiated without arguments. The object is a workflow of one of the
    families in :mod:`~llama_mesh.server.service.families`.
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
        module = _import(module_dir, module_name)
    except InvalidArgumentError:
        raise
    except Exception as exc:
        raise InvalidArgumentError(
            f"cannot import module '{module_name}' from {module_dir}: {type(exc).__name__}: "
            f"{exc}\n{_user_traceback(exc)}"
        ) from exc
    obj = getattr(module, attr, None)
    if obj is None:
        raise InvalidArgumentError(f"module '{module_name}' has no attribute '{attr}'")
    try:
        family_of(obj)
    except InvalidArgumentError:
        what = obj.__name__ if isinstance(obj, type) else type(obj).__name__
        raise InvalidArgumentError(
            f"'{path}' is a {what}, not a workflows.Workflow "
            "(nor a llama_index.core.workflow.Workflow) instance"
        ) from None
    return obj() if isinstance(obj, type) else obj


def _user_traceback(exc: BaseException) -> str:
    """The traceback of an error raised while importing a service module, without the
    frames of this loader and of importlib."""
    frames = [
        frame
        for frame in traceback.extract_tb(exc.__traceback__)
        if frame.filename != __file__ and not frame.filename.startswith("<frozen ")
    ]
    lines = ["Traceback (most recent call last):\n", *traceback.format_list(frames)]
    lines += traceback.format_exception_only(exc)
    return "".join(lines).rstrip()


def _import(module_dir: Path, name: str) -> ModuleType:
    """The module ``name`` from ``module_dir`` (a ``name.py`` file or a ``name/`` package)."""
    candidates = (module_dir / f"{name}.py", module_dir / name / "__init__.py")
    origin = next((c for c in candidates if c.is_file()), None)
    if origin is None:
        raise InvalidArgumentError(f"no module '{name}' in {module_dir}")
    loaded = sys.modules.get(name)
    if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve() == origin:
        return loaded
    # A name taken by another module (an installed package) gets a private alias.
    key = name if loaded is None else f"_llama_mesh_service_{abs(hash(origin))}_{name}"
    spec = importlib.util.spec_from_file_location(
        key,
        origin,
        submodule_search_locations=[str(origin.parent)] if origin.stem == "__init__" else None,
    )
    if spec is None or spec.loader is None:
        raise InvalidArgumentError(f"cannot load {origin}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(key, None)
        raise
    return module
