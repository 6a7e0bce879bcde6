"""Preference losses against their formulas written out in numpy, padding, one-class KTO, gradients.

(Agreement with TRL's own code: bench/check_trl_preference.py.)
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_tune.config import PreferenceConfig
from mlx_tune.training.preference_losses import KtoLogps, PairLogps, kto_loss, needs_reference, pair_loss

# Fixed log-probs of 4 pairs: policy sums, token counts, reference sums.
C = np.array([-12.0, -30.5, -4.2, -18.0], np.float32)
R = np.array([-14.5, -28.0, -9.1, -18.3], np.float32)
NC = np.array([6.0, 15.0, 2.0, 9.0], np.float32)
NR = np.array([7.0, 12.0, 5.0, 8.0], np.float32)
C0 = np.array([-13.0, -29.0, -5.0, -17.5], np.float32)
R0 = np.array([-13.5, -29.5, -8.0, -18.1], np.float32)


def logsig(x):
    return -np.logaddexp(0.0, -x)


def pairs(weight=None, **extra) -> PairLogps:
    w = np.ones(len(C), np.float32) if weight is None else weight
    return PairLogps(*(mx.array(x) for x in (C, R, NC, NR, C0, R0, w)), **extra)


def expected(method: str, cfg: PreferenceConfig) -> float:
    b, e = cfg.beta, cfg.label_smoothing
    if method == "dpo":
        d = (C - C0) - (R - R0)
        per = {
            "sigmoid": -(1 - e) * logsig(b * d) - e * logsig(-b * d),
            "hinge": np.maximum(1 - b * d, 0),
            "ipo": ((C - C0) / NC - (R - R0) / NR - 1 / (2 * b)) ** 2,
            "robust": (-(1 - e) * logsig(b * d) + e * logsig(-b * d)) / (1 - 2 * e),
        }[cfg.loss_type]
        return float(per.mean())
    if method in ("cpo", "simpo"):
        x, y, g = (C, R, 0.0) if method == "cpo" else (C / NC, R / NR, cfg.simpo_margin)
        z = b * (x - y) - g
        alpha = cfg.cpo_alpha if cfg.cpo_alpha is not None else float(method == "cpo")
        return float((-(1 - e) * logsig(z) - e * logsig(-z)).mean() + alpha * (-C.sum() / NC.sum()))
    x, y = C / NC, R / NR  # orpo
    log_odds = (x - y) - (np.log1p(-np.exp(x)) - np.log1p(-np.exp(y)))
    return float(-C.sum() / NC.sum() - b * logsig(log_odds).mean())


CASES = [
    ("dpo", {"loss_type": "sigmoid"}),
    ("dpo", {"loss_type": "sigmoid", "label_smoothing": 0.2}),
    ("dpo", {"loss_type": "hinge", "beta": 0.5}),
    ("dpo", {"loss_type": "ipo"}),
    ("dpo", {"loss_type": "robust", "label_smoothing": 0.1}),
    ("cpo", {}),
    ("cpo", {"label_smoothing": 0.1, "cpo_alpha": 0.5}),
    ("simpo", {"beta": 2.0}),
    ("simpo", {"beta": 2.5, "simpo_gamma": 1.2, "cpo_alpha": 0.1, "label_smoothing": 0.05}),
    ("orpo", {}),
    ("orpo", {"beta": 0.5}),
]


@pytest.mark.parametrize("method,kw", CASES, ids=[f"{m}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for m, kw in CASES])
def test_loss_matches_formula(method, kw):
    cfg = PreferenceConfig(**kw)
    loss, metrics = pair_loss(method, cfg, pairs())
    assert loss.dtype == mx.float32
    assert float(loss) == pytest.approx(expected(method, cfg), rel=1e-5)
    for name in ("reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward", "chosen_logps",
                 "rejected_logps"):
        assert np.isfinite(float(metrics[name])), name


def test_rewards_as_trl_reports_them():
    _, dpo = pair_loss("dpo", PreferenceConfig(beta=0.1), pairs())
    assert float(dpo["chosen_reward"]) == pytest.approx(float((0.1 * (C - C0)).mean()), rel=1e-5)
    assert float(dpo["reward_margin"]) == pytest.approx(float((0.1 * ((C - C0) - (R - R0))).mean()), rel=1e-5)
    # pairs 0 and 2 have the larger chosen reward
    assert float(dpo["reward_accuracy"]) == pytest.approx(np.mean(C - C0 > R - R0))
    assert float(dpo["chosen_logps"]) == pytest.approx(float(C.mean()), rel=1e-6)
    _, simpo = pair_loss("simpo", PreferenceConfig(beta=2.0), pairs())
    assert float(simpo["chosen_reward"]) == pytest.approx(float((2.0 * C / NC).mean()), rel=1e-5)
    assert float(simpo["chosen_logps"]) == pytest.approx(float((C / NC).mean()), rel=1e-5)
    _, cpo = pair_loss("cpo", PreferenceConfig(beta=0.1), pairs())
    assert float(cpo["rejected_reward"]) == pytest.approx(float((0.1 * R).mean()), rel=1e-5)
    assert float(cpo["nll_loss"]) == pytest.approx(float(-C.sum() / NC.sum()), rel=1e-5)


def test_orpo_nll_over_given_tokens():
    # TRL's ORPO takes the NLL over prompt and response: the plumbing passes that sum and count
    nll, k = np.array([20.0, 41.0, 9.0, 25.0], np.float32), np.array([10.0, 20.0, 6.0, 12.0], np.float32)
    base, _ = pair_loss("orpo", PreferenceConfig(), pairs())
    given, metrics = pair_loss("orpo", PreferenceConfig(), pairs(chosen_nll=mx.array(nll), nll_tokens=mx.array(k)))
    assert float(metrics["nll_loss"]) == pytest.approx(float(nll.sum() / k.sum()), rel=1e-6)
    assert float(given) - float(base) == pytest.approx(float(nll.sum() / k.sum() + C.sum() / NC.sum()), rel=1e-5)


@pytest.mark.parametrize("method,kw", [("dpo", {}), ("dpo", {"loss_type": "ipo"}), ("cpo", {}), ("simpo", {}),
                                       ("orpo", {})])
def test_gradient_direction(method, kw):
    """Raising the chosen log-prob lowers the loss; raising the rejected one raises it."""
    cfg = PreferenceConfig(**kw)

    def f(c, r):
        return pair_loss(method, cfg, pairs()._replace(chosen=c, rejected=r))[0]

    gc, gr = mx.grad(f, argnums=(0, 1))(mx.array(C), mx.array(R))
    assert (np.array(gc) < 0).all() and (np.array(gr) > 0).all()
    step = 0.05
    assert float(f(mx.array(C) + step, mx.array(R))) < float(f(mx.array(C), mx.array(R)))


@pytest.mark.parametrize("method", ["dpo", "cpo", "simpo", "orpo"])
def test_padding_pairs_change_nothing(method):
    cfg = PreferenceConfig()
    real_loss, real_metrics = pair_loss(method, cfg, pairs())
    # padding rows hold garbage a plumbing bug might leave there: 0 tokens, 0 log-probs, NaN
    pad = np.array([0.0, np.nan], np.float32)
    padded = PairLogps(*(mx.array(np.concatenate([np.asarray(x), pad])) for x in pairs()[:6]),
                       mx.array(np.array([1, 1, 1, 1, 0, 0], np.float32)))

    def f(c):
        return pair_loss(method, cfg, padded._replace(chosen=c))[0]

    loss, grad = mx.value_and_grad(f)(padded.chosen)
    assert float(loss) == pytest.approx(float(real_loss), rel=1e-6)
    grad = np.array(grad)
    assert np.isfinite(grad).all() and (grad[4:] == 0).all()
    real_grad = np.array(mx.grad(lambda c: pair_loss(method, cfg, pairs()._replace(chosen=c))[0])(mx.array(C)))
    np.testing.assert_allclose(grad[:4], real_grad, rtol=1e-5)
    _, metrics = pair_loss(method, cfg, padded)
    for name, value in real_metrics.items():
        assert float(metrics[name]) == pytest.approx(float(value), rel=1e-6, abs=1e-7), name


def test_single_pair_and_all_padding():
    one = PairLogps(*(mx.array(np.asarray(x)[:1]) for x in pairs()[:7]))
    for method in ("dpo", "cpo", "simpo", "orpo"):
        loss, metrics = pair_loss(method, PreferenceConfig(), one)
        assert np.isfinite(float(loss)) and all(np.isfinite(float(v)) for v in metrics.values())
        empty = one._replace(weight=mx.zeros((1,)))
        assert float(pair_loss(method, PreferenceConfig(), empty)[0]) == 0.0


def test_needs_reference():
    assert [needs_reference(m) for m in ("dpo", "kto", "orpo", "simpo", "cpo")] == [True, True, False, False, False]
    with pytest.raises(ValueError, match="unknown preference method"):
        needs_reference("sft")


# KTO: 6 rows, labels 1 desirable / 0 undesirable, and KL rows (mismatched prompt, completion)
KP = np.array([-10.0, -8.0, -20.0, -6.0, -15.0, -9.0], np.float32)
KR = np.array([-11.0, -7.5, -19.0, -6.5, -15.2, -10.0], np.float32)
KQ = np.array([-30.0, -25.0, -28.0, -22.0, -35.0, -31.0], np.float32)
KQ0 = np.array([-30.5, -25.2, -27.0, -22.1, -35.3, -31.4], np.float32)


def kto(label, weight=None, cfg=None, policy=KP):
    cfg = PreferenceConfig() if cfg is None else cfg
    w = np.ones(len(label), np.float32) if weight is None else np.asarray(weight, np.float32)
    n = len(label)
    lp = KtoLogps(mx.array(policy), mx.array(KR[:n]), mx.array(np.asarray(label, np.float32)), mx.array(KQ[:n]),
                  mx.array(KQ0[:n]), mx.array(w))
    return kto_loss(cfg, lp)


def kto_expected(label, cfg):
    label = np.asarray(label, np.float32)
    b, z = cfg.beta, max(float((KQ - KQ0).mean()), 0.0)
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    ratio = KP - KR
    per = np.where(label > 0, cfg.desirable_weight * (1 - sig(b * (ratio - z))),
                   cfg.undesirable_weight * (1 - sig(b * (z - ratio))))
    return float(per.mean()), z


@pytest.mark.parametrize("label", [[1, 0, 1, 0, 0, 1], [1] * 6, [0] * 6], ids=["mixed", "desirable", "undesirable"])
def test_kto_matches_formula(label):
    cfg = PreferenceConfig(beta=0.3, desirable_weight=1.33, undesirable_weight=0.8)
    loss, metrics = kto(label, cfg=cfg)
    want, z = kto_expected(label, cfg)
    assert float(loss) == pytest.approx(want, rel=1e-5)
    assert float(metrics["kl"]) == pytest.approx(z, rel=1e-5)
    assert all(np.isfinite(float(v)) for v in metrics.values())
    lab = np.asarray(label, bool)
    reward = 0.3 * (KP - KR)
    if lab.any():
        assert float(metrics["chosen_reward"]) == pytest.approx(float(reward[lab].mean()), rel=1e-5)
    if lab.any() and (~lab).any():
        assert float(metrics["reward_margin"]) == pytest.approx(float(reward[lab].mean() - reward[~lab].mean()), rel=1e-5)
    else:
        assert float(metrics["reward_margin"]) == 0.0
    # desirable rows: more likelihood lowers the loss; undesirable: raises it; the KL rows get no gradient
    grad = np.array(mx.grad(lambda p: kto(label, cfg=cfg, policy=p)[0])(mx.array(KP)))
    assert ((grad < 0) == lab).all()


def test_kto_kl_clamped_and_padding():
    label = [1, 0, 1, 0, 0, 1]
    loss, _ = kto(label)
    padded = KtoLogps(*(mx.array(np.concatenate([x, [np.nan]]).astype(np.float32))
                        for x in (KP, KR, np.asarray(label, np.float32), KQ, KQ0)),
                      mx.array(np.array([1, 1, 1, 1, 1, 1, 0], np.float32)))
    padded_loss, metrics = kto_loss(PreferenceConfig(), padded)
    assert float(padded_loss) == pytest.approx(float(loss), rel=1e-6)
    assert np.isfinite(float(metrics["kl"]))
    # a policy below the reference on the KL rows: the estimate is clamped at 0
    neg = KtoLogps(mx.array(KP), mx.array(KR), mx.array(np.asarray(label, np.float32)), mx.array(KQ0 - 1),
                   mx.array(KQ0), mx.ones((6,)))
    assert float(kto_loss(PreferenceConfig(), neg)[1]["kl"]) == 0.0
