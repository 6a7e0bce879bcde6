"""The JSON the studio page draws: runs, one run's series and reports, a data folder.

Everything is read from disk on each request (a run that is training grows its
``metrics.jsonl`` between two polls); ``since`` lets the page fetch only the new rows.
Files are opened only after ``files.inside`` confirms that, symlinks followed, they lie
in the root the request was confined to.
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_tune.data.dataset import read_training_file
from mlx_tune.data.inspect import inspect_rows
from mlx_tune.data.tokenize import tokenize_record
from mlx_tune.errors import UserError
from mlx_tune.server.errors import ApiError
from mlx_tune.studio.files import inside
from mlx_tune.training.runs import find_run_folders, read_metrics, summarize_run

# Series the runs view charts, grouped one chart each, when a run's rows have them.
CHARTS = {
    "loss": ["loss", "val_loss"],
    "learning rate": ["learning_rate"],
    "tokens/s": ["tokens_per_sec"],
    "eval accuracy": ["eval_accuracy"],
    "rewards": ["reward_accuracy", "val_reward_accuracy", "reward_margin", "val_reward_margin", "chosen_reward",
                "rejected_reward", "reward_mean", "reward_std", "val_reward_mean"],
    "kl": ["kl"],
}
LIVE_S = 120  # a run whose metrics changed this recently, and has no adapter written since, is training
SPLITS = ("train", "valid", "test")
HISTOGRAM_ROWS = 2000  # rows tokenized for the length histogram
HISTOGRAM_BINS = 20


def _json_file(root: Path, path: Path) -> Any:
    if not path.is_file() or not inside(root, path):
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def is_live(folder: Path) -> bool:
    """Training now: metrics written in the last ``LIVE_S`` and no final adapter saved after them."""
    metrics = (folder / "metrics.jsonl").stat().st_mtime
    adapter = folder / "adapters.safetensors"
    finished = adapter.is_file() and adapter.stat().st_mtime >= metrics - 30  # the test row follows the adapter
    return time.time() - metrics < LIVE_S and not finished


def run_list(root: Path) -> list[dict[str, Any]]:
    """One entry per run folder under ``root``: name (relative), progress and whether it trains now."""
    out = []
    for folder in find_run_folders(root):
        metrics = folder / "metrics.jsonl"
        if not inside(root, metrics):
            continue
        s = summarize_run(folder, root)
        out.append({
            "name": s.name, "steps": s.steps, "last_loss": s.last_loss, "best_val_loss": s.best_val_loss,
            "best_val_step": s.best_val_step, "tokens_per_sec": s.tokens_per_sec, "peak_memory_gb": s.peak_memory_gb,
            "has_adapter": (folder / "adapters.safetensors").is_file(),
            "live": is_live(folder),
        })
    return out


def _reports(root: Path, folder: Path) -> tuple[Any, list[dict[str, Any]]]:
    """(fuse report, test_mlx.py reports) found in the run folder and its direct subfolders."""
    fuse, tests = None, []
    candidates = sorted(folder.glob("*.json")) + sorted(folder.glob("*/*.json"))
    for path in candidates:
        if path.name in ("adapter_config.json", "state.json", "config.json", "tokenizer.json", "tokenizer_config.json"):
            continue
        data = _json_file(root, path)
        if not isinstance(data, dict):
            continue
        if path.name.endswith("fuse_report.json") and fuse is None:  # in a fused folder, or beside a .gguf
            fuse = data
        elif "compare" in data or ("results" in data and "model" in data):
            tests.append({"file": str(path.relative_to(folder)), "report": data})
    return fuse, tests


@dataclass
class _Series:
    """A run's rows with only their finite numbers, and the keys present, for ``source`` rows."""

    source: list[dict]
    numeric: list[dict]
    present: set[str]


_SERIES: dict[str, _Series] = {}
_SERIES_LOCK = threading.Lock()
MAX_SERIES = 64


def _series(path: Path, rows: list[dict]) -> tuple[list[dict], set[str]]:
    """``rows`` filtered to finite numbers; rows already filtered on an earlier poll are kept.

    ``read_metrics`` hands back the same row objects for lines it parsed before, so an
    unchanged prefix is recognised by identity and only the rows after it are converted.
    """
    key = str(path)
    with _SERIES_LOCK:
        known = _SERIES.get(key)
    n = 0
    if known is not None and len(known.source) <= len(rows) and all(
            a is b for a, b in zip(known.source[-1:], rows[len(known.source) - 1:len(known.source)])):
        n = len(known.source)
    numeric = (known.numeric[:n] if known is not None else []) + [
        {k: v for k, v in r.items() if _finite(v)} for r in rows[n:]]
    present = set(known.present) if n and known is not None else set()
    for r in numeric[n:]:
        present.update(r)
    with _SERIES_LOCK:
        _SERIES.pop(key, None)
        _SERIES[key] = _Series(list(rows), numeric, present)
        while len(_SERIES) > MAX_SERIES:
            _SERIES.pop(next(iter(_SERIES)))
    return numeric, present


def run_detail(root: Path, folder: Path, since: int = 0) -> dict[str, Any]:
    """The run's metrics rows from row ``since`` on, the charts they fill, its config and reports.

    A poll (``since`` > 0) gets only what grows while a run trains: the rows, the charts and
    whether it is still live. The config and the reports came with the first request, and
    leaving them out keeps a page polling every 2 s from costing API clients.
    """
    rows, bad = read_metrics(folder / "metrics.jsonl")
    numeric, present = _series(folder / "metrics.jsonl", rows)
    charts = {title: [k for k in keys if k in present] for title, keys in CHARTS.items()}
    out: dict[str, Any] = {
        "name": str(folder.relative_to(root)) if folder != root else ".",
        "rows": numeric[since:],
        "total_rows": len(numeric),
        "malformed_lines": bad,
        "charts": {t: k for t, k in charts.items() if k},
        "has_adapter": (folder / "adapters.safetensors").is_file(),
        "live": is_live(folder),
    }
    if since > 0:
        return out
    summary = summarize_run(folder, root)
    fuse, tests = _reports(root, folder)
    return {**out, "config": summary.config, "config_source": summary.config_source, "fuse_report": fuse,
            "test_reports": tests}


def data_folders(roots: dict[str, Path]) -> list[dict[str, str]]:
    """Folders holding a ``train.jsonl`` (what data_transform.py writes), up to 3 levels below each root."""
    out = []
    for label, root in roots.items():
        for folder in sorted({p.parent for p in root.glob("train.jsonl")} | {p.parent for p in root.glob("*/train.jsonl")}
                             | {p.parent for p in root.glob("*/*/train.jsonl")}):
            if inside(root, folder / "train.jsonl"):
                rel = folder.relative_to(root).as_posix()
                out.append({"root": label, "path": "" if rel == "." else rel})
    return out


def _histogram(lengths: list[int]) -> dict[str, Any]:
    if not lengths:
        return {"edges": [], "counts": []}
    lo, hi = min(lengths), max(lengths)
    width = max(1, math.ceil((hi - lo + 1) / HISTOGRAM_BINS))
    counts = [0] * math.ceil((hi - lo + 1) / width)
    for n in lengths:
        counts[(n - lo) // width] += 1
    return {"edges": [lo + i * width for i in range(len(counts) + 1)], "counts": counts}


def data_view(folder: Path, root: Path, tokenizer, *, split: str = "train", rows: int = 5) -> dict[str, Any]:
    """Rows of ``split`` as training renders them (segments with a trained flag), counts, lengths."""
    counts: dict[str, int] = {}
    for name in SPLITS:
        path = folder / f"{name}.jsonl"
        if path.is_file() and inside(root, path):
            with path.open("rb") as f:
                counts[name] = sum(1 for line in f if line.strip())
    if split not in counts:
        raise ApiError(404, f"split '{split}': no {split}.jsonl here; have {', '.join(counts) or 'none'}",
                       param="split", code="not_found")
    path = folder / f"{split}.jsonl"
    try:
        shown = inspect_rows(path, tokenizer, rows=rows)
        fmt, records, _ = read_training_file(path)
    except UserError as exc:
        raise ApiError(400, str(exc), param="path", code="invalid_data") from None
    lengths = [len(tokenize_record(tokenizer, r, fmt)[0]) for r in records[:HISTOGRAM_ROWS]]
    return {
        "split": split,
        "format": fmt,
        "counts": counts,
        "rows": [{"line": r.line, "tokens": len(r.ids), "trained": sum(r.train), "summary": r.counts(),
                  "segments": [{"text": s.text, "trained": s.trained and not s.cut, "cut": s.cut} for s in r.segments]}
                 for r in shown],
        "lengths": _histogram(lengths),
        "lengths_of": min(len(records), HISTOGRAM_ROWS),
    }
