"""Run every benchmark and write one report: bench/results/latest.json and latest.md.

Each ``bench/bench_*.py`` prints, as its last output, a JSON list of target objects
``{"name", "measured", "target", "unit", "rival", "pass"}`` (or ``{"targets": [...]}``).
This runner executes them in separate processes (memory is freed between them), in
``--quick`` form when asked, and never drops one silently: a benchmark that fails, times
out or prints no targets appears in the report with ``pass: false`` and the reason.
The README's performance section is regenerated from the report.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))

from mlx_tune.atomic import write_text_atomic  # noqa: E402

# Interop checks need torch + peft + transformers (+ trl) beside mlx_tune: the rivals' Python.
RIVALS_PYTHON = [os.environ.get("MLX_TUNE_RIVALS_PYTHON"), str(ROOT / ".venv-rivals" / "bin" / "python")]
NEEDS_RIVALS = {"check_peft_interop.py", "check_trl_preference.py"}

# (script, extra args for the full run, extra args for --quick, timeout seconds full / quick)
BENCHMARKS = [
    ("bench_data.py", [], ["--quick"], 900, 300),
    ("bench_qlora_step.py", [], ["--quick"], 1800, 400),
    ("bench_attention_loss.py", [], ["--quick"], 900, 200),
    ("bench_packing.py", [], ["--quick"], 1800, 600),
    ("bench_train.py", [], ["--quick"], 3600, 600),
    ("bench_head.py", [], ["--quick"], 3600, 900),
    ("bench_preference.py", [], ["--quick"], 3600, 900),
    ("bench_server.py", [], ["--quick"], 1800, 400),
    ("bench_studio.py", [], ["--quick"], 900, 300),
    ("bench_grammar.py", [], ["--quick"], 1800, 600),
    ("bench_fuse.py", [], ["--quick"], 1200, 300),
    ("bench_llamacpp.py", [], ["--quick"], 3600, 1800),
    ("bench_memory.py", [], ["--quick"], 4 * 3600, 400),
    ("check_peft_interop.py", [], [], 600, 300),
    ("check_trl_preference.py", [], [], 600, 300),
]


def parse_targets(stdout: str) -> list[dict] | None:
    """The last JSON value in the output that holds target objects."""
    lines = stdout.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if not lines[i].lstrip().startswith(("[", "{")):
            continue
        try:
            value = json.loads("\n".join(lines[i:]))
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            value = [value] if "name" in value and "measured" in value else value.get("targets")
        if isinstance(value, list) and all(isinstance(t, dict) and "name" in t for t in value):
            return value
    return None


def run_one(script: str, args: list[str], timeout: int) -> tuple[list[dict], dict]:
    path = ROOT / "bench" / script
    entry = {"script": script, "args": args}
    if not path.is_file():
        entry["status"] = "missing"
        return [_failed(script, "benchmark script missing")], entry
    start = time.perf_counter()
    print(f"== {script} {' '.join(args)}", flush=True)
    python = sys.executable
    if script in NEEDS_RIVALS:
        python = next((p for p in RIVALS_PYTHON if p and Path(p).is_file()), sys.executable)
    try:
        proc = subprocess.run(
            [python, str(path), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
            env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"},
        )
    except subprocess.TimeoutExpired as exc:
        entry.update(status="timeout", seconds=timeout)
        print((exc.stdout or b"")[-2000:] if isinstance(exc.stdout, str) else "", flush=True)
        return [_failed(script, f"timed out after {timeout}s")], entry
    entry["seconds"] = round(time.perf_counter() - start, 1)
    tail = "\n".join(proc.stdout.splitlines()[-40:])
    print(tail, flush=True)
    targets = parse_targets(proc.stdout)
    if proc.returncode != 0 and not targets:
        entry["status"] = f"exit {proc.returncode}"
        err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        print(proc.stderr[-3000:], file=sys.stderr, flush=True)
        return [_failed(script, f"exit {proc.returncode}: {err}")], entry
    skipped = [ln for ln in proc.stdout.splitlines() if ln.startswith("skipped:")]
    if not targets and skipped and proc.returncode == 0:
        entry["status"] = "skipped"
        return [{"name": f"{script}: ran", "measured": None, "target": "runs", "unit": "", "rival": None,
                 "pass": None, "benchmark": script, "note": skipped[0] + " (make bench-rivals installs them)"}], entry
    worst = re.search(r"worst ([0-9.eE+-]+) vs tolerance ([0-9.eE+-]+)", proc.stdout)
    if not targets and worst:
        entry["status"] = "ok"
        measured, tol = float(worst.group(1)), float(worst.group(2))
        return [{"name": "PEFT export: max |logit diff| in peft.PeftModel vs mlx_tune", "measured": measured,
                 "target": tol, "unit": "", "rival": "Hugging Face PEFT", "pass": measured <= tol,
                 "benchmark": script}], entry
    if not targets:
        entry["status"] = "no targets printed"
        return [_failed(script, "printed no target objects")], entry
    entry["status"] = "ok"
    for t in targets:
        t.setdefault("rival", None)
        t.setdefault("benchmark", script)
    return targets, entry


def _failed(script: str, reason: str) -> dict:
    return {"name": f"{script}: ran", "measured": None, "target": "runs", "unit": "", "rival": None,
            "pass": False, "benchmark": script, "note": reason}


def machine() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    def v(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    import mlx.core as mx

    from mlx_tune.runtime.blas import openblas_loaded

    backend = "metal" if mx.metal.is_available() else "cpu"
    return {
        "platform": f"{platform.system()} {platform.machine()}",
        "cpu_count": os.cpu_count(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "backend": backend,
        "openblas_preloaded": openblas_loaded(),
        "versions": {n: v(n) for n in ("mlx", "mlx-lm", "mlx-tune", "torch", "peft", "transformers")}
        | {"python": platform.python_version()},
    }


def to_markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"Benchmarks ({'quick' if report['quick'] else 'full'} run, {report['date']}) on {m['platform']}, "
        f"{m['cpu_count']} cores, {m['memory_gb']} GB, backend {m['backend']} "
        f"(OpenBLAS preloaded: {m['openblas_preloaded']}); mlx {m['versions']['mlx']}, mlx-lm {m['versions']['mlx-lm']}.",
        "",
        "| target | measured | target | rival (same run) | pass |",
        "| --- | --- | --- | --- | --- |",
    ]
    for t in report["targets"]:
        unit = f" {t.get('unit', '')}".rstrip()
        measured = "—" if t.get("measured") is None else f"{_fmt(t['measured'])}{unit}"
        rival = "—" if t.get("rival") is None else f"{_fmt(t['rival'])}"
        note = f" ({t['note']})" if t.get("note") else ""
        mark = {True: "yes", False: "**no**"}.get(t.get("pass"), "reported" if t.get("target") == "report" else "skipped")
        lines.append(f"| {t['name']}{note} | {measured} | {_fmt(t.get('target'))} | {rival} | {mark} |")
    passed = sum(1 for t in report["targets"] if t.get("pass") is True)
    lines += ["", f"{passed} of {len(report['targets'])} targets pass."]
    lines += _seven_b_section()
    return "\n".join(lines) + "\n"


SEVEN_B_REPORT = RESULTS / "memory_7b.json"  # written by the full run's bench_memory.py (hours here)


def _seven_b_section() -> list[str]:
    """The 7B points of the last full memory run: the quick run measures only one of them."""
    if not SEVEN_B_REPORT.is_file():
        return []
    data = json.loads(SEVEN_B_REPORT.read_text())
    targets = data.get("targets") or []
    if not targets:
        return []
    date = data.get("date") or dt.datetime.fromtimestamp(SEVEN_B_REPORT.stat().st_mtime, dt.timezone.utc).strftime(
        "%Y-%m-%d %H:%M UTC")
    lines = ["", f"7B memory points of the last full `bench/bench_memory.py --only 7b` run ({date}; "
             f"`bench/results/{SEVEN_B_REPORT.name}`):", "",
             "| target | measured | target | rival (mlx-lm, same settings) | pass |", "| --- | --- | --- | --- | --- |"]
    for t in targets:
        unit = f" {t.get('unit', '')}".rstrip()
        mark = {True: "yes", False: "**no**"}.get(t.get("pass"), "skipped")
        rival = "—" if t.get("rival") is None else _fmt(t["rival"])
        lines.append(f"| {t['name']} | {_fmt(t['measured'])}{unit} | {_fmt(t.get('target'))} | {rival} | {mark} |")
    return lines


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"
    return str(x)


def update_readme(markdown: str) -> None:
    readme = ROOT / "README.md"
    start, end = "<!-- perf:start -->", "<!-- perf:end -->"
    text = readme.read_text()
    if start in text and end in text:
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        readme.write_text(f"{head}{start}\n{markdown}{end}{tail}")


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _merged(targets: list[dict], runs: list[dict], quick: bool) -> tuple[list[dict], list[dict]]:
    """The previous report's runs and targets with the scripts just run replaced, in BENCHMARKS order."""
    path = RESULTS / "latest.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    if old.get("quick") != quick:
        raise SystemExit(f"--merge: {path} holds a {'quick' if old.get('quick') else 'full'} run; "
                         "rerun everything, or merge with the same --quick setting")
    redone = {r["script"] for r in runs}
    by_script = {r["script"]: r for r in old.get("runs", []) if r["script"] not in redone} | {r["script"]: r for r in runs}
    kept = [t for t in old.get("targets", []) if t.get("benchmark") not in redone]
    order = [b[0] for b in BENCHMARKS]
    all_targets = kept + targets
    all_targets.sort(key=lambda t: order.index(t["benchmark"]) if t.get("benchmark") in order else len(order))
    return all_targets, [by_script[s] for s in order if s in by_script]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the short version (under 20 minutes here)")
    parser.add_argument("--only", nargs="*", help="run only these scripts")
    parser.add_argument("--merge", action="store_true",
                        help="with --only: replace those scripts' results in the existing report (same "
                             "--quick setting) and keep the others, each run dated")
    parser.add_argument("--report-only", action="store_true",
                        help="rebuild latest.md and the README section from latest.json (and the 7B report)")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        md = to_markdown(json.loads((RESULTS / "latest.json").read_text()))
        write_text_atomic(RESULTS / "latest.md", md)
        update_readme(md)
        print(md)
        return 0
    targets, runs = [], []
    start = time.perf_counter()
    for script, full, quick, t_full, t_quick in BENCHMARKS:
        if args.only and script not in args.only:
            continue
        found, entry = run_one(script, quick if args.quick else full, t_quick if args.quick else t_full)
        entry["date"] = _now()
        targets += found
        runs.append(entry)
    if args.merge and args.only:
        targets, runs = _merged(targets, runs, args.quick)
    report = {
        "date": _now(),
        "quick": args.quick,
        "seconds": round(sum(r.get("seconds", 0) for r in runs), 1) if args.merge else round(time.perf_counter() - start, 1),
        "machine": machine(),
        "runs": runs,
        "targets": targets,
    }
    write_text_atomic(RESULTS / "latest.json", json.dumps(report, indent=2) + "\n")
    md = to_markdown(report)
    write_text_atomic(RESULTS / "latest.md", md)
    update_readme(md)
    print("\n" + md)
    print(f"wrote {RESULTS / 'latest.json'} and latest.md in {report['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
