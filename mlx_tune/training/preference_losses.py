"""Preference losses on per-sequence log-probs, as Hugging Face TRL (1.16) defines them.

Inputs per pair i: the policy's summed response log-probs c_i (chosen), r_i (rejected),
their response-token counts n_c, n_r, the reference sums c0_i, r0_i where the method has
a reference, and a weight w_i (1 real pair, 0 padding). Every loss and metric is a mean
over real pairs: sum_i w_i x_i / max(sum_i w_i, 1). sigma is the logistic function,
log sigma its log, b = beta, e = label_smoothing.

DPO (``DPOTrainer._compute_loss``; d = (c - c0) - (r - r0), the reward margin over b):
    sigmoid  -log sigma(b d)                              (e > 0: conservative DPO,
             -(1 - e) log sigma(b d) - e log sigma(-b d)   TRL's pre-1.0 form; 1.16 ignores e here)
    hinge    relu(1 - b d)
    ipo      (d' - 1 / (2 b))^2 with the per-token margin d' = (c - c0)/n_c - (r - r0)/n_r
    robust   (-(1 - e) log sigma(b d) + e log sigma(-b d)) / (1 - 2 e)
    rewards  b (c - c0), b (r - r0); logps c, r.
CPO (``CPOTrainer.cpo_loss`` with loss_type sigmoid) and SimPO (loss_type simpo):
    with x = c, y = r (CPO: sums) or x = c / n_c, y = r / n_r (SimPO: averages), and
    g = simpo gamma (SimPO) or 0 (CPO):
        -(1 - e) log sigma(b (x - y) - g) - e log sigma(-(b (x - y) - g)) + alpha * NLL
    rewards b x, b y; logps x, y; alpha = cpo_alpha (null: 1 for CPO, 0 for SimPO).
ORPO (``ORPOTrainer.odds_ratio_loss``): with the average log-probs x = c / n_c, y = r / n_r,
    log odds(p) = log p - log(1 - p), so
        NLL - b log sigma((x - y) - (log(1 - e^x) - log(1 - e^y)))
    rewards b x, b y; logps x, y.
NLL (CPO, SimPO, ORPO) is ``nn.CrossEntropyLoss`` over every chosen token of the batch,
    a token mean: sum_i w_i nll_i / sum_i w_i k_i, with nll_i the summed cross-entropy of
    the covered tokens of chosen sequence i and k_i their count. By default these are the
    response tokens (nll_i = -c_i, k_i = n_c); TRL's ORPO covers the prompt tokens too
    (``PairLogps.chosen_nll`` / ``nll_tokens`` carry that).
KTO (``KTOTrainer._compute_loss``, loss_type kto) on unpaired rows j with summed completion
    log-probs p_j, reference p0_j, label l_j and a KL estimate z from mismatched
    (prompt, completion) rows: z = max(mean_j (q_j - q0_j), 0), no gradient;
        desirable    w_d (1 - sigma(b ((p - p0) - z)))
        undesirable  w_u (1 - sigma(b (z - (p - p0))))
    loss = the mean over all rows; rewards b (p - p0), averaged per class.

Metrics (no gradient): reward_accuracy (chosen reward > rejected reward), reward_margin,
chosen_reward, rejected_reward, chosen_logps, rejected_logps, nll_loss (CPO, SimPO,
ORPO), log_odds_ratio and log_odds_chosen (ORPO), kl (KTO). TRL logs them as
rewards/accuracies, rewards/margins, rewards/chosen, rewards/rejected, logps/chosen,
logps/rejected, nll_loss, log_odds_ratio, log_odds_chosen, kl.
"""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx

from mlx_tune.config import PreferenceConfig

METHODS = ("dpo", "orpo", "simpo", "cpo", "kto")
_WITH_REFERENCE = {"dpo": True, "kto": True, "orpo": False, "simpo": False, "cpo": False}


class PairLogps(NamedTuple):
    """Per-pair sums over the response tokens; every field (P,) float32."""

    chosen: mx.array
    rejected: mx.array
    chosen_tokens: mx.array
    rejected_tokens: mx.array
    ref_chosen: mx.array | None
    ref_rejected: mx.array | None
    weight: mx.array
    # The NLL term's tokens, where they are not the chosen response's (TRL's ORPO: prompt
    # and response): summed cross-entropy and count. None: -chosen over chosen_tokens.
    chosen_nll: mx.array | None = None
    nll_tokens: mx.array | None = None


class KtoLogps(NamedTuple):
    """Per-row sums over the completion tokens; every field (R,) float32."""

    policy: mx.array
    reference: mx.array
    label: mx.array
    kl_policy: mx.array
    kl_reference: mx.array
    weight: mx.array


def needs_reference(method: str) -> bool:
    """Whether ``method`` compares against a reference model's log-probs."""
    if method not in _WITH_REFERENCE:
        raise ValueError(f"unknown preference method {method!r}; expected one of {', '.join(METHODS)}")
    return _WITH_REFERENCE[method]


def _f32(x: mx.array) -> mx.array:
    return x.astype(mx.float32)


def _mean(x: mx.array, w: mx.array) -> mx.array:
    return (x * w).sum() / mx.maximum(w.sum(), 1.0)


def _safe(x: mx.array, w: mx.array, fill: float) -> mx.array:
    # Padding rows get a harmless value before any log/exp: a 0 * inf in the forward or
    # backward pass would make NaN of the real rows' sums too. (where's gradient to the
    # padding rows is 0.)
    return mx.where(w > 0, _f32(x), fill)


def _masked_pairs(lp: PairLogps, w: mx.array) -> PairLogps:
    def fill(x: mx.array | None, value: float) -> mx.array | None:
        return None if x is None else _safe(x, w, value)

    return PairLogps(_safe(lp.chosen, w, -1.0), _safe(lp.rejected, w, -1.0), _safe(lp.chosen_tokens, w, 1.0),
                     _safe(lp.rejected_tokens, w, 1.0), fill(lp.ref_chosen, -1.0), fill(lp.ref_rejected, -1.0), w,
                     fill(lp.chosen_nll, 1.0), fill(lp.nll_tokens, 1.0))


def _smoothed_sigmoid(logits: mx.array, e: float) -> mx.array:
    # TRL's conservative form; exactly -log sigma(logits) when e = 0.
    loss = -(1.0 - e) * _logsigmoid(logits)
    return loss - e * _logsigmoid(-logits) if e else loss


def _logsigmoid(x: mx.array) -> mx.array:
    return -mx.logaddexp(mx.zeros_like(x), -x)


def _log1mexp(x: mx.array) -> mx.array:
    """log(1 - e^x) for x < 0, branching at -log 2 (as TRL's ``log1mexp``) to avoid cancellation."""
    return mx.where(x < -0.6931471805599453, mx.log1p(-mx.exp(x)), mx.log(-mx.expm1(x)))


def _pair_metrics(chosen_reward, rejected_reward, chosen_logps, rejected_logps, w) -> dict[str, mx.array]:
    cr, rr = mx.stop_gradient(chosen_reward), mx.stop_gradient(rejected_reward)
    return {
        "reward_accuracy": _mean((cr > rr).astype(mx.float32), w),
        "reward_margin": _mean(cr - rr, w),
        "chosen_reward": _mean(cr, w),
        "rejected_reward": _mean(rr, w),
        "chosen_logps": _mean(mx.stop_gradient(chosen_logps), w),
        "rejected_logps": _mean(mx.stop_gradient(rejected_logps), w),
    }


def _nll(lp: PairLogps, w: mx.array) -> mx.array:
    nll = -lp.chosen if lp.chosen_nll is None else lp.chosen_nll
    tokens = lp.chosen_tokens if lp.nll_tokens is None else lp.nll_tokens
    return (nll * w).sum() / mx.maximum((tokens * w).sum(), 1.0)


def _dpo(cfg: PreferenceConfig, lp: PairLogps, w: mx.array):
    if lp.ref_chosen is None or lp.ref_rejected is None:
        raise ValueError("dpo needs the reference log-probs (ref_chosen, ref_rejected)")
    c, r = lp.chosen, lp.rejected
    chosen_ratio = c - lp.ref_chosen
    rejected_ratio = r - lp.ref_rejected
    margin = cfg.beta * (chosen_ratio - rejected_ratio)
    e = cfg.label_smoothing
    if cfg.loss_type == "sigmoid":
        losses = _smoothed_sigmoid(margin, e)
    elif cfg.loss_type == "hinge":
        losses = mx.maximum(1.0 - margin, 0.0)
    elif cfg.loss_type == "ipo":
        # TRL (confirmed with the IPO authors) normalises the log-ratios per completion token
        per_token = (chosen_ratio / mx.maximum(lp.chosen_tokens, 1.0)
                     - rejected_ratio / mx.maximum(lp.rejected_tokens, 1.0))
        losses = (per_token - 1.0 / (2.0 * cfg.beta)) ** 2
    elif cfg.loss_type == "robust":
        losses = (-(1.0 - e) * _logsigmoid(margin) + e * _logsigmoid(-margin)) / (1.0 - 2.0 * e)
    else:
        raise ValueError(f"unknown preference.loss_type {cfg.loss_type!r}")
    metrics = _pair_metrics(cfg.beta * chosen_ratio, cfg.beta * rejected_ratio, c, r, w)
    return _mean(losses, w), metrics


def _cpo(method: str, cfg: PreferenceConfig, lp: PairLogps, w: mx.array):
    x, y = lp.chosen, lp.rejected
    gamma = 0.0
    if method == "simpo":
        x = x / mx.maximum(lp.chosen_tokens, 1.0)
        y = y / mx.maximum(lp.rejected_tokens, 1.0)
        gamma = cfg.simpo_margin
    losses = _smoothed_sigmoid(cfg.beta * (x - y) - gamma, cfg.label_smoothing)
    alpha = cfg.cpo_alpha if cfg.cpo_alpha is not None else (1.0 if method == "cpo" else 0.0)
    loss = _mean(losses, w)
    metrics = _pair_metrics(cfg.beta * x, cfg.beta * y, x, y, w)
    # TRL skips the NLL (and logs 0) when alpha is 0
    nll = _nll(lp, w) if alpha else mx.array(0.0)
    metrics["nll_loss"] = mx.stop_gradient(nll)
    return (loss + alpha * nll if alpha else loss), metrics


def _orpo(cfg: PreferenceConfig, lp: PairLogps, w: mx.array):
    x = lp.chosen / mx.maximum(lp.chosen_tokens, 1.0)
    y = lp.rejected / mx.maximum(lp.rejected_tokens, 1.0)
    log_odds = (x - y) - (_log1mexp(x) - _log1mexp(y))
    ratio = _logsigmoid(log_odds)
    nll = _nll(lp, w)
    metrics = _pair_metrics(cfg.beta * x, cfg.beta * y, x, y, w)
    metrics["nll_loss"] = mx.stop_gradient(nll)
    metrics["log_odds_ratio"] = _mean(mx.stop_gradient(ratio), w)
    metrics["log_odds_chosen"] = _mean(mx.stop_gradient(log_odds), w)
    return nll - cfg.beta * _mean(ratio, w), metrics


def pair_loss(method: str, cfg: PreferenceConfig, lp: PairLogps) -> tuple[mx.array, dict[str, mx.array]]:
    """(scalar loss, {metric: scalar}) of ``method`` (dpo, orpo, simpo, cpo) over the real pairs."""
    w = _f32(lp.weight)
    lp = _masked_pairs(lp, w)
    if method == "dpo":
        return _dpo(cfg, lp, w)
    if method in ("cpo", "simpo"):
        return _cpo(method, cfg, lp, w)
    if method == "orpo":
        return _orpo(cfg, lp, w)
    raise ValueError(f"pair_loss: unknown method {method!r}; expected dpo, orpo, simpo or cpo (kto: kto_loss)")


def kto_loss(cfg: PreferenceConfig, lp: KtoLogps) -> tuple[mx.array, dict[str, mx.array]]:
    """(scalar loss, {metric: scalar}) of KTO over the real rows, either class possibly absent.

    reward_accuracy here (TRL logs none for KTO) is the share of rows whose reward has the
    label's sign: positive for desirable rows, negative for undesirable ones.
    """
    w = _f32(lp.weight)
    lp = KtoLogps(_safe(lp.policy, w, 0.0), _safe(lp.reference, w, 0.0), _safe(lp.label, w, 0.0),
                  _safe(lp.kl_policy, w, 0.0), _safe(lp.kl_reference, w, 0.0), w)
    desirable = lp.label * w
    undesirable = (1.0 - lp.label) * w
    # TRL detaches the KL estimate and clamps it at 0 (it is a KL, and a baseline only)
    kl = mx.maximum(mx.stop_gradient(_mean(lp.kl_policy - lp.kl_reference, w)), 0.0)
    ratio = lp.policy - lp.reference
    chosen_losses = 1.0 - mx.sigmoid(cfg.beta * (ratio - kl))
    rejected_losses = 1.0 - mx.sigmoid(cfg.beta * (kl - ratio))
    per_row = cfg.desirable_weight * chosen_losses * desirable + cfg.undesirable_weight * rejected_losses * undesirable
    loss = per_row.sum() / mx.maximum(w.sum(), 1.0)

    reward = mx.stop_gradient(cfg.beta * ratio)
    logps = mx.stop_gradient(lp.policy)
    n_d, n_u = desirable.sum(), undesirable.sum()
    chosen_reward = (reward * desirable).sum() / mx.maximum(n_d, 1.0)
    rejected_reward = (reward * undesirable).sum() / mx.maximum(n_u, 1.0)
    both = mx.logical_and(n_d > 0, n_u > 0)
    right_sign = mx.where(desirable > 0, reward > 0, reward < 0).astype(mx.float32)
    metrics = {
        "kl": kl,
        "reward_accuracy": _mean(right_sign, w),
        "reward_margin": mx.where(both, chosen_reward - rejected_reward, 0.0),
        "chosen_reward": chosen_reward,
        "rejected_reward": rejected_reward,
        "chosen_logps": (logps * desirable).sum() / mx.maximum(n_d, 1.0),
        "rejected_logps": (logps * undesirable).sum() / mx.maximum(n_u, 1.0),
        "n_desirable": n_d,
        "n_undesirable": n_u,
    }
    return loss, metrics
