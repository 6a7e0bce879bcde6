"""Loop callbacks: the metrics file, the progress bar, and the loss plot.

A callback is any object with some of ``on_report(row)``, ``on_eval(row)``,
``on_bad_step(row)``, ``on_step_end(state)``, ``on_interrupt(state)``,
``on_train_end(state)`` (``training.loop.train`` calls those it has).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlx_tune.atomic import write_file_atomic, write_text_atomic

if TYPE_CHECKING:
    from mlx_tune.training.loop import LoopState


class MetricsLog:
    """Append one JSON object per report to ``metrics.jsonl``; each row is flushed and
    fsynced, so a crash loses at most the row being written."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, row: dict) -> None:
        line = json.dumps({k: _json_number(v) for k, v in row.items()}) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    on_report = on_eval = on_bad_step = write

    def truncate_after(self, step: int) -> None:
        """Drop rows past ``step`` (a resumed run rewrites them), atomically."""
        if not self.path.is_file():
            return
        keep = [line for line in self.rows() if line.get("step", 0) <= step]
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in keep))

    def rows(self) -> list[dict]:
        out = []
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:  # a row cut by a crash
                    continue
        return out


def _json_number(v: Any) -> Any:
    if isinstance(v, float):
        return None if not math.isfinite(v) else round(v, 8)
    return v


class Progress:
    """A tqdm bar with ETA, loss, tokens/s and peak memory (rank 0 only)."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)

    def on_step_end(self, state: LoopState) -> None:
        if self.bar is not None:
            self.bar.update(state.step - self.bar.n)

    def on_report(self, row: dict) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_sec']:.0f}",
                                 mem=f"{row['peak_memory_gb']:.2f}GB", refresh=False)

    def on_eval(self, row: dict) -> None:
        if "val_loss" in row:
            msg = (f"step {row['step']}: val_loss {row['val_loss']:.4f} "
                   f"(ppl {row['val_perplexity']:.2f}, {row['val_time_s']:.1f}s)")
        elif "eval_accuracy" in row:
            parts = [f"{k[len('eval_accuracy_'):]} {_pct(v)}" for k, v in row.items() if k.startswith("eval_accuracy_")]
            msg = (f"step {row['step']}: eval_accuracy {_pct(row['eval_accuracy'])} over {row.get('eval_prompts')} prompts"
                   + (f" ({', '.join(parts)})" if len(parts) > 1 else "") + f", {row.get('eval_time_s', 0):.1f}s")
        elif "reason" in row:
            msg = f"step {row['step']}: {row['reason']}"
        else:
            return
        if self.bar is not None:
            self.bar.write(msg)

    def write(self, msg: str) -> None:
        """A log line above the bar (rank 0 only)."""
        if self.bar is not None:
            self.bar.write(msg)

    def on_train_end(self, state: LoopState) -> None:
        if self.bar is not None:
            self.bar.close()

    on_interrupt = on_train_end


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def plot_losses(metrics_path: str | Path, out_path: str | Path) -> Path | None:
    """Write ``loss.png`` (train and validation loss, and eval accuracy on a right-hand axis,
against step; preference runs add a panel of reward accuracy and margin, GRPO runs one of the
mean reward, sampled and held-out); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = MetricsLog(metrics_path).rows()

    def points(key: str) -> list:
        return [(r["step"], r[key]) for r in rows if r.get(key) is not None and "step" in r]

    train_pts, val_pts, acc_pts = points("loss"), points("val_loss"), points("eval_accuracy")
    reward_acc, margin = points("reward_accuracy"), points("reward_margin")
    preference = bool(reward_acc or margin)
    grpo = not preference and bool(points("reward_mean") or points("val_reward_mean"))
    fig, axes = plt.subplots(1, 2 if preference or grpo else 1, figsize=(12 if preference or grpo else 7, 4))
    ax = axes[0] if preference or grpo else axes
    if train_pts:
        ax.plot(*zip(*train_pts), label="train loss")
    if val_pts:
        ax.plot(*zip(*val_pts), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("preference loss" if preference else "GRPO loss" if grpo else "cross-entropy")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if acc_pts:  # accuracy on its own axis (0..1), right-hand side
        ax2 = ax.twinx()
        ax2.plot(*zip(*acc_pts), "s--", color="tab:green", label="eval accuracy")
        ax2.set_ylabel("eval accuracy")
        ax2.set_ylim(-0.02, 1.02)
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels)
    if preference:  # reward accuracy (0..1) and margin, train and validation
        right = axes[1]
        for key, style, label in (("reward_accuracy", "-", "reward accuracy"), ("val_reward_accuracy", "o-", "validation")):
            if points(key):
                right.plot(*zip(*points(key)), style, label=label)
        right.set_ylim(-0.02, 1.02)
        right.set_xlabel("step")
        right.set_ylabel("reward accuracy")
        right.grid(alpha=0.3)
        twin = right.twinx()
        for key, style, label in (("reward_margin", "--", "reward margin"), ("val_reward_margin", "s--", "val margin")):
            if points(key):
                twin.plot(*zip(*points(key)), style, color="tab:red", label=label)
        twin.set_ylabel("reward margin")
        h1, l1 = right.get_legend_handles_labels()
        h2, l2 = twin.get_legend_handles_labels()
        right.legend(h1 + h2, l1 + l2, loc="upper left")
    if grpo:  # mean reward: of the sampled completions (train) and greedy on the held-out prompts
        right = axes[1]
        for key, style, label in (("reward_mean", "-", "train reward (sampled)"),
                                  ("val_reward_mean", "o-", "held-out reward (greedy)")):
            if points(key):
                right.plot(*zip(*points(key)), style, label=label)
        right.set_xlabel("step")
        right.set_ylabel("mean reward")
        right.grid(alpha=0.3)
        right.legend(loc="upper left")
    try:
        return write_file_atomic(out_path, lambda tmp: fig.savefig(tmp, dpi=100, bbox_inches="tight"))
    finally:
        plt.close(fig)
