"""``mlx-tune train CONFIG.yaml [KEY=VALUE ...]`` (and ``./train_by_mlx.sh``): train an adapter.

Config -> (all checks) -> model -> backend fast path -> LoRA -> data -> loop -> adapter files.
Writes into ``output_dir``: ``adapters.safetensors``, ``adapter_config.json``,
``metrics.jsonl``, ``checkpoints/step_*`` and ``loss.png`` (with matplotlib).

Data parallel: run it under ``mlx.launch``, one process per rank, for example two on this
machine, or one on each of two Macs (passwordless ssh, the same paths on both):

    mlx.launch --backend ring --hosts 127.0.0.1 -n 2 .venv/bin/python -m mlx_tune train CONFIG.yaml
    mlx.launch --backend ring --hosts mac1.local,mac2.local "$PWD/.venv/bin/python" -m mlx_tune train CONFIG.yaml

``train.batch_size`` is the global batch: each rank takes ``batch_size / world`` rows of
its own shard (global batches rank, rank + world, ...), token-weighted gradients are
summed over ranks with ``all_sum``, and only rank 0 writes files. The result equals one
process with ``batch_size / world`` rows and ``grad_accumulation x world`` micro-batches.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

EXIT_INTERRUPTED = 130


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config (see configs/demo.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.iters=50")


def _precheck(cfg) -> None:
    """Problems found without loading anything (so they come before the model load)."""
    from mlx_tune.errors import UserError

    if not cfg.data:
        raise UserError("data: no data folder given; set data: DIR holding train.jsonl (see data_transform.py)")
    data = Path(cfg.data)
    if not (data / "train.jsonl").is_file():
        raise UserError(f"data: {data / 'train.jsonl'} not found; run `python data_transform.py INPUT --out {data}`")
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir: {out} exists and is not a folder")


def _world():
    import mlx.core as mx

    group = mx.distributed.init()
    return group, group.rank(), group.size()


def _say(rank: int, *args) -> None:
    if rank == 0:
        print(*args, flush=True)


def _shifted(data_state: dict, rank: int) -> dict:
    """Rank 0's saved stream position as rank ``rank``'s (each rank is ``rank`` batches ahead)."""
    g = data_state["epoch"] * data_state["n_batches"] + data_state["index"] + rank
    epoch, index = divmod(g, data_state["n_batches"])
    return {**data_state, "epoch": epoch, "index": index, "rank": rank}


def batch_loss(model, batch):
    """``losses.loss_fn`` (packing-aware attention, chunked cross-entropy) over a batch's arrays."""
    from mlx_tune.training.losses import loss_fn

    return loss_fn(model, batch.inputs, batch.targets, batch.loss_mask, batch.segment_ids, batch.positions)


def eval_loss(model, batch):
    """Forward-only loss for validation / test: the same value as ``batch_loss``, without the
    gradient that ``losses.loss_fn`` computes in its forward pass (frozen head: a second
    vocabulary-sized matmul per token, wasted when nothing is trained)."""
    import mlx.core as mx

    from mlx_tune.model.attention import hidden_states
    from mlx_tune.training.losses import masked_ce_value

    h = hidden_states(model, batch.inputs, batch.segment_ids, batch.positions)
    mask = batch.loss_mask.astype(mx.float32)
    total = masked_ce_value(model, h, batch.targets, mask)
    n = mask.sum()
    return total / mx.maximum(n, 1.0), n


def run(args: argparse.Namespace) -> int:
    from mlx_tune.config import load_config

    cfg = load_config(args.config, args.overrides)  # every config error, before any model loads
    _precheck(cfg)

    import mlx.core as mx

    from mlx_tune.adapters import manager as adapters
    from mlx_tune.config import config_to_dict
    from mlx_tune.data import batching
    from mlx_tune.errors import UserError
    from mlx_tune.model import quant
    from mlx_tune.model.loading import load_model
    from mlx_tune.training import checkpoint
    from mlx_tune.training import loop as trainer
    from mlx_tune.training.callbacks import MetricsLog, Progress, plot_losses
    from mlx_tune.training.optim import build_optimizer
    from mlx_tune.training.recompute import grad_checkpoint

    tc = cfg.train
    group, rank, world = _world()
    if tc.batch_size % world:
        raise UserError(f"train.batch_size: {tc.batch_size} must divide evenly over {world} ranks")
    out = Path(cfg.output_dir)
    ckpt_dir = out / "checkpoints"

    model, tokenizer, info = load_model(cfg.model, cfg.quantize, trust_remote_code=cfg.trust_remote_code)
    _say(rank, f"model: {info.source} ({info.kind}, quantization {info.quantization}) loaded in {info.load_seconds:.1f}s")
    quant.prepare_for_backend(model)
    mx.random.seed(tc.seed)  # adapter init and dropout start from the seed
    summary = adapters.inject(model, cfg.lora)
    _say(rank, summary)
    loss_fn = batch_loss
    if tc.grad_checkpoint:
        grad_checkpoint(model)

    splits = batching.load_splits(cfg.data, tokenizer, max_seq_length=tc.max_seq_length,
                                  mask_prompt=tc.mask_prompt, truncation=tc.truncation)
    for ds in splits.values():
        _say(rank, ds.stats.summary())
    pad_id = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
    local = _per_rank(tc, world)
    stream = batching.stream_for(splits["train"], local, train=True, rank=rank, world_size=world, pad_id=pad_id)

    def held_out(name: str):
        if name not in splits:
            return None
        return lambda: batching.stream_for(splits[name], local, train=False, rank=rank, world_size=world, pad_id=pad_id)

    iters = tc.iters or max(1, math.ceil(tc.epochs * len(stream) / tc.grad_accumulation))
    optimizer = build_optimizer(tc, iters)

    metrics = MetricsLog(out / "metrics.jsonl") if rank == 0 else None
    loop_state = trainer.LoopState()
    resumed_from = checkpoint.latest_checkpoint(ckpt_dir) if tc.resume else None
    if resumed_from is not None:
        saved = checkpoint.load_checkpoint(resumed_from, model, optimizer)
        stream.load_state_dict(_shifted(saved["data"], rank))
        loop = saved["loop"]
        loop_state = trainer.LoopState(step=loop["step"], bad_steps=loop["bad_steps"], trained_tokens=loop["trained_tokens"])
        if metrics is not None:
            metrics.truncate_after(loop_state.step)
        _say(rank, f"resumed from {resumed_from} (step {loop_state.step} of {iters})")
    else:
        if tc.resume:
            _say(rank, f"train.resume: no complete checkpoint in {ckpt_dir}; starting from step 0")
        if rank == 0:
            _fresh_output(out)

    def extra_state() -> dict:
        # The stream's position is rank 0's; the other ranks re-derive theirs from it.
        return {"data": stream.state_dict(), "config": config_to_dict(cfg), "iters": iters}

    ckpt = checkpoint.CheckpointCallback(ckpt_dir, model, optimizer, tc.save_every, tc.keep_checkpoints,
                                         extra_state, rank=rank)
    callbacks = [c for c in (metrics, Progress(iters, loop_state.step, enabled=rank == 0), ckpt) if c is not None]
    settings = trainer.LoopSettings(
        iters=iters, grad_accumulation=tc.grad_accumulation, grad_clip=tc.grad_clip,
        steps_per_report=tc.steps_per_report, steps_per_eval=tc.steps_per_eval, val_batches=tc.val_batches,
        max_bad_steps=tc.max_bad_steps, memory_limit_gb=tc.memory_limit_gb, seed=tc.seed,
    )
    _say(rank, f"training {iters} steps: {tc.batch_size} x {tc.max_seq_length} tokens per batch, "
               f"{tc.grad_accumulation} micro-batch(es) per step, {world} rank(s), {len(stream)} batches per epoch")
    start = time.perf_counter()
    state = trainer.train(model, optimizer, stream, loss_fn, settings, callbacks, loop_state,
                          val_batches=held_out("valid"), group=group, eval_loss_fn=eval_loss)
    elapsed = time.perf_counter() - start
    if state.interrupted:
        _say(rank, f"interrupted at step {state.step}; checkpoint {ckpt.last_saved}; "
                   f"continue with: ./train_by_mlx.sh {args.config} train.resume=true")
        return EXIT_INTERRUPTED

    if rank == 0:
        adapters.save_adapter(model, out, cfg.lora, info)
    test = held_out("test") if tc.test else None
    if tc.test and test is None:
        _say(rank, f"train.test: no {Path(cfg.data) / 'test.jsonl'}; test loss skipped")
    if test is not None:
        loss, n = trainer.evaluate(model, test(), eval_loss, 0, group)
        ppl = math.exp(min(loss, 700.0))
        _say(rank, f"test loss {loss:.4f}, perplexity {ppl:.2f} over {n} tokens")
        if metrics is not None:
            metrics.write({"step": state.step, "test_loss": loss, "test_perplexity": ppl, "test_tokens": n})
    if rank == 0:
        plot = plot_losses(out / "metrics.jsonl", out / "loss.png")
        val = f", validation loss {state.val_loss:.4f}" if state.val_loss is not None else ""
        _say(rank, f"done: {state.step} steps in {elapsed:.1f}s, last loss {state.last_loss:.4f}{val}; "
                   f"adapter in {out}" + (f", plot {plot}" if plot else " (no matplotlib: loss.png skipped)"))
    return 0


def _per_rank(tc, world: int):
    """The TrainConfig each rank batches with: its share of the global batch."""
    import dataclasses

    return dataclasses.replace(tc, batch_size=tc.batch_size // world)


def _fresh_output(out: Path) -> None:
    """A new run (no resume) starts a new metrics file and drops an old run's checkpoints,
    which a later ``train.resume`` would otherwise mix in."""
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    old = [p for p in (out / "metrics.jsonl", out / "checkpoints") if p.exists()]
    for p in old:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    if old:
        print(f"new run in {out}: removed the previous run's {', '.join(p.name for p in old)}", file=sys.stderr)
