"""Load services' workflows as a worker would, and say whether that worked.

``python -m llama_mesh.server.service.check --source-dir DIR SERVICE=PATH ...`` imports each
``PATH`` (``dir/module:attr``) relative to ``DIR``, in this interpreter, directory and
environment, and exits 0, or prints which service cannot be loaded and why and exits 3. A
reload runs it with each new version's interpreter before any old worker stops; it needs no
NATS.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llama_mesh.server.errors import MeshError
from llama_mesh.server.service.loader import load_workflow

EXIT_CANNOT_LOAD = 3


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    parser = argparse.ArgumentParser(prog="llama-mesh-check", description=__doc__)
    parser.add_argument("--source-dir", type=Path, required=True, help="the services' root")
    parser.add_argument("services", nargs="+", metavar="SERVICE=PATH")
    args = parser.parse_args(argv)
    for item in args.services:
        service, sep, path = item.partition("=")
        if not sep:
            parser.error(f"expected SERVICE=PATH, got {item!r}")
        try:
            load_workflow(args.source_dir, path)
        except (MeshError, ValueError) as exc:
            message = exc.message if isinstance(exc, MeshError) else str(exc)
            print(f"service '{service}' ({path}) cannot be loaded: {message}", file=sys.stderr)
            return EXIT_CANNOT_LOAD
    return 0


if __name__ == "__main__":
    sys.exit(main())
