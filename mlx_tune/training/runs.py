"""Training runs on disk, compared: ``list_runs(dir)`` and ``format_runs(runs)`` (``mlx-tune runs``).

A run is a folder holding a ``metrics.jsonl`` (what ``run_train`` writes), found at any
depth up to ``MAX_DEPTH`` below the folder asked about; a run folder is not searched
further. Its summary comes from the metrics rows (report rows carry ``loss``,
``tokens_per_sec`` and ``peak_memory_gb``; eval rows ``val_loss``) and from its config:
the ``config`` saved in the newest complete checkpoint's ``state.json``, else the LoRA
keys of ``adapter_config.json``. Lines of ``metrics.jsonl`` that are not JSON objects
are counted, never fatal. ``differing_keys`` names the dotted config keys whose values
differ between the runs listed (``output_dir``, unique to every run, is left out).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_tune.errors import UserError
from mlx_tune.training.checkpoint import checkpoint_steps, read_state

MAX_DEPTH = 3
UNKNOWN = "?"  # shown for a key of a run whose config cannot be read
ABSENT = "-"  # shown for a key the run's config does not have
IGNORED_KEYS = {"output_dir", "source_path"}
# adapter_config.json key -> config key, for runs without a checkpoint
ADAPTER_KEYS = {"rank": "lora.rank", "alpha": "lora.alpha", "dropout": "lora.dropout", "use_rslora": "lora.use_rslora",
                "use_dora": "lora.use_dora", "target_modules": "lora.target_modules", "layers": "lora.layers"}


@dataclass
class RunSummary:
    """One run folder: what its metrics say and its flattened config (None: unreadable)."""

    name: str
    path: Path
    steps: int | None = None
    last_loss: float | None = None
    best_val_loss: float | None = None
    best_val_step: int | None = None
    best_eval_accuracy: float | None = None  # highest eval_accuracy (eval.prompts), first step reaching it
    best_eval_step: int | None = None
    tokens_per_sec: float | None = None
    peak_memory_gb: float | None = None
    malformed_lines: int = 0
    config: dict[str, Any] | None = None
    config_source: str | None = None


def find_run_folders(root: Path, max_depth: int = MAX_DEPTH) -> list[Path]:
    """Folders at depth 0..``max_depth`` under ``root`` holding a ``metrics.jsonl``, sorted."""
    found = []
    for here, dirs, files in os.walk(root):
        depth = len(Path(here).relative_to(root).parts)
        if "metrics.jsonl" in files:
            found.append(Path(here))
            dirs[:] = []
        elif depth >= max_depth:
            dirs[:] = []
        else:
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    return sorted(found)


@dataclass
class _Parsed:
    """What has been read of one ``metrics.jsonl``: its rows up to ``offset`` (just after a newline)."""

    inode: int
    offset: int
    last_line: bytes  # the bytes before ``offset`` back to the previous newline: the file's identity check
    rows: list[dict]
    bad: int


_PARSED: dict[str, _Parsed] = {}
_PARSED_LOCK = threading.Lock()
MAX_PARSED = 256  # files remembered; the oldest is dropped beyond this


def _parse_lines(data: bytes) -> tuple[list[dict], int]:
    rows, bad = [], 0
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8", errors="replace"))
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    return rows, bad


def read_metrics(path: Path) -> tuple[list[dict], int]:
    """(rows, malformed line count) of a ``metrics.jsonl``; blank lines are neither.

    A training run only appends to this file, and the studio polls it every few seconds, so
    the complete lines already parsed are remembered and only the bytes appended since are
    read. The whole file is parsed again when it is another file (new inode), shorter than
    what was parsed, or its last parsed line changed (a resume that cut the file and wrote it
    again). An unterminated last line is parsed each time but not remembered: a writer may
    be half way through it.
    """
    key = os.path.abspath(path)
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            inode, size = st.st_ino, st.st_size
            with _PARSED_LOCK:
                known = _PARSED.get(key)
            rows: list[dict] = []
            bad = 0
            start = 0
            if known is not None and known.inode == inode and size >= known.offset:
                f.seek(known.offset - len(known.last_line))
                if f.read(len(known.last_line)) == known.last_line:
                    rows, bad, start = list(known.rows), known.bad, known.offset
            f.seek(start)
            data = f.read()
    except OSError:
        return [], 1
    end = data.rfind(b"\n") + 1  # complete lines end here
    new_rows, new_bad = _parse_lines(data[:end])
    rows += new_rows
    bad += new_bad
    if end:
        offset = start + end
        # ``start`` is a line boundary, so the last line begins after the newline before it, or at ``start``.
        last_line = data[data.rfind(b"\n", 0, end - 1) + 1:end]
        with _PARSED_LOCK:
            _PARSED.pop(key, None)
            _PARSED[key] = _Parsed(inode, offset, last_line, list(rows), bad)
            while len(_PARSED) > MAX_PARSED:
                _PARSED.pop(next(iter(_PARSED)))
    tail_rows, tail_bad = _parse_lines(data[end:])
    return rows + tail_rows, bad + tail_bad


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """``{"lora": {"rank": 4}}`` -> ``{"lora.rank": 4}``."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def read_run_config(folder: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(flattened config, where it came from) of a run folder; (None, None) when unreadable."""
    for _step, ckpt in reversed(checkpoint_steps(folder / "checkpoints")):
        try:
            cfg = read_state(ckpt).get("config")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(cfg, dict):
            return flatten(cfg), str((ckpt / "state.json").relative_to(folder))
    try:
        adapter = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, None
    if not isinstance(adapter, dict):
        return None, None
    cfg = {key: adapter[k] for k, key in ADAPTER_KEYS.items() if k in adapter}
    if "base_model" in adapter:
        cfg["model"] = adapter["base_model"]
    return (cfg or None), ("adapter_config.json" if cfg else None)


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def summarize_run(folder: Path, root: Path) -> RunSummary:
    """The summary of one run folder (``name`` relative to ``root``)."""
    rows, bad = read_metrics(folder / "metrics.jsonl")
    name = str(folder.relative_to(root)) if folder != root else "."
    run = RunSummary(name=name, path=folder, malformed_lines=bad)
    steps = [int(r["step"]) for r in rows if _number(r.get("step")) is not None]
    run.steps = max(steps) if steps else None
    train = [r for r in rows if _number(r.get("loss")) is not None]
    if train:
        run.last_loss = _number(train[-1]["loss"])
    val = [(_number(r["val_loss"]), r.get("step")) for r in rows if _number(r.get("val_loss")) is not None]
    if val:
        run.best_val_loss, run.best_val_step = min(val, key=lambda x: x[0])  # type: ignore[arg-type,return-value]
    acc = [(_number(r["eval_accuracy"]), r.get("step")) for r in rows if _number(r.get("eval_accuracy")) is not None]
    if acc:
        best_acc = max(a for a, _ in acc)  # type: ignore[type-var]
        run.best_eval_accuracy, run.best_eval_step = next((a, st) for a, st in acc if a == best_acc)
    speeds = [x for x in (_number(r.get("tokens_per_sec")) for r in train) if x is not None]
    run.tokens_per_sec = statistics.median(speeds) if speeds else None
    mems = [x for x in (_number(r.get("peak_memory_gb")) for r in rows) if x is not None]
    run.peak_memory_gb = max(mems) if mems else None
    run.config, run.config_source = read_run_config(folder)
    return run


def list_runs(directory: str | Path) -> list[RunSummary]:
    """Every run under ``directory`` (depth up to ``MAX_DEPTH``), by relative name."""
    root = Path(directory)
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "no such folder"
        raise UserError(f"{root}: {what}; give the folder holding your runs' output_dir folders")
    return [summarize_run(folder, root) for folder in find_run_folders(root)]


def _key(v: Any) -> str:
    return json.dumps(v, sort_keys=True, default=str)


def differing_keys(runs: list[RunSummary]) -> list[str]:
    """Dotted config keys whose values differ between the runs with a readable config.

    Only the configs holding a key are compared on it, so a run known only from its
    adapter_config.json (LoRA keys) does not make every other key look different.
    """
    configs = [r.config for r in runs if r.config is not None]
    if len(configs) < 2:
        return []
    keys = sorted({k for c in configs for k in c} - IGNORED_KEYS)
    return [k for k in keys if len({_key(c[k]) for c in configs if k in c}) > 1]


def config_value(run: RunSummary, key: str) -> Any:
    if run.config is None:
        return UNKNOWN
    return run.config.get(key, ABSENT)


def runs_as_dicts(runs: list[RunSummary]) -> list[dict]:
    """The table as JSON-able rows (what ``--json`` prints)."""
    keys = differing_keys(runs)
    return [{
        "run": r.name, "path": str(r.path), "steps": r.steps, "last_loss": r.last_loss,
        "best_val_loss": r.best_val_loss, "best_val_step": r.best_val_step,
        "best_eval_accuracy": r.best_eval_accuracy, "best_eval_step": r.best_eval_step,
        "tokens_per_sec": r.tokens_per_sec, "peak_memory_gb": r.peak_memory_gb,
        "malformed_lines": r.malformed_lines, "config_source": r.config_source,
        "config_diff": {k: config_value(r, k) for k in keys},
    } for r in runs]


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return ABSENT
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e-3 or abs(v) >= 1e5 else f"{v:.{digits}f}".rstrip("0").rstrip(".")
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)


def format_runs(runs: list[RunSummary], directory: str | Path = ".") -> str:
    """An aligned text table of ``runs`` plus footnotes (malformed lines, unreadable configs)."""
    if not runs:
        return f"no training runs under {directory} (no metrics.jsonl within {MAX_DEPTH} folder levels)"
    keys = differing_keys(runs)
    with_acc = any(r.best_eval_accuracy is not None for r in runs)  # the column only where eval.prompts ran
    header = ["run", "steps", "last loss", "best val (step)", *(["best acc (step)"] if with_acc else []),
              "tok/s", "peak GB", *keys]
    table = [header]
    for r in runs:
        best = ABSENT if r.best_val_loss is None else f"{_fmt(r.best_val_loss)} ({r.best_val_step})"
        acc = [] if not with_acc else [ABSENT if r.best_eval_accuracy is None
                                       else f"{100 * r.best_eval_accuracy:.1f}% ({r.best_eval_step})"]
        name = r.name + ("*" if r.malformed_lines else "")
        tok = ABSENT if r.tokens_per_sec is None else f"{r.tokens_per_sec:.0f}"
        mem = ABSENT if r.peak_memory_gb is None else f"{r.peak_memory_gb:.2f}"
        table.append([name, _fmt(r.steps), _fmt(r.last_loss), best, *acc, tok, mem,
                      *(_fmt(config_value(r, k)) for k in keys)])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
             for row in table]
    if not keys and len(runs) > 1:
        lines.append("configs: no differing keys" if sum(r.config is not None for r in runs) > 1
                     else "configs: fewer than two readable configs to compare")
    for r in runs:
        if r.malformed_lines:
            lines.append(f"* {r.name}: {r.malformed_lines} malformed line(s) in metrics.jsonl skipped")
    unknown = [r.name for r in runs if r.config is None]
    if unknown and keys:
        lines.append(f"? no readable config (checkpoints/*/state.json or adapter_config.json): {', '.join(unknown)}")
    return "\n".join(lines)
