"""A short schemathesis run against the server's own /openapi.json (bench/fuzz_server.py
runs the long one): generated and malformed requests, no 5xx, responses as documented."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from tests.needs import missing

ROOT = Path(__file__).resolve().parent.parent


def test_schemathesis_finds_nothing():
    if not (shutil.which("schemathesis") or Path(sys.executable).with_name("schemathesis").exists()):
        missing("schemathesis is not installed (a dev dependency)")
    sys.path.insert(0, str(ROOT / "bench"))
    import fuzz_server

    code, requests, output = fuzz_server.run(max_examples=6, seed=1, phases="fuzzing")
    assert code == 0, output[-4000:]
    assert requests >= 8  # at least one request per operation
