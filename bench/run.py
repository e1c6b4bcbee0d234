"""Entry point: ``.venv/bin/python bench/run.py [--quick] [--skip-08] [--only PARTS]``.

Prints a Markdown table: each llama-mesh figure (on its own NATS, and with the deployment on
RabbitMQ and on Redis) next to the same workflow run in-process and served by
``llama-deploy==0.8.1``, with the targets and whether they are met.
"""

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench._main import main

    raise SystemExit(main())
