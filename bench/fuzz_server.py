#!/usr/bin/env python3
"""Fuzz the server with schemathesis against its own ``/openapi.json``.

Starts the real server (uvicorn, a thread) on a tiny model with one adapter and an
adapters root, then runs ``schemathesis run`` (generated requests, valid and malformed,
for every operation) with the checks: no 5xx, status codes / content types / response
bodies as the schema documents them, and schema-violating requests rejected. Prints
the number of requests tried and exits non-zero on any failure.

    python bench/fuzz_server.py [--max-examples N] [--seed S]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlx_tune.runtime.blas import ensure_fast_blas  # noqa: E402

ensure_fast_blas()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402

CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
          "response_schema_conformance,negative_data_rejection")


def start_server(tmp: Path):
    """(context manager yielding the URL) for a tiny model + adapter 'a1' + adapters root."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from server_util import make_adapter, serve_in_thread

    from mlx_tune.model.loading import load_model
    from mlx_tune.server import build_app
    from mlx_tune.testing.tiny import save_tiny_folder

    # A short context window bounds every generated request's work.
    base = save_tiny_folder(tmp / "base", max_position_embeddings=96)
    root = tmp / "root"
    make_adapter(base, root / "a1", rank=4)
    model, tokenizer, info = load_model(str(base))
    app, _, _ = build_app(model, tokenizer, info, adapters={"a1": str(root / "a1")}, adapters_root=str(root),
                          max_queue=256, max_batch=8)
    return serve_in_thread(app)


def count_requests(ndjson: Path) -> int:
    """Requests schemathesis sent, from its ndjson event log (one interaction per request)."""
    total = 0
    for line in ndjson.read_text().splitlines():
        if '"ScenarioFinished"' not in line:
            continue
        event = json.loads(line).get("ScenarioFinished", {})
        recorder = event.get("recorder") or {}
        total += len(recorder.get("interactions") or {})
    return total


def run(max_examples: int, seed: int, workers: int = 1,
        phases: str = "examples,coverage,fuzzing") -> tuple[int, int, str]:
    """(schemathesis exit code, requests tried, its output)."""
    exe = shutil.which("schemathesis") or str(Path(sys.executable).with_name("schemathesis"))
    if not Path(exe).exists():
        raise SystemExit("schemathesis is not installed: pip install schemathesis")
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        with start_server(tmp) as url:
            ndjson = tmp / "events.ndjson"
            cmd = [exe, "run", f"{url}/openapi.json", "--checks", CHECKS, "--max-examples", str(max_examples),
                   "--seed", str(seed), "--workers", str(workers), "--phases", phases,
                   "--request-timeout", "60", "--no-color", "--report", "ndjson", "--report-ndjson-path",
                   str(ndjson), "--suppress-health-check", "all", "--generation-database", "none"]
            # Run it in the temporary folder: schemathesis keeps a cache in its working directory.
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, env={**os.environ, "NO_COLOR": "1"})
            requests = count_requests(ndjson) if ndjson.exists() else 0
    return proc.returncode, requests, proc.stdout + proc.stderr


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-examples", type=int, default=30, help="test cases per operation and phase")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--phases", default="examples,coverage,fuzzing", help="schemathesis phases to run")
    args = parser.parse_args(argv)
    code, requests, output = run(args.max_examples, args.seed, phases=args.phases)
    print(output[-6000:])
    print(f"schemathesis: {requests} requests tried, exit code {code}")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
