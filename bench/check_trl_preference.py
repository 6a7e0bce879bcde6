"""Check mlx_tune's preference losses against Hugging Face TRL's own code: losses and gradients.

Part 1 (losses): for DPO (sigmoid, hinge, ipo, robust, and conservative DPO), CPO, SimPO,
ORPO and KTO, one fixed random batch of per-token log-probs T (rows x positions, prompt
and response, some rows shorter) is fed to TRL's trainer code: ``DPOTrainer._compute_loss``
and ``KTOTrainer._compute_loss`` through a stand-in model whose fused head returns T as
``log_probs``, ``CPOTrainer.get_batch_loss_metrics`` and ``ORPOTrainer.get_batch_loss_metrics``
through a stand-in model whose two-class logits give exactly T at the label (so TRL's own
``get_batch_logps``, averaging and cross-entropy NLL run). The trainers are built with
``object.__new__`` and only the attributes those methods read. mlx_tune gets the same T
reduced to the per-sequence sums and counts ``pair_loss`` / ``kto_loss`` take. Loss, the
gradient dLoss/dT (every token) and the logged metrics must agree within 1e-4 relative
(metrics relative to max(|TRL's value|, 0.01)).

Part 2 (model): the tiny llama of ``mlx_tune.testing.tiny`` saved as a Hugging Face folder,
loaded by transformers in torch and built by mlx-lm with the same weights; three (prompt,
chosen, rejected) token lists in one right-padded batch; per-token log-probs from each
framework's model, then TRL's loss code (the same stand-in) vs ``pair_loss``: loss, the
gradient norm over all weights and the worst per-tensor gradient difference, within 1e-4.

Needs torch + trl + transformers next to mlx (``make bench-rivals`` builds .venv-rivals):

    .venv-rivals/bin/python bench/check_trl_preference.py   # writes bench/results/trl_preference.json

Prints "skipped: ..." and exits 0 where trl is missing; exits 1 on any mismatch.
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlx_tune.runtime.blas import ensure_fast_blas  # noqa: E402

ensure_fast_blas()

RTOL = 1e-4
RESULTS = Path(__file__).resolve().parent / "results" / "trl_preference.json"
# TRL logs "rewards/chosen", mlx_tune "chosen_reward", ...
METRIC_NAMES = {"rewards/chosen": "chosen_reward", "rewards/rejected": "rejected_reward",
                "rewards/accuracies": "reward_accuracy", "rewards/margins": "reward_margin",
                "logps/chosen": "chosen_logps", "logps/rejected": "rejected_logps", "nll_loss": "nll_loss",
                "log_odds_ratio": "log_odds_ratio", "log_odds_chosen": "log_odds_chosen", "kl": "kl"}


def _batch(np, rows: int, length: int, seed: int):
    """Per-token log-probs T (rows, length-1) and the masks of a left-aligned batch.

    Position j of T scores token j+1. Rows have prompts of 2-4 tokens and responses of
    1..rest tokens, then padding (T = 0 there, as TRL's fused head gives at label -100).
    """
    rng = np.random.default_rng(seed)
    attention = np.zeros((rows, length), np.int64)
    completion = np.zeros((rows, length), np.int64)
    for i in range(rows):
        p = int(rng.integers(2, 5))
        n = int(rng.integers(1, length - p + 1))
        attention[i, :p + n] = 1
        completion[i, p:p + n] = 1
    T = rng.uniform(-3.0, -0.05, (rows, length - 1)).astype(np.float32) * attention[:, 1:]
    return T, attention, completion


class _Stand:
    """Stand-in for a causal LM: returns fixed per-token log-probs (fused head) or logits."""

    def __init__(self, torch, T, kl_T=None):
        self.torch, self.T, self.kl_T, self.training = torch, T, kl_T, True

    def __call__(self, input_ids=None, labels=None, fused_lm_head=False, **_):
        torch = self.torch
        T = self.kl_T if self.kl_T is not None and input_ids.shape[1] == self.kl_T.shape[1] + 1 else self.T
        if fused_lm_head:
            mask = (labels[:, 1:] != -100).to(T.dtype)
            z = torch.zeros_like(T)
            return SimpleNamespace(log_probs=T * mask, entropy=z, mean_logits=z, is_top1=z.bool())
        # logits [a, 0] with label 0 give log_softmax = log sigmoid(a) = T for a = T - log(1 - e^T)
        a = T - torch.log(-torch.expm1(T.clamp(max=-1e-6)))
        a = torch.cat([a, torch.zeros_like(a[:, :1])], dim=1)
        return SimpleNamespace(logits=torch.stack([a, torch.zeros_like(a)], dim=-1))


def _accelerator(torch):
    return SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x,
                           unwrap_model=lambda m: m)


def _trainer(cls, torch, **attrs):
    trainer = object.__new__(cls)
    base = dict(accelerator=_accelerator(torch), aux_loss_enabled=False, is_encoder_decoder=False,
                _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0,
                _tp_size=1, args=SimpleNamespace(gradient_checkpointing_kwargs=None))
    for k, v in {**base, **attrs}.items():
        object.__setattr__(trainer, k, v)
    return trainer


def _trl_pair_loss(torch, case, T, attention, completion, ref):
    """TRL's (loss, metrics) of a pair method on per-token log-probs T of the stacked [chosen; rejected] rows."""
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer
    from trl.trainer.dpo_trainer import DPOTrainer

    P = T.shape[0] // 2
    ids = torch.zeros(attention.shape, dtype=torch.long)
    am, cm = torch.tensor(attention), torch.tensor(completion)
    method, k = case["method"], case["kwargs"]
    if method == "dpo" and not case.get("via_cpo"):
        model = _Stand(torch, T)
        tr = _trainer(DPOTrainer, torch, model=model, beta=k["beta"], label_smoothing=k.get("label_smoothing", 0.0),
                      loss_types=[k["loss_type"]], loss_weights=[1.0], ld_alpha=None, precompute_ref_logps=True,
                      f_divergence_type="reverse_kl", use_weighting=False)
        inputs = {"input_ids": ids, "attention_mask": am, "completion_mask": cm,
                  "ref_chosen_logps": torch.tensor(ref[0]), "ref_rejected_logps": torch.tensor(ref[1])}
        loss = tr._compute_loss(model, inputs, return_outputs=False)
        metrics = {key: vals[-1] for key, vals in tr._metrics["train"].items()}
    elif method == "dpo":  # conservative DPO: TRL's smoothed sigmoid (CPOTrainer.cpo_loss) on the log-ratios
        tr = _trainer(CPOTrainer, torch, beta=k["beta"], label_smoothing=k["label_smoothing"], loss_type="sigmoid",
                      alpha=0.0, simpo_gamma=0.0)
        sums = (T * cm[:, 1:]).sum(1)
        losses, _, _ = tr.cpo_loss(sums[:P] - torch.tensor(ref[0]), sums[P:] - torch.tensor(ref[1]))
        loss, metrics = losses.mean(), {}
    else:
        batch = {}
        for side, rows in (("chosen", slice(0, P)), ("rejected", slice(P, 2 * P))):
            batch[f"{side}_input_ids"] = ids[rows]
            batch[f"{side}_attention_mask"] = am[rows]
            batch[f"{side}_labels"] = ids[rows].masked_fill(cm[rows] == 0, -100)
        model = _Stand(torch, T)
        if method == "orpo":
            tr = _trainer(ORPOTrainer, torch, beta=k["beta"], padding_value=0)
        else:
            tr = _trainer(CPOTrainer, torch, beta=k["beta"], label_smoothing=k.get("label_smoothing", 0.0),
                          loss_type="simpo" if method == "simpo" else "sigmoid", alpha=0.0,
                          simpo_gamma=k.get("gamma", 0.5), cpo_alpha=k["cpo_alpha"], pad_token_id=0)
        loss, metrics = tr.get_batch_loss_metrics(model, batch, train_eval="train")
    return loss, {METRIC_NAMES[n]: float(v) for n, v in metrics.items() if n in METRIC_NAMES}


def _trl_pairs(torch, case, T_np, attention, completion, ref):
    """TRL's loss, dLoss/dT and metrics on fixed per-token log-probs."""
    T = torch.tensor(T_np, requires_grad=True)
    loss, metrics = _trl_pair_loss(torch, case, T, attention, completion, ref)
    loss.backward()
    return float(loss), T.grad.numpy(), metrics


def _ours_pair_loss(case, T, attention, completion, ref):
    """mlx_tune's (loss, metrics): T reduced to what the plumbing hands ``pair_loss``."""
    import mlx.core as mx

    from mlx_tune.config import PreferenceConfig
    from mlx_tune.training.preference_losses import PairLogps, pair_loss

    P = T.shape[0] // 2
    resp = mx.array(completion[:, 1:].astype("float32"))
    nll_mask = mx.array(attention[:, 1:].astype("float32"))  # TRL's ORPO: prompt and response
    sums, counts = (T * resp).sum(1), resp.sum(1)
    orpo = case["method"] == "orpo"
    lp = PairLogps(sums[:P], sums[P:], counts[:P], counts[P:],
                   mx.array(ref[0]) if ref else None, mx.array(ref[1]) if ref else None, mx.ones((P,)),
                   chosen_nll=-(T * nll_mask).sum(1)[:P] if orpo else None,
                   nll_tokens=nll_mask.sum(1)[:P] if orpo else None)
    return pair_loss(case["method"], PreferenceConfig(**case["kwargs"]), lp)


def _ours_pairs(case, T_np, attention, completion, ref):
    import mlx.core as mx
    import numpy as np

    (loss, metrics), grad = mx.value_and_grad(
        lambda T: _ours_pair_loss(case, T, attention, completion, ref))(mx.array(T_np))
    return float(loss), np.array(grad), {n: float(v) for n, v in metrics.items()}


def _kto_case(torch, np, case, seed):
    import mlx.core as mx
    from trl.trainer.kto_trainer import KTOTrainer

    from mlx_tune.config import PreferenceConfig
    from mlx_tune.training.preference_losses import KtoLogps, kto_loss

    R, L = 8, 12
    T_np, attention, completion = _batch(np, R, L, seed)
    # TRL's KL rows: completion j-1 after prompt j (rotated by one within the batch), no gradient
    kl_T, kl_att, kl_cm = _batch(np, R, L + 2, seed + 1)
    rng = np.random.default_rng(seed + 2)
    labels = np.array(case["labels"], np.int64)
    ref = (T_np * completion[:, 1:]).sum(1) + rng.normal(0, 0.5, R).astype(np.float32)
    # policy above the reference on the KL rows (KL estimate > 0), or below it (TRL clamps the estimate at 0)
    kl_shift = np.abs(rng.normal(0, 0.5, R)).astype(np.float32) * case.get("kl_sign", 1)
    ref_kl = (kl_T * kl_cm[:, 1:]).sum(1) - kl_shift
    k = case["kwargs"]

    T = torch.tensor(T_np, requires_grad=True)
    model = _Stand(torch, T, torch.tensor(kl_T))
    tr = _trainer(KTOTrainer, torch, model=model, beta=k["beta"], desirable_weight=k["desirable_weight"],
                  undesirable_weight=k["undesirable_weight"], loss_type="kto", calculate_KL=True,
                  precompute_ref_logps=True)
    batch = {"input_ids": torch.zeros((R, L), dtype=torch.long), "attention_mask": torch.tensor(attention),
             "completion_mask": torch.tensor(completion), "KL_input_ids": torch.zeros((R, L + 2), dtype=torch.long),
             "KL_attention_mask": torch.tensor(kl_att), "KL_completion_mask": torch.tensor(kl_cm),
             "label": torch.tensor(labels), "ref_logps": torch.tensor(ref), "ref_KL_logps": torch.tensor(ref_kl)}
    loss = tr._compute_loss(model, batch, return_outputs=False)
    loss.backward()
    trl_metrics = {METRIC_NAMES[n]: v[-1] for n, v in tr._metrics["train"].items() if n in METRIC_NAMES}
    trl = (float(loss), T.grad.numpy(), trl_metrics)

    resp = mx.array(completion[:, 1:].astype("float32"))
    kl_policy = mx.array((kl_T * kl_cm[:, 1:]).sum(1))
    cfg = PreferenceConfig(**k)

    def f(T):
        lp = KtoLogps((T * resp).sum(1), mx.array(ref), mx.array(labels.astype("float32")), kl_policy,
                      mx.array(ref_kl), mx.ones((R,)))
        return kto_loss(cfg, lp)

    (loss_m, metrics), grad = mx.value_and_grad(f)(mx.array(T_np))
    ours_metrics = {n: float(v) for n, v in metrics.items()}
    if not (labels.any() and (1 - labels).any()):  # TRL logs no margin (nor the empty class) then
        ours_metrics.pop("reward_margin")
    return trl, (float(loss_m), np.array(grad), ours_metrics)


PAIR_CASES = [
    {"name": "dpo sigmoid", "method": "dpo", "kwargs": {"beta": 0.1, "loss_type": "sigmoid"}},
    {"name": "dpo sigmoid ls=0.1 (cDPO)", "method": "dpo", "via_cpo": True,
     "kwargs": {"beta": 0.1, "loss_type": "sigmoid", "label_smoothing": 0.1}},
    {"name": "dpo hinge", "method": "dpo", "kwargs": {"beta": 0.3, "loss_type": "hinge"}},
    {"name": "dpo ipo", "method": "dpo", "kwargs": {"beta": 0.1, "loss_type": "ipo"}},
    {"name": "dpo robust ls=0.2", "method": "dpo", "kwargs": {"beta": 0.1, "loss_type": "robust", "label_smoothing": 0.2}},
    {"name": "cpo", "method": "cpo", "kwargs": {"beta": 0.1, "cpo_alpha": 1.0}},
    {"name": "cpo ls=0.1 alpha=0.5", "method": "cpo", "kwargs": {"beta": 0.2, "cpo_alpha": 0.5, "label_smoothing": 0.1}},
    {"name": "simpo", "method": "simpo", "kwargs": {"beta": 2.0, "gamma": 0.5, "cpo_alpha": 0.0}},
    {"name": "simpo alpha=0.3 ls=0.1", "method": "simpo",
     "kwargs": {"beta": 2.5, "gamma": 0.8, "cpo_alpha": 0.3, "label_smoothing": 0.1}},
    {"name": "orpo", "method": "orpo", "kwargs": {"beta": 0.1}},
    {"name": "orpo beta=0.5", "method": "orpo", "kwargs": {"beta": 0.5}},
]
KTO_CASES = [
    {"name": "kto", "kwargs": {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0},
     "labels": [1, 0, 1, 1, 0, 0, 1, 0]},
    {"name": "kto weights 1.33/1", "kwargs": {"beta": 0.5, "desirable_weight": 1.33, "undesirable_weight": 1.0},
     "labels": [1, 1, 1, 0, 1, 1, 0, 1]},
    {"name": "kto kl<0 (clamped)", "kwargs": {"beta": 0.2, "desirable_weight": 1.0, "undesirable_weight": 1.2},
     "labels": [0, 1, 0, 1, 1, 0, 0, 1], "kl_sign": -1},
    {"name": "kto desirable only", "kwargs": {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0},
     "labels": [1] * 8},
    {"name": "kto undesirable only", "kwargs": {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0},
     "labels": [0] * 8},
]


def _rel(a, b, np, floor: float = 1e-8) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(float(np.abs(b).max()), floor))


def _compare(np, name, trl, ours) -> dict:
    (tl, tg, tm), (ol, og, om) = trl, ours
    shared = sorted(set(tm) & set(om))
    # a metric near 0 (a reward of -5e-4 from sums of -11) carries float32 rounding of its inputs: scale >= 0.01
    metric_rel = max([_rel(om[m], tm[m], np, floor=1e-2) for m in shared] or [0.0])
    row = {"case": name, "trl_loss": tl, "mlx_tune_loss": ol, "loss_rel": _rel(ol, tl, np),
           "grad_norm": float(np.linalg.norm(tg)), "grad_rel": _rel(og, tg, np),
           "metrics_compared": shared, "metric_rel": metric_rel,
           "metrics_trl_only": sorted(set(tm) - set(om))}
    row["pass"] = bool(row["loss_rel"] <= RTOL and row["grad_rel"] <= RTOL and metric_rel <= RTOL
                       and not row["metrics_trl_only"])
    return row


def part_losses(torch, np) -> list[dict]:
    rows = []
    P, L = 6, 12
    for i, case in enumerate(PAIR_CASES):
        T, att, cm = _batch(np, 2 * P, L, seed=10 + i)
        ref = None
        if case["method"] == "dpo":
            rng = np.random.default_rng(100 + i)
            sums = (T * cm[:, 1:]).sum(1)
            ref = ((sums[:P] + rng.normal(0, 1.0, P)).astype(np.float32),
                   (sums[P:] + rng.normal(0, 1.0, P)).astype(np.float32))
        trl = _trl_pairs(torch, case, T, att, cm, ref)
        ours = _ours_pairs(case, T, att, cm, ref)
        rows.append(_compare(np, case["name"], trl, ours))
    for i, case in enumerate(KTO_CASES):
        trl, ours = _kto_case(torch, np, case, seed=50 + 3 * i)
        rows.append(_compare(np, case["name"], trl, ours))
    return rows


MODEL_PAIRS = [([5, 17, 99, 3], [250, 42, 7, 8], [120, 33]),
               ([1, 2, 3, 4, 5, 6], [60, 61], [70, 71, 72, 73, 74]),
               ([200, 201], [11, 12, 13], [21, 22, 23])]


def _model_batch(np):
    """[chosen rows; rejected rows] of MODEL_PAIRS, right-padded with token 0."""
    rows = [p + c for p, c, _ in MODEL_PAIRS] + [p + r for p, _, r in MODEL_PAIRS]
    prompts = [len(p) for p, _, _ in MODEL_PAIRS] * 2
    L = max(map(len, rows))
    ids = np.zeros((len(rows), L), np.int64)
    attention, completion = np.zeros_like(ids), np.zeros_like(ids)
    for i, (row, p) in enumerate(zip(rows, prompts)):
        ids[i, :len(row)] = row
        attention[i, :len(row)] = 1
        completion[i, p:len(row)] = 1
    return ids, attention, completion


def part_model(torch, np) -> list[dict]:
    """The tiny llama in transformers (torch) and in mlx_tune (MLX), same weights and pairs.

    Per-token log-probs from each framework's model, then TRL's loss code (torch) and
    ``pair_loss`` (MLX): log-prob sums, loss and the gradient norm over all weights.
    """
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from transformers import AutoModelForCausalLM

    from mlx_tune.model.attention import forward
    from mlx_tune.testing.tiny import save_tiny_folder, tiny_model

    ids, attention, completion = _model_batch(np)
    P = len(MODEL_PAIRS)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_tiny_folder(Path(tmp) / "tiny", "llama", seed=0)
        hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    model = tiny_model("llama", seed=0)
    t_ids, t_att = torch.tensor(ids), torch.tensor(attention)

    def torch_T():
        logp = torch.log_softmax(hf(t_ids, attention_mask=t_att).logits[:, :-1].float(), dim=-1)
        return logp.gather(2, t_ids[:, 1:, None])[..., 0] * t_att[:, 1:]

    def mlx_T():
        logits = forward(model, mx.array(ids)).astype(mx.float32)[:, :-1]
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return mx.take_along_axis(logp, mx.array(ids[:, 1:, None]), axis=-1)[..., 0] * mx.array(attention[:, 1:])

    resp = completion[:, 1:]
    with torch.no_grad():
        sums_t = (torch_T() * torch.tensor(resp)).sum(1).numpy()
    sums_m = np.array((mlx_T() * mx.array(resp)).sum(1))
    # a reference a little away from the policy
    ref_all = sums_m - np.float32(0.3) * np.arange(2 * P, dtype=np.float32)
    ref = (ref_all[:P], ref_all[P:])
    rows = []
    for case in PAIR_CASES:
        if case.get("via_cpo"):
            continue
        r = ref if case["method"] == "dpo" else None
        hf.zero_grad()
        loss_t, _ = _trl_pair_loss(torch, case, torch_T(), attention, completion, r)
        loss_t.backward()
        g_t = {n: p.grad.numpy() for n, p in hf.named_parameters() if p.grad is not None}
        loss_m, g_m = nn.value_and_grad(
            model, lambda case=case, r=r: _ours_pair_loss(case, mlx_T(), attention, completion, r)[0])()
        g_m = {n: np.array(g) for n, g in tree_flatten(g_m)}
        norm_t = float(np.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in g_t.values())))
        norm_m = float(np.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in g_m.values())))
        worst = max(float(np.linalg.norm(g_m[n] - g_t[n]) / max(np.linalg.norm(g_t[n]), 1e-12)) for n in g_t)
        row = {"case": f"model {case['name']}", "trl_loss": float(loss_t), "mlx_tune_loss": float(loss_m),
               "loss_rel": _rel(float(loss_m), float(loss_t), np), "grad_norm": norm_t,
               "grad_rel": _rel(norm_m, norm_t, np), "worst_tensor_grad_rel": worst,
               "same_weights": sorted(g_t) == sorted(g_m),
               "logps_max_abs_diff": float(np.abs(sums_m - sums_t).max())}
        row["pass"] = bool(row["loss_rel"] <= RTOL and row["grad_rel"] <= RTOL and worst <= RTOL and row["same_weights"])
        rows.append(row)
    return rows


def main() -> int:
    try:
        import torch
        import trl
    except ImportError as e:
        print(f"skipped: {e.name} not installed (bench/install_rivals.sh builds .venv-rivals)")
        return 0
    import numpy as np

    from mlx_tune.atomic import write_json_atomic

    rows = part_losses(torch, np)
    print(f"TRL {trl.__version__}, torch {torch.__version__}; tolerance {RTOL:g} relative")
    print(f"{'case':28s} {'TRL loss':>12s} {'mlx_tune':>12s} {'loss rel':>9s} {'|grad|':>9s} {'grad rel':>9s} "
          f"{'metr rel':>9s}  metrics")
    for r in rows:
        print(f"{r['case']:28s} {r['trl_loss']:12.6f} {r['mlx_tune_loss']:12.6f} {r['loss_rel']:9.1e} "
              f"{r['grad_norm']:9.4f} {r['grad_rel']:9.1e} {r['metric_rel']:9.1e}  {len(r['metrics_compared'])} "
              f"{'ok' if r['pass'] else 'FAIL'}")
    model_rows = part_model(torch, np)
    print(f"{'tiny llama (torch vs MLX)':28s} {'TRL loss':>12s} {'mlx_tune':>12s} {'loss rel':>9s} {'|dW|':>9s} "
          f"{'|dW| rel':>9s} {'worst W':>9s}  max |logps diff| {model_rows[0]['logps_max_abs_diff']:.1e}")
    for r in model_rows:
        print(f"{r['case']:28s} {r['trl_loss']:12.6f} {r['mlx_tune_loss']:12.6f} {r['loss_rel']:9.1e} "
              f"{r['grad_norm']:9.4f} {r['grad_rel']:9.1e} {r['worst_tensor_grad_rel']:9.1e}  "
              f"{'ok' if r['pass'] else 'FAIL'}")
    failed = [r["case"] for r in rows + model_rows if not r["pass"]]
    import transformers
    write_json_atomic(RESULTS, {"trl": trl.__version__, "torch": torch.__version__,
                                "transformers": transformers.__version__, "tolerance_rel": RTOL,
                                "losses": rows, "model": model_rows, "pass": not failed})
    print(f"TRL preference agreement: {'pass' if not failed else 'FAIL ' + ', '.join(failed)} ({RESULTS.name})")
    worst_losses = max(max(r["loss_rel"], r["grad_rel"], r["metric_rel"]) for r in rows)
    worst_model = max(max(r["loss_rel"], r["grad_rel"], r["worst_tensor_grad_rel"]) for r in model_rows)
    rival = f"Hugging Face TRL {trl.__version__}"
    # bench/run_all.py reads this last JSON value
    print(json.dumps({"targets": [
        {"name": "preference losses vs TRL's trainer code: worst relative difference (loss, dL/dlogp, metrics)",
         "measured": worst_losses, "target": RTOL, "unit": "", "rival": rival,
         "pass": all(r["pass"] for r in rows)},
        {"name": "preference losses on the tiny llama, torch vs MLX: worst relative difference (loss, dL/dW)",
         "measured": worst_model, "target": RTOL, "unit": "", "rival": rival,
         "pass": all(r["pass"] for r in model_rows)}]}))
    return 0 if not failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
