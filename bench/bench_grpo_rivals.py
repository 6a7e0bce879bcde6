#!/usr/bin/env python3
"""Benchmark: mlx_tune's GRPO against mlx-lm-lora's on the same model, prompts and settings.

Same model (SmolLM2-135M-Instruct: ours from the shipped Q4_1 GGUF as configs/grpo-demo.yaml
trains it, and from the same GGUF dequantized once to a float32 Hugging Face folder,
``bench_train.export_hf``, which is what mlx-lm-lora loads; ``--rival-q4`` adds mlx-lm-lora's
own 4-bit QLoRA of that folder), same prompts (data/grpo_demo/train.jsonl: the system prompt
SmolLM2's template inserts is given to mlx-lm-lora explicitly, so both decode from the same
token ids, checked), same rewards (data/grpo_demo/rewards.py, called in each one's convention),
same settings: ``--prompts`` prompts x ``--generations`` completions of at most ``--tokens``
tokens per optimizer step, temperature 1, no top-p / top-k, LoRA rank 16 / alpha 32 on every
linear layer of the top 16 blocks, dropout 0, learning rate ``--lr`` (constant), beta 0 (no
reference model), epsilon 0.2, loss_type bnpo (mlx-lm-lora has grpo, bnpo, dr_grpo; not dapo),
one generation batch per optimizer step.

Each side runs in its own process (its own peak memory), ``--steps`` timed optimizer steps after
one warm-up step:

- ``mlx_tune`` / ``mlx_tune_hf``: ``training.run.run_train`` (train.method grpo), read back from
  its metrics.jsonl (step and generation time, trained tokens); ``--grad-checkpoint`` adds both
  with ``train.grad_checkpoint: true`` (``mlx_tune_ckpt``, ``mlx_tune_hf_ckpt``).
- ``mlx_lm_lora`` (``--rival-q4``: ``mlx_lm_lora_q4``): ``mlx_lm_lora.trainer.grpo_trainer.train_grpo``
  as ``mlx_lm_lora.train`` calls it (``GRPOTrainingArgs`` with the settings above), timed per
  iteration by its training callback; its ``generate_grpo`` is wrapped (module global) to time
  generation and count the generated tokens.

Reported per side: completions per second per optimizer step (completions / step time),
generation tokens/s (generated tokens / generation time), training tokens/s (prompt +
completion tokens / the rest of the step), MLX peak memory and peak RSS; ours / theirs as
ratios. Goals (issue 20): >= 2x mlx-lm-lora's completions/s per optimizer step at no more
peak memory. Plus ``bench_grpo.generation``: our in-loop generator against our server's
batched decode at the same batch size (goal: at least as fast per token).

mlx-lm-lora comes from the rivals environment (``make bench-rivals``: .venv-rivals, or
``MLX_TUNE_RIVALS_PYTHON``; ``pip install --no-deps mlx-lm-lora`` beside mlx_tune's mlx-lm is
enough); without it its side is reported as skipped.

    scripts/python bench/bench_grpo_rivals.py [--steps 5] [--prompts 4 --generations 8 --tokens 12]
        [--grad-checkpoint] [--json OUT]
    scripts/python bench/bench_grpo_rivals.py --quick        # a smoke run: 2 steps, 2 x 4 completions of 8 tokens
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_train import export_hf, rss_gb, run_side  # noqa: E402
from benchlib import MODEL, add_side_flags, rival_python  # noqa: E402

from mlx_tune.atomic import write_text_atomic  # noqa: E402

DATA = ROOT / "data" / "grpo_demo"
RANK, ALPHA, LAYERS = 16, 32.0, 16
SIDES = ("mlx_tune", "mlx_tune_hf", "mlx_tune_ckpt", "mlx_tune_hf_ckpt", "mlx_lm_lora", "mlx_lm_lora_q4")
OURS = tuple(s for s in SIDES if s.startswith("mlx_tune"))


def _rewards():
    """The demo's reward functions (data/grpo_demo/rewards.py) and weights, from configs/grpo-demo.yaml."""
    import importlib.util

    import yaml

    cfg = yaml.safe_load((ROOT / "configs" / "grpo-demo.yaml").read_text())
    names = [spec.rsplit(":", 1)[1] for spec in cfg["grpo"]["reward_functions"]]
    spec = importlib.util.spec_from_file_location("grpo_demo_rewards", DATA / "rewards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return names, [getattr(module, n) for n in names], cfg["grpo"].get("reward_weights")


def _rows(n: int) -> list[dict]:
    return [json.loads(x) for x in (DATA / "train.jsonl").read_text().splitlines()[:n]]


def side_mlx_tune(args, model_path: str, grad_checkpoint: bool = False) -> dict:
    import yaml

    from mlx_tune.config import load_config
    from mlx_tune.training.run import run_train

    names, _, _ = _rewards()
    steps = args.steps + 1
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"  # train.jsonl only: no held-out evaluation inside the timed steps
        data.mkdir()
        rows = _rows(args.prompts * steps)
        (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        cfg = yaml.safe_load((ROOT / "configs" / "grpo-demo.yaml").read_text())
        cfg.update(model=model_path, data=str(data), output_dir=str(Path(tmp) / "out"))
        cfg.pop("eval", None)
        cfg["lora"].update(rank=RANK, alpha=ALPHA, dropout=0.0, layers=LAYERS, target_modules="all-linear")
        cfg["train"].update(iters=steps, batch_size=args.prompts, learning_rate=args.lr, test=False,
                            save_every=10**6, optimizer="adamw", weight_decay=0.0, grad_checkpoint=grad_checkpoint)
        cfg["grpo"].update(reward_functions=[f"{DATA / 'rewards.py'}:{n}" for n in names],
                           num_generations=args.generations, max_completion_length=args.tokens, temperature=1.0,
                           top_p=1.0, beta=0.0, epsilon=0.2, loss_type="bnpo")
        path = Path(tmp) / "c.yaml"
        path.write_text(yaml.safe_dump(cfg))
        run_train(load_config(path), log=lambda m: None)
        got = [json.loads(x) for x in (Path(tmp) / "out" / "metrics.jsonl").read_text().splitlines()]
    got = [r for r in got if "loss" in r]
    trained = [b["trained_tokens"] - a["trained_tokens"] for a, b in zip(got, got[1:])]
    timed = got[1:]  # the first step warms up
    return _summary(args, [r["step_time_s"] for r in timed], [r["generation_time_s"] for r in timed],
                    [r["completion_length"] * args.prompts * args.generations for r in timed], trained,
                    max(r["peak_memory_gb"] for r in got), [r["reward_mean"] for r in got])


def side_mlx_lm_lora(args, hf_dir: str, q4: bool) -> dict:
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_lm_lora.trainer import grpo_trainer
    from mlx_lm_lora.trainer.datasets import GRPODataset
    from mlx_lm_lora.trainer.grpo_trainer import GRPOTrainingArgs, train_grpo
    from mlx_lm_lora.utils import from_pretrained

    from mlx_tune.training import grpo_rollout

    mx.random.seed(0)
    model, tokenizer, _ = from_pretrained(hf_dir, lora_config={"rank": RANK, "dropout": 0.0, "scale": ALPHA / RANK,
                                                               "use_dora": False, "num_layers": LAYERS},
                                          quantized_load={"bits": 4, "group_size": 32} if q4 else None)
    steps = args.steps + 1
    rows = _rows(args.prompts * steps)
    # SmolLM2's template inserts this system prompt when there is none; mlx-lm-lora always writes
    # one (its own default asks for <think>/<answer>), so give it the same text.
    system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    data = [{"prompt": r["messages"][-1]["content"], "answer": r["answer"], "system": system} for r in rows]
    dataset = GRPODataset(data, tokenizer)
    ours = grpo_rollout.encode_prompt(tokenizer, rows[0])
    same_prompt = list(dataset[0][0]) == list(ours)
    names, fns, weights = _rewards()

    def wrap(name, fn):  # its convention: (prompts, completions, answer, types) with text completions
        def reward(prompts, completions, answer, types=None):
            return [float(v) for v in fn(prompts, completions, answer=answer)]
        reward.__name__ = name
        return reward

    gen_s, gen_tokens = [], []
    generate = grpo_trainer.generate_grpo

    def timed_generate(*a, **kw):
        tic = time.perf_counter()
        completions, texts, indices = generate(*a, **kw)
        mx.eval(completions)
        gen_s.append(time.perf_counter() - tic)
        gen_tokens.append(sum(int(c.size) for c in completions))
        return completions, texts, indices

    grpo_trainer.generate_grpo = timed_generate
    marks: list[float] = []
    peaks: list[float] = []

    class Callback:
        def on_train_loss_report(self, info):
            marks.append(time.perf_counter())
            peaks.append(mx.get_peak_memory() / 2**30)
            rewards.append(info.get("train_total_rewards_mean"))

        def on_val_loss_report(self, info):
            pass

    rewards: list = []
    with tempfile.TemporaryDirectory() as tmp:
        targs = GRPOTrainingArgs(batch_size=args.prompts, iters=steps, steps_per_report=1, steps_per_eval=10**6,
                                 steps_per_save=10**6, adapter_file=str(Path(tmp) / "adapters.safetensors"),
                                 max_completion_length=args.tokens, beta=0.0, group_size=args.generations,
                                 epsilon=0.2, epsilon_high=0.2, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0,
                                 grpo_loss_type="bnpo", gradient_accumulation_steps=1, reward_weights=weights)
        start = time.perf_counter()
        train_grpo(model=model, ref_model=None, tokenizer=tokenizer, optimizer=optim.AdamW(learning_rate=args.lr),
                   train_dataset=dataset, val_dataset=None, reward_funcs=[wrap(n, f) for n, f in zip(names, fns)],
                   args=targs, training_callback=Callback(), end_answer_token="")
    step_s = [b - a for a, b in zip([start, *marks], marks)]
    prompt_lens = [len(dataset[i][0]) for i in range(len(dataset))]
    trained = [args.generations * sum(prompt_lens[k * args.prompts:(k + 1) * args.prompts]) + t
               for k, t in enumerate(gen_tokens)]  # its batches may come in another order: lengths are close
    out = _summary(args, step_s[1:], gen_s[1:], gen_tokens[1:], trained[1:], max(peaks), rewards)
    out["same_prompt_tokens"] = same_prompt
    return out


def _summary(args, step_s, gen_s, gen_tokens, trained, peak_gb, rewards) -> dict:
    n = args.prompts * args.generations
    mean = lambda xs: sum(xs) / max(1, len(xs))  # noqa: E731
    train_s = [s - g for s, g in zip(step_s, gen_s)]
    return {"steps": len(step_s), "step_s": mean(step_s), "completions_per_sec_per_step": n / mean(step_s),
            "generation_s": mean(gen_s), "generation_tokens_per_sec": sum(gen_tokens) / max(sum(gen_s), 1e-9),
            "training_tokens_per_sec": sum(trained[: len(train_s)]) / max(sum(train_s), 1e-9),
            "mlx_peak_gb": peak_gb, "rss_gb": rss_gb(), "rewards": rewards}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, help="timed optimizer steps per side, after one warm-up (default 5)")
    p.add_argument("--prompts", type=int, help="prompts per step (default 4, the demo's)")
    p.add_argument("--generations", type=int, help="completions per prompt (default 8)")
    p.add_argument("--tokens", type=int, help="max completion tokens (default 12)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--rival-q4", action="store_true", help="also mlx-lm-lora's 4-bit QLoRA of the float32 folder")
    p.add_argument("--grad-checkpoint", action="store_true",
                   help="also our two sides with train.grad_checkpoint (sides mlx_tune_ckpt, mlx_tune_hf_ckpt)")
    p.add_argument("--quick", action="store_true", help="2 steps of 2 x 4 completions of 8 tokens (a smoke run)")
    p.add_argument("--no-generation", action="store_true", help="skip the rollout vs server decode comparison")
    p.add_argument("--json")
    add_side_flags(p, SIDES)  # --rows unused (bench_train.run_side passes it)
    args = p.parse_args(argv)
    for key, full, quick in (("steps", 5, 1), ("prompts", 4, 2), ("generations", 8, 4), ("tokens", 12, 8)):
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)

    if args.side:
        from mlx_tune.runtime.blas import ensure_fast_blas

        ensure_fast_blas()
        if args.side.startswith("mlx_tune"):
            result = side_mlx_tune(args, args.hf_dir if "_hf" in args.side else str(MODEL),
                                   grad_checkpoint=args.side.endswith("_ckpt"))
        else:
            result = side_mlx_lm_lora(args, args.hf_dir, q4=args.side == "mlx_lm_lora_q4")
        print(json.dumps(result))
        return 0

    if not MODEL.is_file():
        print(f"skipped: {MODEL} not found")
        return 0
    settings = {k: getattr(args, k) for k in ("steps", "prompts", "generations", "tokens", "lr")}
    extra = [f"--{k}={v}" for k, v in settings.items() if k != "steps"]
    results: dict = {"settings": settings, "load_average": os.getloadavg()[0]}
    work = Path(tempfile.mkdtemp(prefix="bench_grpo_"))
    try:
        hf_dir = work / "hf"
        export_hf(hf_dir)
        extra.append(f"--hf-dir={hf_dir}")
        rival = rival_python("mlx_lm_lora")
        sides = (["mlx_tune", "mlx_tune_hf"] + (["mlx_tune_ckpt", "mlx_tune_hf_ckpt"] if args.grad_checkpoint else [])
                 + ["mlx_lm_lora"] + (["mlx_lm_lora_q4"] if args.rival_q4 else []))
        for side in sides:
            python = rival if side.startswith("mlx_lm_lora") else sys.executable
            if python is None:
                results[side] = {"skipped": "mlx-lm-lora not importable (make bench-rivals or MLX_TUNE_RIVALS_PYTHON)"}
                continue
            try:
                results[side] = run_side(python, side, work / "none", args.steps, extra, timeout=3600,
                                         script=__file__)
            except RuntimeError as exc:
                results[side] = {"failed": str(exc)}
            print(side, json.dumps(results[side]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not args.no_generation:
        from bench_grpo import generation

        results["generation"] = generation(argparse.Namespace(prompts=args.prompts, generations=args.generations,
                                                              tokens=args.tokens))
    report(results)
    if args.json:
        write_text_atomic(args.json, json.dumps(results, indent=1))
    return 0


def report(results: dict) -> None:
    s = results["settings"]
    print(f"\nGRPO, {s['prompts']} prompts x {s['generations']} completions (<= {s['tokens']} tokens) per optimizer "
          f"step, {s['steps']} timed steps (load average {results['load_average']:.1f} on {os.cpu_count()} cores)")
    print(f"{'side':<16} {'compl/s/step':>12} {'s/step':>8} {'gen tok/s':>10} {'train tok/s':>12} "
          f"{'MLX peak GB':>12} {'RSS GB':>8}")
    for side in SIDES:
        r = results.get(side)
        if not r or "step_s" not in r:
            if r:
                print(f"{side:<16} {next(iter(r.values()))[:100]}")
            continue
        print(f"{side:<16} {r['completions_per_sec_per_step']:>12.2f} {r['step_s']:>8.2f} "
              f"{r['generation_tokens_per_sec']:>10.1f} {r['training_tokens_per_sec']:>12.1f} "
              f"{r['mlx_peak_gb']:>12.2f} {r['rss_gb']:>8.2f}")
    theirs = results.get("mlx_lm_lora", {})
    for side in OURS:
        ours = results.get(side, {})
        if "step_s" in ours and "step_s" in theirs:
            ratio = {k: ours[k] / theirs[k] for k in ("completions_per_sec_per_step", "generation_tokens_per_sec",
                                                       "training_tokens_per_sec", "mlx_peak_gb")}
            print(f"{side} / mlx-lm-lora: completions/s per step x{ratio['completions_per_sec_per_step']:.2f} "
                  f"(goal >= 2), generation tok/s x{ratio['generation_tokens_per_sec']:.2f}, "
                  f"training tok/s x{ratio['training_tokens_per_sec']:.2f}, MLX peak x{ratio['mlx_peak_gb']:.2f} "
                  "(goal <= 1)")
            results[f"{side}_over_mlx_lm_lora"] = ratio
    if "same_prompt_tokens" in theirs:
        print(f"same prompt token ids on both sides: {theirs['same_prompt_tokens']}")
    g = results.get("generation")
    if g:
        print(f"in-loop generation {g['rollout']['tokens_per_sec']:.1f} tok/s vs server batched decode "
              f"{g['server']['tokens_per_sec']:.1f} tok/s at batch {s['prompts'] * s['generations']} "
              f"(x{g['rollout']['tokens_per_sec'] / g['server']['tokens_per_sec']:.2f}, goal >= 1)")
    print(json.dumps(results))


if __name__ == "__main__":
    sys.exit(main())
