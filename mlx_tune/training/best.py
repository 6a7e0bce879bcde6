"""The best evaluated step, keep-best checkpoints and early stopping.

``BestTracker`` follows one metric (``val_loss``, lower is better, or ``eval_accuracy``,
higher is better). A value improves on the best ``b`` when

    val_loss:       v < b - min_delta          eval_accuracy:  v > b + min_delta

(the first finite value always does). ``stale`` counts the evaluations since the last
improvement; with ``patience`` set, ``stale >= patience`` stops the run.

``EvalMonitor`` is the loop callback that uses it: at ``on_step_end`` it scores the eval
prompts when they are due (``every`` steps and the last step), writes their metrics row
(``eval_accuracy``, ``eval_accuracy_<match>``) to its sinks and the answers to
``eval_samples.jsonl``, feeds the metric (that row's accuracy, or the ``val_loss`` the loop
reported for this step) to the tracker, saves a checkpoint of a new best at once (so its
step is on disk, and the tracker state saved with it is already the new one) and, when
patience runs out, sets ``state.stop_reason``, which ends the loop cleanly. It must come
before the checkpoint callback: a checkpoint written at step k carries the tracker
as it is after step k's evaluation. Step 0 (the untrained adapter) is scored as a
baseline but is no candidate: no checkpoint holds it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class BestTracker:
    metric: str  # "val_loss" | "eval_accuracy"
    min_delta: float = 0.0
    patience: int | None = None
    best_value: float | None = None
    best_step: int | None = None
    stale: int = 0  # evaluations since the last improvement

    @property
    def lower_is_better(self) -> bool:
        return self.metric == "val_loss"

    def improves(self, value: float | None) -> bool:
        if value is None or not math.isfinite(value):
            return False
        if self.best_value is None:
            return True
        if self.lower_is_better:
            return value < self.best_value - self.min_delta
        return value > self.best_value + self.min_delta

    def update(self, step: int, value: float | None) -> bool:
        """Record an evaluation; True when it is the new best."""
        if self.improves(value):
            self.best_value, self.best_step, self.stale = value, step, 0
            return True
        self.stale += 1
        return False

    @property
    def exhausted(self) -> bool:
        return self.patience is not None and self.stale >= self.patience

    def stop_reason(self) -> str:
        return (f"early stopping: {self.metric} did not improve by more than {self.min_delta:g} in "
                f"{self.stale} evaluations (train.early_stopping_patience={self.patience}); "
                f"best {self.best_value:.6g} at step {self.best_step}")

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        """The saved best and staleness (the metric and settings come from this run's config)."""
        if state.get("metric") == self.metric:
            self.best_value, self.best_step, self.stale = state["best_value"], state["best_step"], state["stale"]


class EvalMonitor:
    """Loop callback: prompt evaluation, the best step, keep-best saves and early stopping."""

    def __init__(self, tracker: BestTracker, *, iters: int, every: int,
                 score_prompts: Callable[[int], tuple[dict, list[dict]]] | None = None,
                 save_best: Callable[[Any], object] | None = None, sinks: list | None = None,
                 samples=None, log: Callable[[str], None] = print):
        self.tracker, self.iters, self.every = tracker, iters, every
        self.score_prompts, self.save_best = score_prompts, save_best
        self.sinks, self.samples, self.log = sinks or [], samples, log
        self.val: dict[int, float] = {}  # val_loss by step, waiting for on_step_end

    def evaluate_prompts(self, step: int) -> dict | None:
        """Score the prompts now: the metrics row (also sent to the sinks and logged)."""
        if self.score_prompts is None:
            return None
        row, samples = self.score_prompts(step)
        for sink in self.sinks:
            sink.on_eval(row)
        if self.samples is not None:
            for s in samples:
                self.samples.write({"step": step, **s})
        return row

    def on_eval(self, row: dict) -> None:
        if "val_loss" in row:
            self.val[row["step"]] = row["val_loss"]

    def on_step_end(self, state) -> None:
        step = state.step
        row = None
        if self.score_prompts is not None and (step % self.every == 0 or step == self.iters):
            row = self.evaluate_prompts(step)
        if self.tracker.metric == "eval_accuracy":
            if row is None:
                return
            value = row.get("eval_accuracy")
        else:
            if step not in self.val:
                return
            value = self.val.pop(step)
        if self.tracker.update(step, value):
            if self.save_best is not None:
                self.save_best(state)
            self.log(f"step {step}: new best {self.tracker.metric} {value:.6g}")
        if self.tracker.exhausted and state.stop_reason is None:
            state.stop_reason = self.tracker.stop_reason()
            stop_row = {"step": step, "early_stopped": True, "reason": state.stop_reason,
                        "best_step": self.tracker.best_step, f"best_{self.tracker.metric}": self.tracker.best_value}
            for sink in self.sinks:
                sink.on_eval(stop_row)
