"""Blockwise attention with a recomputing backward: the same values and gradients as the
attention it replaces, and a backward that does not hold the (L, L) probabilities."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_tune import adapters
from mlx_tune.config import LoraConfig
from mlx_tune.model import attention as A
from mlx_tune.model import attention_shapes, flash
from mlx_tune.testing.families import FAMILIES
from mlx_tune.testing.tiny import tiny_model

# Backend-sensitive: attend() picks the kernel by path.
pytestmark = pytest.mark.accelerator


def _qkv(B, H, Hkv, L, D=16, Dv=16, seed=0):
    mx.random.seed(seed)
    return (mx.random.normal((B, H, L, D)), mx.random.normal((B, Hkv, L, D)), mx.random.normal((B, Hkv, L, Dv)),
            mx.random.normal((B, H, L, Dv)))


def _packed(B, L, cuts):
    seg = np.zeros((B, L), np.int32)
    for b in range(B):
        for c in cuts[b % len(cuts)]:
            seg[b, c:] += 1
    return A.packed_mask(mx.array(seg))


CASES = {  # name: (B, H, Hkv, L, Dv, packed cuts or None, sinks, block)
    "causal": (1, 4, 4, 64, 16, None, False, 16),
    "packed-gqa-odd": (2, 6, 2, 77, 16, [[20, 51], [9]], False, 16),
    "sinks-gqa": (2, 4, 2, 50, 16, [[13]], True, 32),
    "causal-sinks-wider-v-odd": (1, 4, 1, 37, 24, None, True, 8),
}


@pytest.mark.parametrize("name", list(CASES))
def test_values_and_gradients_equal_plain_attention(name):
    B, H, Hkv, L, Dv, cuts, with_sinks, block = CASES[name]
    q, k, v, w = _qkv(B, H, Hkv, L, Dv=Dv)
    mask = None if cuts is None else _packed(B, L, cuts)
    sinks = mx.random.normal((H,)) if with_sinks else None
    args = (q, k, v) + ((sinks,) if with_sinks else ())
    argnums = tuple(range(len(args)))

    def ours(q, k, v, sinks=None):
        return (flash.flash_attention(q, k, v, 0.3, mask, sinks=sinks, block=block) * w).sum()

    def ref(q, k, v, sinks=None):
        return (A.block_causal_attention(q, k, v, 0.3, mask, sinks=sinks, block=L, streams=1) * w).sum()

    out = flash.flash_attention(q, k, v, 0.3, mask, sinks=sinks, block=block)
    expect = A.block_causal_attention(q, k, v, 0.3, mask, sinks=sinks, block=L, streams=1)
    assert mx.allclose(out, expect, atol=1e-5).item()
    (v1, g1), (v2, g2) = (mx.value_and_grad(ours, argnums)(*args),
                          mx.compile(mx.value_and_grad(ref, argnums))(*args))
    assert abs(v1.item() - v2.item()) < 1e-3
    for a, b in zip(g1, g2):  # q, k, v (grouped heads summed), and the sinks
        assert mx.allclose(a, b, atol=1e-4, rtol=1e-4).item()
    g3 = mx.compile(mx.grad(ours, argnums))(*args)  # under compile as training runs it
    for a, b in zip(g3, g2):
        assert mx.allclose(a, b, atol=1e-4, rtol=1e-4).item()


def test_bias_keeps_the_plain_kernel_and_its_gradient(monkeypatch):
    """deepseek's MLA passes score terms that depend on trained projections: attend keeps
    the autodiff kernels for them, so the bias gradient flows."""
    monkeypatch.setattr(attention_shapes, "FLASH_MIN_LENGTH", 1)
    q, k, v, w = _qkv(1, 4, 4, 40)
    mask = _packed(1, 40, [[17]])
    bias = 0.3 * mx.random.normal((1, 4, 40, 40))
    g = mx.grad(lambda b: (A.attend(q, k, v, 0.3, mask, bias=b) * w).sum())(bias)
    ref = mx.grad(lambda b: (A.block_causal_attention(q, k, v, 0.3, mask, bias=b) * w).sum())(bias)
    assert mx.abs(g).max().item() > 0
    assert mx.allclose(g, ref, atol=1e-5).item()


@pytest.mark.parametrize("model_type", ["llama", "gpt_oss"])
def test_lora_loss_and_gradients_equal_plain_attention(model_type, monkeypatch):
    f = FAMILIES[model_type]
    model = tiny_model(model_type, seed=3, **{**f.overrides, **({"sliding_window": 16} if model_type == "gpt_oss"
                                                                  else {})})
    adapters.inject(model, LoraConfig(rank=4, alpha=8, dropout=0.0))
    for _, wr in adapters.wrappers(model):  # non-zero B: the adapters' gradients reach every layer
        wr.adapters["default"].lora_b = mx.random.normal(wr.adapters["default"].lora_b.shape, key=mx.random.key(1)) * 0.3
    model.train()
    rng = np.random.default_rng(0)
    L = 45
    row = mx.array(rng.integers(3, 250, size=(2, L)).astype(np.int32))
    seg = np.zeros((2, L), np.int32)
    seg[:, 19:] = 1
    pos = np.concatenate([np.arange(19), np.arange(L - 19)])[None].repeat(2, 0)
    seg_a, pos_a = mx.array(seg), mx.array(pos.astype(np.int32))

    def loss(m):
        logits = A.forward(m, row[:, :-1], seg_a[:, :-1], pos_a[:, :-1])
        return nn.losses.cross_entropy(logits, row[:, 1:]).mean()

    def run(min_length):
        monkeypatch.setattr(attention_shapes, "FLASH_MIN_LENGTH", min_length)
        value, grads = nn.value_and_grad(model, loss)(model)
        mx.eval(value, grads)
        return value.item(), dict(tree_flatten(grads))

    calls = []

    def counted(*args, **kwargs):
        calls.append(kwargs.get("sinks") is not None)
        return flash.flash_attention(*args, **kwargs)

    monkeypatch.setattr(A, "flash_attention", counted)
    monkeypatch.setattr(attention_shapes, "FLASH_BLOCK", 16)  # 44 rows: blocks of 16, 16, 12
    v_ref, g_ref = run(10**9)
    assert not calls
    v_ours, g_ours = run(1)
    assert calls and all(calls) == (model_type == "gpt_oss")  # every layer's attention, sinks for gpt-oss
    assert abs(v_ours - v_ref) < 1e-5
    assert set(g_ours) == set(g_ref) and g_ref
    for key, ref in g_ref.items():
        ref = np.array(ref)
        np.testing.assert_allclose(np.array(g_ours[key]), ref, atol=2e-6 + 1e-4 * np.abs(ref).max(), err_msg=key)


def _backward_peak(fn, q, k, v, w) -> int:
    grad = mx.grad(lambda q, k, v: (fn(q, k, v) * w).sum(), argnums=(0, 1, 2))
    mx.eval(q, k, v, w)
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    mx.eval(grad(q, k, v))
    return mx.get_peak_memory() - base


def test_backward_memory_is_well_under_the_probabilities():
    B, H, L, D = 1, 4, 2048, 32
    q, k, v, w = _qkv(B, H, H, L, D=D, Dv=D)
    probs = B * H * L * L * 4  # one fp32 copy of the probabilities: 64 MiB
    ours = _backward_peak(lambda q, k, v: flash.flash_attention(q, k, v, 0.2), q, k, v, w)
    plain = _backward_peak(lambda q, k, v: A.block_causal_attention(q, k, v, 0.2), q, k, v, w)
    # measured: ~36-40 MiB (a few 128-row blocks of scores) against ~100 MiB
    assert ours < 0.75 * probs < plain and ours < 0.5 * plain, (ours / 2**20, plain / 2**20)


def test_a_row_that_sees_nothing_gives_zeros_not_nan():
    q, k, v, w = _qkv(1, 2, 2, 20)
    mask = mx.array(np.tril(np.ones((20, 20), bool)))[None, None]
    mask = mx.where(mx.arange(20)[:, None] == 5, False, mask)  # row 5 sees no key
    out = flash.flash_attention(q, k, v, 0.3, mask, block=8)
    grads = mx.grad(lambda q, k, v: (flash.flash_attention(q, k, v, 0.3, mask, block=8) * w).sum(), (0, 1, 2))(q, k, v)
    assert mx.all(out[:, :, 5] == 0).item() and all(mx.all(mx.isfinite(g)).item() for g in grads)
