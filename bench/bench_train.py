#!/usr/bin/env python3
"""Benchmark: LoRA training throughput and peak memory, mlx_tune vs mlx-lm vs Hugging Face PEFT.

Same model (SmolLM2-135M-Instruct, the Q4_1 GGUF via ``mlx_tune.model.loading.load_model``),
same data (4 rows x 512 tokens packed from the demo reviews), same settings (LoRA on every
linear layer of every block, r=16, alpha=32, AdamW, lr 1e-4), each side in its own
process so peak memory is its own:

- ``mlx_tune``: the project's compiled step (``trainer.Step``: packing-aware attention,
  chunked cross-entropy, the CPU dequantize + sgemm path for the 4-bit base).
- ``mlx-lm``: ``mlx_lm.tuner.utils.linear_to_lora_layers`` and the step of
  ``mlx_lm.tuner.trainer.train`` (compiled over the same state, ``default_loss``) on the
  same 4-bit model. On the CPU its ``mx.quantized_matmul`` is slow, so few steps are timed.
- ``peft``: transformers ``LlamaForCausalLM`` in float32 (weights dequantized from the same
  GGUF) + ``peft.get_peft_model``, torch CPU, ``torch.optim.AdamW``; run with the rivals'
  Python (``.venv-rivals``, see bench/install_rivals.sh, or ``MLX_TUNE_RIVALS_PYTHON``);
  "skipped: torch/peft not installed" otherwise.

``--text``: plain text rows instead (the reviews as ``{"text"}`` records, packed, every
position trained); ``--dense``: both MLX sides on the dequantized float32 weights (what
``mlx_lm.lora`` trains on a dense checkpoint; mlx-lm is then timed on all blocks).
``--text --dense`` is the "plain 512-token text rows" comparison of issue 19.

Tokens/s counts real (non-padding) tokens. Peak memory: ``mx.get_peak_memory()`` for the
MLX sides, and the process's peak RSS for all three (the like-for-like figure).
Prints a table, then one JSON object ``{"targets": [...]}``.

    python bench/bench_train.py [--quick] [--steps N] [--text] [--dense]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchlib import MODEL, add_side_flags, rival_python, run_child  # noqa: E402

ROWS, SEQ, RANK, ALPHA, LR = 4, 512, 16, 32.0, 1e-4
THROUGHPUT_TARGET, THROUGHPUT_AIM = 2.0, 2.5
N_BLOCKS = 30  # SmolLM2-135M's transformer blocks


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# ---------------------------------------------------------------------------
# Data: the same packed rows for every side
# ---------------------------------------------------------------------------


def make_rows(out: Path, text: bool = False) -> dict:
    """Pack the demo reviews (or generated sentences) into ROWS x SEQ slots; save as .npz.
    ``text``: the reviews as plain text records (every position trained)."""
    import numpy as np

    from mlx_tune.data import batching, cache
    from mlx_tune.model.loading import load_model

    _, tokenizer, _ = load_model(MODEL)
    raw = ROOT / "data" / "demo_raw" / "reviews.jsonl"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "train.jsonl"
        if raw.is_file() and text:
            recs = [json.loads(x) for x in raw.read_text().splitlines() if x.strip()]
            lines = [{"text": f"{r['instruction']}\n\n{r['input']}\n\n{r['output']}"} for r in recs]
        elif raw.is_file():
            recs = [json.loads(x) for x in raw.read_text().splitlines() if x.strip()]
            lines = [{"messages": [{"role": "user", "content": f"{r['instruction']}\n\n{r['input']}"},
                                   {"role": "assistant", "content": r["output"]}]} for r in recs]
        else:
            lines = [{"text": f"Sentence number {i} is about the weather and the sea, and it is fine."} for i in range(400)]
        src.write_text("".join(json.dumps(x) + "\n" for x in lines))
        ds = cache.load_dataset(src, tokenizer, max_seq_length=SEQ, mask_prompt=False, use_cache=False)
    stream = batching.BatchStream(ds, ROWS, SEQ, packing=True, seed=0)
    b = next(stream)
    arrays = {k: np.array(getattr(b, k)) for k in ("inputs", "targets", "loss_mask", "segment_ids", "positions")}
    real = arrays["segment_ids"] >= 0
    np.savez(out, **arrays, real=real)
    return {"n_tokens": int(real.sum()), "examples_per_row": float((arrays["segment_ids"].max(axis=1) + 1).mean())}


def load_rows(path: Path) -> dict:
    import numpy as np

    with np.load(path) as z:
        return {k: z[k] for k in z.files}


# ---------------------------------------------------------------------------
# The three sides (each runs in its own process)
# ---------------------------------------------------------------------------


def side_mlx_tune(rows: dict, steps: int, dense: bool = False) -> dict:
    from mlx_tune.training.lanes import wide_scheduling

    wide_scheduling("sft", False, SEQ)  # as `mlx-tune train` does, before MLX runs anything
    import mlx.core as mx
    import mlx.optimizers as optim

    from mlx_tune import adapters
    from mlx_tune.config import LoraConfig
    from mlx_tune.data.batching import Batch
    from mlx_tune.model import packing, quant
    from mlx_tune.model.loading import load_model
    from mlx_tune.training.losses import batch_loss

    model, _, _ = load_model(MODEL, dequantize=dense)
    quant.prepare_for_backend(model)
    mx.random.seed(0)
    adapters.inject(model, LoraConfig(rank=RANK, alpha=ALPHA, dropout=0.0, target_modules="all-linear"))
    # what `mlx-tune train` tells a packed model: its longest example (training.run)
    packing.set_reach(model, int(rows["positions"][rows["real"]].max()) + 1)
    batch = Batch(**{k: mx.array(rows[k]) for k in ("inputs", "targets", "loss_mask", "segment_ids", "positions")})
    return timed(mlx_tune_step(model, optim.AdamW(learning_rate=LR), batch_loss, batch), steps, mx)


def mlx_tune_step(model, opt, loss_fn, batch):
    """``one()``: one optimizer step of mlx_tune's compiled ``training.loop.Step`` on ``batch``
    (micro-batch, finish, apply, as ``loop.train`` runs it); returns the loss."""
    import mlx.core as mx

    from mlx_tune.training import loop as trainer

    step = trainer.Step(model, opt, loss_fn)

    def one() -> float:
        loss, _, grads, _, _ = step.finish(*step.micro_batch(batch, None))
        step.apply(grads)
        mx.eval(step.state, loss)
        return loss.item()

    return one


def side_mlx_lm(rows: dict, steps: int, blocks: int | None = None, dense: bool = False) -> dict:
    import mlx.core as mx
    import mlx.optimizers as optim
    import numpy as np
    from mlx_lm.tuner.trainer import default_loss
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from mlx_tune.model.loading import load_model

    model, _, _ = load_model(MODEL, dequantize=dense)
    if blocks is not None:  # --rival-blocks: a model cut to its first blocks, to extrapolate
        model.model.layers = model.model.layers[:blocks]
    model.freeze()
    mx.random.seed(0)
    linear_to_lora_layers(model, len(model.layers), {"rank": RANK, "scale": ALPHA / RANK, "dropout": 0.0})
    # default_loss takes whole rows and trains targets 1..length: the same slots as above.
    full = np.concatenate([rows["inputs"], rows["targets"][:, -1:]], axis=1)
    lengths = np.stack([np.zeros(ROWS, np.int32), rows["real"].sum(axis=1).astype(np.int32)], axis=1)
    one = compiled_step(model, optim.AdamW(learning_rate=LR), default_loss, mx.array(full), mx.array(lengths))
    return timed(one, steps, mx)


def compiled_step(model, opt, loss_fn, *batch):
    """``one()``: one step of ``mlx_lm.tuner.trainer.train`` as it is there (no accumulation):
    ``nn.value_and_grad(model, loss_fn)`` and the optimizer update, compiled over model,
    optimizer and random state, on ``batch``; returns the loss. ``loss_fn(model, *batch)``
    returns the loss first (mlx-lm-lora's trainers build their steps the same way)."""
    import mlx.core as mx
    import mlx.nn as nn

    loss_value_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, opt.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(*arrays):
        out, grad = loss_value_and_grad(model, *arrays)
        opt.update(model, grad)
        return out[0]

    def one() -> float:
        loss = step(*batch)
        mx.eval(state, loss)
        return loss.item()

    model.train()
    return one


def side_peft(rows: dict, steps: int, hf_dir: str) -> dict:
    import torch

    inputs = torch.tensor(rows["inputs"], dtype=torch.long)
    labels = torch.tensor(rows["targets"], dtype=torch.long).masked_fill(torch.tensor(~rows["real"]), -100)
    # Packed rows are run as plain causal rows (PEFT's usual path), the same work per token.
    return timed(peft_step(hf_dir, inputs, torch.ones_like(inputs), labels, LR), steps, None)


def peft_step(hf_dir: str, inputs, attn, labels, lr: float):
    """``one()``: a PEFT LoRA step (r=RANK, alpha=ALPHA, all linears) of the float32 model in
    ``hf_dir`` on torch CPU: mean cross-entropy over ``labels`` (-100: not trained), AdamW."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)

    def one() -> float:
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=inputs, attention_mask=attn).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 ignore_index=-100)
        loss.backward()
        opt.step()
        return float(loss)

    return one


def timed(one, steps: int, mx) -> dict:
    """Times ``steps`` steps after a first (compiling) one; ``steps`` 0 times the first step
    itself (for the slow rival: tracing the compiled step is well under a second of it)."""
    warm, cpu = time.perf_counter(), time.process_time()
    first = one()  # compile / first-call costs stay out of the timing
    warm, warm_cpu = time.perf_counter() - warm, time.process_time() - cpu
    start, cpu = time.perf_counter(), time.process_time()
    losses = [one() for _ in range(steps)]
    dt = (time.perf_counter() - start) / steps if steps else warm
    # CPU seconds per step (all threads): steadier than wall time on a shared machine.
    cpu_s = (time.process_time() - cpu) / steps if steps else warm_cpu
    out = {"step_s": dt, "cpu_s": cpu_s, "warmup_s": warm, "losses": [first] + losses, "rss_gb": rss_gb()}
    if mx is not None:
        out["mlx_peak_gb"] = mx.get_peak_memory() / 2**30
    return out


def export_hf(out_dir: Path, layers: int | None = None):
    """SmolLM2 dequantized to float32 as a Hugging Face folder (config.json, model.safetensors
    and the tokenizer files, so transformers, mlx-lm and mlx_tune all load it); returns the
    tokenizer. ``layers``: keep only the first blocks (smoke runs)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_tune.model.loading import load_model

    model, tokenizer, info = load_model(MODEL, dequantize=True)
    if layers is not None:
        model.model.layers = model.model.layers[:layers]
    weights = {k: v.astype(mx.float32) for k, v in tree_flatten(model.parameters())}
    out_dir.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "pt"})
    cfg = dict(info.config)
    cfg.setdefault("architectures", ["LlamaForCausalLM"])
    cfg["torch_dtype"] = "float32"
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    (out_dir / "config.json").write_text(json.dumps(cfg))
    getattr(tokenizer, "_tokenizer", tokenizer).save_pretrained(str(out_dir))
    return tokenizer


# ---------------------------------------------------------------------------
# The parent: run each side in a child, print the table and the targets
# ---------------------------------------------------------------------------


def run_side(python: str, side: str, rows: Path, steps: int, extra: list[str], timeout: float,
             script: str | Path = __file__) -> dict:
    """Run ``script --side SIDE --rows ROWS --steps N ...`` in a child process (its own peak
    memory); its last stdout line that is a JSON object is the result."""
    cmd = [python, str(Path(script).resolve()), "--side", side, "--rows", str(rows), "--steps", str(steps), *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{side} failed (exit {proc.returncode}): {proc.stderr.strip()[-1500:]}")
    return json.loads(lines[-1])


def print_table(rows: list[tuple[str, dict]], digits: int = 3) -> None:
    """The results table: one ``(label, side result)`` a row (``tokens_per_sec`` set), then
    the load average the wall times were taken under."""
    width = max(10, *(len(label) for label, _ in rows))
    print()
    print(f"{'side':<{width}} {'tokens/s':>10} {'s/step':>8} {'CPU s/step':>11} {'first step s':>13} "
          f"{'MLX peak GB':>12} {'peak RSS GB':>12}  losses")
    for label, r in rows:
        mlx_peak = f"{r['mlx_peak_gb']:.2f}" if "mlx_peak_gb" in r else "-"
        losses = ", ".join(f"{x:.{digits}f}" for x in r["losses"][:4])
        print(f"{label:<{width}} {r['tokens_per_sec']:>10.1f} {r['step_s']:>8.2f} {r.get('cpu_s', float('nan')):>11.2f} "
              f"{r['warmup_s']:>13.1f} {mlx_peak:>12} {r['rss_gb']:>12.2f}  {losses}")
    print(f"(load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: wall times on a shared machine vary)")


def extrapolated_mlx_lm(rows_path: Path, blocks: tuple[int, int], extra: list[str]) -> dict:
    """mlx-lm's step on all blocks, extrapolated linearly from one step on B1 and on B2 blocks.

    Time, CPU time and both peaks are each ``fixed + blocks x per_block``; the fixed part
    is the LM head, embedding and loss, the per-block part the layers (30 in SmolLM2).
    """
    b1, b2 = blocks
    parts = {b: run_side(sys.executable, "mlx_lm", rows_path, 0, ["--blocks", str(b), *extra], 1800) for b in (b1, b2)}
    out = dict(parts[b2])
    for key in ("step_s", "cpu_s", "rss_gb", "mlx_peak_gb", "warmup_s"):
        y1, y2 = parts[b1][key], parts[b2][key]
        out[key] = y1 + (N_BLOCKS - b1) * (y2 - y1) / (b2 - b1)
    out["how"] = (f" (EXTRAPOLATED to {N_BLOCKS} blocks from one step on {b1} and {b2} blocks: "
                  f"{parts[b1]['step_s']:.1f} s, {parts[b2]['step_s']:.1f} s)")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer timed steps")
    p.add_argument("--steps", type=int, help="timed steps for mlx_tune (rivals: fewer, see --rival-steps)")
    p.add_argument("--rival-steps", type=int)
    p.add_argument("--rival-blocks", type=lambda v: tuple(int(x) for x in v.split(",")), metavar="B1,B2",
                   help="time mlx-lm on its first B1 and B2 blocks (one step each) and extrapolate to all blocks "
                        "(--quick: 1,4)")
    p.add_argument("--text", action="store_true", help="plain text rows, every position trained")
    p.add_argument("--dense", action="store_true", help="both MLX sides on the dequantized float32 weights")
    p.add_argument("--blocks", type=int, help=argparse.SUPPRESS)
    add_side_flags(p, ["mlx_tune", "mlx_lm", "peft"])
    args = p.parse_args(argv)

    if args.side:
        return run_child(args.side, args.rows, {
            "mlx_lm": lambda rows: side_mlx_lm(rows, args.steps, args.blocks, args.dense),
            "mlx_tune": lambda rows: side_mlx_tune(rows, args.steps, args.dense),
            "peft": lambda rows: side_peft(rows, args.steps, args.hf_dir),
        }, torch_sides=("peft",), load=load_rows)

    from mlx_tune.runtime.blas import ensure_fast_blas

    ensure_fast_blas()
    if not MODEL.is_file():
        print(f"skipped: {MODEL} not present (make setup downloads it)")
        print(json.dumps({"targets": []}))
        return 0
    steps = args.steps or (3 if args.quick else 8)
    rival_steps = args.rival_steps or (1 if args.quick else 3)
    rival_blocks = args.rival_blocks or ((1, 4) if args.quick and not args.dense else None)
    extra = ["--dense"] if args.dense else []
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        rows_path = Path(tmp) / "rows.npz"
        info = make_rows(rows_path, args.text)
        n_tokens = info["n_tokens"]
        print(f"data: {ROWS} x {SEQ} slots, {n_tokens} real tokens, {info['examples_per_row']:.1f} examples per row; "
              f"LoRA all-linear r={RANK}, AdamW; timed steps: mlx_tune {steps}, rivals {rival_steps}", flush=True)
        results["mlx_tune"] = run_side(sys.executable, "mlx_tune", rows_path, steps, extra, 1800)
        print(f"mlx_tune: {results['mlx_tune']['step_s']:.2f} s/step", flush=True)
        if rival_blocks is None:
            results["mlx-lm"] = run_side(sys.executable, "mlx_lm", rows_path, rival_steps, extra, 3000)
        else:
            results["mlx-lm"] = extrapolated_mlx_lm(rows_path, rival_blocks, extra)
        print(f"mlx-lm:   {results['mlx-lm']['step_s']:.2f} s/step{results['mlx-lm'].get('how', '')}", flush=True)
        rivals = rival_python("torch, peft, transformers")
        if rivals is None:
            print("skipped: torch/peft not installed (bench/install_rivals.sh sets up .venv-rivals)")
        else:
            hf = Path(tmp) / "hf"
            export_hf(hf)
            results["peft"] = run_side(rivals, "peft", rows_path, rival_steps, ["--hf-dir", str(hf)], 3000)
            print(f"peft:     {results['peft']['step_s']:.2f} s/step", flush=True)

    for r in results.values():
        r["tokens_per_sec"] = n_tokens / r["step_s"]
    ours = results["mlx_tune"]
    print_table(list(results.items()))
    lm = results["mlx-lm"]
    ratio = ours["tokens_per_sec"] / lm["tokens_per_sec"]
    print(f"\nmlx_tune / mlx-lm tokens/s: {ratio:.2f}x (target >= {THROUGHPUT_TARGET}x, aim {THROUGHPUT_AIM}x); "
          f"per CPU second: {lm.get('cpu_s', 0) / ours.get('cpu_s', 1):.2f}x")
    what = f"SmolLM2-135M {'fp32 dense' if args.dense else 'Q4'}, LoRA r16 all-linear, 4x512{' text rows' if args.text else ''}"
    targets = [
        {"name": f"train tokens/s vs mlx-lm ({what})",
         "measured": round(ratio, 3), "target": THROUGHPUT_TARGET, "unit": "x", "rival": "mlx-lm" + lm.get("how", ""),
         "pass": ratio >= THROUGHPUT_TARGET, "mlx_tune_tokens_per_sec": round(ours["tokens_per_sec"], 1),
         "rival_tokens_per_sec": round(lm["tokens_per_sec"], 1)},
        {"name": "train peak memory vs mlx-lm (MLX peak)", "measured": round(ours["mlx_peak_gb"], 3),
         "target": round(lm["mlx_peak_gb"], 3), "unit": "GB", "rival": "mlx-lm" + lm.get("how", ""),
         "pass": ours["mlx_peak_gb"] < lm["mlx_peak_gb"]},
        {"name": "train peak RSS vs mlx-lm", "measured": round(ours["rss_gb"], 3), "target": round(lm["rss_gb"], 3),
         "unit": "GB", "rival": "mlx-lm" + lm.get("how", ""), "pass": ours["rss_gb"] < lm["rss_gb"]},
    ]
    if "peft" in results:
        pr = results["peft"]
        r2 = ours["tokens_per_sec"] / pr["tokens_per_sec"]
        print(f"mlx_tune / PEFT (torch CPU fp32) tokens/s: {r2:.2f}x (aim 1.0x)")
        targets += [
            {"name": "train tokens/s vs HF PEFT torch CPU fp32 (printed; aim 1.0x)", "measured": round(r2, 3),
             "target": 1.0, "unit": "x", "rival": "peft", "pass": r2 >= 1.0,
             "rival_tokens_per_sec": round(pr["tokens_per_sec"], 1)},
            {"name": "train peak RSS vs HF PEFT", "measured": round(ours["rss_gb"], 3), "target": round(pr["rss_gb"], 3),
             "unit": "GB", "rival": "peft", "pass": ours["rss_gb"] < pr["rss_gb"]},
        ]
    else:
        print("PEFT: skipped: torch/peft not installed")
    print(json.dumps({"targets": targets}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
