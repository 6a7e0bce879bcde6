#!/usr/bin/env python3
"""Benchmark: GRPO on the demo model: generation inside the loop vs the server's batched
decode, and the cost of one GRPO optimizer step.

Same model (SmolLM2-135M-Instruct, the Q4_1 GGUF, LoRA r=16 on every linear layer of the
top 16 blocks, as configs/grpo-demo.yaml), same prompts (data/grpo_demo/train.jsonl),
``--prompts`` x ``--generations`` completions of at most ``--tokens`` tokens at
temperature 1 with per-completion seeds:

- ``rollout``: ``training.grpo_rollout.sample`` (the loop's generator: one BatchGenerator
  batch, each prompt prefilled once, the server's CPU layers swapped in).
- ``server``: the same requests through ``server.engine.Engine`` (``run_pending`` on this
  thread, as ``mlx-tune eval`` drives it; ``max_batch`` = all rows), i.e. what ``mlx-tune
  serve`` would do for them. Same seeds, so the same completions.
- ``step``: ``--steps`` whole GRPO optimizer steps of ``training.grpo.run_grpo`` (demo config,
  these sizes): completions per second per optimizer step, generation and training tokens/s
  and peak memory, read from its metrics.jsonl.

The goal (issue 20): rollout tokens/s >= server tokens/s at the same batch size. mlx-lm-lora's
GRPO on the same settings: bench/bench_grpo_rivals.py.

    scripts/python bench/bench_grpo.py [--prompts 4 --generations 4 --tokens 16 --steps 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mlx_tune.runtime.blas import ensure_fast_blas  # noqa: E402

ensure_fast_blas()

MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
DATA = ROOT / "data" / "grpo_demo" / "train.jsonl"


def _model():
    from mlx_tune import adapters
    from mlx_tune.config import LoraConfig
    from mlx_tune.model import quant
    from mlx_tune.model.loading import load_model

    model, tok, info = load_model(str(MODEL), None)
    quant.prepare_for_backend(model)
    adapters.inject(model, LoraConfig(rank=16, alpha=32, dropout=0.0, target_modules="all-linear", layers=16))
    return model, tok, info


def generation(args) -> dict:
    from mlx_tune.evaluation.live import serving_layers
    from mlx_tune.server.engine import Done, Engine, GenRequest
    from mlx_tune.server.registry import ModelRegistry
    from mlx_tune.training import grpo_rollout

    model, tok, info = _model()
    rows = grpo_rollout.read_prompt_rows(DATA)[: args.prompts]
    prompts = [grpo_rollout.encode_prompt(tok, r) for r in rows for _ in range(args.generations)]
    seeds = [grpo_rollout.completion_seed(0, 0, j) for j in range(len(prompts))]
    out = {}
    with serving_layers(model, 2**30):
        grpo_rollout.sample(model, tok, prompts[:2], seeds[:2], max_tokens=2, temperature=1.0, top_p=1.0,
                            swap_budget=None)  # warm-up
        tic = time.perf_counter()
        got = grpo_rollout.sample(model, tok, prompts, seeds, max_tokens=args.tokens, temperature=1.0, top_p=1.0,
                                  max_batch=len(prompts), swap_budget=None)
        dt = time.perf_counter() - tic
        n = sum(len(c.ids) for c in got)
        out["rollout"] = {"seconds": dt, "tokens": n, "tokens_per_sec": n / dt}

        registry = ModelRegistry(model, tok, info, max_loras=8)
        registry.add_resident("default")
        engine = Engine(registry, max_batch=len(prompts), max_queue=1 << 30)
        counts = [0] * len(prompts)

        def collect(i):
            def emit(event):
                if isinstance(event, Done):
                    counts[i] = event.completion_tokens
            return emit

        model.eval()
        tic = time.perf_counter()
        for i, (p, s) in enumerate(zip(prompts, seeds)):
            engine.submit(GenRequest(prompt=p, adapter="default", max_tokens=args.tokens, temperature=1.0, seed=s),
                          collect(i))
        engine.run_pending()
        dt = time.perf_counter() - tic
        out["server"] = {"seconds": dt, "tokens": sum(counts), "tokens_per_sec": sum(counts) / dt}
    out["same_lengths"] = [len(c.ids) for c in got] == counts
    return out


def steps(args) -> dict:
    import yaml

    from mlx_tune.config import load_config
    from mlx_tune.training.run import run_train

    with tempfile.TemporaryDirectory() as tmp:
        cfg = yaml.safe_load((ROOT / "configs" / "grpo-demo.yaml").read_text())
        cfg["grpo"]["reward_functions"] = [str(ROOT / "data" / "grpo_demo" / f"rewards.py:{spec.rsplit(':', 1)[1]}")
                                           for spec in cfg["grpo"]["reward_functions"]]
        cfg.pop("eval", None)
        cfg.update(model=str(MODEL), data=str(DATA.parent), output_dir=str(Path(tmp) / "out"))
        cfg["train"].update(iters=args.steps, batch_size=args.prompts, test=False, save_every=10**6)
        cfg["grpo"].update(num_generations=args.generations, max_completion_length=args.tokens)
        path = Path(tmp) / "c.yaml"
        path.write_text(yaml.safe_dump(cfg))
        tic = time.perf_counter()
        run_train(load_config(path), log=lambda m: None)
        wall = time.perf_counter() - tic
        rows = [json.loads(line) for line in (Path(tmp) / "out" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r][1:] or rows  # the first step warms up
    mean = lambda k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    return {"wall_s": wall, "steps": args.steps, "generation_tokens_per_sec": mean("generation_tokens_per_sec"),
            "training_tokens_per_sec": mean("tokens_per_sec"), "generation_s_per_step": mean("generation_time_s"),
            "step_time_s": mean("step_time_s"),
            "completions_per_sec_per_step": args.prompts * args.generations / mean("step_time_s"),
            "peak_memory_gb": max(r["peak_memory_gb"] for r in rows)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    if not MODEL.is_file():
        print(f"skipped: {MODEL} not found")
        return 0
    result = {"settings": vars(args), "generation": generation(args), "grpo": steps(args) if args.steps else None}
    g = result["generation"]
    print(f"generation, {args.prompts} x {args.generations} rows, <= {args.tokens} tokens: rollout "
          f"{g['rollout']['tokens_per_sec']:.1f} tok/s, server {g['server']['tokens_per_sec']:.1f} tok/s "
          f"(same completions: {g['same_lengths']})")
    if result["grpo"]:
        s = result["grpo"]
        print(f"grpo step: {s['completions_per_sec_per_step']:.2f} completions/s, generation "
              f"{s['generation_tokens_per_sec']:.1f} tok/s, training {s['training_tokens_per_sec']:.1f} tok/s, "
              f"peak {s['peak_memory_gb']:.2f} GB")
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
