"""Recompute (gradient checkpointing) per transformer block: activations are not kept
for the backward pass but recomputed there (``mx.checkpoint``), trading one more forward
per block for the memory of its intermediate activations.

``grad_checkpoint(model)`` switches every block of ``model.layers``; dropouts inside
become ``KeyedDropout``, which draws its masks from a key that is an input of the
recomputed function, so both passes see the same masks. Saving training state to disk
is ``training.checkpoint``, not this.
"""

from __future__ import annotations

import functools
import threading

import mlx.core as mx
import mlx.nn as nn

from mlx_tune.errors import UserError
from mlx_tune.model import attention


class _BlockKeys(threading.local):
    """The key a recomputed block hands its dropouts (None outside one)."""

    key: mx.array | None = None

    def next(self) -> mx.array:
        self.key, sub = mx.random.split(self.key)
        return sub


_block_keys = _BlockKeys()
RECOMPUTE = mx.checkpoint  # tests swap in the identity to compare with plain autodiff


class KeyedDropout(nn.Dropout):
    """Dropout that, inside a recomputed block, draws from the block's explicit key.

    ``mx.checkpoint`` recomputes the block in the backward pass; masks drawn from the
    global key would differ between the two passes (wrong gradients). An explicit key
    that is an input of the recomputed function gives the same masks both times.
    """

    def __call__(self, x: mx.array) -> mx.array:
        if _block_keys.key is None or self._p_1 == 1 or not self.training:
            return super().__call__(x)
        mask = mx.random.bernoulli(self._p_1, x.shape, key=_block_keys.next())
        return (mask * x) * (1 / self._p_1)


@functools.cache
def _recomputed_class(cls: type) -> type:
    """A subclass of ``cls`` whose ``__call__`` recomputes its activations in the backward pass.

    Swapping ``block.__class__`` (instead of patching ``cls.__call__`` as mlx-lm does)
    touches only this model's blocks, and keeps every parameter path unchanged.
    """
    call = cls.__call__

    def __call__(self, *args, **kwargs):
        if not self.training:  # evaluation / generation (a KV cache argument): no backward pass to save for
            return call(self, *args, **kwargs)
        packing = attention.packing_context()  # the backward's recompute runs after hidden_states returned

        def inner(params, key, *args, **kwargs):
            self.update(params)
            outer, _block_keys.key = _block_keys.key, mx.stop_gradient(key)  # no vjp through RandomBits
            try:
                with attention.restored_context(packing):
                    return call(self, *args, **kwargs)
            finally:
                _block_keys.key = outer

        # A key drawn once, outside: both passes see the same one.
        key = mx.random.randint(0, 2**31 - 1, (2,)).astype(mx.uint32)
        return RECOMPUTE(inner)(self.trainable_parameters(), key, *args, **kwargs)

    return type(cls.__name__, (cls,), {"__call__": __call__, "_mlx_tune_recomputed": True})


def grad_checkpoint(model: nn.Module) -> int:
    """Recompute every block of ``model.layers`` in the backward pass; returns the number of blocks."""
    layers = getattr(model, "layers", None) or getattr(getattr(model, "model", None), "layers", None)
    if not layers:
        raise UserError(f"train.grad_checkpoint: {type(model).__name__} has no `layers` list of blocks")
    for block in layers:
        if not getattr(type(block), "_mlx_tune_recomputed", False):
            block.__class__ = _recomputed_class(type(block))
        for _, m in block.named_modules():
            if type(m) is nn.Dropout:
                m.__class__ = KeyedDropout
    return len(layers)
