"""What the benchmark scripts share: a free local port and how their targets are printed.

Every benchmark ends by printing its target objects (name, measured, target, unit, rival,
pass) as JSON, last, so ``bench/run_all.py`` can read them from the output, and writes
the same JSON to ``--json FILE`` when asked.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

from mlx_tune.atomic import write_text_atomic


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def emit_targets(targets: list[dict], path: str | Path | None = None) -> int:
    """Print ``targets`` as JSON (and write them to ``path``); the exit code 0."""
    text = json.dumps(targets, indent=2)
    if path:
        write_text_atomic(path, text + "\n")
    print(text)
    return 0
