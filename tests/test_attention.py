"""Packing-aware attention: exact against MLX's fused attention and against unpacked runs."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_tune.model import attention as A
from mlx_tune.testing.tiny import tiny_model

# Backend-sensitive: `make test-accelerator` runs this file on the Metal/CUDA code path too.
pytestmark = pytest.mark.accelerator


def _qkv(B=2, H=6, Hkv=2, L=100, D=16, seed=0):
    mx.random.seed(seed)
    return mx.random.normal((B, H, L, D)), mx.random.normal((B, Hkv, L, D)), mx.random.normal((B, Hkv, L, D))


def _segments(B, L, lengths):
    seg = np.full((B, L), -1, dtype=np.int32)
    pos = np.zeros((B, L), dtype=np.int32)
    for b in range(B):
        t = 0
        for s, n in enumerate(lengths):
            seg[b, t:t + n], pos[b, t:t + n] = s, np.arange(n)
            t += n
        pos[b, t:] = np.arange(L - t)
    return mx.array(seg), mx.array(pos)


@pytest.mark.parametrize("block,streams", [(32, 1), (32, 2), (48, 2), (128, 1)])
def test_block_causal_equals_fused_sdpa(block, streams):
    q, k, v = _qkv()
    ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask="causal")
    out = A.block_causal_attention(q, k, v, 0.25, block=block, streams=streams)
    assert mx.allclose(out, ref, atol=1e-5).item()

    seg, _ = _segments(2, 100, [30, 45, 10])
    mask = A.packed_mask(seg)
    ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask)
    out = A.block_causal_attention(q, k, v, 0.25, mask, block=block, streams=streams)
    assert mx.allclose(out, ref, atol=1e-5).item()


def test_block_causal_gradients_equal_fused_sdpa_under_compile():
    q, k, v = _qkv(L=70)
    w = mx.random.normal(q.shape)
    seg, _ = _segments(2, 70, [20, 41])
    mask = A.packed_mask(seg)

    def ours(q, k, v):
        return (A.block_causal_attention(q, k, v, 0.25, mask, block=16, streams=2) * w).sum()

    def ref(q, k, v):
        return (mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask) * w).sum()

    g1 = mx.compile(mx.grad(ours, argnums=(0, 1, 2)))(q, k, v)
    g2 = mx.grad(ref, argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g1, g2):
        assert mx.allclose(a, b, atol=1e-4, rtol=1e-4).item()


def test_packed_mask_blocks_other_examples():
    seg, _ = _segments(1, 8, [3, 4])
    m = np.array(A.packed_mask(seg))[0, 0]
    assert m[2, :3].all() and not m[2, 3:].any()  # example 0 sees itself only
    assert not m[3, :3].any() and m[3, 3] and not m[3, 4:].any()  # example 1 restarts
    assert m[7, 7] and not m[7, :7].any()  # padding sees padding only


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_packed_rows_equal_examples_run_alone(model_type):
    model = tiny_model(model_type, seed=1)
    rng = np.random.default_rng(0)
    lengths = [9, 14, 5]
    examples = [mx.array(rng.integers(3, 250, size=(1, n)).astype(np.int32)) for n in lengths]
    alone = [model(x) for x in examples]  # the untouched mlx-lm model
    row = mx.concatenate(examples + [mx.zeros((1, 4), mx.int32)], axis=1)
    seg, pos = _segments(1, row.shape[1], lengths)
    packed = A.forward(model, row, seg, pos)
    t = 0
    for x, ref in zip(examples, alone):
        n = x.shape[1]
        assert mx.allclose(packed[:, t:t + n], ref, atol=1e-4).item()
        t += n
    # compiled, the packing info passed as call arguments
    fn = mx.compile(lambda r, s, p: A.forward(model, r, s, p))
    assert mx.allclose(fn(row, seg, pos), packed, atol=1e-5).item()


def test_without_packing_info_the_module_is_unchanged():
    model = tiny_model("llama", seed=2)
    x = mx.array([[5, 9, 11, 40, 41, 42]])
    before = model(x)
    cache = model.make_cache()
    step_before = model(x[:, :4], cache=cache)
    A.enable_packing(model)
    assert A.is_enabled(model)
    assert mx.array_equal(model(x), before).item()  # plain call: the original path
    assert mx.allclose(A.forward(model, x), before, atol=1e-5).item()  # causal, no packing
    cache = model.make_cache()
    assert mx.array_equal(model(x[:, :4], cache=cache), step_before).item()  # generation with a KV cache
    names = {k for k, _ in tree_flatten(model.parameters())}
    assert "model.layers.0.self_attn.q_proj.weight" in names  # parameter paths unchanged
    A.disable_packing(model)
    assert not A.is_enabled(model)


def test_lora_injected_after_enable_packing_is_used():
    from mlx_tune.adapters import inject
    from mlx_tune.config import LoraConfig

    model = tiny_model("qwen2", seed=3)
    A.enable_packing(model)
    inject(model, LoraConfig(rank=4, target_modules=["q_proj", "v_proj"]))
    x = mx.array([[5, 9, 11, 40]])
    base = A.forward(model, x)
    for layer in model.model.layers:  # a non-zero B changes the output through the adapter
        ad = layer.self_attn.v_proj.adapters["default"]
        ad.lora_b = mx.ones_like(ad.lora_b)
    assert not mx.allclose(A.forward(model, x), base, atol=1e-4).item()


def test_block_causal_with_sinks_bias_and_other_value_width_equals_fused_sdpa():
    q, k, _ = _qkv(L=90)
    v = mx.random.normal((2, 2, 90, 24))  # MLA: values wider than keys
    seg, _ = _segments(2, 90, [40, 30])
    mask = A.packed_mask(seg)
    sinks = mx.random.normal((6,))
    bias = 0.3 * mx.random.normal((2, 6, 90, 90))
    full = mx.where(mask, bias, -mx.inf)
    ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=full, sinks=sinks)
    for block, streams in [(32, 2), (90, 1)]:
        out = A.block_causal_attention(q, k, v, 0.25, mask, block=block, streams=streams, bias=bias, sinks=sinks)
        assert out.shape == (2, 6, 90, 24)
        assert mx.allclose(out, ref, atol=1e-5).item()


def test_learned_absolute_positions_fall_back_not_fail():
    """gpt2 adds a position table to its embeddings: positions cannot restart, so the proof
    refuses packing (training falls back to unpacked rows) instead of raising."""
    from mlx_tune.model.packing import packing_support

    model = tiny_model("gpt2", n_embd=64, n_head=4, n_layer=2, n_positions=128, layer_norm_epsilon=1e-5,
                       n_ctx=128)
    reason = packing_support(model)
    assert reason is not None and "does not compute what it computes alone" in reason


@pytest.mark.parametrize("lengths,tile,sinks", [([30, 1, 17, 32, 9, 32, 7], 32, False),
                                                ([16, 16, 5, 11, 16], 16, True),
                                                ([64, 3, 60], 64, False)])
def test_band_attention_equals_block_causal(lengths, tile, sinks):
    """The band of key tiles holds every key a packed query may see: values and gradients
    equal the causal kernel's on rows whose examples are at most ``tile`` long."""
    L = 4 * tile if sum(lengths) <= 4 * tile else 8 * tile
    q, k, v = _qkv(L=L, seed=3)
    seg, _ = _segments(2, L, lengths)
    mask = A.packed_mask(seg)
    s = mx.random.normal((q.shape[1],)) if sinks else None
    # padding (its own segment, longer than a tile) is not exact and never trained: weight 0
    real = mx.array((np.array(seg) >= 0)[:, None, :, None])
    w = mx.random.normal(q.shape) * real

    def band(q, k, v):
        return (A.band_attention(q, k, v, 0.25, mask, tile, sinks=s) * w).sum()

    def ref(q, k, v):
        return (A.block_causal_attention(q, k, v, 0.25, mask, sinks=s) * w).sum()

    out, ref_out = A.band_attention(q, k, v, 0.25, mask, tile, sinks=s), A.block_causal_attention(q, k, v, 0.25, mask, sinks=s)
    assert mx.allclose(out * real, ref_out * real, atol=1e-5).item()
    g1 = mx.compile(mx.grad(band, argnums=(0, 1, 2)))(q, k, v)
    g2 = mx.grad(ref, argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g1, g2):
        assert mx.allclose(a, b, atol=1e-4, rtol=1e-4).item()


def test_band_tile_only_where_it_saves_work():
    assert A.band_tile(512, 36) == 64 and A.band_tile(512, 64) == 64 and A.band_tile(512, 65) == 128
    assert A.band_tile(512, 3) == 16  # at least 16
    assert A.band_tile(512, 129) is None  # a 256 tile is over a quarter of the row
    assert A.band_tile(500, 36) is None  # does not divide the row
    assert A.band_tile(512, None) is None


def test_reach_gives_the_same_loss_and_gradients():
    """A packed model told its longest example (``packing.set_reach``) trains exactly as
    without: same hidden states, same LoRA gradients; shared-prefix rows ignore it."""
    from mlx_tune import adapters
    from mlx_tune.config import LoraConfig
    from mlx_tune.model.packing import set_reach

    model = tiny_model("llama", seed=4)
    adapters.inject(model, LoraConfig(rank=4, alpha=8.0, dropout=0.0, target_modules="all-linear"))
    lengths = [12, 16, 3, 16, 9, 7]
    rng = np.random.default_rng(1)
    L = 64
    row = mx.array(rng.integers(3, 250, size=(2, L)).astype(np.int32))
    seg, pos = _segments(2, L, lengths)
    real = mx.array((np.array(seg) >= 0).astype(np.float32))

    def loss():
        return (A.hidden_states(model, row, seg, pos).sum(axis=-1) * real).sum()

    def run():
        value, grads = nn.value_and_grad(model, loss)()
        return value, dict(tree_flatten(grads))

    set_reach(model, None)
    v0, g0 = run()
    set_reach(model, max(lengths))
    assert A.band_tile(L, max(lengths)) == 16
    v1, g1 = run()
    set_reach(model, None)
    assert not hasattr(model, A.REACH)
    assert abs(v0.item() - v1.item()) <= 1e-4 * abs(v0.item())
    assert g0.keys() == g1.keys() and len(g0) > 0
    for name in g0:
        assert mx.allclose(g0[name], g1[name], atol=1e-4, rtol=1e-3).item(), name
