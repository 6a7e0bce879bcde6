"""Masked next-token cross-entropy that never holds the (tokens x vocab) logits at once.

    loss = sum_t m_t * (logsumexp(W h_t) - (W h_t)[y_t]) / sum_t m_t

over the final hidden states h_t, targets y_t and loss mask m_t (logits W h_t, or the
model's own map of them, ``model.head.LogitMap``: a scale or a softcap). The LM head W
(``lm_head`` or the tied embedding) is applied to ``chunk`` tokens at a time, with the
logsumexp in float32 per chunk.

With a frozen head (LoRA, QLoRA) the chunk's gradient is taken in the same pass, as
``dL/dh_t = m_t (softmax(W h_t) - onehot(y_t)) W``: each logit's ``exp`` is computed
once (autodiff would compute it again in the backward pass; on the CPU ``exp`` is the
slowest op of the whole loss), and only (tokens x hidden) gradients are kept. Chunks
are chained with ``mx.depends`` so a bounded number of chunks (about three) is alive
at a time, whatever the number of tokens. A trainable head takes plain autodiff per chunk under
``mx.checkpoint`` (the backward pass recomputes a chunk rather than storing them all).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import NamedTuple

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_tune.model.attention import hidden_states
from mlx_tune.model.head import IDENTITY, LogitMap, apply_map, head_module, lm_head, logit_map
from mlx_tune.runtime.backend import cpu_streams, on_cpu
from mlx_tune.training import loss_shapes
from mlx_tune.training.loss_shapes import DENSE_HEAD_BYTES, HEAD_TILE_BYTES, TILED_TOKENS, chunk_size_for

# Measured peak of the loss and its gradient: 11-13 chunk-sized buffers (4 per chunk,
# two or three chunks in flight), whatever the number of tokens: ~400 MB here.
# Chunks dealt over this many CPU streams. 1: with the row scale and one-hot moved out
# of the (chunk x vocab) work, the loss is matmul-bound and a second stream measured
# no faster here (bench/bench_attention_loss.py) while holding twice the chunks.
CPU_STREAMS = 1


def head_is_trainable(model) -> bool:
    return bool(tree_flatten(head_module(model).trainable_parameters()))


def _lanes(n_chunks: int):
    if on_cpu() and CPU_STREAMS > 1 and n_chunks > 1:
        return [None] + cpu_streams(CPU_STREAMS - 1)
    return [None]


class HeadOps(NamedTuple):
    """What the one-pass loss needs from a frozen LM head W (vocab x hidden).

    logits(h) = h W^T; back(g) = g W (the vjp, linear and row-wise: scaling g's rows
    scales the result's rows), None to take it by ``mx.vjp`` of ``logits``; rows(t) = W[t],
    None where unknown.
    """

    logits: Callable
    back: Callable
    rows: Callable | None


def _dequantized(module) -> mx.array:
    """float32 (out, in) weight, dequantized exactly as mlx_tune.model.quant's CPU layers do."""
    from mlx_tune.model.quant import affine_dequantize

    if hasattr(module, "dense_weight"):
        return module.dense_weight()
    mode = getattr(module, "mode", "affine")
    if mode == "affine":
        return affine_dequantize(module["weight"], module["scales"], module["biases"], module.group_size, module.bits)
    return mx.dequantize(module["weight"], module["scales"], module.get("biases"), group_size=module.group_size,
                         bits=module.bits, mode=mode).astype(mx.float32)


def head_ops(model) -> HeadOps:
    """HeadOps of ``model``'s frozen head: a dense weight where cheap, else the module's own calls."""
    module, head = head_module(model), lm_head(model)
    tied = getattr(model, "lm_head", None) is None
    w, stored = None, module.get("weight")
    if "bias" not in module and isinstance(stored, mx.array):
        if "scales" in module or hasattr(module, "dense_weight"):  # quantized storage (affine, NF4)
            n = module["scales"].size * module.group_size if "scales" in module else stored.size * 2
            if on_cpu() and n * 4 <= DENSE_HEAD_BYTES:
                w = _dequantized(module).astype(mx.float32)
        elif stored.ndim == 2 and mx.issubdtype(stored.dtype, mx.floating):
            w = stored
    if w is not None:
        return HeadOps(lambda x: x @ w.T, lambda g: g @ w, lambda t: w[t])

    rows = (lambda t: module(t)) if tied else None  # an embedding's lookup is W[t]
    return HeadOps(head, None, rows)


def _row_dequantizer(module) -> Callable | None:
    """``rows(index) -> fp32 W[index]`` for a quantized head whose storage slices by rows
    (affine, NF4 without double quantization), else None."""
    from mlx_tune.model.nf4 import nf4_dequantize
    from mlx_tune.model.quant import affine_dequantize

    if "bias" in module:
        return None
    if "scales" in module and getattr(module, "mode", "affine") == "affine":
        g, bits = module.group_size, module.bits
        return lambda i: affine_dequantize(module["weight"][i], module["scales"][i], module["biases"][i], g, bits)
    if "absmax" in module:
        return lambda i: nf4_dequantize(module["weight"][i], module["absmax"][i], module.block_size)
    return None


def _tiled_ce(rows: Callable, vocab: int, h, targets, mask, tile: int, tokens: int, with_grad: bool = True,
              lm: LogitMap = IDENTITY, per_token: bool = False):
    """(sum of masked CE, dL/dh) with the head dequantized ``tile`` vocabulary rows at a time.

    One pass over the tiles per ``tokens`` tokens, an online softmax: with the running max
    ``m``, ``Z = sum_v exp(z_v - m)`` and ``acc = sum_v exp(z_v - m) W_v`` (rescaled by
    ``exp(m_old - m_new)`` when ``m`` grows), at the end ``loss = m + log Z - h.W_y`` and
    ``dL/dh = mask (acc / Z - W_y)``. Each logit's ``exp`` is computed once and each tile
    of ``W`` is dequantized once per pass (the backward reuses ``dL/dh``). Tiles are
    chained with ``mx.depends`` so one tile's weight and logits are alive at a time.
    ``with_grad=False`` (evaluation) skips ``acc`` and returns (loss, None). With a logit
    map (``head.LogitMap``: scale, softcap) the logits are ``f(z)`` and each ``W_v`` enters
    ``acc`` and the target term weighted by ``f'(z_v)``.
    """
    N, D = h.shape
    losses, grads = [], []
    for s in range(0, N, tokens):
        e = min(N, s + tokens)
        hc, tc, mc = h[s:e].astype(mx.float32), targets[s:e], mask[s:e]
        m = mx.full((e - s, 1), -mx.inf, dtype=mx.float32)
        z_sum = mx.zeros((e - s, 1), dtype=mx.float32)
        acc = mx.zeros((e - s, D), dtype=mx.float32) if with_grad else None
        for v0 in range(0, vocab, tile):
            v1 = min(vocab, v0 + tile)
            # dequantize after the previous tile is consumed
            (idx,) = mx.depends([mx.arange(v0, v1)], [acc if with_grad else z_sum])
            w = rows(idx)
            z, dz = apply_map(hc @ w.T, lm)
            m_new = mx.maximum(m, mx.stop_gradient(z.max(axis=-1, keepdims=True)))
            rescale = mx.exp(m - m_new)
            ex = mx.exp(z - m_new)
            z_sum = z_sum * rescale + ex.sum(axis=-1, keepdims=True)
            if with_grad:
                acc = acc * rescale + (ex * dz) @ w
            m = m_new
        w_y = rows(tc)
        z_y, dz_y = apply_map((hc * w_y).sum(axis=-1, keepdims=True), lm)
        ce = (m + mx.log(z_sum) - z_y)[:, 0] * mc
        losses.append(ce if per_token else ce.sum())
        if with_grad:
            grads.append((mc[:, None] * (acc / z_sum - dz_y * w_y)).astype(h.dtype))
    total = _total(losses, per_token)
    if not with_grad:
        return total, None
    return total, grads[0] if len(grads) == 1 else mx.concatenate(grads, axis=0)


def _tiled_fn(rows: Callable, vocab: int, tile: int, tokens: int, lm: LogitMap):
    @mx.custom_function
    def ce(h, targets, mask):
        return _tiled_ce(rows, vocab, h, targets, mask, tile, tokens, lm=lm)

    @ce.vjp
    def ce_vjp(primals, cotangents, outputs):
        h, targets, mask = primals
        return outputs[1] * cotangents[0].astype(h.dtype), mx.zeros_like(targets), mx.zeros_like(mask)

    return ce


def _tiled_head(model):
    """(rows, vocab, hidden) when the loss should tile the frozen head, else None."""
    if not on_cpu():
        return None
    module = head_module(model)
    if "scales" not in module and "absmax" not in module:
        return None
    rows = _row_dequantizer(module)
    if rows is None:
        return None
    vocab = module["weight"].shape[0]
    hidden = module["scales"].shape[1] * module.group_size if "scales" in module else module["weight"].shape[1] * 2
    if not loss_shapes.head_is_tiled(vocab, hidden, DENSE_HEAD_BYTES):
        return None
    return rows, vocab, hidden


def _tile_rows(vocab: int, hidden: int, tokens: int) -> int:
    # This module's (patchable) sizes, not loss_shapes' defaults.
    return loss_shapes.tile_rows_for(vocab, hidden, tokens, HEAD_TILE_BYTES, TILED_TOKENS)


def _back(ops: HeadOps, x, g):
    return ops.back(g) if ops.back is not None else mx.vjp(ops.logits, [x], [g])[1][0]


def _total(parts: list, per_token: bool) -> mx.array:
    """Chunks' losses as one array: their sum, or (per_token) the tokens' losses in order."""
    if len(parts) == 1:
        return parts[0]
    return mx.concatenate(parts) if per_token else mx.sum(mx.stack(parts))


def _fused_ce(ops: HeadOps, h, targets, mask, chunk: int, lm: LogitMap = IDENTITY, per_token: bool = False):
    """(sum of masked CE, dL/dh) in one pass over the vocabulary, chunk by chunk.

    Per chunk: p = exp(z - max) / s, and dL/dh = m (p - onehot(y)) W
    = (m / s) * (exp(z - max) W) - m W[y]: the row scale goes after the matmul and the
    one-hot part is a row gather, so the only (chunk x vocab) passes are max, exp, sum.
    With a logit map f (scale, softcap) the softmax is over f(z) and dL/dz = (p - onehot) f'(z).
    """
    N = h.shape[0]
    lanes = _lanes(-(-N // chunk))
    losses, grads, last = [], [], {}
    for c, s in enumerate(range(0, N, chunk)):
        e = min(N, s + chunk)
        lane = lanes[c % len(lanes)]
        hc, tc, mc = h[s:e], targets[s:e], mask[s:e]
        prev = last.get(lane)
        if prev is not None:  # free the previous chunk on this lane before making this one
            hc = mx.depends(hc, prev)
        logits, dz = apply_map(ops.logits(hc).astype(mx.float32), lm)
        # The elementwise work goes to the lane, the matmuls stay on the default stream.
        with mx.stream(lane) if lane is not None else contextlib.nullcontext():
            top = mx.stop_gradient(logits.max(axis=-1, keepdims=True))
            tgt = mx.take_along_axis(logits, tc[:, None], axis=-1)
            ex = mx.exp(logits - top)  # the one exp over the chunk's logits
            z = ex.sum(axis=-1, keepdims=True)
            loss = (top + mx.log(z) - tgt)[:, 0] * mc
            loss = loss if per_token else loss.sum()
            # f'(z) at the target and over the chunk (a plain float without softcap)
            dz_y = mx.take_along_axis(dz, tc[:, None], axis=-1) if isinstance(dz, mx.array) else dz
            exd = ex if lm.identity else ex * dz
            if ops.rows is None:
                # (softmax - onehot(target)) f'(z) built in place (one more pass over the chunk)
                g = exd * (mc[:, None] / z)
                g = mx.put_along_axis(g, tc[:, None],
                                      mx.take_along_axis(g, tc[:, None], axis=-1) - mc[:, None] * dz_y, axis=-1)
        if ops.rows is not None:
            scale = (mc[:, None] / z).astype(hc.dtype)
            w_y = ops.rows(tc).astype(hc.dtype)
            if not lm.identity:
                w_y = w_y * (dz_y.astype(hc.dtype) if isinstance(dz_y, mx.array) else dz_y)
            dh = _back(ops, hc, exd.astype(hc.dtype)) * scale - mc[:, None].astype(hc.dtype) * w_y
        else:
            dh = _back(ops, hc, g.astype(hc.dtype))
        losses.append(loss)
        grads.append(dh.astype(h.dtype))  # a float32 head makes float32 products; h may be bf16
        last[lane] = [loss, dh]
    total = _total(losses, per_token)
    return total, grads[0] if len(grads) == 1 else mx.concatenate(grads, axis=0)


def _fused_fn(ops: HeadOps, chunk: int, lm: LogitMap):
    @mx.custom_function
    def ce(h, targets, mask):
        return _fused_ce(ops, h, targets, mask, chunk, lm)

    @ce.vjp
    def ce_vjp(primals, cotangents, outputs):
        h, targets, mask = primals
        return outputs[1] * cotangents[0].astype(h.dtype), mx.zeros_like(targets), mx.zeros_like(mask)

    return ce


def _recomputed_ce(model, h, targets, mask, chunk: int, per_token: bool = False):
    """Sum of masked CE (or, per_token, each token's) by autodiff, each chunk under
    mx.checkpoint (trainable head)."""
    module, head, lm = head_module(model), lm_head(model), logit_map(model)

    def chunk_loss(params, hc, tc, mc):
        module.update(params)
        tc = mx.stop_gradient(tc)  # integer targets: no gradient to ask for
        logits = apply_map(head(hc).astype(mx.float32), lm)[0]
        ce = (mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, tc[:, None], axis=-1)[:, 0]) * mc
        return ce if per_token else ce.sum()

    fn = mx.checkpoint(chunk_loss)
    params = module.trainable_parameters()
    parts = [fn(params, h[s:s + chunk], targets[s:s + chunk], mask[s:s + chunk]) for s in range(0, h.shape[0], chunk)]
    return _total(parts, per_token)


def masked_ce_sum(model, h: mx.array, targets: mx.array, mask: mx.array, chunk: int | None = None) -> mx.array:
    """Sum over tokens of mask * CE(lm_head(h), targets); h (..., hidden), targets/mask (...)."""
    h = h.reshape(-1, h.shape[-1])
    targets = targets.reshape(-1)
    mask = mask.reshape(-1).astype(mx.float32)
    if chunk is None:
        chunk = chunk_size_for(_vocab_size(model))
    if head_is_trainable(model):
        return _recomputed_ce(model, h, targets, mask, chunk)
    tiled = _tiled_head(model)
    if tiled is not None:
        rows, vocab, hidden = tiled
        tile = _tile_rows(vocab, hidden, h.shape[0])
        total, _ = _tiled_fn(rows, vocab, tile, TILED_TOKENS, logit_map(model))(h, targets, mask)
        return total
    total, _ = _fused_fn(head_ops(model), chunk, logit_map(model))(h, targets, mask)
    return total


def masked_ce_value(model, h: mx.array, targets: mx.array, mask: mx.array) -> mx.array:
    """Forward-only ``masked_ce_sum`` (validation): no gradient by-products, one chunk of
    fp32 logits (or one vocabulary tile of a big quantized head) at a time."""
    h = h.reshape(-1, h.shape[-1])
    targets = targets.reshape(-1)
    mask = mask.reshape(-1).astype(mx.float32)
    tiled = _tiled_head(model)
    if tiled is not None:
        rows, vocab, hidden = tiled
        tile = _tile_rows(vocab, hidden, h.shape[0])
        return _tiled_ce(rows, vocab, h, targets, mask, tile, TILED_TOKENS, with_grad=False, lm=logit_map(model))[0]
    head, chunk, total = lm_head(model), chunk_size_for(_vocab_size(model)), mx.array(0.0)
    lm = logit_map(model)
    for s in range(0, h.shape[0], chunk):
        logits = apply_map(head(h[s:s + chunk]).astype(mx.float32), lm)[0]
        ce = mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, targets[s:s + chunk, None], axis=-1)[:, 0]
        total = total + (ce * mask[s:s + chunk]).sum()
    return total


def _per_token_fn(compute: Callable):
    """``compute(h, targets, ones) -> (CE_t (N,), G (N, hidden))`` as a function of h whose
    vjp is ``cotangent_t * G_t``: G_t = dCE_t/dh_t, made in the forward pass (one exp per
    logit). Every array it reads is an argument (``mx.compile`` traces custom functions
    by their inputs)."""
    @mx.custom_function
    def ce(h, targets, ones):
        return compute(h, targets, ones)

    @ce.vjp
    def ce_vjp(primals, cotangents, outputs):
        h, targets, ones = primals
        return outputs[1] * cotangents[0][:, None].astype(h.dtype), mx.zeros_like(targets), mx.zeros_like(ones)

    return ce


def token_ce(model, h: mx.array, targets: mx.array, with_grad: bool = True) -> mx.array:
    """Per-token cross-entropy CE_t = logsumexp(W h_t) - (W h_t)[y_t] = -log p(y_t | h_t), shape (N,),
    for rows h (N, hidden) and targets (N,): what sequence log-probabilities (preference
    methods, GRPO) are summed from. Same heads and memory bounds as ``masked_ce_sum``;
    ``with_grad=False`` is forward only (a reference model, validation)."""
    h = h.reshape(-1, h.shape[-1])
    targets = targets.reshape(-1)
    ones = mx.ones(targets.shape, dtype=mx.float32)
    lm = logit_map(model)
    chunk = chunk_size_for(_vocab_size(model))
    tiled = _tiled_head(model)
    if with_grad and head_is_trainable(model):
        return _recomputed_ce(model, h, targets, ones, chunk, per_token=True)
    if tiled is not None:
        rows, vocab, hidden = tiled
        tile = _tile_rows(vocab, hidden, h.shape[0])
        if not with_grad:
            return _tiled_ce(rows, vocab, h, targets, ones, tile, TILED_TOKENS, with_grad=False, lm=lm, per_token=True)[0]
        return _per_token_fn(lambda x, t, w: _tiled_ce(rows, vocab, x, t, w, tile, TILED_TOKENS, lm=lm,
                                                       per_token=True))(h, targets, ones)[0]
    if not with_grad:
        head, parts = lm_head(model), []
        for s in range(0, h.shape[0], chunk):
            logits = apply_map(head(h[s:s + chunk]).astype(mx.float32), lm)[0]
            parts.append(mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, targets[s:s + chunk, None], axis=-1)[:, 0])
        return mx.stop_gradient(_total(parts, True))
    ops = head_ops(model)
    return _per_token_fn(lambda x, t, w: _fused_ce(ops, x, t, w, chunk, lm, per_token=True))(h, targets, ones)[0]


def gathered(h: mx.array, targets: mx.array, mask: mx.array, gather: mx.array | None):
    """(h, targets, mask) flattened to tokens, and cut to the positions ``gather`` lists
    (the ones that carry a loss, from ``data.batching.collate``): the vocabulary head then
    runs only where a loss is taken. Padding entries point at untrained slots (mask 0)."""
    h, targets, mask = h.reshape(-1, h.shape[-1]), targets.reshape(-1), mask.reshape(-1)
    if gather is None:
        return h, targets, mask
    return h[gather], targets[gather], mask[gather]


def _vocab_size(model) -> int:
    m = head_module(model)
    w = getattr(m, "weight", None)
    if w is not None and getattr(m, "bits", None) is None and w.ndim == 2:
        return w.shape[0]
    args = getattr(model, "args", None)
    return int(getattr(args, "vocab_size", 32000))


def loss_fn(model, inputs: mx.array, targets: mx.array, loss_mask: mx.array,
            segment_ids: mx.array | None = None, positions: mx.array | None = None,
            chunk: int | None = None, gather: mx.array | None = None):
    """(mean CE over trained tokens, number of trained tokens) for one batch.

    Use with ``nn.value_and_grad(model, loss_fn)(model, *batch.arrays())``; packing info
    (``segment_ids``, ``positions``) goes to the attention as call arguments; ``gather``
    (trained positions) limits the head to them.
    """
    h = hidden_states(model, inputs, segment_ids, positions)
    n = loss_mask.astype(mx.float32).sum()
    total = masked_ce_sum(model, *gathered(h, targets, loss_mask, gather), chunk=chunk)
    return total / mx.maximum(n, 1.0), n


def batch_loss(model, batch):
    """``loss_fn`` (packing-aware attention, chunked cross-entropy) over a batch's arrays:
    the training loss of ``mlx-tune train`` (``loop.train``'s ``loss_fn`` signature)."""
    return loss_fn(model, batch.inputs, batch.targets, batch.loss_mask, batch.segment_ids, batch.positions,
                   gather=getattr(batch, "gather", None))


def eval_loss(model, batch):
    """Forward-only loss for validation / test: the same value as ``batch_loss``, without the
    gradient that ``loss_fn`` computes in its forward pass (frozen head: a second
    vocabulary-sized matmul per token, wasted when nothing is trained)."""
    h = hidden_states(model, batch.inputs, batch.segment_ids, batch.positions)
    mask = batch.loss_mask.astype(mx.float32)
    hg, tg, mg = gathered(h, batch.targets, mask, getattr(batch, "gather", None))
    total = masked_ce_value(model, hg, tg, mg)
    n = mask.sum()
    return total / mx.maximum(n, 1.0), n


def full_loss_reference(model, inputs, targets, loss_mask, segment_ids=None, positions=None):
    """The plain computation (whole float32 logits, autodiff): what ``loss_fn`` must equal."""
    from mlx_tune.model.attention import forward

    logits = forward(model, inputs, segment_ids, positions).astype(mx.float32)
    ce = mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    n = loss_mask.sum()
    return (ce * loss_mask).sum() / mx.maximum(n, 1.0), n
