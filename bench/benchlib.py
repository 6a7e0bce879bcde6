"""What the benchmark scripts share: the demo model, a free local port, a server started
for a bench, the rivals' Python, how a parent runs a side in a child process, and how
targets are printed.

Every benchmark ends by printing its target objects (name, measured, target, unit, rival,
pass) as JSON, last, so ``bench/run_all.py`` can read them from the output, and writes
the same JSON to ``--json FILE`` when asked.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlx_tune.atomic import write_text_atomic

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"  # the demo model (make setup fetches it)


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


def start_serve(args: list[str], log: Path, timeout: float = 300) -> tuple[subprocess.Popen, str]:
    """``mlx-tune serve ARGS`` on a free port (``scripts/python``, output to ``log``); returns
    ``(process, url)`` once ``/health`` answers. A server that exits first, or does not answer
    within ``timeout`` seconds, raises ``RuntimeError`` (with the log's tail)."""
    import httpx

    port = free_port()
    cmd = [str(ROOT / "scripts" / "python"), "-m", "mlx_tune", "serve", *args, "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError("server did not start")


def rival_python(modules: str) -> str | None:
    """A Python that can import ``modules`` ("torch, peft") beside mlx_tune: ``MLX_TUNE_RIVALS_PYTHON``,
    then ``.venv-rivals`` (bench/install_rivals.sh), then this one; None if none can."""
    for cand in (os.environ.get("MLX_TUNE_RIVALS_PYTHON"), ROOT / ".venv-rivals" / "bin" / "python", sys.executable):
        if cand and Path(cand).is_file():
            ok = subprocess.run([str(cand), "-c", f"import {modules}"], capture_output=True,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
            if ok.returncode == 0:
                return str(cand)
    return None


def add_side_flags(p: argparse.ArgumentParser, sides) -> None:
    """The hidden flags a parent gives a child (``bench_train.run_side``): its side, its data file, the HF folder."""
    p.add_argument("--side", choices=sides, help=argparse.SUPPRESS)
    p.add_argument("--rows", help=argparse.SUPPRESS)
    p.add_argument("--hf-dir", help=argparse.SUPPRESS)


def run_child(side: str, rows: str, sides: dict[str, Callable[[Any], dict]], *, torch_sides=(),
              load: Callable[[Path], Any] = lambda p: json.loads(p.read_text())) -> int:
    """A child's work: ``sides[side](load(rows))`` printed as one JSON line (what ``run_side``
    reads); exit code 0. OpenBLAS is preloaded first (a re-exec) except for the torch sides."""
    if side not in torch_sides:
        from mlx_tune.runtime.blas import ensure_fast_blas

        ensure_fast_blas()
    print(json.dumps(sides[side](load(Path(rows)))))
    return 0
