"""One QLoRA training step of SmolLM2-135M, three ways, side by side in one run.

  (a) 4-bit affine (g64) base on mlx_tune's backend-aware layers (on CPU: dequantize +
      fp32 sgemm, re-dequantizing custom vjp)
  (b) fp32 dense base
  (c) mlx-lm's own LoRA layers (``linear_to_lora_layers``) on ``nn.QuantizedLinear``
      (``mx.quantized_matmul``: ~2-3 GFLOP/s on MLX's CPU backend)

Same step for all: LoRA r=16 (scale alpha/r = 2) on every linear of every block
(q, k, v, o, gate, up, down), batch 4 x 256 tokens, the same forward (mlx_tune's causal
attention by default, ``--attention mlx_lm`` for mlx-lm's), the same loss (mlx_tune's chunked
one-pass CE by default, as ``mlx-tune train`` runs; ``--loss full`` for plain CE over the
whole logits) with each variant's own layer as the tied LM head, AdamW, compiled as
mlx-lm's trainer compiles it. Reports steps/s, MLX peak memory (``mx.get_peak_memory`` after
``mx.reset_peak_memory``, model weights included) and the targets:

  a >= 0.8x b (speed), a >= 20x c (speed), peak(a) < peak(b).

(c) is so slow on CPU that it is timed once, on the full model, between two more steps
of (a) (its ratio uses their mean); ``--quick`` (or ``--rival-blocks 1,4``) instead
extrapolates it linearly from steps on 1 and 4 blocks (time = fixed + blocks x per_block;
the fixed part is mostly the tied LM head), which is noisy on a loaded machine.
The JSON list of targets is printed last (and written to ``--json``).

    python bench/bench_qlora_step.py [--quick] [--steps N] [--rival-blocks B1,B2] [--json out.json]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchlib import emit_targets  # noqa: E402

from mlx_tune.runtime.blas import ensure_fast_blas  # noqa: E402

ensure_fast_blas()

import argparse  # noqa: E402
import gc  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from functools import partial  # noqa: E402

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
from mlx.utils import tree_flatten, tree_unflatten  # noqa: E402

from mlx_tune.config import QuantizeConfig  # noqa: E402
from mlx_tune.model.quantize import LINEAR_TYPES, input_dims, quantize_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GGUF = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
RANK, ALPHA = 16, 32.0


class _LocalLoRA(nn.Module):
    """y = W0 x + (alpha / r) B A x; used only while mlx_tune.adapters.lora is not available."""

    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__()
        self.linear = base
        in_dims, out_dims = input_dims(base), base["weight"].shape[0]
        bound = 1 / math.sqrt(in_dims)
        self.lora_a = mx.random.uniform(-bound, bound, (rank, in_dims))
        self.lora_b = mx.zeros((out_dims, rank))
        self.scale = alpha / rank

    def __call__(self, x):
        return self.linear(x) + self.scale * ((x @ self.lora_a.T) @ self.lora_b.T)


def _lora_factory():
    try:
        from mlx_tune.adapters.lora import LoRALinear

        return "mlx_tune.adapters.lora.LoRALinear", lambda m: LoRALinear.from_base(m, rank=RANK, alpha=ALPHA, dropout=0.0)
    except ImportError:
        return "bench-local LoRA wrapper (mlx_tune.adapters.lora not on this branch)", lambda m: _LocalLoRA(m, RANK, ALPHA)


def load_dense(blocks: int | None = None):
    from mlx_tune.model.loading import load_model

    model, _, _ = load_model(str(GGUF), dequantize=True)  # fp32 on CPU
    if blocks is not None:
        model.model.layers = model.model.layers[:blocks]
    mx.eval(model.parameters())
    return model


def inject_all_linear(model, make_lora) -> int:
    model.freeze()
    swaps = [
        (f"model.layers.{i}.{path}", make_lora(m))
        for i, block in enumerate(model.model.layers)
        for path, m in block.named_modules()
        if isinstance(m, LINEAR_TYPES)
    ]
    model.update_modules(tree_unflatten(swaps))
    return len(swaps)


def build(variant: str, blocks: int | None = None):
    model = load_dense(blocks)
    if variant == "mlx_tune_4bit":
        quantize_model(model, QuantizeConfig(mode="affine", bits=4, group_size=64))
        _, make = _lora_factory()
        inject_all_linear(model, make)
    elif variant == "fp32":
        _, make = _lora_factory()
        inject_all_linear(model, make)
    elif variant == "mlx_lm_4bit":
        from mlx_lm.tuner.utils import linear_to_lora_layers

        nn.quantize(model, group_size=64, bits=4)  # plain nn.QuantizedLinear / QuantizedEmbedding
        model.freeze()
        linear_to_lora_layers(model, len(model.model.layers), {"rank": RANK, "scale": ALPHA / RANK, "dropout": 0.0})
    else:
        raise ValueError(variant)
    mx.eval(model.parameters())
    return model


class Trainer:
    """The compiled LoRA step as mlx-lm's trainer runs it, on one model."""

    def __init__(self, model, batch: int, seq: int, attention: str = "mlx_tune"):
        mx.random.seed(0)
        tokens = mx.random.randint(0, 49152, (batch, seq + 1))
        self.x, self.y = tokens[:, :-1], tokens[:, 1:]
        self.model, opt = model, optim.AdamW(learning_rate=1e-4)
        forward = model
        if attention == "mlx_tune":  # mlx_tune's causal attention (cheaper on the CPU), as its trainer runs
            from mlx_tune.model.attention import forward as packed_forward

            forward = partial(packed_forward, model)

        if LOSS == "mlx_tune":  # the chunked one-pass CE of `mlx-tune train`
            from mlx_tune.training import losses

            ones = mx.ones(self.y.shape)

            def loss_fn(model, x, y):
                return losses.loss_fn(model, x, y, ones)[0]
        else:
            def loss_fn(model, x, y):
                return nn.losses.cross_entropy(forward(x), y).mean()

        loss_and_grad = nn.value_and_grad(model, loss_fn)
        self.state = state = [model.state, opt.state]

        @partial(mx.compile, inputs=state, outputs=state)
        def step(x, y):
            loss, grads = loss_and_grad(model, x, y)
            opt.update(model, grads)
            return loss

        self._step = step
        self.times: list[float] = []
        self.trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))

    def step(self, record: bool = True) -> float:
        t0 = time.perf_counter()
        loss = self._step(self.x, self.y)
        mx.eval(loss, self.state)
        if record:
            self.times.append(time.perf_counter() - t0)
        self.loss = loss.item()
        return self.times[-1] if record else time.perf_counter() - t0


ATTENTION = "mlx_tune"  # set from --attention
LOSS = "mlx_tune"  # set from --loss


def start(variant: str, batch: int, seq: int, blocks: int | None = None) -> tuple[Trainer, int, float]:
    """Build a model and run its first (compiling) step; returns the trainer, its peak
    memory (its own model, optimizer state and step, excluding arrays that already
    existed) and the first step's seconds."""
    gc.collect()
    mx.clear_cache()
    resident = mx.get_active_memory()
    trainer = Trainer(build(variant, blocks), batch, seq, ATTENTION)
    mx.reset_peak_memory()
    from mlx_tune.training import losses

    dense_head, tiled_head = losses.DENSE_HEAD_BYTES, losses._tiled_head
    if variant == "mlx_lm_4bit":
        # Each variant's head is its own layer: mlx-lm's nn.QuantizedEmbedding computes the
        # tied head with mx.quantized_matmul (the loss's dequantizing shortcuts are
        # mlx_tune's CPU path). The first call traces the compiled step, so this sticks.
        losses.DENSE_HEAD_BYTES, losses._tiled_head = 0, lambda model: None
    try:
        first = trainer.step(record=False)
    finally:
        losses.DENSE_HEAD_BYTES, losses._tiled_head = dense_head, tiled_head
    return trainer, mx.get_peak_memory() - resident, first


def _load() -> str:
    try:
        return " ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 timed step each; (c) extrapolated from 1 and 4 blocks")
    ap.add_argument("--steps", type=int, default=3, help="timed steps each for (a) and (b), after a first step")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rival-blocks", type=lambda v: tuple(int(x) for x in v.split(",")), default=None,
                    metavar="B1,B2", help="extrapolate (c) from steps on B1 and B2 blocks instead of one full step")
    ap.add_argument("--attention", choices=("mlx_tune", "mlx_lm"), default="mlx_tune",
                    help="the same attention for all three: mlx_tune's (as `mlx-tune train` runs) or mlx-lm's")
    ap.add_argument("--loss", choices=("mlx_tune", "full"), default="mlx_tune",
                    help="the same loss for all three: mlx_tune's chunked one-pass CE (as `mlx-tune train` "
                         "runs) or plain CE over the whole logits")
    ap.add_argument("--json", type=Path, help="also write the targets here")
    args = ap.parse_args(argv)
    global ATTENTION, LOSS
    ATTENTION, LOSS = args.attention, args.loss
    if not GGUF.is_file():
        print(f"skip: {GGUF} is absent (make setup fetches it)")
        return 0
    steps = 1 if args.quick else args.steps
    if args.quick and args.rival_blocks is None:
        args.rival_blocks = (1, 4)
    lora_name, _ = _lora_factory()
    print(f"SmolLM2-135M, LoRA r={RANK} all-linear x 30 blocks, batch {args.batch} x {args.seq}, AdamW; "
          f"device {mx.default_device()}; LoRA layer: {lora_name}; attention: {args.attention}; loss: "
          f"{args.loss}; load average {_load()}", flush=True)

    # (a) and (b) live side by side and alternate steps, so load from other processes on
    # this shared machine hits both alike; peaks are taken in each one's first step.
    res, trainers = {}, {}
    for variant in ("mlx_tune_4bit", "fp32"):
        trainers[variant], peak, first = start(variant, args.batch, args.seq)
        res[variant] = {"peak_bytes": peak, "first_s": first}
        print(f"  {variant:14s} first step {first:.2f} s, peak {peak / 2**20:.0f} MiB", flush=True)
    for _ in range(steps):
        for trainer in trainers.values():
            trainer.step()
    for variant, trainer in trainers.items():
        r = res[variant]
        r.update(s_per_step=statistics.median(trainer.times), times=trainer.times, loss=trainer.loss,
                 trainable=trainer.trainable)
        print(f"  {variant:14s} {1 / r['s_per_step']:.4f} steps/s ({r['s_per_step']:.2f} s/step median of "
              f"{', '.join(f'{t:.2f}' for t in r['times'])}), peak {r['peak_bytes'] / 2**20:.0f} MiB, "
              f"loss {r['loss']:.3f}, trainable {r['trainable']:,}", flush=True)
    del trainers["fp32"]

    # (c) is timed between two more (a) steps; its ratio uses their mean, so a change in
    # the machine's load during the minutes (c) takes is seen by both sides.
    a_trainer = trainers["mlx_tune_4bit"]
    bracket = [] if args.quick else [a_trainer.step()]  # --quick: the median of (a)'s steps
    if args.rival_blocks is None:
        _, rival_peak, rival_s = start("mlx_lm_4bit", args.batch, args.seq)
        how = "one full 30-block step (its first call: tracing is < 1 s of it)"
    else:
        b1, b2 = args.rival_blocks
        t = {}
        for nb in (b1, b2):
            _, _, t[nb] = start("mlx_lm_4bit", args.batch, args.seq, blocks=nb)
            print(f"  mlx_lm_4bit    {nb} block(s): {t[nb]:.1f} s/step", flush=True)
        per_block = (t[b2] - t[b1]) / (b2 - b1)
        fixed = t[b1] - b1 * per_block
        rival_s = fixed + 30 * per_block
        how = (f"EXTRAPOLATED from {b1} and {b2} blocks ({t[b1]:.1f} s, {t[b2]:.1f} s: {fixed:.1f} s fixed + "
               f"{per_block:.1f} s/block x 30; one step each; noisy on a loaded machine)")
        rival_peak = None
    if not args.quick:
        bracket.append(a_trainer.step())
    a_ref = statistics.mean(bracket) if bracket else res["mlx_tune_4bit"]["s_per_step"]
    del trainers, a_trainer
    res["mlx_lm_4bit"] = {"s_per_step": rival_s, "how": how}
    around = f"; (a) steps around it: {', '.join(f'{t:.2f}' for t in bracket)} s" if bracket else ""
    print(f"  mlx_lm_4bit    {1 / rival_s:.5f} steps/s ({rival_s:.1f} s/step), {how}{around}", flush=True)

    a, b = res["mlx_tune_4bit"], res["fp32"]
    speed_vs_fp32 = b["s_per_step"] / a["s_per_step"]
    speed_vs_mlx_lm = rival_s / a_ref
    mem_ratio = a["peak_bytes"] / b["peak_bytes"]
    print(f"ratios: (a)/(b) speed {speed_vs_fp32:.2f}x (target >= 0.8), (a)/(c) speed {speed_vs_mlx_lm:.1f}x "
          f"(target >= 20), peak (a) {a['peak_bytes'] / 2**20:.0f} MiB vs (b) {b['peak_bytes'] / 2**20:.0f} MiB "
          f"= {mem_ratio:.2f} (target < 1)" + (f"; (c) peak {rival_peak / 2**20:.0f} MiB" if rival_peak else ""))
    targets = [
        {"name": "qlora_step_speed_vs_fp32_base", "measured": round(speed_vs_fp32, 3), "target": 0.8, "unit": "x",
         "rival": "same LoRA step with an fp32 dense base", "pass": speed_vs_fp32 >= 0.8},
        {"name": "qlora_step_speed_vs_mlx_lm_quantized", "measured": round(speed_vs_mlx_lm, 1), "target": 20.0,
         "unit": "x", "rival": f"mlx-lm LoRALinear on nn.QuantizedLinear, {how}", "pass": speed_vs_mlx_lm >= 20},
        {"name": "qlora_step_peak_memory_vs_fp32_base", "measured": round(mem_ratio, 3), "target": 1.0,
         "unit": "ratio (lower is better)",
         "rival": f"fp32 dense base: {b['peak_bytes'] / 2**20:.0f} MiB vs 4-bit {a['peak_bytes'] / 2**20:.0f} MiB",
         "pass": mem_ratio < 1.0},
    ]
    print(f"load average at the end {_load()} (this machine has {os.cpu_count()} cores, shared: a loaded "
          "machine slows multi-threaded sgemm more than single-threaded quantized_matmul)")
    return emit_targets(targets, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
