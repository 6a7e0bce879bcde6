"""Packing-aware, backend-aware attention for every mlx-lm softmax-attention model.

With packed rows, query i may see key j only when both belong to the same example and
the model's own mask allows it:

    allowed[b, i, j] = (seg[b, i] == seg[b, j]) and (j <= i) and model_mask[i, j]

(``model_mask``: causal, or causal within a sliding window), and rotary position
embeddings use each token's position inside its example (``positions``), so a packed
example computes what it computes alone.

No architecture is copied. mlx-lm's model files build their masks with
``create_attention_mask`` / ``create_causal_mask`` and attend with
``scaled_dot_product_attention``, all three from ``mlx_lm.models.base``;
``enable_packing(model)`` rebinds those names, in the model files the model is built
from, to wrappers, and gives the model's RoPE modules (``nn.RoPE`` and the classes of
``mlx_lm.models.rope_utils``) a subclass. Outside ``hidden_states`` every wrapper calls
the original unchanged (generation, a KV cache, other models). Inside, a context
(``_ACTIVE``) holds the batch's segment mask and positions as arrays of the traced call,
so under ``mx.compile`` they are ordinary inputs, never captured constants:

- the mask builders return the model's mask AND the segment mask, a boolean
  (B, 1, L, L) (hand-written attentions such as gemma2's softcapped one use it as is);
- the attention runs the backend's kernel with that mask, attention sinks (gpt_oss)
  and additive score masks (deepseek's MLA) included;
- RoPE rotates each token at its own position (one length-1 "sequence" per token, its
  offset the position). Other rotary code keeps row positions, which gives the same
  attention (a rotary score depends on i - j only, and i - j is the same inside an
  example); learned absolute position tables cannot restart (``packing`` proves it).

Packed rows of short examples (``packing.set_reach``: the run's longest example) attend
with ``band_attention`` on the CPU: a query tile scores only the key tiles its example can
reach, the tile before and its own.

Long rows (``attention_shapes``) attend with ``flash.flash_attention`` on both paths: its
backward recomputes the probabilities a query block at a time instead of keeping (L, L) of
them per head. MLX's fused kernel does not help there on Metal (under autodiff it runs the
unfused attention, forward and backward: MLX 0.32 ``ScaledDotProductAttention::use_fallback``),
only CUDA's cuDNN backward does (``attention_shapes.cudnn_backward``).

Backends: on Metal / CUDA the attention is ``mx.fast.scaled_dot_product_attention``.
On the CPU, where ``exp`` is the wall, ``block_causal_attention`` is exact and cheaper:
query block i only scores key blocks 0..i (the rest of a causal row is masked, so never
computed, ~(n+1)/2n of the work for n blocks), and the blocks are split over two CPU
streams so two softmaxes run at once.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import sys
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlx_tune.model import attention_shapes, head
from mlx_tune.model.flash import flash_attention
from mlx_tune.model.head import body, head_module, lm_head
from mlx_tune.runtime.backend import cpu_streams, device_backend, in_row_lane, on_cpu

__all__ = ["attend", "band_attention", "band_tile", "block_causal_attention", "body", "enable_packing", "forward", "head_module",
           "hidden_states", "lm_head", "packed_mask", "window_limit"]

# CPU levers (module level so benchmarks and tests can turn them off).
CPU_BLOCK: int | None = None  # query/key block; None: L / 8, at least 64
CPU_STREAMS = 2
# ---------------------------------------------------------------------------
# Attention kernels
# ---------------------------------------------------------------------------


def block_causal_attention(q, k, v, scale: float, mask: mx.array | None = None,
                           block: int | None = None, streams: int | None = None,
                           bias: mx.array | None = None, sinks: mx.array | None = None) -> mx.array:
    """Exact causal softmax(q k^T * scale + bias, masked) v, skipping key blocks above the diagonal.

    q: (B, H, L, D); k: (B, Hkv, L, D), v: (B, Hkv, L, Dv) with H a multiple of Hkv
    (grouped queries); mask: None (causal only) or a boolean (B or 1, 1, L, L) with the
    causal part included; bias: None or additive scores (B or 1, H or 1, L, L); sinks:
    None or one logit per head (H,) that joins every row's softmax denominator.
    Query block i (rows i*bq..) scores keys 0..(i+1)*bq only: with n blocks,
    (n + 1) / 2n of the scores and their exps. The blocks' softmaxes are dealt out to
    ``streams`` CPU streams balancing their cost (block i costs i + 1).
    """
    B, H, L, D = q.shape
    in_lane = in_row_lane()  # a row lane of the step (training.lanes): one stream, fewer, larger blocks
    # (512-token rows in a lane: 9.33 s a step at 64-row blocks, 9.0 at 128, 9.33 at 256)
    block = block or CPU_BLOCK or max(128 if in_lane else 64, -(-L // 8))
    streams = streams or (1 if in_lane else CPU_STREAMS)
    Hkv, Dv = k.shape[1], v.shape[-1]
    G = H // Hkv
    q = (q * scale).reshape(B, Hkv, G, L, D)
    if bias is not None:  # (B', H', L, L) -> (B', Hkv', G', L, L), broadcast over the groups
        bias = bias.reshape(bias.shape[0], Hkv if bias.shape[1] == H else 1, G if bias.shape[1] == H else 1, L, L)
    sink = None if sinks is None else sinks.astype(q.dtype).reshape(1, Hkv, G, 1, 1)
    n = -(-L // block)
    if n == 1 and streams <= 1:
        block = L
    bounds = [(i * block, min(L, (i + 1) * block)) for i in range(n)]

    # Greedy balance: biggest blocks first, each to the least loaded stream.
    lanes = ([None] + cpu_streams(streams - 1)) if streams > 1 else [None]
    load = [0] * len(lanes)
    lane_of = {}
    for i in reversed(range(n)):
        s = min(range(len(lanes)), key=lambda j: load[j])
        lane_of[i] = s
        load[s] += bounds[i][1]

    outs: list[Any] = [None] * n
    for i, (s, e) in enumerate(bounds):
        lane = lanes[lane_of[i]]
        qi = q[:, :, :, s:e, :].reshape(B, Hkv, G * (e - s), D)
        scores = (qi @ k[:, :, :e, :].swapaxes(-1, -2)).reshape(B, Hkv, G, e - s, e)
        # Only the elementwise softmax goes to the lane: matmuls stay on the default
        # stream (BLAS is multi-threaded already; two concurrent sgemms fight for cores).
        with mx.stream(lane) if lane is not None else contextlib.nullcontext():
            if bias is not None:
                scores = scores + bias[..., s:e, :e].astype(scores.dtype)
            if mask is None:
                # Only the diagonal block holds masked entries.
                allowed = mx.arange(s, e)[:, None] >= mx.arange(e)[None, :]
            else:
                allowed = mask[:, :, s:e, :e][:, :, None]  # (B, 1, 1, bq, e)
            scores = mx.where(allowed, scores, mx.array(-mx.inf, scores.dtype))
            if sink is None:
                p = _softmax(scores)
            else:  # the sink is one more logit in the softmax whose probability is dropped
                sk = mx.broadcast_to(sink, (*scores.shape[:-1], 1))
                p = _softmax(mx.concatenate([scores, sk], axis=-1))[..., :e]
            p = p.reshape(B, Hkv, G * (e - s), e)
        outs[i] = (p @ v[:, :, :e, :]).reshape(B, Hkv, G, e - s, Dv)
    out = outs[0] if n == 1 else mx.concatenate(outs, axis=3)
    return out.reshape(B, H, L, Dv)


FAST_SOFTMAX = True  # False: MLX's Softmax primitive (module level, for benchmarks)


@mx.custom_function
def _softmax_fn(x):
    e = mx.exp(x - x.max(axis=-1, keepdims=True))  # the vjp below is the whole gradient
    return e / e.sum(axis=-1, keepdims=True)


@_softmax_fn.vjp
def _softmax_vjp(primals, cotangent, output):
    return (output * (cotangent - (cotangent * output).sum(axis=-1, keepdims=True)),)


def _softmax(x: mx.array) -> mx.array:
    """softmax over the last axis, p = exp(x - max) / sum, with the usual vjp
    p * (g - sum(g p)). Built from element-wise ops so that ``mx.compile`` fuses the exp
    into a JIT kernel, which ``runtime.jit`` vectorises: about twice as fast as MLX's CPU
    Softmax primitive, whose exp runs one element at a time on x86."""
    if not FAST_SOFTMAX:
        return mx.softmax(x, axis=-1, precise=True)
    out: mx.array = _softmax_fn(x)  # type: ignore[assignment]
    return out


def band_tile(length: int, reach: int | None) -> int | None:
    """The key tile ``band_attention`` uses for rows of ``length`` when no query sees a key
    ``reach`` rows back: the power of two >= reach (at least 16), or None where the band
    would not save work (a tile over a quarter of the row) or does not divide the row."""
    if reach is None or reach < 1:
        return None
    tile = max(16, 1 << (reach - 1).bit_length())
    return tile if length % tile == 0 and 4 * tile <= length else None


def band_attention(q, k, v, scale: float, mask: mx.array, tile: int, sinks: mx.array | None = None) -> mx.array:
    """Exact masked softmax(q k^T * scale) v when no query may see a key ``tile`` or more
    rows back (packed rows whose examples are all shorter than ``tile``: ``packing.set_reach``).

    Query tile i (rows i*tile..) scores key tiles i-1 and i only: 2 * tile * L scores per
    head instead of the ~L^2 / 2 of ``block_causal_attention``, and their exps. A query's
    keys all lie in its example, which starts less than ``tile`` rows back, so every key
    the mask allows is in the window; the rest of the window is masked (as are the
    zero keys before the first tile). q: (B, H, L, D); k: (B, Hkv, L, D); v: (B, Hkv, L, Dv);
    mask: boolean (B or 1, 1, L, L), causal part included; L a multiple of ``tile``.
    """
    B, H, L, D = q.shape
    Hkv, Dv, T = k.shape[1], v.shape[-1], tile
    G, n = H // Hkv, L // T

    def windows(x):  # (B, Hkv, L, d) -> (B, Hkv, 1, n, 2T, d): key tiles i-1 and i
        t = mx.pad(x, [(0, 0), (0, 0), (T, 0), (0, 0)]).reshape(x.shape[0], Hkv, n + 1, T, x.shape[-1])
        return mx.concatenate([t[:, :, :-1], t[:, :, 1:]], axis=3)[:, :, None]

    kw, vw = windows(k), windows(v)
    scores = (q * scale).reshape(B, Hkv, G, n, T, D) @ kw.swapaxes(-1, -2)  # (B, Hkv, G, n, T, 2T)
    # The mask's band, read in place: window (i, t, j) is padded[i*T + t, i*T + j].
    Bm, W = mask.shape[0], L + T
    padded = mx.pad(mask, [(0, 0), (0, 0), (0, 0), (T, 0)], constant_values=False)
    allowed = mx.as_strided(padded, (Bm, 1, 1, n, T, 2 * T), (L * W, L * W, L * W, T * W + T, W, 1))
    scores = mx.where(allowed, scores, mx.array(-mx.inf, scores.dtype))
    if sinks is None:
        p = _softmax(scores)
    else:  # the sink is one more logit in the softmax whose probability is dropped
        sk = mx.broadcast_to(sinks.astype(scores.dtype).reshape(1, Hkv, G, 1, 1, 1), (*scores.shape[:-1], 1))
        p = _softmax(mx.concatenate([scores, sk], axis=-1))[..., :2 * T]
    return (p @ vw).reshape(B, H, L, Dv)


def packed_mask(segment_ids: mx.array, prefix_ids: mx.array | None = None) -> mx.array:
    """(B, 1, L, L) boolean: key not after query, and in the query's example or in its
    shared prefix (``prefix_ids[b, i]``: the segment that query i also sees; a token with
    no shared prefix names its own segment).

    A shared prefix lets several continuations of one prompt sit in one row after a single
    copy of it, ``[prompt | c_1 | c_2 | ...]``: c_k attends to the prompt and to itself,
    never to c_j, and its positions continue the prompt's, so each computes what
    ``prompt + c_k`` computes alone, with the prompt's tokens run once."""
    L = segment_ids.shape[-1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    if prefix_ids is not None:
        same = mx.logical_or(same, prefix_ids[:, :, None] == segment_ids[:, None, :])
    causal = mx.arange(L)[:, None] >= mx.arange(L)[None, :]
    return mx.logical_and(same, causal)[:, None]


def _fused_backward(q, v) -> bool:
    """Whether ``mx.fast.scaled_dot_product_attention`` has a backward without the (L, L)
    probabilities here: only CUDA's cuDNN one (``attention_shapes.cudnn_backward``)."""
    if on_cpu() or device_backend() != "cuda":
        return False
    return attention_shapes.cudnn_backward(q.dtype.size, q.shape[-1], v.shape[-1], q.shape[2])


def attend(q, k, v, scale: float, mask: mx.array | None, bias: mx.array | None = None,
           sinks: mx.array | None = None, reach: int | None = None) -> mx.array:
    """Causal attention (``mask`` None) or masked by a boolean (B, 1, L, L) that includes
    the causal part, with optional additive ``bias`` scores and per-head ``sinks``, per backend.

    Long rows (``attention_shapes.FLASH_MIN_LENGTH``) without ``bias`` take ``flash_attention`` unless MLX's
    fused kernel has a backward of its own (``_fused_backward``). An additive bias
    (deepseek's MLA rotary scores, a function of the trained q/k projections) keeps the
    kernels below: its gradient is an (L, L) array anyway.

    ``reach``: no query sees a key this many rows back or more (``packing.set_reach``);
    on the CPU, rows long enough for it take ``band_attention`` (``band_tile``)."""
    if mask is not None and bias is None and mask.ndim == 4 and mask.shape[1] == 1 and on_cpu():
        tile = band_tile(q.shape[2], reach)
        if tile is not None:
            return band_attention(q, k, v, scale, mask, tile, sinks=sinks)
    if attention_shapes.flash_applies(q.shape[2], bias is not None) and not _fused_backward(q, v):
        return flash_attention(q, k, v, scale, mask, sinks=sinks)
    if on_cpu():
        return block_causal_attention(q, k, v, scale, mask, bias=bias, sinks=sinks)
    if bias is not None:
        allowed = mask if mask is not None else mx.arange(q.shape[2])[:, None] >= mx.arange(k.shape[2])[None]
        full: Any = mx.where(allowed, bias, mx.array(-mx.inf, bias.dtype)).astype(q.dtype)
    else:
        full = "causal" if mask is None else mask
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=full, sinks=sinks)


# ---------------------------------------------------------------------------
# The packing context and the wrappers consulted inside it
# ---------------------------------------------------------------------------


@dataclass
class _Packing:
    """What the wrappers read during one ``hidden_states`` call (arrays of that call)."""

    batch: int
    length: int
    mask: mx.array | None  # packed_mask(segment_ids); None: no packing (plain causal rows)
    positions: mx.array | None  # (B, L) position of each token inside its example
    rank: int = 4  # the masks' rank: 4 (B, 1, L, L), or 5 (B, 1, 1, L, L) for attentions that score in 5-D
    reach: int | None = None  # no query sees a key this many rows back (``packing.set_reach``); None: unknown
    built: list = field(default_factory=list)  # masks made here: known to include the causal part

    def combine(self, model_mask: Any) -> Any:
        """The model's mask ("causal", None, a boolean or additive array) AND the segment mask."""
        if self.mask is None:
            out = model_mask
        elif model_mask is None or isinstance(model_mask, str):
            out = self.mask
        elif model_mask.dtype == mx.bool_:
            out = mx.logical_and(self.mask, model_mask)
        else:
            out = mx.where(self.mask, model_mask, mx.array(-mx.inf, model_mask.dtype))
        if isinstance(out, mx.array) and out.dtype == mx.bool_:
            if out.ndim < 4:  # (L, L) -> (1, 1, L, L), the shape the kernels take
                out = out.reshape((1,) * (4 - out.ndim) + out.shape)
            if self.rank == 5 and out.ndim == 4:  # (B, 1, 1, L, L): broadcasts over (B, kv, groups, L, L)
                out = out.reshape(out.shape[0], 1, *out.shape[1:])
            self.built.append(out)
        return out

    def is_built(self, mask: Any) -> bool:
        return any(mask is m for m in self.built)


_ACTIVE: contextvars.ContextVar[_Packing | None] = contextvars.ContextVar("mlx_tune_packing", default=None)


def _originals() -> dict[str, Any]:
    from mlx_lm.models import base

    return {"create_attention_mask": base.create_attention_mask, "create_causal_mask": base.create_causal_mask,
            "scaled_dot_product_attention": base.scaled_dot_product_attention}


def _create_attention_mask(h, cache=None, window_size=None, return_array=False):
    ctx, orig = _ACTIVE.get(), _originals()["create_attention_mask"]
    if ctx is None or cache is not None or h.ndim < 2 or h.shape[1] != ctx.length:
        return orig(h, cache, window_size=window_size, return_array=return_array)
    return ctx.combine(orig(h, None, window_size=window_size, return_array=return_array or ctx.mask is not None))


def _create_causal_mask(N, offset=0, window_size=None, right_padding=None, left_padding=None):
    ctx, orig = _ACTIVE.get(), _originals()["create_causal_mask"]
    mask = orig(N, offset, window_size=window_size, right_padding=right_padding, left_padding=left_padding)
    if ctx is None or N != ctx.length or offset or right_padding is not None or left_padding is not None:
        return mask
    return ctx.combine(mask)


def _scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None):
    ctx, orig = _ACTIVE.get(), _originals()["scaled_dot_product_attention"]
    L = queries.shape[-2]
    if ctx is None or cache is not None or L != ctx.length or keys.shape[-2] != L or queries.ndim != 4:
        return orig(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)
    bias = None
    if mask is None or isinstance(mask, str) or ctx.is_built(mask):
        allowed = ctx.mask if mask is None or isinstance(mask, str) else mask
        if allowed is not None and allowed.ndim == 5:  # a rank-5 mask of ours: (B, 1, 1, L, L)
            allowed = allowed.reshape(allowed.shape[0], 1, L, L)
    elif ctx.mask is None:  # the model's own mask: nothing known about it, so the generic kernel
        return orig(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)
    elif mask.dtype == mx.bool_:
        allowed = mx.logical_and(ctx.mask, mask)
    else:  # additive scores (deepseek's MLA passes its rotary part this way)
        allowed, bias = ctx.mask, mask
    return attend(queries, keys, values, scale, allowed, bias=bias, sinks=sinks, reach=ctx.reach)


def packing_context() -> _Packing | None:
    """The active packing context (None outside ``hidden_states``)."""
    return _ACTIVE.get()


@contextlib.contextmanager
def restored_context(ctx: _Packing | None):
    """Run with ``ctx`` active again: a block recomputed in the backward pass (``mx.checkpoint``)
    runs after ``hidden_states`` returned, and must see the mask and positions its forward saw."""
    token = _ACTIVE.set(ctx)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


WRAPPERS = {"create_attention_mask": _create_attention_mask, "create_causal_mask": _create_causal_mask,
            "scaled_dot_product_attention": _scaled_dot_product_attention}


class PackedRoPE:
    """Mixin put in front of a RoPE class: inside ``hidden_states`` with positions and no
    cache offset, each token is rotated at its own position."""

    def __call__(self, x, offset=0, *args, **kwargs):
        ctx = _ACTIVE.get()
        call = super().__call__
        if (ctx is None or ctx.positions is None or not isinstance(offset, int) or offset != 0 or x.ndim < 3
                or x.shape[0] != ctx.batch or x.shape[-2] != ctx.length):
            return call(x, offset, *args, **kwargs)
        # (B, ..., L, D) -> (B * L, ..., 1, D): one length-1 sequence per token, offset = its position
        y = x.swapaxes(1, -2)
        shape = y.shape
        y = call(y.reshape(shape[0] * shape[1], *shape[2:-1], 1, shape[-1]), ctx.positions.reshape(-1), *args, **kwargs)
        return y.reshape(shape).swapaxes(1, -2)


_rope_classes: dict[type, type] = {}
# Model attribute: the rank of the packed masks this model's attention broadcasts right (set by
# ``packing.packing_support``: gemma2 scores grouped queries as (B, kv, groups, L, S))
MASK_RANK = "_mlx_tune_mask_rank"
# Model attribute: the longest packed example of this run, in tokens (``packing.set_reach``)
REACH = "_mlx_tune_reach"
_HOOKED = "_mlx_tune_packing_hooks"


def _is_rope(module) -> bool:
    cls = type(module)
    if isinstance(module, PackedRoPE):
        return False
    # DynamicNTK computes its base from the offset in Python: it needs an int
    return isinstance(module, nn.RoPE) or (cls.__module__ == "mlx_lm.models.rope_utils"
                                           and cls.__name__ != "DynamicNTKScalingRoPE" and "RoPE" in cls.__name__)


def enable_packing(model) -> None:
    """Install the wrappers for ``model``'s files and RoPE modules (idempotent, cheap after the first call)."""
    if getattr(model, _HOOKED, False):
        return
    names: set[str] = set()
    for m in [model, *model.modules()]:
        names.update(c.__module__ for c in type(m).__mro__)
        if _is_rope(m):
            cls = type(m)
            if cls not in _rope_classes:
                _rope_classes[cls] = type(f"Packed{cls.__name__}", (PackedRoPE, cls), {})
            m.__class__ = _rope_classes[cls]
    originals = _originals()
    for name in sorted(n for n in names if n.startswith("mlx_lm.models.") and n in sys.modules):
        mod = sys.modules[name]
        for fn, orig in originals.items():
            if getattr(mod, fn, None) is orig:
                setattr(mod, fn, WRAPPERS[fn])
    object.__setattr__(model, _HOOKED, True)


def disable_packing(model) -> None:
    """Give the RoPE modules their classes back (the file-level wrappers pass through outside a packed call)."""
    for m in model.modules():
        if isinstance(m, PackedRoPE):
            m.__class__ = type(m).__mro__[2]
    if getattr(model, _HOOKED, False):
        object.__delattr__(model, _HOOKED)


def is_enabled(model) -> bool:
    return bool(getattr(model, _HOOKED, False))


def window_limit(model) -> int | None:
    """The smallest sliding window in ``model``'s config (None: none), the longest row a
    shared prefix may use: the window masks count row distance, and in a shared-prefix row a
    continuation sits further from its prompt than its positions say."""
    args = getattr(model, "args", None)
    found = [v for k in ("sliding_window", "sliding_window_size", "attention_window_size", "window_size")
             if isinstance(v := getattr(args, k, None), int) and not isinstance(v, bool) and v > 0]
    return min(found) if found else None


_takes: dict[type, bool] = {}


def _takes_cache(cls: type) -> bool:
    # some bodies (mamba's) require the cache argument; None is "no cache" everywhere
    if cls not in _takes:
        _takes[cls] = "cache" in inspect.signature(cls.__call__).parameters
    return _takes[cls]


def hidden_states(model, inputs: mx.array, segment_ids: mx.array | None = None,
                  positions: mx.array | None = None, prefix_ids: mx.array | None = None) -> mx.array:
    """The final-norm hidden states (B, L, hidden) of an mlx-lm model, packing-aware.

    Runs the model's own body with the packing context set: the backend's attention
    kernel always, the segment mask and restarted positions when given. Whether a model
    may be given packed rows is ``packing.packing_support``'s question (asked before
    training); here it is trusted. ``prefix_ids``: shared prefixes (``packed_mask``); the
    caller keeps a row within the model's sliding window (``window_limit``), whose mask
    counts row distance, not position distance.
    """
    enable_packing(model)
    B, L = inputs.shape[:2]
    # a shared prefix sits further back than any example's length: no reach then
    reach = getattr(model, REACH, None) if segment_ids is not None and prefix_ids is None else None
    ctx = _Packing(B, L, None if segment_ids is None else packed_mask(segment_ids, prefix_ids), positions,
                   rank=getattr(model, MASK_RANK, 4), reach=reach)
    with restored_context(ctx):
        inner = body(model)
        return inner(inputs, cache=None) if _takes_cache(type(inner)) else inner(inputs)


def forward(model, inputs: mx.array, segment_ids: mx.array | None = None,
            positions: mx.array | None = None) -> mx.array:
    """Logits (B, L, vocab); for training use ``losses.loss_fn``, which never builds them whole."""
    return head.logits(model, hidden_states(model, inputs, segment_ids, positions))
