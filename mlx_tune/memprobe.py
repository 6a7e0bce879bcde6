"""Measure the real peak memory of LoRA training steps, to check the planner against.

``measure_steps(model, batch_size, seq_len, ...)`` runs full optimizer steps (forward,
backward, AdamW update) on random tokens and reports MLX's peak memory
(``mx.get_peak_memory()`` after ``mx.reset_peak_memory()``), the process's peak RSS
(``ru_maxrss``) and the time per step. The step is the one ``memory.plan`` models:

* gradient checkpointing per transformer block (``mx.checkpoint`` around each block's
  ``__call__``: only the block's input is kept, the rest is recomputed in the backward);
* the loss is a cross-entropy over the vocabulary computed ``ce_chunk`` tokens at a time
  with a recomputing backward, so at most one (chunk x vocab) fp32 logits block lives;
* AdamW over the trainable (LoRA) parameters. The gradient computation is not compiled
  by default: on the CPU backend ``mx.compile`` merges each checkpointed block's
  recomputed weight dequantization with the forward's (common subexpressions), which
  keeps every layer's dense fp32 weight alive until the backward (measured: +12 MB per
  layer on a 3M-parameter block, i.e. about 4 bytes per base weight on a 7B model).

``mlx_tune.losses`` / ``mlx_tune.trainer`` provide the production versions; this module
uses them when they expose the same pieces and keeps a local, equivalent fallback so the
benchmark runs on any branch.
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
def checkpointed_blocks(model: nn.Module, enabled: bool = True):
    """Recompute each transformer block in the backward pass while the context is open.

    Patches the block class's ``__call__`` (as mlx-lm's ``grad_checkpoint`` does) and
    restores it on exit, so other models in the same process are unaffected afterwards.
    """
    if not enabled:
        yield
        return
    cls = type(model.layers[0])
    original = cls.__call__

    def call(block, *args, **kwargs):
        def inner(params, *args, **kwargs):
            block.update(params)
            return original(block, *args, **kwargs)

        return mx.checkpoint(inner)(block.trainable_parameters(), *args, **kwargs)

    cls.__call__ = call
    try:
        yield
    finally:
        cls.__call__ = original


def _head_storage(model: nn.Module):
    """(dequantize(*arrays) -> dense fp32 (vocab, dims), arrays) of the frozen output projection."""
    from .quant import affine_dequantize

    head = getattr(model, "lm_head", None)
    if head is None:
        head = model.model.embed_tokens
    if "scales" in head and getattr(head, "mode", "affine") == "affine":
        g, bits = head.group_size, head.bits
        return (lambda w, s, b: affine_dequantize(w, s, b, g, bits)), (head["weight"], head["scales"], head["biases"])
    if "scales" in head or not isinstance(head, (nn.Linear, nn.Embedding)):
        from .quant import dense_weight

        return (lambda *a: dense_weight(head)), ()
    return (lambda w: w.astype(mx.float32)), (head["weight"],)


def chunked_cross_entropy(model: nn.Module, hidden: mx.array, targets: mx.array, chunk: int) -> mx.array:
    """Mean over tokens of ``logsumexp(h W^T) - (h W^T)[target]``, ``chunk`` tokens at a time.

    The frozen head weight ``W`` is made dense once per pass (on the CPU backend that
    beats the quantized matmul) and never kept between the forward and the backward;
    the backward recomputes each chunk's logits: ``dh = (softmax(h W^T) - onehot) W``.
    So at most one (B, chunk, vocab) fp32 logits block and one dense ``W`` live at once.
    """
    dequant, arrays = _head_storage(model)
    T = hidden.shape[1]
    spans = [(s, min(s + chunk, T)) for s in range(0, T, chunk)]

    @mx.custom_function
    def total_ce(h, *arrays):
        w = dequant(*arrays)
        total = mx.array(0.0, dtype=mx.float32)
        for s, e in spans:
            logits = h[:, s:e].astype(mx.float32) @ w.T
            picked = mx.take_along_axis(logits, targets[:, s:e, None], axis=-1)[..., 0]
            total = total + (mx.logsumexp(logits, axis=-1) - picked).sum()
        return total

    @total_ce.vjp
    def total_ce_vjp(primals, cotangent, output):
        h, *arrays = primals
        w = dequant(*arrays)
        vocab = mx.arange(w.shape[0])
        grads = []
        for s, e in spans:
            logits = h[:, s:e].astype(mx.float32) @ w.T
            probs = mx.softmax(logits, axis=-1) - (vocab == targets[:, s:e, None])
            grads.append((probs @ w) * cotangent)
        dh = mx.concatenate(grads, axis=1).astype(h.dtype)
        return (dh, *(mx.zeros_like(a) for a in arrays))

    return total_ce(hidden, *arrays) / targets.size


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
                  ce_chunk: int = 512, steps: int = 2, compile: bool = False, seed: int = 0,
                  learning_rate: float = 1e-5) -> StepMeasure:
    """Run ``steps`` AdamW steps on random tokens; the peak is taken over the last step.

    The first step also builds the optimizer state and (with ``compile``) traces the
    graph, so with ``steps >= 2`` the last one shows the steady-state peak a long run has.
    """
    vocab = model.args.vocab_size if hasattr(model, "args") else model.model.embed_tokens.weight.shape[0]
    mx.random.seed(seed)
    tokens = mx.random.randint(0, vocab, (batch_size, seq_len + 1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    mx.eval(inputs, targets)

    def loss_fn(model, inputs, targets):
        hidden = model.model(inputs)
        return chunked_cross_entropy(model, hidden, targets, ce_chunk)

    opt = optim.AdamW(learning_rate=learning_rate)
    grad_fn = nn.value_and_grad(model, loss_fn)
    state = [model.state, opt.state]

    def step(inputs, targets):
        loss, grads = grad_fn(model, inputs, targets)
        opt.update(model, grads)
        return loss

    if compile:
        step = mx.compile(step, inputs=state, outputs=state)
    model.train()
    out = StepMeasure(batch_size, seq_len, grad_checkpoint, 0, 0, 0)
    with checkpointed_blocks(model, grad_checkpoint):
        for _ in range(steps):
            mx.eval(model.state, opt.state)
            mx.clear_cache()
            out.active_before = mx.get_active_memory()
            mx.reset_peak_memory()
            start = time.perf_counter()
            loss = step(inputs, targets)
            mx.eval(loss, state)
            out.seconds.append(time.perf_counter() - start)
            out.peak_bytes = mx.get_peak_memory()
            out.loss = loss.item()
    out.rss_peak_bytes = rss_peak_bytes()
    return out
