"""Whether a model may be trained on packed rows: a structural check, then a proof.

``packing_support(model)`` returns None when packed rows compute exactly what their
examples compute alone, else a one-line reason (training then falls back to unpacked
rows with one warning line, never an error):

1. layers whose state runs across tokens (Mamba/SSM, GatedDelta or linear-attention
   hybrids such as qwen3_next, RG-LRU): mlx-lm gives them an ``ArraysCache`` in
   ``make_cache()``; one example's state would flow into the next;
2. the proof: two rows, each packing two short examples split differently, run through
   ``attention.hidden_states`` with their segments and restarted positions, must give
   every example's hidden states as it gives them alone (to float tolerance). This
   catches whatever the hooks cannot reach (an attention with its own mask, learned
   absolute positions) without a list of architectures. It also picks the rank of the
   packed masks: (B, 1, L, L), or (B, 1, 1, L, L) for an attention that scores grouped
   queries as (B, kv, groups, L, S) (gemma2), which would broadcast a rank-4 mask's batch
   against its KV heads. It costs two forwards of a few rows of a dozen tokens (four for
   gemma2), once per model.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from mlx_tune.errors import UserError
from mlx_tune.model import attention

_REASON = "_mlx_tune_packing_reason"
_FIRST, _SECOND = 7, 6  # probe example lengths (a second example long enough to see RoPE and masks act)


def model_type(model) -> str:
    return str(getattr(model, "model_type", None) or getattr(getattr(model, "args", None), "model_type", "?"))


def recurrent_reason(model) -> str | None:
    """Why ``model`` carries state across tokens (None when every layer is attention)."""
    from mlx_lm.models.cache import ArraysCache

    make = getattr(model, "make_cache", None)
    if make is None:
        return None  # mlx-lm's default: one KVCache per layer
    try:
        caches = list(make())
    except Exception as exc:  # noqa: BLE001 - any failure means we cannot tell
        return f"cannot inspect its layers ({type(exc).__name__})"
    while any(hasattr(c, "caches") for c in caches):  # CacheList holds several per layer
        caches = [x for c in caches for x in (getattr(c, "caches", None) or [c])]
    kinds = sorted({type(c).__name__ for c in caches if isinstance(c, ArraysCache)})
    if kinds:
        return f"{model_type(model)} has layers whose state runs across tokens ({', '.join(kinds)})"
    return None


def _probe_rows(vocab: int) -> tuple[mx.array, mx.array, mx.array, list[tuple[int, int, int]]]:
    """Two rows split differently (so a mask applied to the wrong row shows), and where each example sits."""
    n = _FIRST + _SECOND
    ids = [[(7 * i + 3 + 11 * r) % max(2, min(vocab, 200)) for i in range(n)] for r in range(2)]
    splits = [_FIRST, _SECOND - 2]  # row 1: examples of SECOND - 2 and FIRST + 2 tokens
    seg = [[0] * k + [1] * (n - k) for k in splits]
    pos = [list(range(k)) + list(range(n - k)) for k in splits]
    where = [(r, 0, k) for r, k in enumerate(splits)] + [(r, k, n) for r, k in enumerate(splits)]
    return mx.array(ids, dtype=mx.int32), mx.array(seg, dtype=mx.int32), mx.array(pos, dtype=mx.int32), where


def _probe(model, rank: int) -> str | None:
    vocab = int(getattr(getattr(model, "args", None), "vocab_size", 0) or 64)
    rows, seg, pos, where = _probe_rows(vocab)
    was_training = model.training
    model.eval()  # no dropout in the comparison
    object.__setattr__(model, attention.MASK_RANK, rank)
    try:
        packed = attention.hidden_states(model, rows, seg, pos)
        exact = packed.dtype == mx.float32  # else half-precision compute: rounding differs more
        # every example alone, in one unpacked batch: left-aligned, so the causal mask keeps
        # each from its padding
        width = max(e - s for _, s, e in where)
        alone_rows = mx.stack([mx.pad(rows[r, s:e], (0, width - (e - s))) for r, s, e in where])
        alone = attention.hidden_states(model, alone_rows).astype(mx.float32)
        err = size = 0.0
        for i, (r, s, e) in enumerate(where):
            ref, got = alone[i, :e - s], packed[r, s:e].astype(mx.float32)
            d, m = np.array(mx.stack([mx.abs(got - ref).max(), mx.abs(ref).max()])).tolist()
            err, size = max(err, d), max(size, m)
    except Exception as exc:  # noqa: BLE001 - an architecture the hooks break: fall back, do not fail
        return f"the packed forward of {model_type(model)} failed ({type(exc).__name__}: {str(exc)[:80]})"
    finally:
        model.train(was_training)
    tol = 1e-3 if exact else 2e-2
    if not err <= tol * max(size, 1e-6):  # also catches NaN
        return (f"in {model_type(model)} a packed example does not compute what it computes alone "
                f"(max difference {err:.2g} of {size:.2g}): state or positions cross example boundaries")
    return None


def packing_support(model) -> str | None:
    """None when ``model`` may be trained on packed rows, else the reason (checked once per model)."""
    if hasattr(model, _REASON):
        return getattr(model, _REASON)
    try:
        attention.body(model)
        reason = recurrent_reason(model)
        if reason is None:
            # rank-4 masks first; attentions scoring grouped queries in 5-D (gemma2) need rank 5
            reason = _probe(model, 4)
            if reason is not None and _probe(model, 5) is None:
                reason = None
            elif reason is not None:
                object.__setattr__(model, attention.MASK_RANK, 4)
    except UserError as exc:
        reason = str(exc)
    object.__setattr__(model, _REASON, reason)
    return reason


def shares_prefix(model, row_width: int) -> bool:
    """Whether ``model`` may be given shared-prefix rows (``attention.packed_mask``'s
    ``prefix_ids``) of ``row_width`` positions: it packs exactly (``packing_support``) and no
    sliding window is shorter than a row (a window counts row distance, and a continuation
    sits further from its prompt in the row than its positions say). GRPO's groups and
    preference units both ask it."""
    limit = attention.window_limit(model)
    return packing_support(model) is None and (limit is None or row_width <= limit)


def set_reach(model, longest: int | None) -> None:
    """Tell the attention that no packed example of this run is longer than ``longest``
    tokens (None: forget it), so a query never needs a key that many rows back or more and
    the CPU path may score a band of key tiles (``attention.band_attention``) instead of
    the causal triangle. Exact only while it holds: the trainer sets it from every split it
    packs and clears it when training ends. Shared-prefix rows ignore it."""
    if longest is None:
        if hasattr(model, attention.REACH):
            object.__delattr__(model, attention.REACH)
    else:
        object.__setattr__(model, attention.REACH, int(longest))
