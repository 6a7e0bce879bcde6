"""Training as a library call: ``run_train(cfg) -> TrainResult``.

Config -> (checks) -> model -> backend fast path -> LoRA -> data -> loop -> adapter files.
Writes into ``output_dir``: ``adapters.safetensors``, ``adapter_config.json`` (with
``train.finetune: full`` the model folder ``model/`` instead: ``training.full``),
``metrics.jsonl``, ``checkpoints/step_*``, ``loss.png`` (with matplotlib) and, with
``eval.prompts``, ``eval_samples.jsonl`` (every evaluation's answers).

With ``train.keep_best`` (the default) the adapter written is the best evaluated one
(``training.best``; its checkpoint survives pruning), else the last; ``adapter_config.json``
records its ``step`` and metric value either way.

Data parallel (one process per rank under ``mlx.launch``): ``train.batch_size`` is the
global batch; each rank takes ``batch_size / world`` rows of its own shard (global
batches rank, rank + world, ...), token-weighted gradients are summed over ranks with
``all_sum``, and only rank 0 writes files or logs. The result equals one process with
``batch_size / world`` rows and ``grad_accumulation x world`` micro-batches.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx

from mlx_tune import adapters
from mlx_tune.adapters.stack import load_reference
from mlx_tune.config import PREFERENCE_METHODS, Config, config_to_dict
from mlx_tune.data import batching, cache
from mlx_tune.data.cache import file_hash
from mlx_tune.data.dataset import peek_format
from mlx_tune.data.masks import MaskPolicy
from mlx_tune.data.pair_batches import pair_stream_for
from mlx_tune.data.pairs import needs_chat_template
from mlx_tune.errors import UserError
from mlx_tune.model import quant
from mlx_tune.model.chat_templates import require_chat_template, use_chat_template
from mlx_tune.model.loading import load_model
from mlx_tune.model.packing import packing_support, set_reach, shares_prefix
from mlx_tune.runtime.backend import row_lanes
from mlx_tune.training import checkpoint, full
from mlx_tune.training.best import BestTracker, EvalMonitor
from mlx_tune.training.callbacks import MetricsLog, Progress, plot_losses
from mlx_tune.training.lanes import ROW_LANES
from mlx_tune.training.loop import LoopSettings, LoopState, evaluate, train
from mlx_tune.training.losses import batch_loss, eval_loss
from mlx_tune.training.optim import build_optimizer
from mlx_tune.training.preference import load_pair_splits, method_loss, precomputed_references
from mlx_tune.training.preference_losses import needs_reference
from mlx_tune.training.recompute import grad_checkpoint
from mlx_tune.training.result import TrainResult, fresh_output
from mlx_tune.training.tracking import open_trackers


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
    if cfg.eval.prompts:
        eval_rows(cfg)
    return data


def eval_rows(cfg: Config) -> list:
    """The eval prompts (the first ``eval.max_prompts``), checked row by row (``file:line: reason``)."""
    from mlx_tune.evaluation.prompts import read_prompts

    rows = read_prompts(cfg.eval.prompts)  # type: ignore[arg-type]
    return rows[: cfg.eval.max_prompts] if cfg.eval.max_prompts else rows


def run_train(cfg: Config, *, log: Callable[[str], None] = print) -> TrainResult:
    """Train the adapter ``cfg`` describes; ``log`` gets rank 0's progress lines.

    An interrupted run (Ctrl-C) returns with ``result.interrupted`` set, a checkpoint
    saved and no adapter written; ``train.resume=true`` continues it.
    """
    if cfg.train.method == "grpo":  # online RL from rewards: its own loop, the same TrainResult
        from mlx_tune.training.grpo import run_grpo
        return run_grpo(cfg, log=log)
    data_dir = precheck(cfg)
    full.check_config(cfg)
    tc = cfg.train
    group = mx.distributed.init()
    rank, world = group.rank(), group.size()
    say = log if rank == 0 else (lambda msg: None)
    if tc.batch_size % world:
        raise UserError(f"train.batch_size: {tc.batch_size} must divide evenly over {world} ranks")
    out = Path(cfg.output_dir)
    ckpt_dir = out / "checkpoints"

    model, tokenizer, info = load_model(cfg.model, cfg.quantize, dequantize=tc.dequantize,
                                        trust_remote_code=cfg.trust_remote_code)
    say(f"model: {info.source} ({info.kind}, quantization {info.quantization}) loaded in {info.load_seconds:.1f}s")
    template = use_chat_template(tokenizer, cfg.chat_template)
    if tc.method in PREFERENCE_METHODS:
        if needs_chat_template(data_dir / "train.jsonl"):
            require_chat_template(tokenizer, cfg.model, str(data_dir / "train.jsonl"))
    elif peek_format(data_dir / "train.jsonl") == "chat":  # refuse before any step, not deep in transformers
        require_chat_template(tokenizer, cfg.model, str(data_dir / "train.jsonl"))
    quant.prepare_for_backend(model)
    mx.random.seed(tc.seed)  # adapter init and dropout start from the seed
    setup = full.prepare(model, info, cfg)  # the adapter, and/or the base weights train.finetune/trainable name
    say(setup.summary)
    reference_id = f"{info.source}|{info.quantization}"
    if tc.method in PREFERENCE_METHODS and cfg.preference.reference:
        if tc.finetune == "full":
            raise UserError("preference.reference: an adapter reference needs train.finetune: lora (a full "
                            "fine-tune starts from the base; fuse the reference adapter into it instead)")
        layers = load_reference(model, cfg.preference.reference)
        reference_id += "|" + file_hash(Path(cfg.preference.reference) / "adapters.safetensors")
        say(f"preference.reference: {cfg.preference.reference} frozen under the new adapter on {layers} layers")
    if tc.grad_checkpoint:
        grad_checkpoint(model)

    preference = tc.method in PREFERENCE_METHODS
    if preference:
        splits = load_pair_splits(data_dir, tokenizer, tc)
        stream_for: Callable = pair_stream_for
        train_loss, held_out_loss = method_loss(tc.method, cfg.preference), method_loss(tc.method, cfg.preference, False)
    else:
        splits = cache.load_splits(data_dir, tokenizer, max_seq_length=tc.max_seq_length, mask_prompt=tc.mask_prompt,
                                   truncation=tc.truncation, mask_policy=MaskPolicy.of(tc.mask))
        stream_for, train_loss, held_out_loss = batching.stream_for, batch_loss, eval_loss
    for ds in splits.values():
        say(ds.stats.summary())
    pad_id = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
    packing = tc.packing
    if packing and (reason := packing_support(model)) is not None:
        say(f"warning: train.packing: off for this model, training on unpacked rows: {reason}")
        packing = False
    if packing and not preference:
        # No packed example of this run (any split) is longer than this: the CPU attention
        # scores only the key tiles an example can reach (attention.band_attention).
        set_reach(model, max((len(ids) - 1 for ds in splits.values() for ids in ds.ids), default=None))
    if preference and packing and shares_prefix(model, 2 * tc.max_seq_length):
        # a unit's two sequences run their common prompt once (data.pair_batches): exact, and cheaper
        stream_for = functools.partial(pair_stream_for, shared=True)
    # this rank's share of the batch
    local = dataclasses.replace(tc, batch_size=tc.batch_size // world, packing=packing)

    def make_stream(ds, train: bool = False):
        return stream_for(ds, local, train=train, rank=rank, world_size=world, pad_id=pad_id)

    refs = {}
    if preference and needs_reference(tc.method):
        # Switching the adapter off gives the reference only when the adapter is all that trains.
        fixed = tc.finetune == "full" or bool(tc.trainable)
        if fixed and not cfg.preference.precompute_reference:
            say("preference: base weights train (train.finetune full / train.trainable), so the reference "
                "log-probs are computed once from the starting weights (preference.precompute_reference)")
        if fixed or cfg.preference.precompute_reference:
            used = {k: v for k, v in splits.items() if k != "test" or tc.test}
            refs = precomputed_references(model, used, make_stream, reference_id, say, show=rank == 0)
    stream = make_stream(splits["train"], train=True)
    stream.ref = refs.get("train")

    def held_out(name: str):
        if name not in splits:
            return None

        def fresh():
            s = make_stream(splits[name])
            s.ref = refs.get(name)
            return s
        return fresh

    # the config requires iters or epochs
    iters = tc.iters or max(1, math.ceil((tc.epochs or 1) * len(stream) / tc.grad_accumulation))
    optimizer = build_optimizer(tc, iters)

    metrics = MetricsLog(out / "metrics.jsonl") if rank == 0 else None
    samples = MetricsLog(out / "eval_samples.jsonl") if rank == 0 and cfg.eval.prompts else None
    tracker = BestTracker(cfg.best_metric, tc.early_stopping_min_delta, tc.early_stopping_patience)
    if tracker.metric == "val_loss" and "valid" not in splits and (tc.keep_best or tc.early_stopping_patience):
        say(f"train.best_metric val_loss: no {data_dir / 'valid.jsonl'}, so no evaluation: "
            "the last step's adapter is kept and early stopping is off")
    loop_state = LoopState()
    resumed_from = checkpoint.latest_checkpoint(ckpt_dir) if tc.resume else None
    if resumed_from is not None:
        saved = checkpoint.load_checkpoint(resumed_from, model, optimizer)
        stream.load_state_dict(_shifted(saved["data"], rank))
        loop = saved["loop"]
        loop_state = LoopState(step=loop["step"], bad_steps=loop["bad_steps"], trained_tokens=loop["trained_tokens"])
        tracker.load_state_dict(saved.get("best") or {})
        for log_file in (metrics, samples):
            if log_file is not None:
                log_file.truncate_after(loop_state.step)
        say(f"resumed from {resumed_from} (step {loop_state.step} of {iters})")
    else:
        if tc.resume:
            say(f"train.resume: no complete checkpoint in {ckpt_dir}; starting from step 0")
        if rank == 0:
            fresh_output(out, ("metrics.jsonl", "eval_samples.jsonl", "checkpoints"))

    def extra_state() -> dict:
        # The stream's position is rank 0's; the other ranks re-derive theirs from it.
        return {"data": stream.state_dict(), "config": config_to_dict(cfg), "iters": iters,
                "best": tracker.state_dict()}

    def protected() -> frozenset[int]:
        return frozenset([tracker.best_step]) if tc.keep_best and tracker.best_step is not None else frozenset()

    ckpt = checkpoint.CheckpointCallback(ckpt_dir, model, optimizer, tc.save_every, tc.keep_checkpoints,
                                         extra_state, rank=rank, protect=protected)
    progress = Progress(iters, loop_state.step, enabled=rank == 0)
    trackers = open_trackers(cfg, out, say) if rank == 0 else []
    sinks = [c for c in (metrics, progress, *trackers) if c is not None]
    monitor = EvalMonitor(tracker, iters=iters, every=cfg.eval.every or tc.steps_per_eval,
                          score_prompts=_prompt_scorer(cfg, model, tokenizer, info), sinks=sinks, samples=samples,
                          save_best=ckpt.save if tc.keep_best else None, log=progress.write)
    if loop_state.step == 0:
        monitor.evaluate_prompts(0)  # the baseline: what the untrained adapter (the base) answers
    callbacks = [c for c in (metrics, progress, monitor, ckpt, *trackers) if c is not None]
    settings = LoopSettings(
        iters=iters, grad_accumulation=tc.grad_accumulation, grad_clip=tc.grad_clip,
        steps_per_report=tc.steps_per_report, steps_per_eval=tc.steps_per_eval, val_batches=tc.val_batches,
        max_bad_steps=tc.max_bad_steps, memory_limit_gb=tc.memory_limit_gb, seed=tc.seed,
    )
    lanes = row_lanes(ROW_LANES, world) if tc.method == "sft" else 1  # training.lanes: SFT batches only
    say(f"training {iters} steps: {tc.batch_size} x {tc.max_seq_length} tokens per batch, "
        f"{tc.grad_accumulation} micro-batch(es) per step, {world} rank(s), {len(stream)} batches per epoch"
        + (f", rows over {lanes} CPU streams (row lanes)" if lanes > 1 else ""))
    start = time.perf_counter()
    state = train(model, optimizer, stream, train_loss, settings, callbacks, loop_state,
                  val_batches=held_out("valid"), group=group, eval_loss_fn=held_out_loss)
    result = TrainResult(state, iters, rank, out, time.perf_counter() - start, last_checkpoint=ckpt.last_saved,
                         stop_reason=state.stop_reason)
    if state.interrupted:
        for t in trackers:
            t.close()
        set_reach(model, None)
        return result
    if state.stop_reason:
        say(f"stopped at step {state.step}: {state.stop_reason}")

    kept: dict[str, object] = {"step": state.step}
    best_dir = ckpt_dir / f"step_{tracker.best_step:06d}" if tracker.best_step is not None else None
    if tc.keep_best and best_dir is not None:
        if checkpoint.is_complete(best_dir):
            checkpoint.load_weights(best_dir, model)  # every rank: the test loss below is the kept adapter's
            kept = {"step": tracker.best_step, "metric": tracker.metric, tracker.metric: tracker.best_value}
            say(f"keeping the best adapter: step {tracker.best_step}, {tracker.metric} {tracker.best_value:.6g}")
        else:
            say(f"train.keep_best: checkpoint {best_dir} is gone; keeping the last step's adapter")
    result.kept_step = tracker.best_step if "metric" in kept else state.step
    if rank == 0:
        full.save_outputs(model, tokenizer, info, cfg, setup, template=template, kept=kept)
    test = held_out("test") if tc.test else None
    if tc.test and test is None:
        say(f"train.test: no {data_dir / 'test.jsonl'}; test loss skipped")
    if test is not None:
        loss, n = evaluate(model, test(), held_out_loss, 0, group)
        ppl = math.exp(min(loss, 700.0))
        result.test_loss, result.test_perplexity, result.test_tokens = loss, ppl, n
        say(f"test loss {loss:.4f}, perplexity {ppl:.2f} over {n} tokens")
        if metrics is not None:
            metrics.write({"step": state.step, "test_loss": loss, "test_perplexity": ppl, "test_tokens": n})
    if rank == 0:
        result.plot = plot_losses(out / "metrics.jsonl", out / "loss.png")
        for t in trackers:
            t.finish(config_to_dict(cfg), result.plot)
    set_reach(model, None)
    return result


def _prompt_scorer(cfg: Config, model, tokenizer, info):
    """``score(step)`` for the eval prompts with the adapter being trained, or None without prompts."""
    if not cfg.eval.prompts:
        return None
    from mlx_tune.evaluation.live import LiveScorer, step_scorer

    # While answering, at most 1 GiB of fp32 weight copies on top of training's memory (the
    # planner does not count them); larger models dequantize per call instead.
    scorer = LiveScorer(model, tokenizer, info, max_batch=cfg.eval.batch_size, swap_budget=2**30)
    name = adapters.active_name(model) or ("default" if adapters.wrappers(model) else None)
    if name is not None:  # a full fine-tune answers with the model itself
        scorer.use_resident(name)
    return step_scorer(scorer, eval_rows(cfg), name, cfg.eval.max_tokens)


def _shifted(data_state: dict, rank: int) -> dict:
    """Rank 0's saved stream position as rank ``rank``'s (each rank is ``rank`` batches ahead)."""
    g = data_state["epoch"] * data_state["n_batches"] + data_state["index"] + rank
    epoch, index = divmod(g, data_state["n_batches"])
    return {**data_state, "epoch": epoch, "index": index, "rank": rank}
