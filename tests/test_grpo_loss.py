"""The GRPO loss and advantages against the formulas of TRL's GRPOTrainer, written in numpy."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_tune.training.grpo_loss import LossSettings, group_advantages, grpo_loss, truncation_mask

RNG = np.random.default_rng(0)
B, T, G = 6, 5, 3
LOGPS = RNG.normal(-2.0, 0.5, (B, T)).astype(np.float32)
OLD = (LOGPS + RNG.normal(0, 0.3, (B, T))).astype(np.float32)
REF = (LOGPS + RNG.normal(0, 0.2, (B, T))).astype(np.float32)
MASK = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0],
                 [1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], np.float32)
REWARDS = np.array([1.0, 0.0, 0.5, 2.0, np.nan, 1.0], np.float32)


def np_advantages(r, g, scale):
    grouped = r.reshape(-1, g)
    mean = np.repeat(np.nanmean(grouped, 1), g)
    std = np.repeat(np.nanstd(grouped, 1, ddof=1), g) if scale != "batch" else np.full_like(r, np.nanstd(r, ddof=1))
    adv = r - mean
    if scale != "none":
        adv = adv / (std + 1e-4)
    return np.nan_to_num(adv, nan=0.0)


def np_loss(logp, old, ref, adv, mask, loss_type, eps=0.2, eps_high=0.28, beta=0.04, t_max=8, k=1, s=1, n=None):
    ratio = np.exp(logp - old)
    a = adv[:, None]
    per = -np.minimum(ratio * a, np.clip(ratio, 1 - eps, 1 + eps_high) * a)
    d = ref - logp
    kl = np.exp(d) - d - 1
    per = per + beta * kl
    if loss_type == "grpo":
        loss = ((per * mask).sum(1) / np.maximum(mask.sum(1), 1)).mean() / k
    elif loss_type == "bnpo":
        loss = (per * mask).sum() / mask.sum() / k
    elif loss_type == "dr_grpo":
        loss = (per * mask).sum() / (logp.shape[0] * t_max) / k
    else:
        loss = (per * mask).sum() / ((mask.sum() if n is None else n) * k / s)
    low = (ratio < 1 - eps) & (a < 0)
    high = (ratio > 1 + eps_high) & (a > 0)
    metrics = {"kl": (kl * mask).sum() / mask.sum(), "clip_ratio/low_mean": (low * mask).sum() / mask.sum(),
               "clip_ratio/high_mean": (high * mask).sum() / mask.sum(),
               "clip_ratio/region_mean": ((low | high) * mask).sum() / mask.sum(),
               "clip_ratio/low_min": ((low * mask).sum(1) / mask.sum(1)).min(),
               "clip_ratio/high_max": ((high * mask).sum(1) / mask.sum(1)).max()}
    return loss, metrics


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages(scale):
    adv, zero = group_advantages(mx.array(REWARDS), G, scale)
    np.testing.assert_allclose(np.array(adv), np_advantages(REWARDS, G, scale), rtol=1e-5, atol=1e-6)
    assert not np.array(zero).any()
    _, zero = group_advantages(mx.array([1.0, 1.0, 1.0, 0.0, 1.0, 2.0]), G, "group")
    assert np.array(zero).tolist() == [True] * 3 + [False] * 3


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_loss_and_metrics_match_the_formulas(loss_type):
    adv = np_advantages(REWARDS, G, "group").astype(np.float32)
    s = LossSettings(loss_type=loss_type, epsilon=0.2, epsilon_high=0.28, beta=0.04, max_completion_length=8,
                     grad_accumulation=2, steps_per_generation=4)
    loss, metrics = grpo_loss(mx.array(LOGPS), mx.array(OLD), mx.array(REF), mx.array(adv), mx.array(MASK), s,
                              batch_tokens=40.0)
    want, want_metrics = np_loss(LOGPS, OLD, REF, adv, MASK, loss_type, k=2, s=4, n=40.0)
    np.testing.assert_allclose(loss.item(), want, rtol=1e-5)
    for key, value in want_metrics.items():
        np.testing.assert_allclose(metrics[key].item(), value, rtol=1e-5, atol=1e-7, err_msg=key)


def test_gradient_when_on_policy_is_minus_advantage_times_grad_logp():
    # old = stop_gradient(logp): ratio 1, d loss / d logp_it = -A_i m_it / (B * sum_t m_it) for grpo
    adv = np_advantages(REWARDS, G, "group").astype(np.float32)
    s = LossSettings(loss_type="grpo")

    def f(lp):
        return grpo_loss(lp, None, None, mx.array(adv), mx.array(MASK), s)[0]

    g = np.array(mx.grad(f)(mx.array(LOGPS)))
    want = -adv[:, None] * MASK / (B * MASK.sum(1, keepdims=True))
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-7)
    assert f(mx.array(LOGPS)).item() == pytest.approx(-(adv).mean(), abs=1e-6)


def test_truncated_completions_are_masked():
    m = truncation_mask(mx.array(MASK), mx.array([True, False, True, True, True, False]))
    assert np.array(m).sum(1).tolist() == [5, 0, 1, 4, 2, 0]
