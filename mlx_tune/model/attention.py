"""Packing-aware, backend-aware causal attention for mlx-lm decoder models.

With packed rows, query i may see key j only when both belong to the same example and
j <= i:  ``allowed[b, i, j] = (seg[b, i] == seg[b, j]) and (j <= i)``; rotary position
embeddings use each token's position inside its example (``positions``), so a packed
example computes exactly what it computes alone.

``enable_packing(model)`` swaps the class of every block's ``self_attn`` for a subclass
that adds this path and otherwise calls the original ``__call__`` (generation with a KV
cache, a plain mask): parameters, their names and LoRA injection are untouched.
``hidden_states(model, inputs, segment_ids, positions)`` runs embedding, blocks and final
norm like mlx-lm's ``LlamaModel.__call__`` but hands the packing info to every block as
its ``mask`` argument (a dict), so it is an ordinary call argument under ``mx.compile``.

Backends: on Metal / CUDA the masked attention is ``mx.fast.scaled_dot_product_attention``.
On the CPU, where ``exp`` is the wall, ``block_causal_attention`` is exact and cheaper:
query block i only scores key blocks 0..i (the rest of a causal row is masked, so never
computed, ~(n+1)/2n of the work for n blocks), and the blocks are split over two CPU
streams so two softmaxes run at once.
"""

from __future__ import annotations

import contextlib
from typing import Any

import mlx.core as mx

from mlx_tune.errors import UserError
from mlx_tune.runtime.backend import cpu_streams, on_cpu

# model_type -> module of its attention class (mistral is llama's code in mlx-lm).
ARCHITECTURES = {
    "llama": "mlx_lm.models.llama",
    "mistral": "mlx_lm.models.llama",
    "qwen2": "mlx_lm.models.qwen2",
    "qwen3": "mlx_lm.models.qwen3",
}
_NEEDED = ("q_proj", "k_proj", "v_proj", "o_proj", "rope", "n_heads", "n_kv_heads", "scale")

# CPU levers (module level so benchmarks and tests can turn them off).
CPU_BLOCK: int | None = None  # query/key block; None: L / 8, at least 64
CPU_STREAMS = 2
# ---------------------------------------------------------------------------
# Attention kernels
# ---------------------------------------------------------------------------


def block_causal_attention(q, k, v, scale: float, mask: mx.array | None = None,
                           block: int | None = None, streams: int | None = None) -> mx.array:
    """Exact causal softmax(q k^T * scale + mask) v, skipping key blocks above the diagonal.

    q: (B, H, L, D); k, v: (B, Hkv, L, D) with H a multiple of Hkv (grouped queries);
    mask: None (causal only) or a boolean (B or 1, 1, L, L) with the causal part included.
    Query block i (rows i*bq..) scores keys 0..(i+1)*bq only: with n blocks,
    (n + 1) / 2n of the scores and their exps. The blocks' softmaxes are dealt out to
    ``streams`` CPU streams balancing their cost (block i costs i + 1).
    """
    B, H, L, D = q.shape
    block = block or CPU_BLOCK or max(64, -(-L // 8))
    streams = streams or CPU_STREAMS
    Hkv = k.shape[1]
    G = H // Hkv
    q = (q * scale).reshape(B, Hkv, G, L, D)
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

    outs = [None] * n
    for i, (s, e) in enumerate(bounds):
        lane = lanes[lane_of[i]]
        qi = q[:, :, :, s:e, :].reshape(B, Hkv, G * (e - s), D)
        scores = (qi @ k[:, :, :e, :].swapaxes(-1, -2)).reshape(B, Hkv, G, e - s, e)
        # Only the elementwise softmax goes to the lane: matmuls stay on the default
        # stream (BLAS is multi-threaded already; two concurrent sgemms fight for cores).
        with mx.stream(lane) if lane is not None else contextlib.nullcontext():
            if mask is None:
                # Only the diagonal block holds masked entries.
                allowed = mx.arange(s, e)[:, None] >= mx.arange(e)[None, :]
            else:
                allowed = mask[:, :, s:e, :e][:, :, None]  # (B, 1, 1, bq, e)
            scores = mx.where(allowed, scores, mx.array(-mx.inf, scores.dtype))
            p = mx.softmax(scores, axis=-1, precise=True).reshape(B, Hkv, G * (e - s), e)
        outs[i] = (p @ v[:, :, :e, :]).reshape(B, Hkv, G, e - s, D)
    out = outs[0] if n == 1 else mx.concatenate(outs, axis=3)
    return out.reshape(B, H, L, D)


def packed_mask(segment_ids: mx.array) -> mx.array:
    """(B, 1, L, L) boolean: same example and key not after query."""
    L = segment_ids.shape[-1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = mx.arange(L)[:, None] >= mx.arange(L)[None, :]
    return mx.logical_and(same, causal)[:, None]


def attend(q, k, v, scale: float, mask: mx.array | None) -> mx.array:
    """Causal attention (``mask`` None) or masked by a boolean (B, 1, L, L), per backend."""
    if on_cpu():
        return block_causal_attention(q, k, v, scale, mask)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal" if mask is None else mask)


# ---------------------------------------------------------------------------
# The swapped attention class
# ---------------------------------------------------------------------------


def _rope(rope, x: mx.array, positions: mx.array | None) -> mx.array:
    """RoPE on (B, L, H, D) at each token's own position -> (B, H, L, D)."""
    B, L, H, D = x.shape
    if positions is None:
        return rope(x.transpose(0, 2, 1, 3))
    # mx.fast.rope takes one offset per leading index: make every token its own
    # length-1 "sequence" whose offset is its position.
    y = rope(x.reshape(B * L, H, 1, D), offset=positions.reshape(-1))
    return y.reshape(B, L, H, D).transpose(0, 2, 1, 3)


class PackedAttention:
    """Mixin put in front of an mlx-lm attention class by ``enable_packing``.

    ``mask`` a dict from ``hidden_states`` -> the packing-aware path; anything else
    (None, "causal", an array, a KV cache) -> the original ``__call__`` unchanged.
    """

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        if not isinstance(mask, dict) or cache is not None:
            return super().__call__(x, mask, cache)
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        if hasattr(self, "q_norm"):  # qwen3: per-head RMSNorm before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        positions = mask.get("positions")
        q, k = _rope(self.rope, q, positions), _rope(self.rope, k, positions)
        out = attend(q, k, v, self.scale, mask.get("mask"))
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


_subclasses: dict[type, type] = {}


def _blocks(model) -> list:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "pipeline_layers", None) or getattr(inner, "layers", None)
    return list(layers or [])


def unsupported_reason(model) -> str | None:
    """Why ``enable_packing`` cannot handle ``model`` (None when it can)."""
    mtype = getattr(model, "model_type", None) or getattr(getattr(model, "args", None), "model_type", None)
    if mtype not in ARCHITECTURES:
        return (f"packed attention supports model types {', '.join(sorted(ARCHITECTURES))}, not {mtype!r}; "
                "set train.packing: false")
    blocks = _blocks(model)
    if not blocks:
        return f"model type {mtype!r}: no transformer blocks found at model.model.layers"
    for b in blocks:
        attn = getattr(b, "self_attn", None)
        base = type(attn).__mro__[2] if isinstance(attn, PackedAttention) else type(attn)
        if attn is None or base.__module__ != ARCHITECTURES[mtype] or any(not hasattr(attn, a) for a in _NEEDED):
            return f"model type {mtype!r}: unexpected attention module {type(attn).__name__}; set train.packing: false"
        if getattr(b, "use_sliding", False):
            return f"model type {mtype!r}: sliding-window layers are not supported by packing; set train.packing: false"
    return None


def enable_packing(model) -> None:
    """Give every block's ``self_attn`` the packing-aware path (idempotent)."""
    reason = unsupported_reason(model)
    if reason:
        raise UserError(reason)
    for b in _blocks(model):
        cls = type(b.self_attn)
        if issubclass(cls, PackedAttention):
            continue
        if cls not in _subclasses:
            _subclasses[cls] = type(f"Packed{cls.__name__}", (PackedAttention, cls), {})
        b.self_attn.__class__ = _subclasses[cls]


def disable_packing(model) -> None:
    """Undo ``enable_packing``."""
    for b in _blocks(model):
        cls = type(b.self_attn)
        if issubclass(cls, PackedAttention):
            b.self_attn.__class__ = cls.__mro__[2]


def is_enabled(model) -> bool:
    blocks = _blocks(model)
    return bool(blocks) and all(isinstance(getattr(b, "self_attn", None), PackedAttention) for b in blocks)


def hidden_states(model, inputs: mx.array, segment_ids: mx.array | None = None,
                  positions: mx.array | None = None) -> mx.array:
    """The final-norm hidden states (B, L, hidden) of an mlx-lm model, packing-aware.

    Supported architectures go through the packing-aware attention (and its CPU levers);
    others run ``model.model(inputs)`` unchanged, which is only right without packing.
    """
    if not is_enabled(model):
        if unsupported_reason(model) is None:
            enable_packing(model)
        elif segment_ids is None and positions is None:
            return model.model(inputs)
        else:
            raise UserError(unsupported_reason(model))
    inner = model.model
    h = inner.embed_tokens(inputs)
    info = {"positions": positions, "mask": None if segment_ids is None else packed_mask(segment_ids)}
    for layer in _blocks(model):
        h = layer(h, info)
    return inner.norm(h)


def lm_head(model):
    """The function hidden -> logits: ``lm_head`` or the tied embedding's ``as_linear``."""
    if getattr(model, "lm_head", None) is not None:
        return model.lm_head
    return model.model.embed_tokens.as_linear


def forward(model, inputs: mx.array, segment_ids: mx.array | None = None,
            positions: mx.array | None = None) -> mx.array:
    """Logits (B, L, vocab); for training use ``losses.loss_fn``, which never builds them whole."""
    return lm_head(model)(hidden_states(model, inputs, segment_ids, positions))
