"""What a training run did (``TrainResult``: ``run.run_train`` and ``grpo.run_grpo`` return it), and
the fresh output folder a new run starts with."""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from mlx_tune.training.loop import LoopState


@dataclass
class TrainResult:
    """What ``run_train`` did. ``rank`` is this process's rank (only rank 0 wrote files)."""

    state: LoopState
    iters: int
    rank: int
    output_dir: Path
    seconds: float
    last_checkpoint: Path | None = None
    plot: Path | None = None  # loss.png, None without matplotlib (or when interrupted)
    test_loss: float | None = None
    test_perplexity: float | None = None
    test_tokens: int = 0
    stop_reason: str | None = None  # why the run ended early (early stopping)
    kept_step: int | None = None  # the step of the adapter written (the best one with train.keep_best)
    generations: int = 0  # GRPO: generation batches sampled

    @property
    def interrupted(self) -> bool:
        return self.state.interrupted


def fresh_output(out: Path, names: tuple[str, ...]) -> None:
    """A new run (no resume) starts new metrics files and drops an old run's checkpoints,
    which a later ``train.resume`` would otherwise mix in."""
    out.mkdir(parents=True, exist_ok=True)
    old = [p for p in (out / n for n in names) if p.exists()]
    for p in old:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    if old:
        print(f"new run in {out}: removed the previous run's {', '.join(p.name for p in old)}", file=sys.stderr)
