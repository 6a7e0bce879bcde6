#!/usr/bin/env python3
"""Benchmark: DPO step throughput and peak memory, mlx_tune vs mlx-lm-lora vs TRL (torch CPU).

Same model (SmolLM2-135M-Instruct: the shipped Q4_1 GGUF dequantized once to a float32
Hugging Face folder, ``bench_train.export_hf``), same pairs (``data/dpo_demo_raw/pairs.jsonl``
converted by ``data_transform.py``, tokenized once by ``mlx_tune.data.pairs.load_pairs``; the
pairs of one packed batch of ``PairStream`` go to every side as the same token ids and
response masks), same settings (LoRA r16, alpha 32, on every linear of every block,
DPO sigmoid loss with beta 0.1, AdamW lr 1e-5, no dropout), each side in its own process:

- ``mlx_tune``: ``training.loop.Step`` over ``preference.method_loss("dpo")``: chosen and
  rejected packed in one forward pass as the trainer lays them out (shared-prefix rows:
  each pair's prompt once, both answers after it, so the batch's rows hold more pairs;
  ``--plain-rows``: the batch and layout before, both sequences whole),
  the vocabulary head only on response tokens, the reference the same weights with the
  adapter off (a second, gradient-free forward).
- ``mlx_tune precomputed``: the same with ``preference.precompute_reference``: reference
  log-probs computed once (``preference.reference_logps``, not timed) and fed in.
- ``mlx_tune SFT``: an SFT step (``losses.batch_loss``, trained positions gathered) on the
  same pairs' chosen sides, packed into ``max_seq_length`` rows: the cost a DPO step is
  compared with.
- ``mlx-lm-lora``: its DPO step as ``mlx_lm_lora.trainer.dpo_trainer.train_dpo`` builds it
  (``get_token_scores`` / ``compute_score`` / ``dpo_loss``, one compiled step over model,
  optimizer and random state), on its own loader (``mlx_lm_lora.utils.from_pretrained``,
  LoRA via mlx-lm) and its own reference model (a second copy, as its ``train.py`` loads),
  its batches from its ``iterate_dpo_batches`` (chosen and rejected as separate padded rows).
- ``trl``: ``trl.DPOTrainer`` with a PEFT LoRA config (reference = adapter disabled, as
  ours), torch CPU fp32; timed is ``trainer.training_step`` (forward, loss, backward) plus
  the optimizer step of ``trainer.create_optimizer()`` on batches of its own collator.

mlx-lm-lora and TRL run with the rivals' Python (``.venv-rivals``: bench/install_rivals.sh,
``pip install --no-deps mlx-lm-lora``; or ``MLX_TUNE_RIVALS_PYTHON``); a side whose package
is missing is reported as skipped. Tokens/s counts every real position of both sides of
every pair (prompt included). Peak memory: ``mx.get_peak_memory()`` on the MLX sides and
the process's peak RSS on all.

    python bench/bench_preference.py [--quick] [--steps N] [--rival-steps N] [--batch-rows R] [--plain-rows]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_train import MODEL, compiled_step, export_hf, mlx_tune_step, print_table, rss_gb, run_side, timed  # noqa: E402
from benchlib import add_side_flags, rival_python, run_child  # noqa: E402

RAW_PAIRS = ROOT / "data" / "dpo_demo_raw" / "pairs.jsonl"
SEQ, RANK, ALPHA, LR, BETA = 256, 16, 32.0, 1e-5, 0.1
ROWS = 4  # packed rows of 2 x SEQ slots per step (the DPO demo's batch: about 8 pairs a row whole, 15 shared)
LORA_TARGET, TRL_TARGET, SFT_RATIO_GOAL = 2.0, 1.5, 1.3
SIDES = ("mlx_tune", "mlx_tune_pre", "mlx_tune_sft", "mlx_lm_lora", "trl")


# ---------------------------------------------------------------------------
# Data: the pairs of one batch, the same token ids for every side
# ---------------------------------------------------------------------------


def make_pairs(out: Path, work: Path, tokenizer, rows: int, shared: bool = True) -> dict:
    """Convert the raw pairs (data_transform.py), tokenize them, take one packed batch of
    ``rows`` rows as the trainer batches them for SmolLM2 (``shared``: shared-prefix rows,
    each pair counted by its prompt once, so more pairs fill the rows); save its pairs (ids,
    response masks) and its row layout as JSON."""
    from mlx_tune.data.pair_batches import PairStream
    from mlx_tune.data.pairs import load_pairs

    conv = work / "pairs"
    subprocess.run([sys.executable, str(ROOT / "data_transform.py"), str(RAW_PAIRS), "--out", str(conv),
                    "--valid-ratio", "0", "--test-ratio", "0", "--force"], check=True, capture_output=True, cwd=ROOT)
    ds = load_pairs(conv / "train.jsonl", tokenizer, max_seq_length=SEQ, use_cache=False)
    stream = PairStream(ds, rows, SEQ, packing=True, seed=0, shared=shared)
    layout = stream.batch_rows(0)
    pairs, new_rows = [], []
    for row in layout:
        new_rows.append([])
        for u in row:
            c, r = ds.units[u]
            new_rows[-1].append(len(pairs))
            pairs.append({side: {"ids": ds.ids[s].tolist(), "mask": ds.train[s].astype(int).tolist()}
                          for side, s in (("chosen", c), ("rejected", r))})
    data = {"pairs": pairs, "rows": new_rows, "shared": shared}
    out.write_text(json.dumps(data))
    return {"n_pairs": len(pairs), "n_tokens": n_positions(data),
            "n_response": sum(sum(p[s]["mask"][1:]) for p in pairs for s in ("chosen", "rejected")),
            "n_chosen": sum(len(p["chosen"]["ids"]) - 1 for p in pairs)}


def n_positions(data: dict) -> int:
    """Real positions of a step: every token but the first of each sequence, both sides."""
    return sum(len(p[s]["ids"]) - 1 for p in data["pairs"] for s in ("chosen", "rejected"))


def pair_dataset(data: dict):
    """The batch's pairs as an mlx_tune PairDataset (sequences 2k, 2k + 1 = pair k)."""
    import numpy as np

    from mlx_tune.data.pairs import PairDataset

    ids, train = [], []
    for p in data["pairs"]:
        for s in ("chosen", "rejected"):
            ids.append(np.array(p[s]["ids"], dtype=np.int32))
            train.append(np.array(p[s]["mask"], dtype=bool))
    return PairDataset(ids=ids, train=train, units=[(2 * k, 2 * k + 1) for k in range(len(data["pairs"]))],
                       kind="pairs")


# ---------------------------------------------------------------------------
# The sides (each in its own process)
# ---------------------------------------------------------------------------


def _mlx_tune_model(hf_dir: str):
    import mlx.core as mx
    import mlx.optimizers as optim

    from mlx_tune import adapters
    from mlx_tune.config import LoraConfig
    from mlx_tune.model import quant
    from mlx_tune.model.loading import load_model

    model, tokenizer, _ = load_model(hf_dir)
    quant.prepare_for_backend(model)
    mx.random.seed(0)
    adapters.inject(model, LoraConfig(rank=RANK, alpha=ALPHA, dropout=0.0, target_modules="all-linear"))
    return model, tokenizer, optim.AdamW(learning_rate=LR)


def side_mlx_tune(data: dict, steps: int, hf_dir: str, precompute: bool) -> dict:
    """mlx_tune's DPO step: live reference (adapter off), or precomputed reference log-probs;
    the batch laid out as the trainer lays it out for this model (shared-prefix rows where
    ``packing.shares_prefix``; ``--plain-rows``: both sequences of a pair whole, as before)."""
    import time

    import mlx.core as mx

    from mlx_tune.config import PreferenceConfig
    from mlx_tune.data import batching
    from mlx_tune.data.pair_batches import collate_units
    from mlx_tune.model.packing import shares_prefix
    from mlx_tune.training.preference import method_loss, reference_logps

    model, tokenizer, opt = _mlx_tune_model(hf_dir)
    ds = pair_dataset(data)
    pad = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
    shared = data["shared"] and shares_prefix(model, 2 * SEQ)
    # the batch's rows (packed by the shared length when chosen so; re-packed whole if the model cannot share)
    rows = data["rows"] if shared == data["shared"] else batching.pack(ds.lengths(), 2 * SEQ)
    batch = collate_units(ds, rows, True, 2 * SEQ, pad, shared=shared)
    pre_s = None
    if precompute:  # once per dataset in a run (cached beside the token cache): not a step cost
        tic = time.perf_counter()
        ref = reference_logps(model, [batch], len(ds.ids))
        pre_s = time.perf_counter() - tic
        batch = collate_units(ds, rows, True, 2 * SEQ, pad, ref=ref, shared=shared)
    loss = method_loss("dpo", PreferenceConfig(beta=BETA, loss_type="sigmoid"))
    out = timed(mlx_tune_step(model, opt, loss, batch), steps, mx)
    out["layout"] = {"shared": shared, "rows": len(rows), "positions": int((batch.segment_ids >= 0).sum().item())}
    if pre_s is not None:
        out["precompute_s"] = pre_s
    return out


def side_mlx_tune_sft(data: dict, steps: int, hf_dir: str) -> dict:
    """mlx_tune's SFT step on the chosen sides (prompt + chosen, loss on the response)."""
    from types import SimpleNamespace

    import mlx.core as mx
    import numpy as np

    from mlx_tune.data import batching
    from mlx_tune.training.losses import batch_loss

    model, tokenizer, opt = _mlx_tune_model(hf_dir)
    ids = [np.array(p["chosen"]["ids"], dtype=np.int32) for p in data["pairs"]]
    train = [np.array(p["chosen"]["mask"], dtype=bool) for p in data["pairs"]]
    rows = batching.pack(np.array([len(x) - 1 for x in ids]), SEQ)
    pad = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
    batch = batching.collate(SimpleNamespace(ids=ids, train=train), rows, SEQ, True, pad)
    out = timed(mlx_tune_step(model, opt, batch_loss, batch), steps, mx)
    out["n_tokens"] = batch.n_tokens
    return out


def side_mlx_lm_lora(data: dict, steps: int, hf_dir: str) -> dict:
    """mlx-lm-lora's DPO step, built as ``train_dpo`` builds it (no accumulation)."""
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_lm_lora.train import load_reference_model
    from mlx_lm_lora.trainer.dpo_trainer import compute_score, dpo_loss, get_token_scores, iterate_dpo_batches
    from mlx_lm_lora.utils import from_pretrained

    mx.random.seed(0)
    n_layers = json.loads((Path(hf_dir) / "config.json").read_text())["num_hidden_layers"]
    model, _, _ = from_pretrained(hf_dir, lora_config={"rank": RANK, "dropout": 0.0, "scale": ALPHA / RANK,
                                                       "use_dora": False, "num_layers": n_layers})
    ref_model = load_reference_model(argparse.Namespace(reference_model_path=hf_dir, model=hf_dir))
    opt = optim.AdamW(learning_rate=LR)
    loss_type = "sigmoid"

    def loss_wrapper(_model, chosen, rejected, chosen_masks, rejected_masks):  # train_dpo's, as it is there
        pc = compute_score(get_token_scores(model, chosen, chosen_masks), chosen_masks, loss_type)
        pr = compute_score(get_token_scores(model, rejected, rejected_masks), rejected_masks, loss_type)
        rc = compute_score(mx.stop_gradient(get_token_scores(ref_model, chosen, chosen_masks)), chosen_masks, loss_type)
        rr = compute_score(mx.stop_gradient(get_token_scores(ref_model, rejected, rejected_masks)), rejected_masks,
                           loss_type)
        return dpo_loss(policy_chosen_score=pc, policy_rejected_score=pr, reference_chosen_score=rc,
                        reference_rejected_score=rr, chosen_masks=chosen_masks, rejected_masks=rejected_masks,
                        beta=BETA, delta=50.0, loss_type=loss_type)

    # its dataset rows: whole sequences and the prompt length (its mask is 1 after the prompt)
    rows = [{"chosen": p["chosen"]["ids"], "rejected": p["rejected"]["ids"],
             "chosen_prompt_length": p["chosen"]["mask"].index(1),
             "rejected_prompt_length": p["rejected"]["mask"].index(1)} for p in data["pairs"]]
    batch = next(iterate_dpo_batches(rows, len(rows), SEQ + 1))
    return timed(compiled_step(model, opt, loss_wrapper, *batch), steps, mx)


def side_trl(data: dict, steps: int, hf_dir: str) -> dict:
    """TRL's DPOTrainer (PEFT LoRA, reference = adapter off): training_step + optimizer step."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    peft_cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear",
                          task_type="CAUSAL_LM")
    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(output_dir=tmp, per_device_train_batch_size=len(data["pairs"]), learning_rate=LR,
                         beta=BETA, loss_type=["sigmoid"], max_length=SEQ, report_to=[], use_cpu=True,
                         save_strategy="no", logging_strategy="no", dataloader_num_workers=0, bf16=False,
                         optim="adamw_torch", max_steps=1)
        # The trainer needs a dataset to build; the timed batches are the shared token ids.
        stub = Dataset.from_list([{"prompt": "Hello.", "chosen": "Yes.", "rejected": "No."}])
        trainer = DPOTrainer(model=model, args=args, train_dataset=stub, processing_class=tokenizer,
                             peft_config=peft_cfg)
        examples = []
        for p in data["pairs"]:
            cut = p["chosen"]["mask"].index(1)
            assert p["chosen"]["ids"][:cut] == p["rejected"]["ids"][:cut]
            examples.append({"prompt_ids": p["chosen"]["ids"][:cut], "chosen_ids": p["chosen"]["ids"][cut:],
                             "rejected_ids": p["rejected"]["ids"][cut:]})
        inputs = trainer.data_collator(examples)
        opt = trainer.create_optimizer()
        trainer.current_gradient_accumulation_steps = 1  # what Trainer's loop sets before its steps
        trainer.model.train()

        def one() -> float:
            loss = trainer.training_step(trainer.model, inputs)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss)

        out = timed(one, steps, None)
    out["rss_gb"] = rss_gb()
    return out


# ---------------------------------------------------------------------------
# The parent
# ---------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one packed row of pairs, the first 4 blocks, few steps (a smoke run)")
    p.add_argument("--steps", type=int, help="timed steps per mlx side (default 8, quick 1)")
    p.add_argument("--rival-steps", type=int, help="timed steps for TRL (default 3, quick 1)")
    p.add_argument("--batch-rows", type=int, help=f"packed rows of 2 x {SEQ} slots per step (default {ROWS}, quick 1)")
    p.add_argument("--layers", type=int, help="keep only the first N of the 30 blocks (quick: 4; a smoke run, "
                                              "not a measurement)")
    p.add_argument("--plain-rows", action="store_true",
                   help="the bench as before shared prefixes: the batch packed and laid out with both sequences of "
                        "a pair whole (each prompt run twice)")
    add_side_flags(p, SIDES)
    args = p.parse_args(argv)

    if args.side:
        return run_child(args.side, args.rows, {
            "mlx_tune": lambda data: side_mlx_tune(data, args.steps, args.hf_dir, precompute=False),
            "mlx_tune_pre": lambda data: side_mlx_tune(data, args.steps, args.hf_dir, precompute=True),
            "mlx_tune_sft": lambda data: side_mlx_tune_sft(data, args.steps, args.hf_dir),
            "mlx_lm_lora": lambda data: side_mlx_lm_lora(data, args.steps, args.hf_dir),
            "trl": lambda data: side_trl(data, args.steps, args.hf_dir),
        }, torch_sides=("trl",))
    return run_parent(args)


def run_parent(args) -> int:
    from mlx_tune.runtime.blas import ensure_fast_blas

    ensure_fast_blas()
    if not MODEL.is_file() or not RAW_PAIRS.is_file():
        print(f"skipped: {MODEL} or {RAW_PAIRS} not present")
        print(json.dumps({"targets": []}))
        return 0
    steps = args.steps or (1 if args.quick else 8)
    rival_steps = args.rival_steps or (1 if args.quick else 3)
    rows = args.batch_rows or (1 if args.quick else ROWS)
    layers = args.layers or (4 if args.quick else None)
    results: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        hf = work / "hf"
        tokenizer = export_hf(hf, layers)
        data_path = work / "pairs.json"
        info = make_pairs(data_path, work, tokenizer, rows, shared=not args.plain_rows)
        n_tokens = info["n_tokens"]
        print(f"data: {info['n_pairs']} pairs in {rows} packed row(s) of 2 x {SEQ} slots, {n_tokens} real positions "
              f"({info['n_response']} response tokens); LoRA all-linear r={RANK}, DPO sigmoid beta {BETA}, "
              f"AdamW lr {LR}; timed steps: mlx {steps}, TRL {rival_steps}"
              + (f"; SMOKE RUN: the first {layers} of 30 blocks only" if layers else ""), flush=True)
        extra = ["--hf-dir", str(hf)]
        for side in ("mlx_tune", "mlx_tune_pre", "mlx_tune_sft"):
            results[side] = run_side(sys.executable, side, data_path, steps, extra, 1800, script=__file__)
            layout = results[side].get("layout")
            where = "" if layout is None else (
                f" ({'shared-prefix' if layout['shared'] else 'plain'} rows: {layout['rows']} row(s), "
                f"{layout['positions']} positions run)")
            print(f"{side}: {results[side]['step_s']:.2f} s/step{where}", flush=True)
        for side, module, n, label in (("mlx_lm_lora", "mlx_lm_lora", steps, "mlx-lm-lora"),
                                       ("trl", "trl, peft, torch", rival_steps, "TRL")):
            python = rival_python(module)
            if python is None:
                skipped[side] = f"skipped: {label} not installed (bench/install_rivals.sh; pip install mlx-lm-lora)"
                print(skipped[side])
                continue
            try:
                results[side] = run_side(python, side, data_path, n, extra, 3000, script=__file__)
            except RuntimeError as exc:  # a rival that fails is reported, not fatal
                skipped[side] = f"failed: {exc}"
                print(f"{side}: {skipped[side]}", flush=True)
                continue
            print(f"{side}: {results[side]['step_s']:.2f} s/step", flush=True)
    return report(results, skipped, n_tokens, info)


def report(results: dict, skipped: dict, n_tokens: int, info: dict) -> int:
    for r in results.values():
        r["tokens_per_sec"] = r.get("n_tokens", n_tokens) / r["step_s"]
    names = {"mlx_tune": "mlx_tune (live ref)", "mlx_tune_pre": "mlx_tune (precomputed ref)",
             "mlx_tune_sft": "mlx_tune SFT (chosen)", "mlx_lm_lora": "mlx-lm-lora", "trl": "TRL (torch CPU)"}
    print_table([(names[name], r) for name, r in results.items()], digits=4)
    if "precompute_s" in results.get("mlx_tune_pre", {}):
        print(f"(precomputing the reference log-probs of these pairs: {results['mlx_tune_pre']['precompute_s']:.2f} s, "
              "once per dataset)")
    print("(tokens/s: both sides of every pair, prompt included; the SFT row counts its chosen sides only)")
    targets = []
    best = max(("mlx_tune", "mlx_tune_pre"), key=lambda k: results[k]["tokens_per_sec"])
    ours = results[best]
    if "mlx_lm_lora" in results:
        lo = results["mlx_lm_lora"]
        ratio = ours["tokens_per_sec"] / lo["tokens_per_sec"]
        live = results["mlx_tune"]["tokens_per_sec"] / lo["tokens_per_sec"]
        print(f"\nmlx_tune / mlx-lm-lora DPO tokens/s: {live:.2f}x live reference, "
              f"{results['mlx_tune_pre']['tokens_per_sec'] / lo['tokens_per_sec']:.2f}x precomputed "
              f"(goal >= {LORA_TARGET}x at no more peak memory)")
        targets += [
            {"name": "DPO tokens/s vs mlx-lm-lora (SmolLM2-135M dense, LoRA r16 all-linear, live reference)",
             "measured": round(live, 3), "target": LORA_TARGET, "unit": "x", "rival": "mlx-lm-lora",
             "pass": live >= LORA_TARGET, "mlx_tune_tokens_per_sec": round(results["mlx_tune"]["tokens_per_sec"], 1),
             "rival_tokens_per_sec": round(lo["tokens_per_sec"], 1)},
            {"name": f"DPO tokens/s vs mlx-lm-lora (best mlx_tune: {names[best]})", "measured": round(ratio, 3),
             "target": LORA_TARGET, "unit": "x", "rival": "mlx-lm-lora", "pass": ratio >= LORA_TARGET},
            {"name": "DPO MLX peak memory vs mlx-lm-lora (live reference)",
             "measured": round(results["mlx_tune"]["mlx_peak_gb"], 3), "target": round(lo["mlx_peak_gb"], 3),
             "unit": "GB", "rival": "mlx-lm-lora", "pass": results["mlx_tune"]["mlx_peak_gb"] <= lo["mlx_peak_gb"]},
            {"name": "DPO peak RSS vs mlx-lm-lora (live reference)", "measured": round(results["mlx_tune"]["rss_gb"], 3),
             "target": round(lo["rss_gb"], 3), "unit": "GB", "rival": "mlx-lm-lora",
             "pass": results["mlx_tune"]["rss_gb"] <= lo["rss_gb"]},
        ]
    if "trl" in results:
        tr = results["trl"]
        r2 = results["mlx_tune"]["tokens_per_sec"] / tr["tokens_per_sec"]
        print(f"mlx_tune (live reference) / TRL DPOTrainer (torch CPU fp32) tokens/s: {r2:.2f}x (goal >= {TRL_TARGET}x)")
        targets.append({"name": "DPO tokens/s vs TRL DPOTrainer (torch CPU fp32, PEFT LoRA, live reference)",
                        "measured": round(r2, 3), "target": TRL_TARGET, "unit": "x", "rival": "trl",
                        "pass": r2 >= TRL_TARGET, "rival_tokens_per_sec": round(tr["tokens_per_sec"], 1)})
    cost = results["mlx_tune_pre"]["step_s"] / results["mlx_tune_sft"]["step_s"]
    cpu_cost = results["mlx_tune_pre"]["cpu_s"] / results["mlx_tune_sft"]["cpu_s"]
    run = results["mlx_tune_pre"].get("layout", {}).get("positions", n_tokens)
    print(f"mlx_tune DPO step (precomputed reference) / SFT step on the chosen sides: {cost:.2f}x wall, "
          f"{cpu_cost:.2f}x CPU seconds (goal <= {SFT_RATIO_GOAL}x; the DPO step runs {run} positions for the "
          f"pairs' {n_tokens}, the SFT step {info['n_chosen']})")
    targets.append({"name": "DPO step (precompute_reference) / SFT step on the same pairs' chosen sides",
                    "measured": round(cost, 3), "target": SFT_RATIO_GOAL, "unit": "x", "rival": None,
                    "pass": cost <= SFT_RATIO_GOAL, "cpu_seconds_ratio": round(cpu_cost, 3)})
    for side, why in skipped.items():
        targets.append({"name": f"DPO vs {names[side]}", "measured": None, "target": "runs", "unit": "",
                        "rival": names[side], "pass": None, "note": why[:300]})
    print(json.dumps({"targets": targets}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
