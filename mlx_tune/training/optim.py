"""Optimizers and learning-rate schedules, by name (dict registries).

The schedule is linear warmup ``0 -> peak`` over ``warmup_steps``, then the named decay
(constant, linear to 0, cosine) over the remaining ``total_steps - warmup_steps``. The
optimizer's own step counter drives it, so the schedule position is optimizer state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.optimizers as optim

from mlx_tune.errors import UserError

OPTIMIZERS: dict[str, Callable[..., optim.Optimizer]] = {
    "adamw": lambda lr, wd: optim.AdamW(learning_rate=lr, weight_decay=wd),
    "adam": lambda lr, wd: optim.Adam(learning_rate=lr),
    "sgd": lambda lr, wd: optim.SGD(learning_rate=lr, weight_decay=wd),
    # relative_step=False: follow our schedule instead of Adafactor's own 1/sqrt(t) rate.
    "adafactor": lambda lr, wd: optim.Adafactor(learning_rate=lr, relative_step=False, scale_parameter=False),
}

# name -> (peak, decay_steps) -> schedule over the steps after warmup
DECAYS: dict[str, Callable[[float, int], Any]] = {
    "constant": lambda peak, steps: peak,
    "linear": lambda peak, steps: optim.linear_schedule(peak, 0.0, max(steps, 1)),
    "cosine": lambda peak, steps: optim.cosine_decay(peak, max(steps, 1)),
}


def build_schedule(kind: str, peak: float, total_steps: int, warmup_steps: int = 0):
    """A learning rate (float) or schedule(step): linear warmup 0 -> peak, then ``kind`` decay.

    The optimizer's own step counter drives it, so the schedule position is part of the
    optimizer state and is checkpointed with it.
    """
    if kind not in DECAYS:
        raise UserError(f"train.lr_schedule: {kind!r} is not one of {', '.join(DECAYS)}")
    decay = DECAYS[kind](peak, total_steps - warmup_steps)
    if warmup_steps <= 0:
        return decay
    # Warmup starts one step above zero so the first update is not wasted.
    warmup = optim.linear_schedule(peak / (warmup_steps + 1), peak, warmup_steps)
    if not callable(decay):
        decay = (lambda value: (lambda step: mx.array(value, mx.float32)))(decay)
    return optim.join_schedules([warmup, decay], [warmup_steps])


def build_optimizer(train_cfg, total_steps: int) -> optim.Optimizer:
    """The optimizer ``train_cfg.optimizer`` with its learning-rate schedule."""
    if train_cfg.optimizer not in OPTIMIZERS:
        raise UserError(f"train.optimizer: {train_cfg.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    lr = build_schedule(train_cfg.lr_schedule, train_cfg.learning_rate, total_steps, train_cfg.warmup_steps)
    return OPTIMIZERS[train_cfg.optimizer](lr, train_cfg.weight_decay)
