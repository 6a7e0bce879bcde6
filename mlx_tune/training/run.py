"""Training as a library call: ``run_train(cfg) -> TrainResult``.

Config -> (checks) -> model -> backend fast path -> LoRA -> data -> loop -> adapter files.
Writes into ``output_dir``: ``adapters.safetensors``, ``adapter_config.json``,
``metrics.jsonl``, ``checkpoints/step_*`` and ``loss.png`` (with matplotlib).

Data parallel (one process per rank under ``mlx.launch``): ``train.batch_size`` is the
global batch; each rank takes ``batch_size / world`` rows of its own shard (global
batches rank, rank + world, ...), token-weighted gradients are summed over ranks with
``all_sum``, and only rank 0 writes files or logs. The result equals one process with
``batch_size / world`` rows and ``grad_accumulation x world`` micro-batches.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from mlx_tune import adapters
from mlx_tune.config import Config, config_to_dict
from mlx_tune.data import batching, cache
from mlx_tune.errors import UserError
from mlx_tune.model import quant
from mlx_tune.model.loading import load_model
from mlx_tune.model.packing import packing_support
from mlx_tune.training import checkpoint
from mlx_tune.training.callbacks import MetricsLog, Progress, plot_losses
from mlx_tune.training.loop import LoopSettings, LoopState, evaluate, train
from mlx_tune.training.losses import batch_loss, eval_loss
from mlx_tune.training.optim import build_optimizer
from mlx_tune.training.recompute import grad_checkpoint


@dataclass
class TrainResult:
    """What ``run_train`` did. ``rank`` is this process's rank (only rank 0 wrote files)."""

    state: LoopState
    iters: int
    rank: int
    output_dir: Path
    seconds: float
    last_checkpoint: Path | None = None
    plot: Path | None = None  # loss.png, None without matplotlib (or when interrupted)
    test_loss: float | None = None
    test_perplexity: float | None = None
    test_tokens: int = 0

    @property
    def interrupted(self) -> bool:
        return self.state.interrupted


def precheck(cfg: Config) -> Path:
    """Problems found without loading anything (so they come before the model load);
    returns the data folder."""
    if not cfg.data:
        raise UserError("data: no data folder given; set data: DIR holding train.jsonl (see data_transform.py)")
    data = Path(cfg.data)
    if not (data / "train.jsonl").is_file():
        raise UserError(f"data: {data / 'train.jsonl'} not found; run `python data_transform.py INPUT --out {data}`")
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir: {out} exists and is not a folder")
    return data


def run_train(cfg: Config, *, log: Callable[[str], None] = print) -> TrainResult:
    """Train the adapter ``cfg`` describes; ``log`` gets rank 0's progress lines.

    An interrupted run (Ctrl-C) returns with ``result.interrupted`` set, a checkpoint
    saved and no adapter written; ``train.resume=true`` continues it.
    """
    data_dir = precheck(cfg)
    tc = cfg.train
    group = mx.distributed.init()
    rank, world = group.rank(), group.size()
    say = log if rank == 0 else (lambda msg: None)
    if tc.batch_size % world:
        raise UserError(f"train.batch_size: {tc.batch_size} must divide evenly over {world} ranks")
    out = Path(cfg.output_dir)
    ckpt_dir = out / "checkpoints"

    model, tokenizer, info = load_model(cfg.model, cfg.quantize, trust_remote_code=cfg.trust_remote_code)
    say(f"model: {info.source} ({info.kind}, quantization {info.quantization}) loaded in {info.load_seconds:.1f}s")
    quant.prepare_for_backend(model)
    mx.random.seed(tc.seed)  # adapter init and dropout start from the seed
    say(str(adapters.inject(model, cfg.lora)))
    if tc.grad_checkpoint:
        grad_checkpoint(model)

    splits = cache.load_splits(data_dir, tokenizer, max_seq_length=tc.max_seq_length,
                               mask_prompt=tc.mask_prompt, truncation=tc.truncation)
    for ds in splits.values():
        say(ds.stats.summary())
    pad_id = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
    packing = tc.packing
    if packing and (reason := packing_support(model)) is not None:
        say(f"warning: train.packing: off for this model, training on unpacked rows: {reason}")
        packing = False
    # this rank's share of the batch
    local = dataclasses.replace(tc, batch_size=tc.batch_size // world, packing=packing)
    stream = batching.stream_for(splits["train"], local, train=True, rank=rank, world_size=world, pad_id=pad_id)

    def held_out(name: str):
        if name not in splits:
            return None
        return lambda: batching.stream_for(splits[name], local, train=False, rank=rank, world_size=world, pad_id=pad_id)

    # the config requires iters or epochs
    iters = tc.iters or max(1, math.ceil((tc.epochs or 1) * len(stream) / tc.grad_accumulation))
    optimizer = build_optimizer(tc, iters)

    metrics = MetricsLog(out / "metrics.jsonl") if rank == 0 else None
    loop_state = LoopState()
    resumed_from = checkpoint.latest_checkpoint(ckpt_dir) if tc.resume else None
    if resumed_from is not None:
        saved = checkpoint.load_checkpoint(resumed_from, model, optimizer)
        stream.load_state_dict(_shifted(saved["data"], rank))
        loop = saved["loop"]
        loop_state = LoopState(step=loop["step"], bad_steps=loop["bad_steps"], trained_tokens=loop["trained_tokens"])
        if metrics is not None:
            metrics.truncate_after(loop_state.step)
        say(f"resumed from {resumed_from} (step {loop_state.step} of {iters})")
    else:
        if tc.resume:
            say(f"train.resume: no complete checkpoint in {ckpt_dir}; starting from step 0")
        if rank == 0:
            _fresh_output(out)

    def extra_state() -> dict:
        # The stream's position is rank 0's; the other ranks re-derive theirs from it.
        return {"data": stream.state_dict(), "config": config_to_dict(cfg), "iters": iters}

    ckpt = checkpoint.CheckpointCallback(ckpt_dir, model, optimizer, tc.save_every, tc.keep_checkpoints,
                                         extra_state, rank=rank)
    callbacks = [c for c in (metrics, Progress(iters, loop_state.step, enabled=rank == 0), ckpt) if c is not None]
    settings = LoopSettings(
        iters=iters, grad_accumulation=tc.grad_accumulation, grad_clip=tc.grad_clip,
        steps_per_report=tc.steps_per_report, steps_per_eval=tc.steps_per_eval, val_batches=tc.val_batches,
        max_bad_steps=tc.max_bad_steps, memory_limit_gb=tc.memory_limit_gb, seed=tc.seed,
    )
    say(f"training {iters} steps: {tc.batch_size} x {tc.max_seq_length} tokens per batch, "
        f"{tc.grad_accumulation} micro-batch(es) per step, {world} rank(s), {len(stream)} batches per epoch")
    start = time.perf_counter()
    state = train(model, optimizer, stream, batch_loss, settings, callbacks, loop_state,
                  val_batches=held_out("valid"), group=group, eval_loss_fn=eval_loss)
    result = TrainResult(state, iters, rank, out, time.perf_counter() - start, last_checkpoint=ckpt.last_saved)
    if state.interrupted:
        return result

    if rank == 0:
        adapters.save_adapter(model, out, cfg.lora, info)
    test = held_out("test") if tc.test else None
    if tc.test and test is None:
        say(f"train.test: no {data_dir / 'test.jsonl'}; test loss skipped")
    if test is not None:
        loss, n = evaluate(model, test(), eval_loss, 0, group)
        ppl = math.exp(min(loss, 700.0))
        result.test_loss, result.test_perplexity, result.test_tokens = loss, ppl, n
        say(f"test loss {loss:.4f}, perplexity {ppl:.2f} over {n} tokens")
        if metrics is not None:
            metrics.write({"step": state.step, "test_loss": loss, "test_perplexity": ppl, "test_tokens": n})
    if rank == 0:
        result.plot = plot_losses(out / "metrics.jsonl", out / "loss.png")
    return result


def _shifted(data_state: dict, rank: int) -> dict:
    """Rank 0's saved stream position as rank ``rank``'s (each rank is ``rank`` batches ahead)."""
    g = data_state["epoch"] * data_state["n_batches"] + data_state["index"] + rank
    epoch, index = divmod(g, data_state["n_batches"])
    return {**data_state, "epoch": epoch, "index": index, "rank": rank}


def _fresh_output(out: Path) -> None:
    """A new run (no resume) starts a new metrics file and drops an old run's checkpoints,
    which a later ``train.resume`` would otherwise mix in."""
    out.mkdir(parents=True, exist_ok=True)
    old = [p for p in (out / "metrics.jsonl", out / "checkpoints") if p.exists()]
    for p in old:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    if old:
        print(f"new run in {out}: removed the previous run's {', '.join(p.name for p in old)}", file=sys.stderr)
