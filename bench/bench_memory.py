"""Memory benchmark: the planner's predictions against measured training steps, 7B in 32 GB, and 8B-32B.

(a) Small configs (tiny, a medium-small synthetic llama, SmolLM2-135M) at 256/512/1024
    tokens with and without gradient checkpointing: measured MLX peak of a real step vs
    ``mlx_tune.planning.planner.plan`` (target: within 15%).
(b) 7B: the exact architectures of Mistral-7B v0.3, Llama-3.1-8B and Qwen2.5-7B (published
    config values, mlx-lm model classes), random bf16 weights created and quantized to 4-bit
    g64 one layer at a time, LoRA all-linear r=16 on every block, gradient checkpointing,
    batch 1, real AdamW steps at 512 / 2048 / 4096 tokens. Targets: under 10 GB at 2048
    and under 16 GB at 4096 tokens. The rival is mlx-lm's own LoRA step (``linear_to_lora_layers``,
    ``grad_checkpoint``, ``default_loss`` over the full logits, compiled as in
    ``mlx_lm.tuner.trainer.train``) with mlx-lm's quantized layers. Its CPU quantized matmul
    runs at a few GFLOP/s, so it is measured at 1 and 2 blocks (full width and vocabulary)
    and extrapolated linearly per block to the full depth; the output says so.

(c) Bigger: Qwen3-14B and Qwen3-32B at 2048 tokens (targets under 16 and 32 GB) and
    Llama-3.1-8B at 8192 tokens (under 16 GB), measured the same way (1-block real step at
    full width and vocabulary plus the per-block bytes of the other blocks), planner within
    15% of each, and one more full-depth check of the extension on Qwen3-14B at 512 tokens.
    Part of the full run and of ``--only 7b`` (``--only big`` runs just these); ``--smoke``
    runs the same code path on Qwen3-0.6B at 256 tokens (1 block and full depth, ~3 min).

Every point runs in its own subprocess (memory is returned between points; peak RSS is per
point) under ``mx.set_memory_limit`` and a watchdog that stops a point cleanly when the
process grows past ``--max-gb`` (default 18 GB).

    python bench/bench_memory.py [--quick] [--out FILE] [--only small|7b|big] [--smoke] [--max-gb 18]
                                 [--pick MODEL[@SEQ]]  (e.g. --only big --pick Llama-3.1-8B@8192)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlx_tune.runtime.blas import ensure_fast_blas  # noqa: E402

SMOLLM2 = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
MEDIUM = dict(hidden_size=512, num_hidden_layers=4, intermediate_size=1408, num_attention_heads=8,
              num_key_value_heads=4, head_dim=64, vocab_size=8192)
SEVEN_B = ("mistralai/Mistral-7B-Instruct-v0.3", "meta-llama/Llama-3.1-8B-Instruct", "Qwen/Qwen2.5-7B-Instruct")
QWEN3_14B, QWEN3_32B, SMOKE_MODEL = "Qwen/Qwen3-14B", "Qwen/Qwen3-32B", "Qwen/Qwen3-0.6B"
FULL_SIZE = SEVEN_B + (QWEN3_14B, QWEN3_32B, SMOKE_MODEL)  # points built at full width from known_configs
# (model, tokens) -> GB the full-depth MLX peak must stay under
LIMITS = {**{(m, 2048): 10.0 for m in SEVEN_B}, **{(m, 4096): 16.0 for m in SEVEN_B},
          (QWEN3_14B, 2048): 16.0, (QWEN3_32B, 2048): 32.0, (SEVEN_B[1], 8192): 16.0}
TOLERANCE = 0.15
ABS_TOLERANCE_GB = 0.02  # MLX's own buffers and allocator rounding at the smallest points


# ---------------------------------------------------------------------------
# One point, in a child process
# ---------------------------------------------------------------------------


def _random_quantized_model(config: dict, bits: int = 4, group_size: int = 64, seed: int = 0):
    """An mlx-lm model of ``config`` whose every Linear / Embedding holds random 4-bit weights.

    The model class is constructed lazily (MLX arrays are not computed until evaluated,
    so its fp32 initial weights are never materialised), then each layer in turn gets
    random packed codes and random bf16 group scales (biases ``-8 * scale``: symmetric
    codes), evaluated at once. That is what quantizing random weights gives, without
    drawing 7 billion normal samples (about half an hour on this CPU); memory depends on
    shapes only.
    """
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_unflatten
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    mx.random.seed(seed)
    for path, layer in list(model.named_modules()):
        if isinstance(layer, nn.Linear):
            out_dims, in_dims = layer.weight.shape
            new = nn.QuantizedLinear(in_dims, out_dims, bias="bias" in layer, group_size=group_size, bits=bits)
        elif isinstance(layer, nn.Embedding):
            out_dims, in_dims = layer.weight.shape
            new = nn.QuantizedEmbedding(out_dims, in_dims, group_size=group_size, bits=bits)
        else:
            continue
        new.weight = mx.random.randint(0, 2**31 - 1, (out_dims, in_dims * bits // 32)).astype(mx.uint32)
        scales = (0.02 / 8) * (0.5 + mx.random.uniform(shape=(out_dims, in_dims // group_size)))
        new.scales = scales.astype(mx.bfloat16)
        new.biases = (-(2 ** (bits - 1)) * scales).astype(mx.bfloat16)
        if "bias" in layer:
            new.bias = mx.zeros((out_dims,), dtype=mx.bfloat16)
        mx.eval(new.parameters())
        model.update_modules(tree_unflatten([(path, new)]))
    model.set_dtype(mx.bfloat16)  # norms (the quantized weights stay uint32)
    mx.eval(model.parameters())
    model.freeze()
    return model


def _per_block_bytes(model, tokens: int) -> int:
    """What one more block adds to a checkpointed step, from the real arrays of the top block:
    its weights and adapter (all arrays), the adapter's gradient and AdamW m, v (3x its
    trainable arrays), and its kept input (tokens x hidden, bf16)."""
    from mlx.utils import tree_flatten

    block = model.layers[-1]
    arrays = sum(v.nbytes for _, v in tree_flatten(block.parameters()))
    trainable = sum(v.nbytes for _, v in tree_flatten(block.trainable_parameters()))
    return arrays + 3 * trainable + tokens * model.args.hidden_size * 2


def _load_point_model(point: dict):
    """(model, HF config dict, quantization dict or None) for a point."""
    import mlx.core as mx

    from mlx_tune.config import QuantizeConfig
    from mlx_tune.model.known_configs import KNOWN_CONFIGS
    from mlx_tune.model.quantize import quantize_model

    kind = point["model"]
    if kind in ("tiny", "medium"):
        from mlx_tune.testing.tiny import tiny_config, tiny_model

        overrides = MEDIUM if kind == "medium" else {}
        model = tiny_model("llama", **overrides)
        quantize_model(model, QuantizeConfig(bits=4, group_size=64), fast_cpu=not point.get("rival"))
        return model, tiny_config("llama", **overrides), {"bits": 4, "group_size": 64}
    if kind == "smollm2":
        from mlx_tune.model.loading import load_model
        from mlx_tune.model.quant import prepare_for_backend
        from mlx_tune.planning.arch import read_source_config

        model, _, _ = load_model(str(SMOLLM2))
        if not point.get("rival"):
            prepare_for_backend(model)
        src = read_source_config(str(SMOLLM2))
        return model, src.config, src.quantization
    config = dict(KNOWN_CONFIGS[kind])
    if point.get("layers"):
        config["num_hidden_layers"] = int(point["layers"])
    model = _random_quantized_model(config)
    if not point.get("rival"):
        from mlx_tune.model.quant import prepare_for_backend

        prepare_for_backend(model)
    mx.clear_cache()
    return model, config, {"bits": 4, "group_size": 64}


def _rival_step(model, seq_len: int, layers: int):
    """mlx-lm's LoRA step as ``mlx_lm.tuner.trainer.train`` builds it; returns (peak, seconds, loss)."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx_lm.tuner.trainer import default_loss, grad_checkpoint
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model.freeze()
    linear_to_lora_layers(model, layers, {"rank": 16, "scale": 2.0, "dropout": 0.0})
    grad_checkpoint(model.layers[0])
    opt = optim.AdamW(learning_rate=1e-5)
    loss_value_and_grad = nn.value_and_grad(model, default_loss)
    state = [model.state, opt.state, mx.random.state]

    def step(batch, lengths):
        (loss, _), grad = loss_value_and_grad(model, batch, lengths)
        opt.update(model, grad)
        return loss

    step = mx.compile(step, inputs=state, outputs=state)
    vocab = model.args.vocab_size
    batch = mx.random.randint(0, vocab, (1, seq_len + 1))
    lengths = mx.array([[0, seq_len]])
    model.train()
    mx.eval(model.state)
    mx.reset_peak_memory()
    start = time.perf_counter()
    loss = step(batch, lengths)
    mx.eval(loss, state)
    return mx.get_peak_memory(), time.perf_counter() - start, loss.item()


def run_point(point: dict) -> dict:
    """Build the point's model, run its steps, return measured figures and the plan."""
    import mlx.core as mx

    from mlx_tune.config import LoraConfig
    from mlx_tune.planning.probe import measure_steps, rss_peak_bytes

    mx.set_memory_limit(int(point.get("max_gb", 18) * 1e9))
    start = time.perf_counter()
    model, config, quant = _load_point_model(point)
    build_s = time.perf_counter() - start
    seq, batch, ck = point["seq"], point.get("batch", 1), point.get("ck", True)
    result = {"point": point, "build_seconds": round(build_s, 1), "weights_gb": mx.get_active_memory() / 1e9}
    if point.get("rival"):
        peak, secs, loss = _rival_step(model, seq, int(config["num_hidden_layers"]))
        result.update(peak_gb=peak / 1e9, seconds=[round(secs, 1)], loss=loss, rss_peak_gb=rss_peak_bytes() / 1e9,
                      per_block_gb=_per_block_bytes(model, seq * batch) / 1e9, config=config, quant=quant)
        return result
    from mlx_tune.adapters import inject

    inject(model, LoraConfig(rank=16, alpha=32.0))
    mx.eval(model.parameters())
    m = measure_steps(model, batch, seq, grad_checkpoint=ck, steps=point.get("steps", 2))
    result.update(m.as_dict())
    result.update(config=config, quant=quant, rss_peak_gb=rss_peak_bytes() / 1e9)
    if point.get("layers"):
        result["per_block_gb"] = _per_block_bytes(model, seq * batch) / 1e9
    return result


# ---------------------------------------------------------------------------
# The parent: subprocesses with a memory watchdog
# ---------------------------------------------------------------------------


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def spawn(point: dict, max_gb: float, timeout_s: float) -> dict:
    """Run one point in a child; kill it (and report so) past ``max_gb`` RSS or ``timeout_s``."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--point", json.dumps({**point, "max_gb": max_gb})]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    stopped: list[str] = []

    def watch():
        start = time.time()
        while proc.poll() is None:
            if _rss_bytes(proc.pid) > max_gb * 1e9:
                stopped.append(f"stopped: RSS above {max_gb} GB")
                proc.kill()
            elif time.time() - start > timeout_s:
                stopped.append(f"stopped: longer than {timeout_s:.0f} s")
                proc.kill()
            time.sleep(0.2)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    out, err = proc.communicate()
    t.join()
    for line in reversed(out.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    reason = stopped[0] if stopped else (err.strip().splitlines() or ["no output"])[-1]
    return {"point": point, "error": reason}


def predict(r: dict) -> dict:
    """Add the planner's prediction (computed now, from the point's config only) to a result."""
    from mlx_tune.planning.arch import arch_from_config
    from mlx_tune.planning.planner import Settings, plan

    if "config" not in r or "peak_gb" not in r:
        return r
    p, quant = r["point"], r.get("quant")
    s = Settings(batch_size=p.get("batch", 1), seq_len=p["seq"], grad_checkpoint=p.get("ck", True),
                 bits=quant["bits"] if quant else None, group_size=quant["group_size"] if quant else 64,
                 lora_rank=16, backend="cpu")
    pl = plan(arch_from_config(r["config"]), s)
    r.update(predicted_gb=pl.mlx_peak / 1e9, predicted_total_gb=pl.total / 1e9,
             ratio=r["peak_gb"] / (pl.mlx_peak / 1e9), parts_gb=pl.as_dict()["parts_gb"])
    return r


def _fmt(r: dict) -> str:
    p = r["point"]
    name = f"{p['model']}{'/' + str(p['layers']) + 'L' if p.get('layers') else ''}"
    tag = "rival mlx-lm" if p.get("rival") else ("ckpt" if p.get("ck", True) else "no-ckpt")
    if "error" in r:
        return f"{name:<36} {p['seq']:>5} {tag:<12} {r['error']}"
    pred = f"{r['predicted_gb']:7.3f}" if "predicted_gb" in r else "      -"
    ratio = f"{r['ratio']:6.3f}" if "ratio" in r else "     -"
    return (f"{name:<36} {p['seq']:>5} {tag:<12} measured {r['peak_gb']:7.3f} GB  predicted {pred} GB  "
            f"ratio {ratio}  rss {r['rss_peak_gb']:6.2f} GB  step {r['seconds'][-1]:7.1f} s")


def small_points(quick: bool) -> list[dict]:
    models = ["tiny", "medium"] + (["smollm2"] if SMOLLM2.exists() else [])
    seqs = (256, 512) if quick else (256, 512, 1024)
    return [{"model": m, "seq": s, "ck": ck} for m in models for s in seqs for ck in (True, False)]


def seven_b_points(quick: bool) -> list[dict]:
    """Real steps at full width and vocabulary on 1 block; the full depth is added per block.

    A full-depth step of an 8B model takes about 10 min at 512 tokens on this 2-core CPU
    (and scales with the tokens), so each point trains a 1-block model of the exact
    architecture and the report adds ``num_hidden_layers - 1`` times the per-block bytes
    taken from the real arrays of that block (weights, adapter, its gradient and AdamW
    moments, the checkpointed input). The full run checks that extension once against a
    full-depth step (Llama-3.1-8B at 512 tokens). ``--quick`` runs the point the 10 GB
    target is hardest on: Llama-3.1-8B (128k vocabulary) at 2048 tokens.
    """
    mistral, llama, qwen = SEVEN_B
    if quick:
        return [{"model": llama, "seq": 2048, "layers": 1, "steps": 1}]
    pts = [{"model": m, "seq": s, "layers": 1, "steps": 1} for s in (512, 2048, 4096) for m in (llama, qwen, mistral)]
    pts += [{"model": m, "seq": 512, "layers": 1, "rival": True} for m in (mistral, llama)]
    pts += [{"model": llama, "seq": 512, "steps": 1}]  # full depth: checks the per-block extension
    return pts + big_points()


def big_points(smoke: bool = False) -> list[dict]:
    """Qwen3-14B / 32B at 2048 and Llama-3.1-8B at 8192 tokens (1 block + per-block bytes), and
    a full-depth Qwen3-14B step at 512 tokens checking the extension on that architecture.
    ``smoke``: the same path on Qwen3-0.6B at 256 tokens (1-block and full depth), quickly."""
    if smoke:
        return [{"model": SMOKE_MODEL, "seq": 256, "layers": 1, "steps": 1}, {"model": SMOKE_MODEL, "seq": 256, "steps": 1}]
    return [{"model": QWEN3_14B, "seq": 2048, "layers": 1, "steps": 1},
            {"model": QWEN3_32B, "seq": 2048, "layers": 1, "steps": 1},
            {"model": SEVEN_B[1], "seq": 8192, "layers": 1, "steps": 1},
            {"model": QWEN3_14B, "seq": 512, "layers": 1, "steps": 1},
            {"model": QWEN3_14B, "seq": 512, "steps": 1}]


def targets_from(results: list[dict]) -> list[dict]:
    """Contract-shaped target objects: name, measured, target, unit, rival, pass."""
    targets = []
    for r in results:
        p = r["point"]
        if "ratio" in r and not p.get("rival"):  # the planner predicts mlx_tune's step, not mlx-lm's
            err = abs(r["peak_gb"] / r["predicted_gb"] - 1)
            # Below a few tens of MB MLX's own buffers dominate: there the check is absolute.
            close = err <= TOLERANCE or abs(r["peak_gb"] - r["predicted_gb"]) <= ABS_TOLERANCE_GB
            depth = f" {p['layers']}-block" if p.get("layers") else ""
            targets.append({"name": f"plan accuracy {p['model']}{depth} {p['seq']} tok "
                                    f"{'ckpt' if p.get('ck', True) else 'no-ckpt'}",
                            "measured": round(err * 100, 1), "target": TOLERANCE * 100,
                            "unit": f"% error vs measured peak (or within {ABS_TOLERANCE_GB * 1000:.0f} MB)",
                            "rival": None, "pass": close})
    from mlx_tune.model.known_configs import KNOWN_CONFIGS
    from mlx_tune.planning.arch import arch_from_config
    from mlx_tune.planning.planner import Settings, plan

    def full_depth(r: dict) -> float:
        """Measured peak at the run's depth plus the per-block bytes of the missing blocks."""
        full = KNOWN_CONFIGS[r["point"]["model"]]["num_hidden_layers"]
        return r["peak_gb"] + (full - r["point"]["layers"]) * r["per_block_gb"]

    rival = {(r["point"]["model"], r["point"]["seq"]): full_depth(r)
             for r in results if r["point"].get("rival") and "per_block_gb" in r}
    for r in results:
        p = r["point"]
        if p["model"] not in FULL_SIZE or p.get("rival") or "per_block_gb" not in r:
            continue
        measured = full_depth(r)
        planned = plan(arch_from_config(KNOWN_CONFIGS[p["model"]]),
                       Settings(batch_size=1, seq_len=p["seq"], grad_checkpoint=True, backend="cpu")).mlx_peak / 1e9
        r["full_depth_gb"], r["full_depth_predicted_gb"] = measured, planned
        limit = LIMITS.get((p["model"], p["seq"]))
        name = p["model"].split("/")[-1]
        size = "7B" if p["model"] in SEVEN_B and p["seq"] <= 4096 else "big"
        targets.append({"name": f"{size} QLoRA MLX peak {name} {p['seq']} tok (1-block step + per-block bytes)",
                        "measured": round(measured, 3), "target": limit, "unit": "GB",
                        "rival": round(rival[(p["model"], p["seq"])], 3) if (p["model"], p["seq"]) in rival else None,
                        "pass": measured < limit if limit else True})
        err = abs(measured / planned - 1)
        targets.append({"name": f"plan accuracy {name} {p['seq']} tok full depth", "measured": round(err * 100, 1),
                        "target": TOLERANCE * 100, "unit": "% error vs measured peak", "rival": None,
                        "pass": err <= TOLERANCE})
    # A full-depth step, where one ran, checks the 1-block extension the other points use.
    extended = {(r["point"]["model"], r["point"]["seq"]): r["full_depth_gb"] for r in results if "full_depth_gb" in r}
    for r in results:
        p = r["point"]
        key = (p["model"], p["seq"])
        if p["model"] in FULL_SIZE and not p.get("rival") and not p.get("layers") and "peak_gb" in r and key in extended:
            err = abs(extended[key] / r["peak_gb"] - 1)
            targets.append({"name": f"1-block extension vs a full-depth step {p['model'].split('/')[-1]} {p['seq']} tok",
                            "measured": round(err * 100, 1), "target": TOLERANCE * 100,
                            "unit": f"% error (full depth measured {r['peak_gb']:.3f} GB, extension "
                                    f"{extended[key]:.3f} GB)", "rival": None, "pass": err <= TOLERANCE})
    return targets, rival


def main() -> int:
    ensure_fast_blas()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small configs at 256/512 and one 7B point at 512")
    ap.add_argument("--out", help="write the JSON report here (atomically)")
    ap.add_argument("--only", choices=["small", "7b", "big"], help="run one part only (7b includes big)")
    ap.add_argument("--smoke", action="store_true", help="with --only big: Qwen3-0.6B at 256 tokens instead")
    ap.add_argument("--max-gb", type=float, default=18.0, help="stop a point whose process grows past this")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per point")
    ap.add_argument("--keep", action="store_true", help="keep the points already in --out and run the rest")
    ap.add_argument("--rescore", metavar="FILE", help="recompute predictions and targets for a saved report")
    ap.add_argument("--pick", metavar="MODEL[@SEQ]",
                    help="run only the points whose model contains MODEL (and with SEQ tokens), "
                         "e.g. --only big --pick Llama-3.1-8B@8192")
    ap.add_argument("--point", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.point:
        print(json.dumps(run_point(json.loads(args.point))), flush=True)
        return 0
    if args.rescore:
        results = [predict(r) for r in json.loads(Path(args.rescore).read_text())["results"]]
        for r in results:
            print(_fmt(r))
        return _finish(args, results)
    if args.only == "big":
        points = big_points(args.smoke)
    else:
        points = [] if args.only == "7b" else small_points(args.quick)
        points += [] if args.only == "small" else seven_b_points(args.quick)
    if args.pick:
        name, _, seq = args.pick.partition("@")
        points = [p for p in points if name in p["model"] and (not seq or p["seq"] == int(seq))]
    results = []
    if args.keep and args.out and Path(args.out).is_file():
        results = [predict(r) for r in json.loads(Path(args.out).read_text())["results"] if "error" not in r]
        done = [{k: v for k, v in r["point"].items() if k != "max_gb"} for r in results]
        points = [p for p in points if p not in done]
        for r in results:
            print(_fmt(r), flush=True)
    for point in points:
        r = predict(spawn(point, args.max_gb, args.timeout))
        results.append(r)
        print(_fmt(r), flush=True)
        if args.out:
            _write(args.out, results)
    return _finish(args, results)


def _finish(args, results: list[dict]) -> int:
    targets, extrapolated = targets_from(results)
    for (model, seq), gb in extrapolated.items():
        print(f"mlx-lm rival {model} at {seq} tokens: {gb:.3f} GB at full depth "
              "(its CPU quantized matmul is too slow for a full-depth step here: measured on 1 block, "
              "plus the per-block bytes of the missing blocks from the real arrays)")
    for r in results:
        if "full_depth_gb" in r:
            print(f"{r['point']['model']} {r['point']['seq']} tok full depth: measured-and-extended "
                  f"{r['full_depth_gb']:.3f} GB, planner {r['full_depth_predicted_gb']:.3f} GB")
    for t in targets:
        print(json.dumps(t))
    print(json.dumps({"targets": targets}))  # the whole list, last (what bench/run_all.py reads)
    if args.out:
        _write(args.out, results, targets)
    return 0


def _write(path: str, results: list[dict], targets: list[dict] | None = None) -> None:
    from mlx_tune.atomic import write_json_atomic

    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    write_json_atomic(path, {"bench": "memory", "date": date, "results": results, "targets": targets or []}, indent=1)


if __name__ == "__main__":
    raise SystemExit(main())
