"""Serving a quantized model fast on the CPU backend; a no-op on Metal and CUDA.

On the CPU backend ``mx.quantized_matmul`` computes at a few GFLOP/s and its time grows
linearly with the rows of ``x``, while a dense fp32 sgemm (OpenBLAS) reaches hundreds of
GFLOP/s and costs little more for 16 rows than for 1. Decoding one token is a matrix-
vector product bound by memory traffic, where the 4-bit weight (8x fewer bytes) can win.
So each quantized layer is swapped for ``ServingQuantizedLinear`` (same arrays, same
parameter names, so adapters and their base fingerprint are unaffected), which computes

    y = quantized_matmul(x, W_q)       when x has at most ``qmm_rows`` rows,
    y = x W^T (dense fp32 W)           otherwise,

where the dense ``W`` is a cached fp32 copy when the whole model's copy fits in
``dense_budget_bytes`` (kept outside the parameters: private attribute), or is
dequantized per call otherwise (``mlx_tune.model.quant``'s path). ``qmm_rows`` is measured at
start-up on whole single-token decode steps (1 when the quantized kernel wins a single
row, 0 when the dense path wins everything).
"""

from __future__ import annotations

import logging
import time

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from mlx_tune.model import quant
from mlx_tune.runtime.backend import on_cpu

log = logging.getLogger(__name__)

DEFAULT_DENSE_BUDGET = 4 * 2**30


class ServingQuantizedLinear(quant.CPUQuantizedLinear):
    """A quantized linear whose CPU matmul picks the quantized kernel or dense fp32 by rows."""

    qmm_rows = 1  # class default; set per model by ``prepare_for_serving``

    @classmethod
    def from_quantized(cls, layer: nn.QuantizedLinear, dense: bool = False) -> ServingQuantizedLinear:
        new = super().from_quantized(layer)
        new._dense = new.dense_weight() if dense and new.mode == "affine" else None
        return new

    def __call__(self, x):
        if not on_cpu() or self.mode != "affine":
            return nn.QuantizedLinear.__call__(self, x)
        rows = x.size // x.shape[-1]
        if rows <= self.qmm_rows:
            return nn.QuantizedLinear.__call__(self, x)
        dense = getattr(self, "_dense", None)
        if dense is None:
            return super().__call__(x)  # dequantize + sgemm, per call
        y = (x.astype(mx.float32) @ dense.T).astype(x.dtype)
        return y + self["bias"] if "bias" in self else y


class ServingQuantizedEmbedding(quant.CPUQuantizedEmbedding):
    """A quantized embedding whose ``as_linear`` (a tied output head) follows the same rule."""

    qmm_rows = 1

    @classmethod
    def from_quantized(cls, layer: nn.QuantizedEmbedding, dense: bool = False) -> ServingQuantizedEmbedding:
        new = super().from_quantized(layer)
        new._dense = (quant.affine_dequantize(new["weight"], new["scales"], new["biases"], new.group_size, new.bits)
                      if dense and new.mode == "affine" else None)
        return new

    def as_linear(self, x):
        if not on_cpu() or self.mode != "affine":
            return nn.QuantizedEmbedding.as_linear(self, x)
        if x.size // x.shape[-1] <= self.qmm_rows:
            return nn.QuantizedEmbedding.as_linear(self, x)
        dense = getattr(self, "_dense", None)
        if dense is None:
            return super().as_linear(x)
        return (x.astype(mx.float32) @ dense.T).astype(x.dtype)


SWAPS = {nn.QuantizedLinear: ServingQuantizedLinear, quant.CPUQuantizedLinear: ServingQuantizedLinear,
         nn.QuantizedEmbedding: ServingQuantizedEmbedding, quant.CPUQuantizedEmbedding: ServingQuantizedEmbedding}


def _dense_bytes(layers) -> int:
    total = 0
    for m in layers:
        out_dims, packed = m["weight"].shape
        total += out_dims * packed * 32 // m.bits * 4
    return total


def measure_qmm_rows(model: nn.Module, trials: int = 5) -> int:
    """1 when single-token decoding of ``model`` is faster with the quantized kernel, else 0.

    Times whole decode steps (every layer, the output head, a KV cache) both ways,
    interleaved so that a busy machine slows both alike, and keeps each way's best.
    """
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([[1] * 8]), cache=cache))
    token = mx.array([[1]])
    best = {0: float("inf"), 1: float("inf")}
    for _ in range(trials):
        for rows in (1, 0):
            ServingQuantizedLinear.qmm_rows = ServingQuantizedEmbedding.qmm_rows = rows
            start = time.perf_counter()
            mx.eval(model(token, cache=cache))
            best[rows] = min(best[rows], time.perf_counter() - start)
            for c in cache:  # keep the cache length fixed: drop the token just added
                if c.is_trimmable():
                    c.trim(1)
    return 1 if best[1] <= best[0] else 0


def prepare_for_serving(model: nn.Module, dense_budget_bytes: int = DEFAULT_DENSE_BUDGET,
                        measure: bool = True) -> str | None:
    """Swap quantized layers for the serving ones on the CPU backend; returns a note or None."""
    if not on_cpu():
        return None
    found = [(p, m) for p, m in model.named_modules() if type(m) in SWAPS and m.mode == "affine"]
    if not found:
        return None
    dense_bytes = _dense_bytes([m for _, m in found])
    dense = dense_bytes <= dense_budget_bytes
    new = [(p, SWAPS[type(m)].from_quantized(m, dense=dense)) for p, m in found]
    model.update_modules(tree_unflatten(new))
    caches = [m._dense for _, m in new if m._dense is not None]
    if caches:
        mx.eval(caches)
    rows = measure_qmm_rows(model) if measure else 1
    ServingQuantizedLinear.qmm_rows = ServingQuantizedEmbedding.qmm_rows = rows
    how = f"fp32 copies cached ({dense_bytes / 2**30:.2f} GiB)" if dense else "dequantized per call"
    single = "quantized kernel" if rows else "dense path"
    note = (f"CPU backend: {len(new)} quantized layers compute batches with dense fp32 matmuls ({how}); "
            f"single rows use the {single} (measured)")
    log.info(note)
    return note
