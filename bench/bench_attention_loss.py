"""Attention + loss, forward and backward, at SmolLM2-135M size: mlx_tune's CPU levers vs mlx-lm's path.

Shapes: 4 rows x 512 tokens, 9 query / 3 KV heads of 64, hidden 576, vocabulary 49152,
30 layers (one layer's attention is timed and counted 30 times). Rival: what
``mlx_lm.lora`` runs, ``mx.fast.scaled_dot_product_attention(mask="causal")`` and the
full cross-entropy (whole float32 logits, autodiff). Ours: ``attention.attend`` (key
blocks above the diagonal skipped, two CPU streams) and ``losses.masked_ce_sum`` (chunks,
one ``exp`` per logit, the frozen head's gradient taken in the same pass). Both compiled; best of N,
interleaved so load hits both alike.
Prints a table and, last, the JSON targets for bench/run_all.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mlx_tune.runtime.blas import ensure_fast_blas  # noqa: E402

ensure_fast_blas()

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

from mlx_tune.model import attention as A  # noqa: E402
from mlx_tune.training import losses as L  # noqa: E402

B, T, H, HKV, D, HIDDEN, VOCAB, LAYERS = 4, 512, 9, 3, 64, 576, 49152, 30


def best(fns: dict, args: dict, reps: int) -> dict:
    for name, f in fns.items():
        mx.eval(f(*args[name]))  # compile + warm up
    times = {n: [] for n in fns}
    for _ in range(reps):
        for name, f in fns.items():
            t = time.perf_counter()
            mx.eval(f(*args[name]))
            times[name].append(time.perf_counter() - t)
    return {n: min(v) for n, v in times.items()}


def peak_mb(f, *args) -> float:
    mx.eval(f(*args))
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    mx.eval(f(*args))
    return (mx.get_peak_memory() - base) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--reps", type=int, default=None)
    args = ap.parse_args()
    reps = args.reps or (3 if args.quick else 7)
    mx.random.seed(0)

    # --- attention, one layer -------------------------------------------------
    q = mx.random.normal((B, H, T, D))
    k = mx.random.normal((B, HKV, T, D))
    v = mx.random.normal((B, HKV, T, D))
    w = mx.random.normal((B, H, T, D))
    seg = mx.array([[i // 128 for i in range(T)]] * B)  # 4 packed examples per row
    mask = A.packed_mask(seg)
    scale = D ** -0.5

    def grad_of(attn):
        return mx.compile(mx.grad(lambda q, k, v: (attn(q, k, v) * w).sum(), argnums=(0, 1, 2)))

    def levers(block, streams, m=None):
        return grad_of(lambda q, k, v: A.block_causal_attention(q, k, v, scale, m, block=block, streams=streams))

    att = {
        "mlx-lm sdpa causal": grad_of(lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal")),
        "ours: block skip, 1 stream": levers(None, 1),
        "ours: block skip, 2 streams (default)": levers(None, 2),
        "ours: packed mask, 2 streams": levers(None, 2, mask),
    }
    t_att = best(att, {n: (q, k, v) for n in att}, reps)

    # --- loss over the vocabulary ---------------------------------------------
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)

    head = Head()
    head.freeze()  # LoRA: the head is frozen, gradients flow to the hidden states
    h = mx.random.normal((B * T, HIDDEN)) * 0.5
    tgt = mx.random.randint(0, VOCAB, (B * T,))
    msk = mx.ones((B * T,))
    mx.eval(head.parameters(), h, tgt, msk)

    def full_ce(h):
        logits = head.lm_head(h).astype(mx.float32)
        ce = mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, tgt[:, None], axis=-1)[:, 0]
        return (ce * msk).sum()

    def ours_ce(h, streams):
        L.CPU_STREAMS = streams
        return L.masked_ce_sum(head, h, tgt, msk)

    loss = {
        "mlx-lm full CE": mx.compile(mx.value_and_grad(full_ce)),
        "ours: chunked one-exp CE (default)": mx.compile(mx.value_and_grad(lambda h: ours_ce(h, 1))),
        "ours: chunked one-exp CE, 2 streams": mx.compile(mx.value_and_grad(lambda h: ours_ce(h, 2))),
    }
    t_loss = best(loss, {n: (h,) for n in loss}, reps)
    mem_full = peak_mb(loss["mlx-lm full CE"], h)
    mem_ours = peak_mb(loss["ours: chunked one-exp CE (default)"], h)

    # --- report ----------------------------------------------------------------
    print(f"one layer attention fwd+bwd, {B}x{T} tokens, {H}/{HKV} heads (best of {reps}):")
    for n, t in t_att.items():
        print(f"  {n:40s} {t * 1e3:8.1f} ms   x{t_att['mlx-lm sdpa causal'] / t:.2f}")
    print(f"loss fwd+bwd, {B * T} tokens x {VOCAB} vocab:")
    for n, t in t_loss.items():
        print(f"  {n:40s} {t * 1e3:8.1f} ms   x{t_loss['mlx-lm full CE'] / t:.2f}")
    print(f"  peak memory: full {mem_full:.0f} MB, ours {mem_ours:.0f} MB")
    rival = LAYERS * t_att["mlx-lm sdpa causal"] + t_loss["mlx-lm full CE"]
    ours = LAYERS * t_att["ours: block skip, 2 streams (default)"] + t_loss["ours: chunked one-exp CE (default)"]
    ours_packed = LAYERS * t_att["ours: packed mask, 2 streams"] + t_loss["ours: chunked one-exp CE (default)"]
    print(f"{LAYERS} layers of attention + loss: mlx-lm {rival:.2f} s, ours {ours:.2f} s (x{rival / ours:.2f}), "
          f"ours with packing mask {ours_packed:.2f} s (x{rival / ours_packed:.2f})")
    targets = [
        {"name": "attention+loss fwd+bwd speed-up vs mlx-lm (SmolLM2 size, 4x512, CPU)", "measured": round(rival / ours, 2),
         "target": 1.3, "unit": "x", "rival": "mlx-lm sdpa causal + full CE", "pass": rival / ours >= 1.3},
        {"name": "loss peak memory vs full logits (4x512 x 49152)", "measured": round(mem_ours / mem_full, 3),
         "target": 0.5, "unit": "ratio", "rival": "full float32 logits CE", "pass": mem_ours / mem_full <= 0.5},
    ]
    print(json.dumps(targets))


if __name__ == "__main__":
    main()
