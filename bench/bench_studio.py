#!/usr/bin/env python3
"""What the studio costs the API: requests per second of API clients with and without it.

The same `mlx-tune serve` process setup on the demo model (SmolLM2-135M-Instruct Q4_1),
measured three ways, one server process at a time:

* ``--no-studio``: the page and its routes left out (the baseline);
* studio attached, nobody looking;
* studio attached with ``--tabs`` open pages on the runs view of a training run, each
  polling what the page polls (``/studio/api/run?since=N`` every 2 s, the runs list every
  10 s) over a 2,000-row ``metrics.jsonl`` that grows while the clients run.

API load: ``--clients`` threads sending short chat completions (8 tokens, greedy), then
``GET /v1/models`` (the cheapest route, where routing overhead would show), for
``--seconds`` each; the scenarios run in ``--rounds`` interleaved rounds (rotated, so none is always
first) and each reports its median round. Target: API requests/s with the studio open >= 0.95x the baseline. Prints
the target objects as JSON last.

    python bench/bench_studio.py [--quick] [--model PATH] [--json OUT]
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import httpx  # noqa: E402
from benchlib import MODEL, emit_targets, start_serve  # noqa: E402

DEFAULT_MODEL = MODEL


def make_run(runs: Path, rows: int = 2000) -> Path:
    run = runs / "live"
    run.mkdir(parents=True)
    with open(run / "metrics.jsonl", "w") as f:
        for i in range(1, rows + 1):
            f.write(json.dumps({"step": i, "loss": 3.0 / (1 + i / 500), "learning_rate": 1e-4,
                                "tokens_per_sec": 900.0, "peak_memory_gb": 1.2}) + "\n")
    return run


def api_load(url: str, clients: int, seconds: float, kind: str) -> dict[str, float]:
    """Requests/s of ``kind`` (chat completions or GET /v1/models) over ``seconds`` with ``clients`` threads."""
    stop = time.monotonic() + seconds
    counts = {"chat": 0, "models": 0}
    lock = threading.Lock()

    def chat():
        with httpx.Client(base_url=url, timeout=60) as c:
            while time.monotonic() < stop:
                r = c.post("/v1/chat/completions", json={"model": "base", "max_tokens": 8, "temperature": 0,
                                                         "messages": [{"role": "user", "content": "Say hello."}]})
                r.raise_for_status()
                with lock:
                    counts["chat"] += 1

    def models():
        with httpx.Client(base_url=url, timeout=60) as c:
            while time.monotonic() < stop:
                c.get("/v1/models").raise_for_status()
                with lock:
                    counts["models"] += 1

    # One kind of request at a time: mixing them measures how they starve each other, not the studio.
    threads = [threading.Thread(target=f) for f in ([chat] if kind == "chat" else [models]) * clients]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    return {k: v / wall for k, v in counts.items()}


def studio_tabs(url: str, run: Path, tabs: int, until: threading.Event) -> list[int]:
    """Threads acting as open pages on the run's view; a writer grows metrics.jsonl meanwhile."""
    polls = [0] * tabs

    def tab(i: int):
        with httpx.Client(base_url=url, timeout=60) as c:
            c.get("/studio").raise_for_status()
            seen = c.get("/studio/api/run", params={"name": "live"}).json()["total_rows"]
            last_list = 0.0
            while not until.wait(2.0):
                r = c.get("/studio/api/run", params={"name": "live", "since": seen}).json()
                seen += len(r["rows"])
                if time.monotonic() - last_list > 10:
                    c.get("/studio/api/runs").raise_for_status()
                    last_list = time.monotonic()
                polls[i] += 1

    def writer():
        step = 2001
        while not until.wait(0.5):
            with open(run / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "loss": 1.0, "tokens_per_sec": 900.0}) + "\n")
            step += 1

    threads = [threading.Thread(target=tab, args=(i,), daemon=True) for i in range(tabs)]
    threads.append(threading.Thread(target=writer, daemon=True))
    for t in threads:
        t.start()
    return polls


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--quick", action="store_true", help="10 s per measurement instead of 30")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--tabs", type=int, default=4)
    p.add_argument("--seconds", type=float, default=None)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the three scenarios")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    seconds = args.seconds or (6.0 if args.quick else 15.0)
    if not args.model.is_file():
        print(json.dumps([{"name": "studio_api_rps", "measured": None, "target": 0.95, "unit": "x", "rival": "",
                           "pass": False, "error": f"{args.model} missing: run make setup"}]))
        return 1
    results: dict[str, dict] = {}
    rounds: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp) / "runs"
        run = make_run(runs)
        scenarios = (("no studio", False, 0), ("studio idle", True, 0), (f"studio, {args.tabs} tabs polling", True, args.tabs))
        # Interleaved rounds, each starting one scenario later: drift and order hit every scenario alike.
        order = [scenarios[(i + r) % 3] for r in range(args.rounds) for i in range(3)]
        for label, studio, tabs in order:
            proc, url = start_serve(["--model", str(args.model), "--runs-dir", str(runs), "--log-level", "warning"]
                                    + ([] if studio else ["--no-studio"]), Path(tmp) / "server.log")
            try:
                api_load(url, args.clients, 2.0, "chat")  # warm-up
                until = threading.Event()
                polls = studio_tabs(url, run, tabs, until) if tabs else []
                got = {kind: api_load(url, args.clients, seconds, kind)[kind] for kind in ("chat", "models")}
                until.set()
                for kind, rps in got.items():
                    rounds.setdefault(label, {}).setdefault(kind, []).append(rps)
                results[label] = {k: statistics.median(v) for k, v in rounds[label].items()}
                results[label]["studio_polls"] = results[label].get("studio_polls", 0) + sum(polls)
            finally:
                proc.terminate()
                proc.wait(20)
            print(f"{label:>26}: chat {got['chat']:.2f} req/s, /v1/models {got['models']:.1f} req/s, "
                  f"studio polls {sum(polls)}", flush=True)
    results = {label: results[label] for label, _, _ in scenarios}
    base = results["no studio"]
    targets = []
    for label in list(results)[1:]:
        for kind in ("chat", "models"):
            ratio = results[label][kind] / base[kind]
            targets.append({
                "name": f"studio_api_{kind}_rps_{label.split(',')[0].replace(' ', '_')}"
                        + ("_polling" if "tabs" in label else ""),
                "measured": round(ratio, 3), "target": 0.95, "unit": "x",
                "rival": f"{label}: {results[label][kind]:.2f} req/s vs --no-studio {base[kind]:.2f} req/s "
                         f"({args.clients} clients, {seconds:.0f} s)",
                "pass": ratio >= 0.95})
    return emit_targets(targets, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
