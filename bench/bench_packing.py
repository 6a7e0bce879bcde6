"""Packed LoRA training step, new packing mechanism vs the old per-architecture attention copies.

The old mechanism is commit 54a927e's ``mlx_tune/model/attention.py`` (a ``self_attn``
subclass per llama / mistral / qwen2 / qwen3 and its own model body), read with
``git show`` into a temporary module; the new one is today's ``attention.hidden_states``
(mlx-lm's own model body, wrappers on its mask builders, attention and RoPE). Both run the
same compiled step as ``mlx-tune train`` (``loop.Step``: forward + backward of the chunked
loss, LoRA on q/k/v/o) on two models of the same random weights, llama-shaped (SmolLM2-135M
widths) and qwen3-shaped (Qwen3-0.6B widths), a few layers deep, on rows of several packed
examples. Timings are interleaved (old, new, old, new, ...) so load hits both alike; the
ratio old / new is >= 1 when the new mechanism is no slower.

    scripts/python bench/bench_packing.py            # 7 rounds
    scripts/python bench/bench_packing.py --quick    # 3 rounds, fewer layers
    scripts/python bench/bench_packing.py --vocab 4096   # the attention / body share of the step larger
Prints a table and, last, the JSON targets for bench/run_all.py.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from mlx_tune.runtime.blas import ensure_fast_blas  # noqa: E402

ensure_fast_blas()

import mlx.core as mx  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402

from mlx_tune.adapters import inject  # noqa: E402
from mlx_tune.config import LoraConfig  # noqa: E402
from mlx_tune.training import losses  # noqa: E402
from mlx_tune.training.loop import Step, batch_arrays  # noqa: E402

OLD_COMMIT = "54a927e"
SHAPES = {  # model_type -> tiny_config overrides (real widths, few layers)
    "llama": {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
              "head_dim": 64, "vocab_size": 49152, "tie_word_embeddings": True},
    "qwen3": {"hidden_size": 1024, "intermediate_size": 3072, "num_attention_heads": 16, "num_key_value_heads": 8,
              "head_dim": 128, "vocab_size": 151936, "tie_word_embeddings": True},
}


def old_attention():
    """Commit 54a927e's attention module, imported from a temporary file."""
    src = subprocess.run(["git", "show", f"{OLD_COMMIT}:mlx_tune/model/attention.py"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp(prefix="mlx_tune_old_")) / "old_attention.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("old_attention", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def packed_batch(rows: int, width: int, vocab: int, seed: int = 0):
    """Rows of examples 40..400 tokens long, packed as the batcher packs them (segments, restarted positions)."""
    from mlx_tune.data.batching import Batch

    rng = np.random.default_rng(seed)
    inputs = rng.integers(3, vocab, size=(rows, width)).astype(np.int32)
    seg = np.full((rows, width), -1, np.int32)
    pos = np.zeros((rows, width), np.int32)
    for b in range(rows):
        t, s = 0, 0
        while t < width - 40:
            n = min(int(rng.integers(40, 400)), width - t)
            seg[b, t:t + n], pos[b, t:t + n] = s, np.arange(n)
            t, s = t + n, s + 1
        pos[b, t:] = np.arange(width - t)
    mask = (seg >= 0).astype(np.float32)
    return Batch(inputs=mx.array(inputs), targets=mx.array(np.roll(inputs, -1, axis=1)), loss_mask=mx.array(mask),
                 segment_ids=mx.array(seg), positions=mx.array(pos), n_tokens=int(mask.sum()))


def model_for(model_type: str, layers: int):
    from mlx_tune.testing.tiny import tiny_model

    model = tiny_model(model_type, seed=0, num_hidden_layers=layers, **SHAPES[model_type])
    mx.random.seed(1)
    inject(model, LoraConfig(rank=8, alpha=16, dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 rounds, 2 layers")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=None,
                    help="smaller vocabulary: the loss (the same code in both) weighs less, the body more")
    args = ap.parse_args()
    reps = args.reps or (3 if args.quick else 7)
    layers = args.layers or (2 if args.quick else 4)
    old = old_attention()

    def old_loss(model, batch):
        h = old.hidden_states(model, batch.inputs, batch.segment_ids, batch.positions)
        n = batch.loss_mask.astype(mx.float32).sum()
        return losses.masked_ce_sum(model, h, batch.targets, batch.loss_mask) / mx.maximum(n, 1.0), n

    results, targets = {}, []
    for model_type, shape in SHAPES.items():
        if args.vocab:
            shape["vocab_size"] = args.vocab
        batch = packed_batch(args.rows, args.width, shape["vocab_size"])
        arrays = batch_arrays(batch)
        steps = {}
        for name, loss_fn in (("old", old_loss), ("new", losses.batch_loss)):
            model = model_for(model_type, layers)
            steps[name] = Step(model, optim.Adam(1e-4), loss_fn)
        check = {n: s.accumulate(arrays, None) for n, s in steps.items()}  # compile + warm up
        mx.eval(check)
        same = abs(check["old"][0].item() - check["new"][0].item()) <= 1e-3 * abs(check["old"][0].item())
        times: dict[str, list[float]] = {n: [] for n in steps}
        for _ in range(reps):
            for name, step in steps.items():
                tic = time.perf_counter()
                mx.eval(step.accumulate(arrays, None))
                times[name].append(time.perf_counter() - tic)
        best = {n: min(v) for n, v in times.items()}
        results[model_type] = best
        ratio = best["old"] / best["new"]
        print(f"{model_type}-shaped, {layers} layers, {args.rows}x{args.width} packed tokens, best of {reps}: "
              f"old {best['old'] * 1e3:.0f} ms, new {best['new'] * 1e3:.0f} ms, old/new x{ratio:.2f}"
              f"{'' if same else '  (LOSSES DIFFER)'}")
        targets.append({"name": f"packed LoRA step, new packing vs old attention copies ({model_type}-shaped, CPU)",
                        "measured": round(ratio, 3), "target": 1.0, "unit": "x (old/new time)",
                        "rival": f"mlx_tune {OLD_COMMIT} per-architecture attention", "pass": same and ratio >= 1.0})
    print(json.dumps(targets))


if __name__ == "__main__":
    main()
