"""``python -m llama_mesh.server``: the same as ``llamactl serve``."""

import sys

from llama_mesh.server.serve import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m llama_mesh.server"))
