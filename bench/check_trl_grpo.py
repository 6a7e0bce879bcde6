"""Check ``training.grpo_loss`` against TRL's own GRPO loss on fixed inputs.

Fixed per-token log-probs (policy, old policy, reference), a completion mask and rewards
go to TRL's ``GRPOTrainer._compute_loss`` (called unbound on a minimal object that has
only the attributes it reads; its ``_get_per_token_logps_and_entropies`` hands back the
fixed log-probs as a leaf tensor) and to ours. Compared, per ``loss_type`` x ``beta`` x
``grad_accumulation``/``steps_per_generation``: the loss, its gradient with respect to
the per-token log-probs, and the metrics TRL logs (``kl``, ``clip_ratio/*``); and the
advantages for each ``scale_rewards`` against TRL's formula with TRL's ``nanstd``.
Pass: every largest absolute difference <= 1e-5.

torch and trl are not installed next to mlx: the TRL side runs in ``--trl-python`` (e.g.
``python3 -m venv /tmp/trlvenv && /tmp/trlvenv/bin/pip install torch trl``) as a
subprocess that reads the inputs and writes its results as JSON.

    scripts/python bench/check_trl_grpo.py [--trl-python /tmp/trlvenv/bin/python] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CASES = [{"loss_type": lt, "beta": beta, "grad_accumulation": ga, "steps_per_generation": spg,
          "epsilon": 0.2, "epsilon_high": eh, "max_completion_length": 8}
         for lt, beta, (ga, spg), eh in itertools.product(
             ["grpo", "bnpo", "dr_grpo", "dapo"], [0.0, 0.04], [(1, 1), (2, 4)], [None, 0.28])]


def make_inputs(seed: int = 0) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    b, t = 8, 8
    logps = rng.normal(-2.0, 0.6, (b, t))
    lengths = rng.integers(1, t + 1, b)
    mask = (np.arange(t)[None, :] < lengths[:, None]).astype(float)
    rewards = rng.choice([0.0, 0.5, 1.0, 2.0], b)
    rewards[3] = np.nan
    return {"logps": logps.tolist(), "old_logps": (logps + rng.normal(0, 0.35, (b, t))).tolist(),
            "ref_logps": (logps + rng.normal(0, 0.25, (b, t))).tolist(), "mask": mask.tolist(),
            "rewards": rewards.tolist(), "num_generations": 4, "batch_tokens": float(mask.sum() * 2)}


# -- TRL's side (runs in the torch + trl Python) --------------------------------------
def trl_side(inputs: dict) -> dict:
    import types
    from collections import defaultdict

    import torch
    from trl import GRPOTrainer
    from trl.trainer.utils import nanstd

    def t(key):
        return torch.tensor(inputs[key], dtype=torch.float64)

    rewards, g = t("rewards"), inputs["num_generations"]
    advantages = {}
    for scale in ("group", "batch", "none"):  # GRPOTrainer._generate_and_score_completions, sum_then_normalize
        mean = torch.nanmean(rewards.view(-1, g), dim=1).repeat_interleave(g)
        std = nanstd(rewards).expand_as(rewards) if scale == "batch" else \
            nanstd(rewards.view(-1, g), dim=1).repeat_interleave(g)
        adv = rewards - mean
        if scale != "none":
            adv = adv / (std + 1e-4)
        advantages[scale] = torch.nan_to_num(adv, nan=0.0).tolist()

    adv = torch.tensor(advantages["group"], dtype=torch.float64)
    mask = t("mask")
    out = []
    for case in CASES:
        logps = t("logps").requires_grad_(True)
        eps_high = case["epsilon_high"] if case["epsilon_high"] is not None else case["epsilon"]

        class Acc:
            num_processes = 1
            reduce = staticmethod(lambda x, reduction="sum": x)
            gather = gather_for_metrics = staticmethod(lambda x: x)

        fake = types.SimpleNamespace(
            _get_per_token_logps_and_entropies=lambda *a, lp=logps, **k: (lp, torch.zeros_like(lp), None),
            aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
            importance_sampling_level="token", beta=case["beta"], loss_type=case["loss_type"],
            epsilon_low=case["epsilon"], epsilon_high=eps_high, use_vllm=False,
            vllm_importance_sampling_correction=False, model=types.SimpleNamespace(training=True),
            current_gradient_accumulation_steps=case["grad_accumulation"],
            max_completion_length=case["max_completion_length"], accelerator=Acc(), _entropy_bonus_enabled=False,
            _metrics=defaultdict(lambda: defaultdict(list)),
            args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None,
                                       steps_per_generation=case["steps_per_generation"]))
        n_prompt = 2
        batch = {"prompt_ids": torch.zeros(mask.shape[0], n_prompt, dtype=torch.long),
                 "prompt_mask": torch.ones(mask.shape[0], n_prompt, dtype=torch.long),
                 "completion_ids": torch.zeros(mask.shape, dtype=torch.long), "completion_mask": mask,
                 "advantages": adv, "old_per_token_logps": t("old_logps"), "ref_per_token_logps": t("ref_logps"),
                 "num_items_in_batch": torch.tensor(inputs["batch_tokens"], dtype=torch.float64)}
        loss = GRPOTrainer._compute_loss(fake, None, batch)
        loss.backward()
        metrics = {k: v[-1] for k, v in fake._metrics["train"].items() if k == "kl" or k.startswith("clip_ratio")}
        out.append({"case": case, "loss": loss.item(), "grad": logps.grad.tolist(), "metrics": metrics})
    import trl

    return {"trl_version": trl.__version__, "torch_version": torch.__version__, "advantages": advantages,
            "cases": out}


# -- our side --------------------------------------------------------------------------
def ours(inputs: dict) -> dict:
    sys.path.insert(0, str(ROOT))
    import mlx.core as mx

    from mlx_tune.training.grpo_loss import LossSettings, group_advantages, grpo_loss

    def a(key):
        return mx.array(inputs[key], dtype=mx.float32)

    rewards, g = a("rewards"), inputs["num_generations"]
    advantages = {s: group_advantages(rewards, g, s)[0].tolist() for s in ("group", "batch", "none")}
    adv = mx.array(advantages["group"])
    out = []
    for case in CASES:
        s = LossSettings(**case)

        def f(lp, s=s):
            return grpo_loss(lp, a("old_logps"), a("ref_logps"), adv, a("mask"), s, inputs["batch_tokens"])

        (loss, metrics), grad = mx.value_and_grad(lambda lp: f(lp))(a("logps"))
        metrics = {k: v.item() for k, v in metrics.items()}
        out.append({"case": case, "loss": loss.item(), "grad": grad.tolist(), "metrics": metrics})
    return {"advantages": advantages, "cases": out}


def max_diff(x, y) -> float:
    import numpy as np

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    return float(np.nanmax(np.abs(x - y))) if x.size else 0.0


def compare(mine: dict, theirs: dict) -> dict:
    worst = {f"advantages/{s}": max_diff(mine["advantages"][s], theirs["advantages"][s]) for s in mine["advantages"]}
    rows = []
    for m, t in zip(mine["cases"], theirs["cases"]):
        row = {"case": m["case"], "loss": max_diff(m["loss"], t["loss"]), "grad": max_diff(m["grad"], t["grad"])}
        missing = sorted(set(t["metrics"]) - set(m["metrics"]))
        row["metrics"] = max((max_diff(m["metrics"][k], t["metrics"][k]) for k in t["metrics"] if k in m["metrics"]),
                             default=0.0)
        row["metrics_missing"] = missing
        rows.append(row)
    worst.update({k: max(r[k] for r in rows) for k in ("loss", "grad", "metrics")})
    ok = all(v <= 1e-5 for v in worst.values()) and not any(r["metrics_missing"] for r in rows)
    return {"pass": ok, "worst": worst, "cases": len(rows), "trl_version": theirs.get("trl_version"),
            "torch_version": theirs.get("torch_version"), "rows": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trl-python", default="/tmp/trlvenv/bin/python")
    ap.add_argument("--json", help="write the comparison here")
    ap.add_argument("--trl-side", nargs=2, metavar=("IN", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.trl_side:
        Path(args.trl_side[1]).write_text(json.dumps(trl_side(json.loads(Path(args.trl_side[0]).read_text()))))
        return 0
    inputs = make_inputs()
    if not Path(args.trl_python).exists():
        print(f"skipped: {args.trl_python} not found (a Python with torch and trl; see the docstring)")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.json", Path(tmp) / "out.json"
        src.write_text(json.dumps(inputs))
        proc = subprocess.run([args.trl_python, __file__, "--trl-side", str(src), str(dst)], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            print("failed: the TRL side did not run")
            return 1
        theirs = json.loads(dst.read_text())
    result = compare(ours(inputs), theirs)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"TRL {result['trl_version']} (torch {result['torch_version']}), {result['cases']} loss cases: "
          + ", ".join(f"{k} {v:.2e}" for k, v in result["worst"].items()))
    print("pass" if result["pass"] else "FAIL (largest absolute difference > 1e-5)")
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
