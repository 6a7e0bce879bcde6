"""Causal attention whose backward recomputes the probabilities a query block at a time.

Autodiff of softmax attention keeps the (L, L) probabilities of every head until the
backward pass; at long rows they dominate training memory. ``flash_attention`` saves
only q, k, v, the output O and each row's log-sum-exp, and recomputes the rest per
query block of ``bq`` rows (keys after the block's last row are masked by causality,
so never scored). With S = q k^T * scale (masked entries -inf), sink logit z per head
(None: no sink term):

    lse_i = log(sum_j exp(S_ij) + exp(z)),   P = exp(S - lse),   O = P V

and for an upstream gradient dO, per query block:

    dV += P^T dO,   dP = dO V^T,   D_i = rowsum(dO * O)_i,   dS = P * (dP - D),
    dQ = dS K * scale,   dK += dS^T Q * scale,   dz = -sum_i exp(z - lse_i) D_i

(grouped-query heads: a key/value head sums over its query heads, which the
(group x rows) matmuls do). Memory: O(L * bq) per head in the working set, O(L) saved.
The accumulators for dQ, dK, dV travel as one array, so each block's P and dS are
consumed by one node and freed before the next block is scored.
"""

from __future__ import annotations

import functools

import mlx.core as mx

from mlx_tune.model import attention_shapes

__all__ = ["flash_attention"]


def flash_attention(q, k, v, scale: float, mask: mx.array | None = None, sinks: mx.array | None = None,
                    block: int | None = None) -> mx.array:
    """Exact softmax(q k^T * scale, masked) v, causal; q: (B, H, L, D); k: (B, Hkv, L, D);
    v: (B, Hkv, L, Dv); mask: None (causal) or boolean (B or 1, 1, L, L) including the causal
    part; sinks: None or (H,) logits joining each row's denominator (their gradient flows)."""
    L = q.shape[2]
    fn = _kernel(float(scale), min(block or attention_shapes.FLASH_BLOCK, L), mask is not None, sinks is not None)
    extra = ([mask] if mask is not None else []) + ([sinks] if sinks is not None else [])
    return fn(q, k, v, *extra)[0]


def _split(q, k, v, extra, has_mask, has_sinks):
    mask = extra[0] if has_mask else None
    sinks = extra[-1] if has_sinks else None
    B, H, L, D = q.shape
    Hkv = k.shape[1]
    sink = None if sinks is None else sinks.astype(mx.float32).reshape(1, Hkv, H // Hkv, 1, 1)
    return mask, sinks, sink, B, H, L, D, Hkv, H // Hkv


def _scores(q, k, mask, s, e, scale, B, Hkv, G, D):
    """Masked fp32 scores of query rows s:e against keys 0:e, (B, Hkv, G, e - s, e)."""
    qi = q.reshape(B, Hkv, G, -1, D)[:, :, :, s:e].reshape(B, Hkv, G * (e - s), D)
    sc = ((qi @ k[:, :, :e].swapaxes(-1, -2)).astype(mx.float32) * scale).reshape(B, Hkv, G, e - s, e)
    if mask is None:
        allowed = mx.arange(s, e)[:, None] >= mx.arange(e)[None, :]
    else:
        allowed = mask[:, :, s:e, :e][:, :, None]
    return mx.where(allowed, sc, -mx.inf), qi


@functools.lru_cache(maxsize=64)
def _kernel(scale: float, block: int, has_mask: bool, has_sinks: bool):
    @mx.custom_function
    def attention(q, k, v, *extra):
        return _forward(q, k, v, extra, scale, block, has_mask, has_sinks)

    @attention.vjp
    def attention_vjp(primals, cotangents, outputs):  # the lse output is internal: its cotangent is zero
        q, k, v, *extra = primals
        return _backward(q, k, v, extra, cotangents[0], outputs, scale, block, has_mask, has_sinks)

    return attention


def _bounds(L: int, block: int) -> list[tuple[int, int]]:
    return [(s, min(L, s + block)) for s in range(0, L, block)]


def _forward(q, k, v, extra, scale, block, has_mask, has_sinks):
    mask, _, sink, B, H, L, D, Hkv, G = _split(q, k, v, extra, has_mask, has_sinks)
    Dv = v.shape[-1]
    outs, lses = [], []
    for s, e in _bounds(L, block):
        sc, _ = _scores(q, k, mask, s, e, scale, B, Hkv, G, D)
        m = sc.max(axis=-1, keepdims=True)
        if sink is not None:
            m = mx.maximum(m, sink)
        m = mx.where(mx.isinf(m), 0.0, m)  # a row with nothing allowed (and no sink): output 0, not NaN
        p = mx.exp(sc - m)
        denom = p.sum(axis=-1, keepdims=True)
        if sink is not None:
            denom = denom + mx.exp(sink - m)
        denom = mx.maximum(denom, 1e-30)  # >= 1 for any row with an allowed key; only empty rows change
        o = (p.reshape(B, Hkv, G * (e - s), e).astype(v.dtype) @ v[:, :, :e]).reshape(B, Hkv, G, e - s, Dv)
        outs.append((o.astype(mx.float32) / denom).astype(q.dtype))
        lses.append(m + mx.log(denom))
        q, k, v = mx.depends([q, k, v], [outs[-1], lses[-1]])  # the next block waits: one block's scores alive
    out = mx.concatenate(outs, axis=3) if len(outs) > 1 else outs[0]
    lse = mx.concatenate(lses, axis=3) if len(lses) > 1 else lses[0]
    return out.reshape(B, H, L, Dv), lse


def _backward(q, k, v, extra, d_out, outputs, scale, block, has_mask, has_sinks):
    mask, sinks, sink, B, H, L, D, Hkv, G = _split(q, k, v, extra, has_mask, has_sinks)
    Dv = v.shape[-1]
    out, lse = outputs
    dO = d_out.reshape(B, Hkv, G, L, Dv)
    delta = (dO.astype(mx.float32) * out.reshape(B, Hkv, G, L, Dv).astype(mx.float32)).sum(-1, keepdims=True)
    # One accumulator: [dK | dV | dQ as (L, G*D)] along the last axis, updated once per block.
    width = D + Dv + G * D
    acc = mx.zeros((B, Hkv, L, width), mx.float32)
    for s, e in _bounds(L, block):
        if s:  # MLX evaluates breadth first; without this every block's P would be alive at once
            q, k, v, dO, delta, lse = mx.depends([q, k, v, dO, delta, lse], [acc])
        n = e - s
        sc, qi = _scores(q, k, mask, s, e, scale, B, Hkv, G, D)
        p = mx.exp(sc - lse[:, :, :, s:e])  # masked entries: exp(-inf) = 0
        p2 = p.reshape(B, Hkv, G * n, e)
        do_i = dO[:, :, :, s:e].reshape(B, Hkv, G * n, Dv)
        d_v = p2.swapaxes(-1, -2) @ do_i.astype(mx.float32)  # (B, Hkv, e, Dv)
        d_p = (do_i @ v[:, :, :e].swapaxes(-1, -2)).astype(mx.float32).reshape(B, Hkv, G, n, e)
        d_s = (p * (d_p - delta[:, :, :, s:e])).reshape(B, Hkv, G * n, e)
        d_k = (d_s.swapaxes(-1, -2) @ qi.astype(mx.float32)) * scale  # (B, Hkv, e, D)
        d_q = ((d_s @ k[:, :, :e].astype(mx.float32)) * scale).reshape(B, Hkv, G, n, D)
        d_q = mx.pad(d_q.transpose(0, 1, 3, 2, 4).reshape(B, Hkv, n, G * D), [(0, 0), (0, 0), (s, 0), (0, 0)])
        part = mx.concatenate([d_k, d_v, d_q], axis=-1)
        acc = acc + (mx.pad(part, [(0, 0), (0, 0), (0, L - e), (0, 0)]) if e < L else part)
    d_k = acc[..., :D].astype(k.dtype)
    d_v = acc[..., D:D + Dv].astype(v.dtype)
    d_q = acc[..., D + Dv:].reshape(B, Hkv, L, G, D).transpose(0, 1, 3, 2, 4).reshape(B, H, L, D).astype(q.dtype)
    grads = [d_q, d_k, d_v]
    if has_mask:
        grads.append(mx.zeros_like(mask))
    if has_sinks:
        p_sink = mx.exp(sink - lse)  # (B, Hkv, G, L, 1)
        grads.append((-(p_sink * delta).sum(axis=(0, 3, 4)).reshape(H)).astype(sinks.dtype))
    return tuple(grads)
