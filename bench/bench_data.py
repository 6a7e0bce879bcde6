#!/usr/bin/env python3
"""Benchmark: data_transform.py converting 1 million Alpaca records (JSONL -> chat JSONL).

Generates the input in a temporary folder, runs the converter in a child process (so
its peak RSS is the converter's alone) and prints records/s and peak RSS, then one JSON
line: ``{"name", "measured", "target", "unit", "rival", "pass", ...}``. No tokenizer
statistics. ``--quick`` uses 200k records.

    python bench/bench_data.py [--quick] [--records N] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET = 50_000  # records/s, from the issue

WORDS = ("data model train token layer adapter rank alpha matrix vector sample batch loss "
         "gradient weight bias query key value head norm scale group chat user answer").split()


def generate(path: Path, n: int, seed: int = 0) -> int:
    """``n`` Alpaca records with ~5% exact duplicates; returns the file size in bytes."""
    rng = random.Random(seed)
    dumps = json.JSONEncoder(ensure_ascii=False).encode
    with open(path, "w", encoding="utf-8") as f:
        lines, recent = [], []
        for i in range(n):
            if recent and rng.random() < 0.05:
                rec = rng.choice(recent)  # an exact duplicate of a recent record
            else:
                words = " ".join(rng.choices(WORDS, k=12))
                rec = {"instruction": f"Explain item {i}: {words}", "input": words if i % 3 == 0 else "",
                       "output": f"Item {i} is about {words}."}
                recent.append(rec)
                if len(recent) > 1000:
                    recent.pop(0)
            lines.append(dumps(rec))
            if len(lines) == 10_000:
                f.write("\n".join(lines) + "\n")
                lines = []
        if lines:
            f.write("\n".join(lines) + "\n")
    return path.stat().st_size


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="200k records instead of 1M")
    p.add_argument("--records", type=int, help="number of records (overrides --quick)")
    p.add_argument("--json-out", help="also write the JSON result to this file")
    args = p.parse_args(argv)
    n = args.records or (200_000 if args.quick else 1_000_000)

    with tempfile.TemporaryDirectory(prefix="bench_data-") as tmp:
        src = Path(tmp) / "alpaca.jsonl"
        t0 = time.perf_counter()
        size = generate(src, n)
        print(f"generated {n} records ({size / 1e6:.0f} MB) in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        cmd = [sys.executable, str(ROOT / "data_transform.py"), str(src), "--out", str(Path(tmp) / "out")]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        if proc.returncode != 0:
            print(proc.stdout + proc.stderr, file=sys.stderr)
            return 1
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
        if sys.platform == "darwin":
            peak_mb /= 1024  # bytes on macOS
        report = json.loads((Path(tmp) / "out" / "report.json").read_text())

    # The converter is one thread: on an idle machine CPU time equals wall time, and on a
    # shared one (CI, other jobs) CPU time is the figure that does not depend on the neighbours.
    rate, wall_rate = n / cpu, n / seconds
    print(f"{n} records: {cpu:.2f} CPU-s ({rate:,.0f} records/CPU-s), {seconds:.2f}s wall "
          f"({wall_rate:,.0f} records/s), peak RSS {peak_mb:.0f} MB "
          f"(input {size / 1e6:.0f} MB; written {report['written']}, duplicates {report['duplicates']})")
    result = {
        "name": "data_transform records per CPU-second (Alpaca JSONL -> chat, no tokenizer)",
        "measured": round(rate),
        "target": TARGET,
        "unit": "records/CPU-s",
        "rival": None,
        "pass": rate >= TARGET,
        "records": n,
        "cpu_seconds": round(cpu, 3),
        "wall_seconds": round(seconds, 3),
        "wall_records_per_s": round(wall_rate),
        "peak_rss_mb": round(peak_mb, 1),
        "input_mb": round(size / 1e6, 1),
    }
    print(json.dumps(result))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
