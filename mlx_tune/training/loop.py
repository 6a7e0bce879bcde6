"""The training loop: the compiled step, evaluation, and ``train`` with its state and settings.

One optimizer step over ``A = grad_accumulation`` micro-batches (and ``W`` ranks) is

    g = sum_{ranks, micro-batches} grad(sum_t mask_t * CE_t) / sum_{ranks, micro-batches} sum_t mask_t
    g <- g * min(1, clip / ||g||)          (if grad_clip)
    theta <- optimizer(theta, g)            (skipped when the loss or ||g|| is not finite)

so accumulating A micro-batches, or spreading them over W ranks, gives exactly the
gradient of one batch A x W times larger (token-weighted mean cross-entropy).

``train`` is a plain function taking the model, optimizer, batch iterator, loss and
callbacks; everything else (checkpoints, metrics file, progress bar) is a callback
(``training.callbacks``, ``training.checkpoint``): any object with some of
``on_report(row)``, ``on_eval(row)``, ``on_bad_step(row)``, ``on_step_end(state)``,
``on_interrupt(state)``, ``on_train_end(state)``. A callback ends the run early and
cleanly by setting ``state.stop_reason`` (early stopping: ``training.best``). Optimizers and schedules are
``training.optim``; per-block recompute is ``training.recompute``.

``loss_fn(model, batch) -> (mean_loss, n_trained_tokens)`` (or ``(mean_loss, weight,
{metric: mean})``: a preference loss weighs pairs, and its reward metrics reach the
metrics rows, validation's as ``val_<metric>``) is called inside the compiled step with a
batch whose array fields (``BATCH_ARRAYS``) are traced arrays; it must not read
Python-int fields.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from types import SimpleNamespace
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from mlx_tune.errors import UserError
from mlx_tune.runtime.backend import cpu_streams, keep_freed_buffers, row_lane, row_lanes
from mlx_tune.runtime.blas import blas_threads
from mlx_tune.training import lanes as row_parts

log = logging.getLogger(__name__)

BATCH_ARRAYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions", "gather",
                # preference unit batches (data.pair_batches)
                "gtargets", "gslot", "gresp", "prefix_ids", "slot_tokens", "slot_all_tokens", "unit_weight", "labels",
                "ref_logps")


class TrainingStopped(UserError):
    """The run stopped on purpose (non-finite steps, memory limit): a clear one-line reason."""


# ---------------------------------------------------------------------------
# The compiled step
# ---------------------------------------------------------------------------


def batch_arrays(batch: Any) -> dict[str, mx.array]:
    """The array fields of a batch (what goes through ``mx.compile``); ints stay outside."""
    return {k: v for k in BATCH_ARRAYS if (v := getattr(batch, k, None)) is not None}


def traced_batch(arrays: dict) -> SimpleNamespace:
    """What ``loss_fn`` sees: every array field (None where the batch has none)."""
    return SimpleNamespace(**{**dict.fromkeys(BATCH_ARRAYS), **arrays})


def global_norm(grads) -> mx.array:
    return mx.sqrt(sum((g.astype(mx.float32).square().sum() for _, g in tree_flatten(grads)), mx.array(0.0)))


class Step:
    """The compiled pieces of one optimizer step, over the state they read and write.

    ``state = [model.state, optimizer.state, mx.random.state]``: the model (adapter
    weights), the optimizer (moments, step count = schedule position) and the random
    key (dropout; re-seeded from (seed, rank, step) before every step). Build it
    *after* restoring a checkpoint: ``mx.compile`` captures these exact objects.
    """

    def __init__(self, model: nn.Module, optimizer: optim.Optimizer, loss_fn: Callable,
                 grad_clip: float | None = None, group: Any = None):
        keep_freed_buffers()  # a step reuses its buffers (CPU allocator; runtime.backend)
        self.state = [model.state, optimizer.state, mx.random.state]
        world = group.size() if group is not None else 1

        def summed_loss(model, arrays):
            loss, ntoks, extras = split_loss(loss_fn(model, traced_batch(arrays)))
            ntoks = ntoks.astype(mx.float32)
            return loss.astype(mx.float32) * ntoks, ntoks, {k: v.astype(mx.float32) * ntoks for k, v in extras.items()}

        value_and_grad = nn.value_and_grad(model, summed_loss)

        def added(out, acc):
            (loss_sum, ntoks, extras), grads = out
            if acc is not None:
                loss_sum, ntoks = loss_sum + acc[0], ntoks + acc[1]
                grads = tree_map(mx.add, grads, acc[2])
                extras = tree_map(mx.add, extras, acc[3])
            return loss_sum, ntoks, grads, extras

        @partial(mx.compile, inputs=self.state, outputs=self.state)
        def accumulate(arrays, acc):
            return added(value_and_grad(model, arrays), acc)

        @mx.compile
        def finish(loss_sum, ntoks, grads, extras):
            if world > 1:  # sum over ranks, then one division: the global batch's mean
                loss_sum, ntoks = mx.distributed.all_sum(loss_sum, group=group), mx.distributed.all_sum(ntoks, group=group)
                grads = tree_map(lambda g: mx.distributed.all_sum(g, group=group), grads)
                extras = tree_map(lambda g: mx.distributed.all_sum(g, group=group), extras)
            denom = mx.maximum(ntoks, 1.0)
            grads = tree_map(lambda g: g / denom, grads)
            norm = global_norm(grads)
            if grad_clip is not None:
                scale = mx.minimum(1.0, grad_clip / (norm + 1e-6))
                grads = tree_map(lambda g: g * scale.astype(g.dtype), grads)
            return loss_sum / denom, ntoks, grads, norm, tree_map(lambda v: v / denom, extras)

        @partial(mx.compile, inputs=self.state, outputs=self.state)
        def apply(grads):
            optimizer.update(model, grads)

        # Row lanes (training.lanes): part i of a batch built on CPU stream i.
        self.lanes = row_lanes(row_parts.ROW_LANES, world)
        streams = [None, *cpu_streams(self.lanes - 1)]

        @partial(mx.compile, inputs=self.state, outputs=self.state)
        def accumulate_rows(parts, acc):
            total = None
            for lane, arrays in zip(streams, parts):
                with row_lane(lane):  # the part's backward pass is built on its stream too
                    out = value_and_grad(model, arrays)
                total = out if total is None else tree_map(mx.add, total, out)
            return added(total, acc)

        self.accumulate, self.finish, self.apply = accumulate, finish, apply
        self.accumulate_rows = accumulate_rows

    def micro_batch(self, batch: Any, acc: Any) -> Any:
        """``acc`` plus one micro-batch's (loss sum, tokens, gradients, extras), evaluated
        (one micro-batch graph alive at a time). Rows go over the step's lanes where the
        batch splits (``training.lanes``), with OpenBLAS single-threaded meanwhile."""
        parts = row_parts.split_rows(batch, self.lanes)
        if parts is None:
            acc = self.accumulate(batch_arrays(batch), acc)
            mx.eval(acc)
            return acc
        acc = self.accumulate_rows([batch_arrays(p) for p in parts], acc)
        with blas_threads(1):
            mx.eval(acc)
        return acc


# ---------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------


_eval_fns: dict[tuple[int, int], Callable] = {}


def _compiled_eval(model: nn.Module, loss_fn: Callable) -> Callable:
    """``loss_fn`` compiled over the model's state (weights are inputs, not constants)."""
    key = (id(model), id(loss_fn))
    if key not in _eval_fns:
        _eval_fns[key] = mx.compile(lambda arrays: loss_fn(model, traced_batch(arrays)), inputs=[model.state])
    return _eval_fns[key]


def evaluate(model: nn.Module, batches: Iterable, loss_fn: Callable, max_batches: int = 0,
             group: Any = None) -> tuple[float, int]:
    """Token-weighted mean loss over ``batches`` (all of them when max_batches is 0), all ranks."""
    loss, n, _ = evaluate_metrics(model, batches, loss_fn, max_batches, group)
    return loss, n


def evaluate_metrics(model: nn.Module, batches: Iterable, loss_fn: Callable, max_batches: int = 0,
                     group: Any = None) -> tuple[float, int, dict[str, float]]:
    """``evaluate`` plus the loss's extra metrics (``split_loss``), weighted the same way."""
    was_training = model.training
    model.eval()
    fn = _compiled_eval(model, loss_fn)
    total, count, sums = mx.array(0.0), mx.array(0.0), None
    try:
        for i, batch in enumerate(batches):
            if max_batches and i >= max_batches:
                break
            loss, ntoks, extras = split_loss(fn(batch_arrays(batch)))
            ntoks = ntoks.astype(mx.float32)
            total = total + loss.astype(mx.float32) * ntoks
            count = count + ntoks
            weighted = {k: v.astype(mx.float32) * ntoks for k, v in extras.items()}
            sums = weighted if sums is None else tree_map(mx.add, sums, weighted)
            mx.eval(total, count, sums)
    finally:
        model.train(was_training)
    sums = sums or {}
    if group is not None and group.size() > 1:
        total, count = mx.distributed.all_sum(total, group=group), mx.distributed.all_sum(count, group=group)
        sums = {k: mx.distributed.all_sum(v, group=group) for k, v in sums.items()}
    n = int(count.item())
    metrics = {k: (v.item() / n if n else float("nan")) for k, v in sums.items()}
    return (total.item() / n if n else float("nan")), n, metrics


def split_loss(out: tuple) -> tuple[mx.array, mx.array, dict[str, mx.array]]:
    """``(loss, weight)`` or ``(loss, weight, {metric: value})`` from a loss function: metrics
    (reward accuracy, margins) are means over the same weight (tokens, pairs) as the loss."""
    return (out[0], out[1], out[2]) if len(out) > 2 else (out[0], out[1], {})


# ---------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------


@dataclass
class LoopState:
    """What the loop carries from step to step (and what a checkpoint restores)."""

    step: int = 0  # optimizer steps done (skipped non-finite steps count: their data was used)
    bad_steps: int = 0  # non-finite steps in a row
    trained_tokens: int = 0  # real (non-padding) tokens seen, all ranks
    last_loss: float = float("nan")
    val_loss: float | None = None
    interrupted: bool = False
    stop_reason: str | None = None  # a callback ended the run early on purpose (early stopping)
    extra: dict = field(default_factory=dict)


@dataclass
class LoopSettings:
    iters: int
    grad_accumulation: int = 1
    grad_clip: float | None = None
    steps_per_report: int = 10
    steps_per_eval: int = 50
    val_batches: int = 25
    max_bad_steps: int = 5
    memory_limit_gb: float | None = None
    eval_at_start: bool = True
    seed: int = 0


def step_key_seed(seed: int, step: int, rank: int = 0) -> int:
    """The random seed of optimizer step ``step`` (dropout): a pure function of (seed, rank, step),
    so a resumed run draws the same masks without saving MLX's global key (which has no setter)."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


def _emit(callbacks: Iterable, event: str, *args) -> None:
    for cb in callbacks:
        fn = getattr(cb, event, None)
        if fn is not None:
            fn(*args)


@contextlib.contextmanager
def sigint_flag():
    """Turn the first Ctrl-C into a flag the loop checks between steps (a second one stops at once)."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag.is_set():
            raise KeyboardInterrupt
        flag.set()
        print("\nCtrl-C: finishing this step and saving a checkpoint (press again to stop at once)", flush=True)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def _agreed(flag: bool, group: Any) -> bool:
    """``flag`` on any rank (a Ctrl-C reaches one rank; all must stop together or the
    others would wait in ``all_sum`` for ever)."""
    if group is None or group.size() == 1:
        return flag
    return mx.distributed.all_sum(mx.array(int(flag)), group=group).item() > 0


def _out_of_memory(exc: Exception, limit_gb: float | None) -> TrainingStopped | None:
    text = str(exc).lower()
    if "memory" not in text and "malloc" not in text:
        return None
    limit = f"the limit train.memory_limit_gb={limit_gb}" if limit_gb else "the memory available"
    return TrainingStopped(
        f"out of memory: training needs more than {limit} ({str(exc).strip()[:120]}); lower train.batch_size or "
        "train.max_seq_length, set train.grad_checkpoint: true, or quantize the base (`mlx-tune plan CONFIG` predicts the peak)"
    )


@dataclass
class _Window:
    """Sums over the steps since the last report (the loss is token-weighted)."""

    loss: float = 0.0
    loss_tokens: float = 0.0
    tokens: int = 0
    seconds: float = 0.0
    extras: dict = field(default_factory=dict)  # metric -> weighted sum (weight: loss_tokens)

    def add(self, loss: float, loss_tokens: float, tokens: int, seconds: float, extras: dict | None = None) -> None:
        if math.isfinite(loss):
            self.loss += loss * loss_tokens
            self.loss_tokens += loss_tokens
            for k, v in (extras or {}).items():
                self.extras[k] = self.extras.get(k, 0.0) + v * loss_tokens
        self.tokens += tokens
        self.seconds += seconds

    def row(self, state: LoopState, lr: float, peak_gb: float, grad_norm: float) -> dict:
        return {
            "step": state.step,
            "loss": self.loss / self.loss_tokens if self.loss_tokens else float("nan"),
            "learning_rate": lr,
            "tokens_per_sec": self.tokens / max(self.seconds, 1e-9),  # real (non-padding) tokens, all ranks
            "peak_memory_gb": peak_gb,
            "trained_tokens": state.trained_tokens,
            "grad_norm": grad_norm,
            **{k: v / self.loss_tokens for k, v in self.extras.items() if self.loss_tokens},
        }


def _accumulate(step: Step, stream: Iterator, micro_batches: int) -> tuple[Any, int]:
    """Sum loss and gradients over ``micro_batches`` batches: (acc or None, real tokens)."""
    acc, n_tokens = None, 0
    for _ in range(micro_batches):
        try:
            batch = next(stream)
        except StopIteration:
            break
        n_tokens += int(getattr(batch, "n_tokens", 0))
        acc = step.micro_batch(batch, acc)
    return acc, n_tokens


def _apply_or_skip(step: Step, grads, loss: float, norm: float, state: LoopState, settings: LoopSettings,
                   callbacks: list) -> None:
    """Apply the update, or skip a non-finite one (and stop after max_bad_steps in a row)."""
    if math.isfinite(loss) and math.isfinite(norm):
        step.apply(grads)
        mx.eval(step.state)
        state.bad_steps = 0
        return
    state.bad_steps += 1
    log.warning("step %d: non-finite loss %s / gradient norm %s; update skipped (%d in a row)",
                state.step, loss, norm, state.bad_steps)
    _emit(callbacks, "on_bad_step", {"step": state.step, "loss": loss, "grad_norm": norm})
    if state.bad_steps >= settings.max_bad_steps:
        raise TrainingStopped(
            f"training stopped at step {state.step}: {state.bad_steps} steps in a row had a non-finite "
            f"loss or gradient (train.max_bad_steps={settings.max_bad_steps}); lower train.learning_rate, "
            "keep train.grad_clip on, or check the data for empty or broken rows"
        )


def train(model: nn.Module, optimizer: optim.Optimizer, batches: Iterable, loss_fn: Callable,
          settings: LoopSettings, callbacks: Iterable = (), state: LoopState | None = None,
          val_batches: Callable[[], Iterable] | None = None, group: Any = None,
          eval_loss_fn: Callable | None = None) -> LoopState:
    """Train until ``settings.iters`` optimizer steps; returns the final ``LoopState``.

    ``batches`` yields batches (``batch_arrays`` fields plus ``n_tokens``); each step
    draws ``grad_accumulation`` of them. ``val_batches()`` returns a fresh validation
    iterator; ``eval_loss_fn`` (default ``loss_fn``) scores it, e.g. a forward-only loss.
    Resume by passing the restored ``state`` (and a model, optimizer, random
    key and batch stream restored to the same step).
    """
    state = state or LoopState()
    callbacks = list(callbacks)
    group = group if group is not None else mx.distributed.init()
    world = group.size()
    if settings.memory_limit_gb:
        mx.set_memory_limit(int(settings.memory_limit_gb * 2**30))
    step = Step(model, optimizer, loss_fn, settings.grad_clip, group)
    stream: Iterator = iter(batches)
    model.train()

    def run_eval() -> None:
        if val_batches is None:
            return
        tic = time.perf_counter()
        val_loss, n, extras = evaluate_metrics(model, val_batches(), eval_loss_fn or loss_fn, settings.val_batches,
                                               group)
        state.val_loss = val_loss
        row = {"step": state.step, "val_loss": val_loss, "val_perplexity": _ppl(val_loss), "val_tokens": n,
               **{f"val_{k}": v for k, v in extras.items()}}
        _emit(callbacks, "on_eval", {**row, "val_time_s": round(time.perf_counter() - tic, 3)})

    window, exhausted = _Window(), False
    try:
        with sigint_flag() as interrupted:
            if settings.eval_at_start and state.step == 0:
                run_eval()
            while state.step < settings.iters and state.stop_reason is None and not _agreed(interrupted.is_set(), group):
                tic = time.perf_counter()
                # Dropout keys depend on (seed, rank, step) only: resumable without saving a key.
                mx.random.seed(step_key_seed(settings.seed, state.step + 1, group.rank()))
                acc, n_tokens = _accumulate(step, stream, settings.grad_accumulation)
                if acc is None:
                    log.warning("the batch stream ended after %d steps", state.step)
                    exhausted = True
                    break
                loss, ntoks, grads, norm, extras = step.finish(*acc)
                mx.eval(loss, ntoks, grads, norm, extras)
                # Sync point: skipping needs the values on the host. Every rank sees the same
                # all-summed numbers, so every rank decides the same.
                loss_v, norm_v = loss.item(), norm.item()
                state.step += 1
                _apply_or_skip(step, grads, loss_v, norm_v, state, settings, callbacks)
                del grads
                if world > 1:
                    n_tokens = int(mx.distributed.all_sum(mx.array(n_tokens), group=group).item())
                state.trained_tokens += n_tokens
                state.last_loss = loss_v
                window.add(loss_v, ntoks.item(), n_tokens, time.perf_counter() - tic,
                           {k: v.item() for k, v in extras.items()})
                peak = mx.get_peak_memory() / 2**30
                if settings.memory_limit_gb and peak > settings.memory_limit_gb:
                    raise TrainingStopped(
                        f"peak memory {peak:.2f} GB passed train.memory_limit_gb={settings.memory_limit_gb} at step "
                        f"{state.step}; lower train.batch_size or train.max_seq_length, or set train.grad_checkpoint: true"
                    )
                last = state.step == settings.iters
                if state.step % settings.steps_per_report == 0 or last:
                    _emit(callbacks, "on_report", window.row(state, _lr(optimizer), peak, norm_v))
                    window = _Window()
                if state.step % settings.steps_per_eval == 0 or last:
                    run_eval()
                _emit(callbacks, "on_step_end", state)
                if state.stop_reason is not None and window.tokens:  # the steps since the last report
                    _emit(callbacks, "on_report", window.row(state, _lr(optimizer), peak, norm_v))
            if exhausted:
                run_eval()
            elif state.step < settings.iters and state.stop_reason is None:  # left early: Ctrl-C (on any rank)
                state.interrupted = True
                _emit(callbacks, "on_interrupt", state)
    except RuntimeError as exc:
        oom = _out_of_memory(exc, settings.memory_limit_gb)
        if oom is None:
            raise
        raise oom from None
    _emit(callbacks, "on_train_end", state)
    return state


def _lr(optimizer: optim.Optimizer) -> float:
    lr = optimizer.state.get("learning_rate", None)
    if lr is None:
        lr = optimizer.learning_rate
    return float(lr.item() if isinstance(lr, mx.array) else lr)


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 700.0)) if math.isfinite(loss) else float("nan")
