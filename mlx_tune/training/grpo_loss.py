"""The GRPO objective as TRL's ``GRPOTrainer`` defines it (``_compute_loss``), on per-token log-probs.

Advantages (``group_advantages``). ``G = num_generations`` completions per prompt, rewards
``r`` (NaN: unscorable, left out of the statistics, advantage 0)::

    A_i = r_i - mean_group(r)                                  scale_rewards "none"
    A_i = (r_i - mean_group(r)) / (std_group(r) + 1e-4)        "group" (TRL's default)
    A_i = (r_i - mean_group(r)) / (std_batch(r) + 1e-4)        "batch"

with NaN-ignoring means and the unbiased (n - 1) standard deviation (TRL's ``nanstd``).

Per token ``t`` of completion ``i`` (``m_it`` the completion mask)::

    rho_it   = exp(logp_it - logp_old_it)               (old: the policy that sampled; stop-gradient)
    L_it     = -min(rho_it A_i, clip(rho_it, 1 - epsilon, 1 + epsilon_high) A_i)
             + beta * KL_it,
    KL_it    = exp(ref_it - logp_it) - (ref_it - logp_it) - 1            (k3, >= 0; ref: adapter off)

When the generation batch is used by one optimizer step only, ``logp_old = stop_gradient(logp)``:
the ratio is 1 and the gradient is ``-A_i grad logp_it`` (TRL does the same).

Normalisation by ``loss_type`` (``B`` completions in the micro-batch, ``k`` the gradient
accumulation steps, ``T_max = max_completion_length``)::

    grpo     mean_i( sum_t m L / sum_t m ) / k          (each sequence's token mean, then the mean)
    bnpo     sum m L / sum m / k                        (token mean over the micro-batch)
    dr_grpo  sum m L / (B * T_max) / k
    dapo     sum m L / (N * k / s)                      (N: completion tokens of the whole generation
                                                         batch, s: steps_per_generation; TRL's default)

``mask_truncated_completions`` zeroes ``m`` for completions that ended without EOS
(``truncation_mask``). Metrics (TRL's names): ``kl`` (token mean of KL), ``clip_ratio/low_mean``
(tokens with ``rho < 1 - epsilon`` and ``A < 0``), ``clip_ratio/high_mean`` (``rho > 1 +
epsilon_high`` and ``A > 0``), ``clip_ratio/region_mean`` (either), ``clip_ratio/low_min`` and
``clip_ratio/high_max`` (the min / max over sequences of the per-sequence means).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALES = ("group", "batch", "none")


def _nanmean(x: mx.array, axis: int | None = None, keepdims: bool = False) -> mx.array:
    ok = ~mx.isnan(x)
    total = mx.where(ok, x, 0.0).sum(axis=axis, keepdims=keepdims)
    return total / ok.sum(axis=axis, keepdims=keepdims)


def _nanstd(x: mx.array, axis: int | None = None, keepdims: bool = False) -> mx.array:
    """TRL's ``nanstd``: NaNs ignored, Bessel's n - 1."""
    ok = ~mx.isnan(x)
    mean = _nanmean(x, axis=axis, keepdims=True)
    var = _nanmean(mx.where(ok, (x - mean) ** 2, mx.nan), axis=axis, keepdims=keepdims)
    n = ok.sum(axis=axis, keepdims=keepdims).astype(mx.float32)
    return mx.sqrt(var * n / (n - 1))


def group_advantages(rewards: mx.array, num_generations: int, scale_rewards: str = "group"
                     ) -> tuple[mx.array, mx.array]:
    """``(advantages, std_is_zero)`` for rewards ordered prompt by prompt (G consecutive rows each)."""
    if scale_rewards not in SCALES:
        raise ValueError(f"scale_rewards: {scale_rewards!r} is not one of {SCALES}")
    r = rewards.astype(mx.float32)
    grouped = r.reshape(-1, num_generations)
    mean = mx.repeat(_nanmean(grouped, axis=1), num_generations)
    if scale_rewards == "batch":
        std = mx.broadcast_to(_nanstd(r), r.shape)
    else:
        std = mx.repeat(_nanstd(grouped, axis=1), num_generations)
    adv = r - mean
    if scale_rewards != "none":
        adv = adv / (std + 1e-4)
    adv = mx.where(mx.isnan(adv), 0.0, adv)
    return adv, mx.abs(std) <= 1e-8  # TRL's torch.isclose(std, 0)


def truncation_mask(mask: mx.array, ended: mx.array) -> mx.array:
    """``mask`` with the rows of completions that did not end with EOS (``ended`` False) zeroed."""
    return mask * ended.astype(mask.dtype)[:, None]


@dataclass(frozen=True)
class LossSettings:
    loss_type: str = "dapo"
    epsilon: float = 0.2
    epsilon_high: float | None = None  # None: epsilon
    beta: float = 0.0
    max_completion_length: int = 512
    grad_accumulation: int = 1
    steps_per_generation: int = 1


def per_token_terms(logps: mx.array, old_logps: mx.array, ref_logps: mx.array | None, advantages: mx.array,
                    s: LossSettings) -> tuple[mx.array, mx.array, mx.array | None]:
    """``(L (B, T), rho (B, T), KL (B, T) or None)`` before masking and normalisation."""
    eps_high = s.epsilon if s.epsilon_high is None else s.epsilon_high
    adv = advantages[:, None]
    ratio = mx.exp(logps - old_logps)
    clipped = mx.clip(ratio, 1 - s.epsilon, 1 + eps_high)
    loss = -mx.minimum(ratio * adv, clipped * adv)
    kl = None
    if s.beta != 0.0 and ref_logps is not None:
        d = ref_logps - logps
        kl = mx.exp(d) - d - 1
        loss = loss + s.beta * kl
    return loss, ratio, kl


def reduce_loss(per_token: mx.array, mask: mx.array, s: LossSettings, batch_tokens: float | None = None) -> mx.array:
    """The ``loss_type`` normalisation of the module docstring; ``batch_tokens`` is dapo's ``N``
    (the generation batch's completion tokens; None: this micro-batch's)."""
    m = mask.astype(per_token.dtype)
    k = s.grad_accumulation
    if s.loss_type == "grpo":
        return ((per_token * m).sum(-1) / mx.maximum(m.sum(-1), 1.0)).mean() / k
    if s.loss_type == "bnpo":
        return (per_token * m).sum() / mx.maximum(m.sum(), 1.0) / k
    if s.loss_type == "dr_grpo":
        return (per_token * m).sum() / (per_token.shape[0] * s.max_completion_length) / k
    if s.loss_type == "dapo":
        n = m.sum() if batch_tokens is None else mx.array(batch_tokens, per_token.dtype)
        return (per_token * m).sum() / (mx.maximum(n, 1.0) * k / s.steps_per_generation)
    raise ValueError(f"loss_type: {s.loss_type!r} is not one of {LOSS_TYPES}")


def grpo_loss(logps: mx.array, old_logps: mx.array | None, ref_logps: mx.array | None, advantages: mx.array,
              mask: mx.array, s: LossSettings, batch_tokens: float | None = None) -> tuple[mx.array, dict]:
    """``(loss, metrics)`` of one micro-batch; ``old_logps`` None: ``stop_gradient(logps)``.
    ``metrics`` holds mx scalars (TRL's names; see the module docstring)."""
    old = mx.stop_gradient(logps) if old_logps is None else old_logps
    per_token, ratio, kl = per_token_terms(logps, old, ref_logps, advantages, s)
    loss = reduce_loss(per_token, mask, s, batch_tokens)
    return loss, clip_metrics(ratio, advantages, mask, s, kl)


def clip_metrics(ratio: mx.array, advantages: mx.array, mask: mx.array, s: LossSettings,
                 kl: mx.array | None = None) -> dict:
    eps_high = s.epsilon if s.epsilon_high is None else s.epsilon_high
    m = mask.astype(mx.float32)
    adv = advantages[:, None]
    ratio = mx.stop_gradient(ratio)
    low = ((ratio < 1 - s.epsilon) & (adv < 0)).astype(mx.float32)
    high = ((ratio > 1 + eps_high) & (adv > 0)).astype(mx.float32)
    region = mx.maximum(low, high)
    n = mx.maximum(m.sum(), 1.0)

    def seq_mean(x):  # TRL divides by the unclamped count: an all-masked row is NaN and skipped
        v = (x * m).sum(-1) / m.sum(-1)
        return mx.where(mx.isnan(v), mx.nan, v)

    def nan_extreme(v, fn, fill):
        ok = ~mx.isnan(v)
        return mx.where(ok.any(), fn(mx.where(ok, v, fill)), mx.nan)

    out = {"clip_ratio/low_mean": (low * m).sum() / n, "clip_ratio/high_mean": (high * m).sum() / n,
           "clip_ratio/region_mean": (region * m).sum() / n,
           "clip_ratio/low_min": nan_extreme(seq_mean(low), mx.min, mx.inf),
           "clip_ratio/high_max": nan_extreme(seq_mean(high), mx.max, -mx.inf)}
    if kl is not None:
        out["kl"] = (mx.stop_gradient(kl) * m).sum() / n
    return out
