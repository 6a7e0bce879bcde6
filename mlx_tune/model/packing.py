"""Whether a model may be trained on packed rows: a structural check, then a proof.

``packing_support(model)`` returns None when packed rows compute exactly what their
examples compute alone, else a one-line reason (training then falls back to unpacked
rows with one warning line, never an error):

1. layers whose state runs across tokens (Mamba/SSM, GatedDelta or linear-attention
   hybrids such as qwen3_next, RG-LRU): mlx-lm gives them an ``ArraysCache`` in
   ``make_cache()``; one example's state would flow into the next;
2. the proof: a row packing two short examples, run through ``attention.hidden_states``
   with their segments and restarted positions, must give the second example's hidden
   states as it gives them alone (to float tolerance). This catches whatever the hooks
   cannot reach (an attention with its own mask, learned absolute positions) without a
   list of architectures. It costs two forwards of a dozen tokens, once per model.
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


def _probe(model) -> str | None:
    vocab = int(getattr(getattr(model, "args", None), "vocab_size", 0) or 64)
    ids = [(7 * i + 3) % max(2, min(vocab, 200)) for i in range(_FIRST + _SECOND)]
    row = mx.array([ids], dtype=mx.int32)
    seg = mx.array([[0] * _FIRST + [1] * _SECOND], dtype=mx.int32)
    pos = mx.array([list(range(_FIRST)) + list(range(_SECOND))], dtype=mx.int32)
    was_training = model.training
    model.eval()  # no dropout in the comparison
    try:
        packed = attention.hidden_states(model, row, seg, pos)[:, _FIRST:]
        alone = attention.hidden_states(model, row[:, _FIRST:])
        exact = packed.dtype == mx.float32  # else half-precision compute: rounding differs more
        packed, alone = packed.astype(mx.float32), alone.astype(mx.float32)
        err, size = np.array(mx.stack([mx.abs(packed - alone).max(), mx.abs(alone).max()])).tolist()
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
        reason = recurrent_reason(model) or _probe(model)
    except UserError as exc:
        reason = str(exc)
    object.__setattr__(model, _REASON, reason)
    return reason
