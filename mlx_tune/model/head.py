"""The model's parts the loss needs: its body, its embedding, its LM head, and what the
model does to the head's output before calling it logits.

Most mlx-lm models return ``W h`` as logits; some map it first (``LOGIT_MAPS``):

    logits = cap * tanh(scale * W h / cap)     (cap None: logits = scale * W h)

gemma2 and recurrent_gemma softcap (``final_logit_softcapping``), granite divides by
``logits_scaling``, cohere multiplies by ``logit_scale``, minicpm scales an untied head's
input. The loss applies the same map, so it trains the logits the model serves
(``tests/test_families.py`` checks ``logits`` against each family's own ``__call__``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import mlx.core as mx
import mlx.nn as nn

from mlx_tune.errors import UserError

BODIES = ("model", "backbone", "transformer")  # mlx-lm's names for the token -> hidden-states module
EMBEDDINGS = ("embed_tokens", "embeddings", "wte")


def body(model) -> Any:
    """The module that maps token ids to final-norm hidden states (``model.model`` in most files)."""
    for name in BODIES:
        inner = getattr(model, name, None)
        if isinstance(inner, nn.Module):
            return inner
    raise UserError(f"{type(model).__module__}: no model body ({', '.join(BODIES)}) found; this architecture "
                    "is not supported for training")


def embedding(model) -> Any:
    """The token embedding of the body (the head too when the embeddings are tied)."""
    inner = body(model)
    for name in EMBEDDINGS:
        if isinstance(getattr(inner, name, None), nn.Module):
            return getattr(inner, name)
    raise UserError(f"{type(model).__module__}: no token embedding ({', '.join(EMBEDDINGS)}) found")


def head_module(model) -> Any:
    """The module holding the LM head's weight: ``lm_head``, or the tied embedding."""
    head = getattr(model, "lm_head", None)
    return head if head is not None else embedding(model)


def lm_head(model) -> Callable:
    """The function hidden -> ``W h``: ``lm_head`` or the tied embedding's ``as_linear``."""
    if getattr(model, "lm_head", None) is not None:
        return model.lm_head
    return embedding(model).as_linear


class LogitMap(NamedTuple):
    """logits = cap * tanh(scale * z / cap), or scale * z when cap is None."""

    scale: float = 1.0
    cap: float | None = None

    @property
    def identity(self) -> bool:
        return self.scale == 1.0 and not self.cap


IDENTITY = LogitMap()


def _args(model) -> Any:
    return getattr(model, "args", None) or getattr(body(model), "args", None)


def _minicpm(model) -> LogitMap:
    a = _args(model)
    return LogitMap() if a.tie_word_embeddings else LogitMap(a.dim_model_base / a.hidden_size)


LOGIT_MAPS: dict[str, Callable[[Any], LogitMap]] = {
    "gemma2": lambda m: LogitMap(cap=m.final_logit_softcapping or None),
    "recurrent_gemma": lambda m: LogitMap(cap=_args(m).logits_soft_cap or None),
    "granite": lambda m: LogitMap(1.0 / m.logits_scaling),
    "granitemoe": lambda m: LogitMap(1.0 / m.logits_scaling),
    "granitemoehybrid": lambda m: LogitMap(1.0 / m.logits_scaling),
    "cohere": lambda m: LogitMap(float(body(m).args.logit_scale)),
    "cohere2": lambda m: LogitMap(float(body(m).args.logit_scale)),
    "minicpm": _minicpm,
    "minicpm3": _minicpm,
}


def logit_map(model) -> LogitMap:
    """What ``model`` does to ``W h`` before returning logits (identity for most families)."""
    mtype = getattr(model, "model_type", None) or getattr(getattr(model, "args", None), "model_type", None)
    fn = LOGIT_MAPS.get(str(mtype))
    return fn(model) if fn is not None else LogitMap()


def apply_map(z: mx.array, lm: LogitMap) -> tuple[mx.array, Any]:
    """(logits, d logits / d z) for raw head outputs ``z`` (the derivative a scalar when no cap)."""
    if lm.scale != 1.0:
        z = z * lm.scale
    if not lm.cap:
        return z, lm.scale
    t = mx.tanh(z / lm.cap)
    return lm.cap * t, (1.0 - t * t) * lm.scale


def logits(model, h: mx.array) -> mx.array:
    """The model's logits for final hidden states ``h`` (its head and its logit map)."""
    return apply_map(lm_head(model)(h), logit_map(model))[0]
