"""Measure the real peak memory of LoRA training steps, to check the planner against.

``measure_steps(model, batch_size, seq_len, ...)`` runs full optimizer steps (forward,
backward, AdamW update) on random tokens and reports MLX's peak memory
(``mx.get_peak_memory()`` after ``mx.reset_peak_memory()``), the process's peak RSS
(``ru_maxrss``) and the time per step. The step is the real one (``loop.Step`` over ``losses.batch_loss``, with
``recompute.grad_checkpoint`` when asked), the one ``planner.plan`` models.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim


def rss_peak_bytes() -> int:
    """Peak resident set of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@contextlib.contextmanager
def recomputed_blocks(model: nn.Module, enabled: bool = True):
    """``recompute.grad_checkpoint`` while the context is open (the block classes are restored
    on exit, so other measurements in the same process are unaffected)."""
    if not enabled:
        yield
        return
    from mlx_tune.training.recompute import grad_checkpoint

    blocks = list(model.layers)
    classes = [type(b) for b in blocks]
    grad_checkpoint(model)
    try:
        yield
    finally:
        for b, cls in zip(blocks, classes):
            b.__class__ = cls


@dataclass
class StepMeasure:
    batch_size: int
    seq_len: int
    grad_checkpoint: bool
    peak_bytes: int  # MLX peak over the measured step(s)
    active_before: int  # MLX active memory when the step started (weights + state)
    rss_peak_bytes: int
    seconds: list[float] = field(default_factory=list)
    loss: float = float("nan")

    def as_dict(self) -> dict:
        return {
            "batch_size": self.batch_size, "seq_len": self.seq_len, "grad_checkpoint": self.grad_checkpoint,
            "peak_gb": self.peak_bytes / 1e9, "active_before_gb": self.active_before / 1e9,
            "rss_peak_gb": self.rss_peak_bytes / 1e9, "seconds": [round(s, 2) for s in self.seconds],
            "loss": self.loss,
        }


def measure_steps(model: nn.Module, batch_size: int, seq_len: int, *, grad_checkpoint: bool = True,
                  steps: int = 2, seed: int = 0, learning_rate: float = 1e-5) -> StepMeasure:
    """Run ``steps`` AdamW steps of the real training step on random tokens.

    The step is ``loop.Step`` with the loss ``mlx-tune train`` uses (packing-aware
    attention, the chunked or vocabulary-tiled cross-entropy), compiled as there. The
    peak is taken over the last step: the first also builds the optimizer state and
    traces the graph, so with ``steps >= 2`` the last one shows what a long run holds.
    """
    from mlx_tune.data.batching import Batch
    from mlx_tune.training.loop import Step
    from mlx_tune.training.losses import batch_loss

    vocab = model.args.vocab_size if hasattr(model, "args") else model.model.embed_tokens.weight.shape[0]
    mx.random.seed(seed)
    tokens = mx.random.randint(0, vocab, (batch_size, seq_len + 1))
    arrays = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mx.ones((batch_size, seq_len))}
    mx.eval(arrays)
    batch = Batch(**arrays)
    model.train()
    out = StepMeasure(batch_size, seq_len, grad_checkpoint, 0, 0, 0)
    with recomputed_blocks(model, grad_checkpoint):
        step = Step(model, optim.AdamW(learning_rate=learning_rate), batch_loss)
        for _ in range(steps):
            mx.eval(step.state)
            mx.clear_cache()
            out.active_before = mx.get_active_memory()
            mx.reset_peak_memory()
            start = time.perf_counter()
            loss, _, grads, _, _ = step.finish(*step.micro_batch(batch, None))  # as loop.train runs it
            step.apply(grads)
            mx.eval(step.state, loss)
            out.seconds.append(time.perf_counter() - start)
            out.peak_bytes = mx.get_peak_memory()
            out.loss = loss.item()
    out.rss_peak_bytes = rss_peak_bytes()
    return out
