#!/usr/bin/env python3
"""Benchmark: SFT on chat data with the vocabulary head only on trained positions (gather on
vs off), mlx_tune vs mlx-lm's LoRA trainer vs Hugging Face PEFT, on the same dense weights.

On chat data most positions of a batch are prompts (and padding): mlx_tune gathers the
positions that carry a loss before the head (``data.batching.gather_index``, below
``GATHER_BELOW`` of a batch's slots trained); ``GATHER_BELOW = 0`` turns it off (the head on
every position, the "before"). Two chat sets, each in the same run:

- ``demo``: the demo reviews (``data/demo_raw/reviews.jsonl`` through ``data_transform.py``:
  a user turn with the instruction and review, an assistant turn with the JSON label);
- ``multiturn``: about 512-token conversations of several user / assistant turns,
  synthesised here deterministically (seeded word lists), every assistant turn trained.

One step = the examples of one packed batch of ``BatchStream`` (``ROWS`` rows of ``SEQ``
slots, prompts masked); every side trains the same examples with the same token ids:

- ``mlx_tune`` / ``mlx_tune (no gather)``: ``training.loop.Step`` over ``losses.batch_loss``
  on the packed rows, the trained positions gathered before the head, or not;
- ``mlx_lm``: ``mlx_lm.load`` of the dense folder, ``linear_to_lora_layers`` and the
  compiled step of ``mlx_lm.tuner.trainer.train`` (``default_loss``) on its own batches
  (``iterate_batches``: one row per example, padded to a multiple of 32). ``default_loss``
  takes one trained range per row, from the first trained token to the end: on a multi-turn
  row that also counts the user turns in between, which costs it nothing more (its head runs
  on every position anyway);
- ``peft``: transformers + ``peft.get_peft_model``, torch CPU fp32, one padded row per
  example with its attention mask, labels -100 off the trained positions, AdamW.

Same model (SmolLM2-135M-Instruct: the shipped Q4_1 GGUF dequantized once to a float32
folder, ``bench_train.export_hf``), LoRA r16 alpha 32 on every linear of every block,
AdamW lr 1e-4. Tokens/s counts real (non-padding) positions. PEFT runs with the rivals'
Python (``.venv-rivals``; "skipped" where torch / peft are missing).

    python bench/bench_head.py [--quick] [--steps N] [--rival-steps N] [--only demo|multiturn]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_train import MODEL, compiled_step, export_hf, mlx_tune_step, peft_step, print_table, run_side, timed  # noqa: E402
from benchlib import add_side_flags, rival_python, run_child  # noqa: E402

RAW_DEMO = ROOT / "data" / "demo_raw" / "reviews.jsonl"
ROWS, SEQ, RANK, ALPHA, LR = 4, 512, 16, 32.0, 1e-4
PEFT_TARGET, MLX_LM_TARGET = 3.0, 2.5
SETS = ("demo", "multiturn")
SIDES = ("mlx_tune", "mlx_tune_nogather", "mlx_lm", "peft")

_WORDS = ("the order arrived late but the support team was kind and quick to help me with a refund "
          "for the broken part so I would buy again from this shop because prices are fair and the "
          "box was packed well although the manual was hard to read and the colour looked different").split()


def multiturn_chats(n: int, tokenizer, target: int = SEQ - 12, seed: int = 0) -> list[dict]:
    """``n`` conversations of alternating user / assistant turns, each grown turn by turn to
    just under ``target`` tokens as the chat template renders it (deterministic)."""
    rng = random.Random(seed)

    def sentence(k: int) -> str:
        return " ".join(rng.choice(_WORDS) for _ in range(k)).capitalize() + "."

    def length(msgs: list[dict]) -> int:
        return len(tokenizer.apply_chat_template(msgs, tokenize=True))

    chats = []
    for _ in range(n):
        msgs: list[dict] = []
        while True:
            turn = [{"role": "user", "content": " ".join(sentence(rng.randint(6, 14)) for _ in range(2))},
                    {"role": "assistant", "content": " ".join(sentence(rng.randint(6, 14)) for _ in range(3))}]
            if msgs and length(msgs + turn) > target:
                break
            msgs += turn
        chats.append({"messages": msgs})
    return chats


def make_rows(name: str, out: Path, work: Path, tokenizer, rows: int) -> dict:
    """Convert (data_transform.py) and tokenize the set, pack it, take one batch of ``rows``
    rows; save its examples (ids, trained mask) and the row layout as JSON."""
    from mlx_tune.data import batching, cache

    raw = work / f"{name}_raw.jsonl"
    if name == "demo":
        raw.write_text(RAW_DEMO.read_text())
    else:
        raw.write_text("".join(json.dumps(c) + "\n" for c in multiturn_chats(4 * rows + 4, tokenizer)))
    conv = work / name
    subprocess.run([sys.executable, str(ROOT / "data_transform.py"), str(raw), "--out", str(conv), "--to", "chat",
                    "--valid-ratio", "0", "--test-ratio", "0", "--force"], check=True, capture_output=True, cwd=ROOT)
    ds = cache.load_dataset(conv / "train.jsonl", tokenizer, max_seq_length=SEQ, mask_prompt=True, use_cache=False)
    stream = batching.BatchStream(ds, rows, SEQ, packing=True, seed=0)
    layout = [r for r in stream.batch_rows(0) if r]
    examples, new_rows = [], []
    for row in layout:
        new_rows.append(list(range(len(examples), len(examples) + len(row))))
        examples += [{"ids": ds.ids[i].tolist(), "mask": ds.train[i].astype(int).tolist()} for i in row]
    data = {"examples": examples, "rows": new_rows, "width": SEQ}
    out.write_text(json.dumps(data))
    n_tokens = sum(len(e["ids"]) - 1 for e in examples)
    n_trained = sum(sum(e["mask"][1:]) for e in examples)
    return {"n_examples": len(examples), "n_tokens": n_tokens, "n_trained": n_trained, "rows": len(new_rows)}


# ---------------------------------------------------------------------------
# The sides (each in its own process)
# ---------------------------------------------------------------------------


def side_mlx_tune(data: dict, steps: int, hf_dir: str, gather: bool) -> dict:
    from mlx_tune.training.lanes import wide_scheduling

    wide_scheduling("sft", False, SEQ)  # as `mlx-tune train` does, before MLX runs anything
    from types import SimpleNamespace

    import mlx.core as mx
    import mlx.optimizers as optim
    import numpy as np

    from mlx_tune import adapters
    from mlx_tune.config import LoraConfig
    from mlx_tune.data import batching
    from mlx_tune.model import packing, quant
    from mlx_tune.model.loading import load_model
    from mlx_tune.training.losses import batch_loss

    if not gather:
        batching.GATHER_BELOW = 0.0  # the head on every position: the "before"
    model, tokenizer, _ = load_model(hf_dir)
    quant.prepare_for_backend(model)
    mx.random.seed(0)
    adapters.inject(model, LoraConfig(rank=RANK, alpha=ALPHA, dropout=0.0, target_modules="all-linear"))
    ds = SimpleNamespace(ids=[np.array(e["ids"], dtype=np.int32) for e in data["examples"]],
                         train=[np.array(e["mask"], dtype=bool) for e in data["examples"]])
    pad = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
    batch = batching.collate(ds, data["rows"], data["width"], True, pad)
    packing.set_reach(model, max(len(i) - 1 for i in ds.ids))  # what `mlx-tune train` tells a packed model
    out = timed(mlx_tune_step(model, optim.AdamW(learning_rate=LR), batch_loss, batch), steps, mx)
    out["gathered"] = 0 if batch.gather is None else int(batch.gather.shape[0])
    return out


def side_mlx_lm(data: dict, steps: int, hf_dir: str) -> dict:
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_lm import load
    from mlx_lm.tuner.trainer import default_loss, iterate_batches
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, _ = load(hf_dir)
    model.freeze()
    mx.random.seed(0)
    linear_to_lora_layers(model, len(model.layers), {"rank": RANK, "scale": ALPHA / RANK, "dropout": 0.0})
    # its dataset items: (tokens, offset of the first trained token)
    items = [(e["ids"], e["mask"].index(1)) for e in data["examples"]]
    batch, lengths = next(iterate_batches(items, len(items), data["width"] + 1, seed=0))
    out = timed(compiled_step(model, optim.AdamW(learning_rate=LR), default_loss, batch, lengths), steps, mx)
    out["shape"] = list(batch.shape)
    return out


def side_peft(data: dict, steps: int, hf_dir: str) -> dict:
    """One padded row per example (its attention mask), labels -100 off the trained positions."""
    import torch

    ex = data["examples"]
    width = max(len(e["ids"]) for e in ex)
    ids = torch.zeros((len(ex), width), dtype=torch.long)
    attn = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, e in enumerate(ex):
        n = len(e["ids"])
        ids[i, :n] = torch.tensor(e["ids"])
        attn[i, :n] = 1
        labels[i, :n] = torch.where(torch.tensor(e["mask"], dtype=torch.bool), ids[i, :n], torch.tensor(-100))
    out = timed(peft_step(hf_dir, ids[:, :-1], attn[:, :-1], labels[:, 1:], LR), steps, None)
    out["shape"] = [len(ex), width - 1]
    return out


# ---------------------------------------------------------------------------
# The parent
# ---------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 rows per step, the first 4 blocks, few steps (a smoke run)")
    p.add_argument("--steps", type=int, help="timed steps per mlx side (default 6, quick 1)")
    p.add_argument("--rival-steps", type=int, help="timed steps for PEFT (default 3, quick 1)")
    p.add_argument("--batch-rows", type=int, help=f"packed rows of {SEQ} slots per step (default {ROWS}, quick 2)")
    p.add_argument("--layers", type=int, help="keep only the first N of the 30 blocks (quick: 4; not a measurement)")
    p.add_argument("--only", choices=SETS, help="one data set only")
    add_side_flags(p, SIDES)
    args = p.parse_args(argv)

    if args.side:
        return run_child(args.side, args.rows, {
            "mlx_lm": lambda data: side_mlx_lm(data, args.steps, args.hf_dir),
            "peft": lambda data: side_peft(data, args.steps, args.hf_dir),
            "mlx_tune": lambda data: side_mlx_tune(data, args.steps, args.hf_dir, gather=True),
            "mlx_tune_nogather": lambda data: side_mlx_tune(data, args.steps, args.hf_dir, gather=False),
        }, torch_sides=("peft",))

    from mlx_tune.runtime.blas import ensure_fast_blas

    ensure_fast_blas()
    if not MODEL.is_file() or not RAW_DEMO.is_file():
        print(f"skipped: {MODEL} or {RAW_DEMO} not present")
        print(json.dumps({"targets": []}))
        return 0
    steps = args.steps or (1 if args.quick else 6)
    rival_steps = args.rival_steps or (1 if args.quick else 3)
    rows = args.batch_rows or (2 if args.quick else ROWS)
    layers = args.layers or (4 if args.quick else None)
    sets = [args.only] if args.only else list(SETS)
    rivals = rival_python("torch, peft, transformers")
    results: dict[str, dict[str, dict]] = {}
    infos: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        hf = work / "hf"
        tokenizer = export_hf(hf, layers)
        extra = ["--hf-dir", str(hf)]
        for name in sets:
            data_path = work / f"{name}.json"
            info = infos[name] = make_rows(name, data_path, work, tokenizer, rows)
            print(f"{name}: {info['n_examples']} examples in {info['rows']} packed row(s) of {SEQ} slots, "
                  f"{info['n_tokens']} real positions, {info['n_trained']} trained "
                  f"({100 * info['n_trained'] / info['n_tokens']:.0f}%); timed steps: mlx {steps}, PEFT {rival_steps}"
                  + (f"; SMOKE RUN: the first {layers} of 30 blocks only" if layers else ""), flush=True)
            res = results[name] = {}
            for side in ("mlx_tune", "mlx_tune_nogather", "mlx_lm"):
                res[side] = run_side(sys.executable, side, data_path, steps, extra, 1800, script=__file__)
                print(f"  {side}: {res[side]['step_s']:.2f} s/step", flush=True)
            if rivals is None:
                print("  peft: skipped: torch/peft not installed (bench/install_rivals.sh sets up .venv-rivals)")
            else:
                res["peft"] = run_side(rivals, "peft", data_path, rival_steps, extra, 3000, script=__file__)
                print(f"  peft: {res['peft']['step_s']:.2f} s/step", flush=True)
    return report(results, infos)


def report(results: dict, infos: dict) -> int:
    names = {"mlx_tune": "mlx_tune (gather)", "mlx_tune_nogather": "mlx_tune (no gather)", "mlx_lm": "mlx_lm.lora",
             "peft": "PEFT (torch CPU)"}
    targets = []
    for name, res in results.items():
        for r in res.values():
            r["tokens_per_sec"] = infos[name]["n_tokens"] / r["step_s"]
    print_table([(f"{name}: {names[side]}", r) for name, res in results.items() for side, r in res.items()])
    print()
    for name, res in results.items():
        ours = res["mlx_tune"]["tokens_per_sec"]
        gain = ours / res["mlx_tune_nogather"]["tokens_per_sec"]
        lm = ours / res["mlx_lm"]["tokens_per_sec"]
        line = (f"{name}: gather on / off {gain:.2f}x ({res['mlx_tune']['gathered']} of {infos[name]['n_tokens']} "
                f"positions through the head); vs mlx_lm.lora {lm:.2f}x (goal >= {MLX_LM_TARGET}x)")
        targets += [
            {"name": f"SFT chat ({name}) tokens/s, head on trained positions vs on all (mlx_tune, printed)",
             "measured": round(gain, 3), "target": 1.0, "unit": "x", "rival": "mlx_tune GATHER_BELOW=0",
             "pass": gain >= 1.0, "mlx_tune_tokens_per_sec": round(ours, 1),
             "before_tokens_per_sec": round(res["mlx_tune_nogather"]["tokens_per_sec"], 1)},
            {"name": f"SFT chat ({name}) tokens/s vs mlx_lm.lora (SmolLM2-135M dense fp32, LoRA r16 all-linear)",
             "measured": round(lm, 3), "target": MLX_LM_TARGET, "unit": "x", "rival": "mlx_lm.lora",
             "pass": lm >= MLX_LM_TARGET, "rival_tokens_per_sec": round(res["mlx_lm"]["tokens_per_sec"], 1)},
        ]
        if "peft" in res:
            pf = ours / res["peft"]["tokens_per_sec"]
            line += f"; vs PEFT {pf:.2f}x (goal >= {PEFT_TARGET}x)"
            targets.append({"name": f"SFT chat ({name}) tokens/s vs HF PEFT (torch CPU fp32)", "measured": round(pf, 3),
                            "target": PEFT_TARGET, "unit": "x", "rival": "peft", "pass": pf >= PEFT_TARGET,
                            "rival_tokens_per_sec": round(res["peft"]["tokens_per_sec"], 1)})
        else:
            targets.append({"name": f"SFT chat ({name}) tokens/s vs HF PEFT", "measured": None, "target": "runs",
                            "unit": "", "rival": "peft", "pass": None, "note": "skipped: torch/peft not installed"})
        print(line)
    print(json.dumps({"targets": targets}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
