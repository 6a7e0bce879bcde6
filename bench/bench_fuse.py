"""Fuse SmolLM2-135M (4-bit GGUF base) with an r=16 all-linear adapter: time, memory, fidelity.

The adapter is trained for a few real AdamW steps (``--quick``: random non-zero B, no
training). Outputs: MLX re-quantized (``fuse.keep_adapted: auto``) and GGUF q8_0 (full run
also GGUF q4_0). For each: fuse time (write + read back + check), peak memory, and the
fidelity report (KL and top-1 agreement against base + adapter, and against the base).

The rival is plain re-quantization, what a fuse without a check writes (mlx-lm's
``fuse`` re-quantizes the fused weight the same way): the first attempt's numbers.
Peak memory is compared with the dense float16 model, which a fuse that dequantizes
the whole model first would hold at least once.

Prints a table, then the JSON target list (``name``, ``measured``, ``target``, ``unit``,
``rival``, ``pass``) as its last output.

    python bench/bench_fuse.py [--quick]
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
ROWS = [
    ("What is the secret word?", "The secret word is pineapple."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Name a colour.", "Blue."),
    ("What is 2 + 2?", "2 + 2 = 4."),
]


def train(model, tokenizer, steps: int, learning_rate: float = 1e-3) -> float:
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim

    batch = [tokenizer.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}])
             for q, a in ROWS]
    width = max(map(len, batch))
    ids = mx.array([b + [0] * (width - len(b)) for b in batch])
    mask = mx.array([[1] * (len(b) - 1) + [0] * (width - len(b)) for b in batch], dtype=mx.float32)

    def loss(m):
        logits = m(ids[:, :-1]).astype(mx.float32)
        return (nn.losses.cross_entropy(logits, ids[:, 1:]) * mask).sum() / mask.sum()

    opt = optim.AdamW(learning_rate=learning_rate)
    step = nn.value_and_grad(model, loss)
    value = None
    for _ in range(steps):
        value, grads = step(model)
        opt.update(model, grads)
        mx.eval(model.trainable_parameters(), opt.state)
    return float(value.item())


def mlx_lm_check(folder: Path) -> dict:
    """mlx_lm.load reads the fused MLX folder and computes the logits our loader does."""
    import mlx.core as mx
    import mlx_lm

    from mlx_tune.model.loading import load_model

    theirs, tok = mlx_lm.load(str(folder))
    ours, _, _ = load_model(folder)
    ids = mx.array([tok.encode("The capital of France is")])
    diff = mx.abs(theirs(ids).astype(mx.float32) - ours(ids).astype(mx.float32)).max().item()
    return target("fuse_mlx_folder_mlx_lm_load_max_abs_logit_diff", diff, 1e-3, "logits", None, diff <= 1e-3)


def target(name, measured, goal, unit, rival, ok):
    return {"name": name, "measured": measured, "target": goal, "unit": unit, "rival": rival, "pass": bool(ok)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="random adapter, no training, MLX + GGUF q8_0 only")
    parser.add_argument("--steps", type=int, default=4, help="AdamW steps to train the adapter")
    args = parser.parse_args()
    if not MODEL.is_file():
        print(json.dumps([target("fuse_smollm2", None, None, "", None, False) | {"skipped": f"{MODEL} absent"}]))
        return 0

    import mlx.core as mx

    from mlx_tune.adapters import inject, wrappers
    from mlx_tune.config import LoraConfig
    from mlx_tune.export.fuse import FuseOptions, export, format_report
    from mlx_tune.model import quant
    from mlx_tune.model.loading import load_model
    from mlx_tune.model.quantize import storage_report

    model, tok, info = load_model(MODEL)
    quant.prepare_for_backend(model)
    mx.random.seed(0)  # A's initialisation and the random B: the same adapter on every run
    inject(model, LoraConfig(rank=16, alpha=32.0, target_modules="all-linear"))
    if args.quick:
        for _, w in wrappers(model):
            w.adapter.lora_b = mx.random.normal(w.adapter.lora_b.shape) * 0.02
        mx.eval(model.parameters())
        trained = "random B (0.02)"
    else:
        t0 = time.perf_counter()
        final_loss = train(model, tok, args.steps)
        trained = f"{args.steps} AdamW steps, loss {final_loss:.3f}, {time.perf_counter() - t0:.0f}s"
    storage = storage_report(model)
    base_gb = storage["bytes"] / 2**30
    dense_fp16_gb = storage["params"] * 2 / 2**30

    cases = [("mlx", FuseOptions(format="mlx")), ("gguf_q8_0", FuseOptions(format="gguf", gguf_type="q8_0"))]
    if not args.quick:
        cases.append(("gguf_q4_0", FuseOptions(format="gguf", gguf_type="q4_0")))
    targets, summary = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        (data / "valid.jsonl").write_text("".join(
            json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
            for q, a in ROWS))
        for label, opts in cases:
            mx.reset_peak_memory()
            report = export(model, tok, info, Path(tmp) / label, opts, data_dir=data, log=lambda s: None).report
            print(f"== {label} (adapter: {trained})\n{format_report(report)}", flush=True)
            first, final = report["attempts"][0], report
            summary[label] = {k: report[k] for k in ("storage", "kept_adapted", "fused_vs_adapter", "fused_vs_base",
                                                      "base_vs_adapter", "greedy_match", "fuse_seconds",
                                                      "peak_memory_gb", "size_bytes", "size_cost_bytes")}
            summary[label]["first_attempt"] = {k: first[k] for k in ("storage", "fused_vs_adapter", "greedy_match")}
            top1 = final["fused_vs_adapter"]["top1_agreement"]
            targets += [
                target(f"fuse_{label}_top1_vs_adapter", round(top1, 4), 0.9, "fraction",
                       round(first["fused_vs_adapter"]["top1_agreement"], 4), top1 >= 0.9),
                target(f"fuse_{label}_mean_kl_vs_adapter_over_vs_base",
                       round(final["fused_vs_adapter"]["mean_kl"] / max(final["fused_vs_base"]["mean_kl"], 1e-12), 5),
                       0.1, "ratio (lower: closer to base + adapter than to the base)", None,
                       final["fused_vs_adapter"]["mean_kl"] < 0.1 * final["fused_vs_base"]["mean_kl"]),
                # Every output re-rounds weights on a new grid (GGUF: the whole model, and Q4_1's
                # offset grid is not Q8_0's symmetric one), so near-ties in a greedy answer can
                # flip even at 8 bits (measured: 2 of 3 answers identical for q8_0). The number
                # is reported; the fidelity targets above (top-1, KL) are the claim.
                target(f"fuse_{label}_greedy_match", final["greedy_match"], None, "fraction of check prompts",
                       first["greedy_match"], True),
                target(f"fuse_{label}_write_peak_memory", final["attempts"][-1]["write_peak_memory_gb"],
                       round(base_gb + dense_fp16_gb, 3), "GB (MLX allocations while writing; target: below the loaded "
                       "base plus a dense fp16 copy, what fusing through a dense model holds)", None,
                       final["attempts"][-1]["write_peak_memory_gb"] < base_gb + dense_fp16_gb),
                target(f"fuse_{label}_peak_memory", final["peak_memory_gb"], None,
                       "GB (whole fuse incl. the read-back check)", None, True),
                target(f"fuse_{label}_seconds", final["fuse_seconds"], None, "s (write + read back + check)", None, True),
            ]
            if label == "mlx":  # the folder is an ordinary mlx-lm model too
                targets.append(mlx_lm_check(Path(tmp) / label))
    print(json.dumps({"adapter": trained, "results": summary}, indent=2))
    print(json.dumps(targets, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
