"""GRPO training (``train.method: grpo``): ``run_grpo(cfg)``, online RL from reward functions.

One generation batch = ``train.batch_size`` prompts x ``grpo.num_generations`` completions,
sampled with the adapter being trained (``grpo_rollout.sample``), scored by the reward
functions (``rewards``), turned into group-normalised advantages (``grpo_loss``). It is
split into ``grpo.steps_per_generation`` micro-batches (TRL's meaning; default
``train.grad_accumulation``; shuffled first, as TRL does) and an optimizer step sums the gradients of
``train.grad_accumulation`` micro-batches, so a generation batch serves
``steps_per_generation / grad_accumulation`` optimizer steps. When an update happens
between a batch's sampling and its last use (``grad_accumulation % steps_per_generation !=
0``) the sampling policy's log-probs are kept (``old_logps``) for the clipped ratio;
otherwise the ratio is 1 (TRL does the same). With ``grpo.beta > 0`` the reference
log-probs (adapter disabled) are taken at sampling time.

Reproducible and resumable: the prompt order is a pure function of ``(seed, epoch)``,
each completion's sampling seed of ``(seed, generation, row)``, dropout keys of ``(seed,
step)``; a checkpoint holds the adapter, optimizer, prompt position, generation count and
the unused rest of the current generation batch, so ``train.resume`` continues with the
same rewards and losses as an uninterrupted run.

Writes ``metrics.jsonl`` (per report: loss, reward_mean, reward_std, reward_<fn>_mean,
kl when beta > 0, completion_length, clip_ratio*, tokens/s of generation and training),
``samples.jsonl`` (the first completions of the latest generation batch, per report), checkpoints and
the adapter, as ``run_train`` does.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_map

from mlx_tune import adapters
from mlx_tune.config import Config, config_to_dict
from mlx_tune.errors import UserError
from mlx_tune.runtime.backend import keep_freed_buffers
from mlx_tune.training import checkpoint, grpo_rollout
from mlx_tune.training.callbacks import MetricsLog, Progress, plot_losses
from mlx_tune.training.grpo_loss import LossSettings, group_advantages, grpo_loss, truncation_mask
from mlx_tune.training.loop import LoopState, sigint_flag, step_key_seed
from mlx_tune.training.result import TrainResult, fresh_output
from mlx_tune.training.rewards import Reward, RewardContext, load_rewards, score

SAMPLES_PER_REPORT = 4


@dataclass
class Generation:
    """One scored generation batch and how much of it the optimizer has used."""

    index: int  # generation number (seeds its sampling)
    prompts: list[list[int]]  # prompt tokens per completion
    completions: list[list[int]]
    ended: list[bool]
    advantages: np.ndarray  # (N,)
    old_logps: np.ndarray | None  # (N, T) the sampling policy's, when an update comes before their use
    ref_logps: np.ndarray | None  # (N, T) with the adapter disabled, when beta > 0
    batch_tokens: float  # completion tokens in the loss (dapo's normaliser)
    slices: int
    used: int = 0
    metrics: dict = field(default_factory=dict)

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("index", "prompts", "completions", "ended", "advantages", "old_logps",
                                              "ref_logps", "batch_tokens", "slices", "used", "metrics")}

    def next_slice(self) -> slice:
        n = len(self.completions) // self.slices
        self.used += 1
        return slice((self.used - 1) * n, self.used * n)


class Rollouts:
    """Makes generation batches: sample, score, advantages, optional old / reference log-probs."""

    def __init__(self, cfg: Config, model, tokenizer, rows: list[dict], rewards: list[Reward]):
        self.cfg, self.g, self.tc = cfg, cfg.grpo, cfg.train
        self.model, self.tokenizer, self.rows, self.rewards = model, tokenizer, rows, rewards
        self.order = grpo_rollout.PromptOrder(len(rows), self.tc.seed)
        self.count = 0  # generation batches made
        self.slices = self.g.steps_per_generation or self.tc.grad_accumulation
        self.need_old = self.tc.grad_accumulation % self.slices != 0
        self.last_samples: list[dict] = []

    def make(self) -> Generation:
        g = self.g
        picked = self.order.take(self.tc.batch_size)
        rows = [self.rows[i] for i in picked for _ in range(g.num_generations)]
        prompt_ids = [grpo_rollout.encode_prompt(self.tokenizer, r) for r in rows]
        seeds = [grpo_rollout.completion_seed(self.tc.seed, self.count, j) for j in range(len(rows))]
        tic = time.perf_counter()
        outs = grpo_rollout.sample(self.model, self.tokenizer, prompt_ids, seeds, max_tokens=g.max_completion_length,
                                   temperature=g.temperature, top_p=g.top_p, max_batch=len(rows), swap_budget=None)
        gen_s = time.perf_counter() - tic
        texts, prompts, total, per = score_completions(self.tokenizer, rows, outs, self.rewards)
        adv, zero_std = group_advantages(mx.array(total.astype(np.float32)), g.num_generations, g.scale_rewards)
        ids = [c.ids for c in outs]
        ended = [c.ended for c in outs]
        lengths = np.array([len(c) for c in ids], dtype=np.float64)
        kept = [n if (e or not g.mask_truncated_completions) else 0 for n, e in zip(lengths, ended)]
        advantages = np.array(adv, dtype=np.float32)
        order = list(range(len(ids)))
        if self.slices > 1:  # TRL shuffles the generation batch before splitting it into micro-batches
            order = np.random.default_rng([self.tc.seed, self.count, 1]).permutation(len(ids)).tolist()
        gen = Generation(self.count, [prompt_ids[i] for i in order], [ids[i] for i in order],
                         [ended[i] for i in order], advantages[order], None, None, float(sum(kept)), self.slices)
        if self.need_old:
            gen.old_logps = self._logps(gen)
        if g.beta != 0.0:
            with grpo_rollout.reference(self.model):
                gen.ref_logps = self._logps(gen)
        with np.errstate(all="ignore"):
            gen.metrics = {
                "reward_mean": float(np.nanmean(total)), "reward_std": float(np.nanstd(total, ddof=1)),
                **{f"reward_{r.name}_mean": float(np.nanmean(per[:, j])) for j, r in enumerate(self.rewards)},
                **{f"reward_{r.name}_std": float(np.nanstd(per[:, j], ddof=1)) for j, r in enumerate(self.rewards)},
                "frac_reward_zero_std": float(np.array(zero_std).mean()),
                "completion_length": float(lengths.mean()), "completion_length_max": float(lengths.max()),
                "truncated_ratio": float(1 - np.mean(ended)),
                "generation_tokens_per_sec": float(lengths.sum() / max(gen_s, 1e-9)),
                "generation_time_s": gen_s,
            }
        self.last_samples = [{"generation": self.count, "prompt": p if isinstance(p, str) else p[-1].get("content"),
                              "completion": t, "reward": float(total[j]), "advantage": float(advantages[j])}
                             for j, (p, t) in enumerate(zip(prompts, texts)) if j < SAMPLES_PER_REPORT]
        self.count += 1
        return gen

    def _logps(self, gen: Generation) -> np.ndarray:
        """Log-probs of the whole batch, one micro-batch at a time (no gradient), padded to one T."""
        was = self.model.training
        self.model.eval()
        parts = []
        try:
            n = len(gen.completions) // gen.slices
            for s in range(gen.slices):
                sl = slice(s * n, (s + 1) * n)
                rows = grpo_rollout.model_rows(self.model, gen.prompts[sl], gen.completions[sl])
                lp = grpo_rollout.completion_logps(self.model, rows, self.g.temperature, with_grad=False)
                mx.eval(lp)
                parts.append(np.array(lp))
        finally:
            self.model.train(was)
        t = max(p.shape[1] for p in parts)
        return np.concatenate([np.pad(p, ((0, 0), (0, t - p.shape[1]))) for p in parts])

    def state_dict(self) -> dict:
        return {"order": self.order.state_dict(), "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state["order"])
        self.count = int(state["count"])


def score_completions(tokenizer, rows: list[dict], outs: list[grpo_rollout.Completion], rewards: list[Reward]):
    """``(texts, prompts, total (N,), per_function (N, k))``: the reward functions called in
    TRL's convention (chat rows: message-list prompts and completions; every other column and
    ``completion_ids`` as keyword lists)."""
    eos = set(tokenizer.eos_token_ids or ())
    texts = [tokenizer.decode([t for t in c.ids if t not in eos]) for c in outs]
    prompts = [r["messages"] if "messages" in r else r["prompt"] for r in rows]
    completions = [[{"role": "assistant", "content": t}] if "messages" in r else t for r, t in zip(rows, texts)]
    columns = {k: [r.get(k) for r in rows] for k in sorted({k for r in rows for k in r} - {"prompt", "messages"})}
    total, per = score(rewards, prompts, completions, {**columns, "completion_ids": [c.ids for c in outs]})
    return texts, prompts, total, per


def _restore_generation(state: dict | None) -> Generation | None:
    if not state:
        return None
    gen = Generation(**{k: v for k, v in state.items()})
    gen.advantages = np.asarray(gen.advantages, dtype=np.float32)
    return gen


def micro_batch(model, gen: Generation, sl: slice, mask_truncated: bool) -> dict:
    """The arrays of one micro-batch (old / reference log-probs cut to its completion length)."""
    rows = grpo_rollout.model_rows(model, gen.prompts[sl], gen.completions[sl])
    mask = rows.mask
    if mask_truncated:
        mask = truncation_mask(mask, mx.array(gen.ended[sl]))
    t = rows.comp.shape[1]
    out = {"rows": rows, "mask": mask,
           "adv": mx.array(gen.advantages[sl]), "old": None, "ref": None, "batch_tokens": gen.batch_tokens}
    for key, arr in (("old", gen.old_logps), ("ref", gen.ref_logps)):
        if arr is not None:
            out[key] = mx.array(np.asarray(arr, dtype=np.float32)[sl, :t])
    return out


def _window_row(step: int, rows: list[dict]) -> dict:
    """The mean of each metric over the steps since the last report (NaN-free values only)."""
    out: dict = {"step": step}
    for key in dict.fromkeys(k for r in rows for k in r):
        vals = [r[key] for r in rows if key in r and r[key] is not None and math.isfinite(r[key])]
        out[key] = sum(vals) / len(vals) if vals else None
    return out


def _check(cfg: Config) -> Path:
    if not cfg.data:
        raise UserError("data: no data folder given; set data: DIR holding train.jsonl (data_transform.py --to prompts)")
    path = Path(cfg.data) / "train.jsonl"
    if not path.is_file():
        raise UserError(f"data: {path} not found; run `python data_transform.py INPUT --to prompts --out {cfg.data}`")
    if cfg.eval.prompts:
        raise UserError(f"eval.prompts: {cfg.eval.prompts}: train.method grpo does not answer a prompts file; it scores "
                        "the prompts of data/valid.jsonl (else test.jsonl) with the reward functions every eval.every "
                        "steps (val_reward_mean); remove eval.prompts")
    n = cfg.train.batch_size * cfg.grpo.num_generations
    slices = cfg.grpo.steps_per_generation or cfg.train.grad_accumulation
    if n % slices:
        raise UserError(f"grpo.steps_per_generation: {slices} micro-batches must divide the generation batch of "
                        f"train.batch_size x grpo.num_generations = {n} completions")
    return path


class GrpoStep:
    """One optimizer step: ``grad_accumulation`` micro-batches, each the next slice of the
    current generation batch (a new one when it is used up), gradients summed (each loss is
    already divided as TRL divides it), clipped, applied unless non-finite."""

    def __init__(self, model, optimizer, rollouts: Rollouts, settings: LossSettings, grad_clip: float | None,
                 gen: Generation | None = None):
        self.model, self.optimizer, self.rollouts, self.settings = model, optimizer, rollouts, settings
        self.grad_clip, self.gen = grad_clip, gen
        keep_freed_buffers()  # steps and rollouts reuse their buffers (CPU allocator; runtime.backend)

        temperature = rollouts.g.temperature

        def loss_fn(m, b):
            lp = grpo_rollout.completion_logps(m, b["rows"], temperature)
            return grpo_loss(lp, b["old"], b["ref"], b["adv"], b["mask"], settings, b["batch_tokens"])

        self.value_and_grad = nn.value_and_grad(model, loss_fn)

    def step(self) -> dict:
        """The step's metrics row (``tokens``: real tokens trained on; ``finite``: applied)."""
        tic = time.perf_counter()
        grads: dict | None = None
        loss_sum, row, train_s, tokens = 0.0, {}, 0.0, 0
        for _ in range(self.settings.grad_accumulation):
            if self.gen is None or self.gen.used >= self.gen.slices:
                self.gen = self.rollouts.make()
            gen = self.gen
            row.update(gen.metrics)  # the rewards of the batch this step learns from
            t0 = time.perf_counter()
            sl = gen.next_slice()
            batch = micro_batch(self.model, gen, sl, self.rollouts.g.mask_truncated_completions)
            (loss, m), gr = self.value_and_grad(self.model, batch)
            grads = gr if grads is None else tree_map(lambda x, y: x + y, grads, gr)
            mx.eval(loss, grads, m)
            loss_sum += loss.item()
            row.update({k.replace("/", "_"): v.item() for k, v in m.items()})
            train_s += time.perf_counter() - t0
            # each completion's prompt + completion, as if run alone (a shared prompt runs once)
            tokens += sum(len(p) + len(c) for p, c in zip(gen.prompts[sl], gen.completions[sl]))
        assert grads is not None  # grad_accumulation >= 1 (config)
        norm = mx.array(float("nan"))
        if self.grad_clip:
            grads, norm = optim.clip_grad_norm(grads, self.grad_clip)
        mx.eval(norm)
        norm_v = float(np.asarray(norm))
        finite = math.isfinite(loss_sum) and (not self.grad_clip or math.isfinite(norm_v))
        if finite:
            self.optimizer.update(self.model, grads)
            mx.eval(self.model.parameters(), self.optimizer.state)
        if "clip_ratio_region_mean" in row:
            row["clip_ratio"] = row["clip_ratio_region_mean"]
        return {**row, "loss": loss_sum, "grad_norm": norm_v, "tokens": tokens, "finite": finite,
                "tokens_per_sec": tokens / max(train_s, 1e-9), "peak_memory_gb": mx.get_peak_memory() / 2**30,
                "step_time_s": time.perf_counter() - tic}


def run_grpo(cfg: Config, *, log: Callable[[str], None] = print) -> TrainResult:
    """Train ``cfg``'s adapter with GRPO; an interrupted run (Ctrl-C) checkpoints and returns."""
    from mlx_tune.evaluation.live import serving_layers
    from mlx_tune.model import quant
    from mlx_tune.model.chat_templates import require_chat_template, use_chat_template
    from mlx_tune.model.loading import load_model
    from mlx_tune.training.optim import build_optimizer
    from mlx_tune.training.recompute import grad_checkpoint

    train_file = _check(cfg)
    tc, g = cfg.train, cfg.grpo
    if mx.distributed.init().size() > 1:
        raise UserError("train.method grpo: one process only for now (no mlx.launch)")
    out = Path(cfg.output_dir)
    ckpt_dir = out / "checkpoints"
    rows = grpo_rollout.read_prompt_rows(train_file)
    val_rows, val_file = held_out_rows(cfg)
    base_dir = Path(cfg.source_path).parent if cfg.source_path else None
    model, tokenizer, info = load_model(cfg.model, cfg.quantize, trust_remote_code=cfg.trust_remote_code)
    log(f"model: {info.source} ({info.kind}, quantization {info.quantization}) loaded in {info.load_seconds:.1f}s")
    template = use_chat_template(tokenizer, cfg.chat_template)
    if any("messages" in r for r in rows):
        require_chat_template(tokenizer, cfg.model, str(train_file))
    # train.max_seq_length is the prompt budget the planner sizes the step and KV cache for.
    lengths = [len(grpo_rollout.encode_prompt(tokenizer, r)) for r in rows]
    if max(lengths) > tc.max_seq_length:
        k = int(np.argmax(lengths))
        raise UserError(f"{train_file}: prompt row {k + 1} is {lengths[k]} tokens, over train.max_seq_length "
                        f"{tc.max_seq_length} (GRPO's prompt budget; {sum(n > tc.max_seq_length for n in lengths)} "
                        "rows over it); raise train.max_seq_length or shorten the prompts")
    rewards = load_rewards(g.reward_functions, g.reward_weights,
                           RewardContext(base_dir, g.max_completion_length, tokenizer))
    quant.prepare_for_backend(model)
    mx.random.seed(tc.seed)
    log(str(adapters.inject(model, cfg.lora)))
    if tc.grad_checkpoint:
        grad_checkpoint(model)

    rollouts = Rollouts(cfg, model, tokenizer, rows, rewards)
    n_gen = math.ceil((tc.epochs or 1) * len(rows) / tc.batch_size)
    iters = tc.iters or max(1, math.ceil(n_gen * rollouts.slices / tc.grad_accumulation))
    optimizer = build_optimizer(tc, iters)
    metrics, samples = MetricsLog(out / "metrics.jsonl"), MetricsLog(out / "samples.jsonl")
    state, gen = LoopState(), None
    resumed_from = checkpoint.latest_checkpoint(ckpt_dir) if tc.resume else None
    if resumed_from is not None:
        saved = checkpoint.load_checkpoint(resumed_from, model, optimizer)
        rollouts.load_state_dict(saved["grpo"])
        gen = _restore_generation(saved["grpo"].get("generation"))
        state = LoopState(step=saved["loop"]["step"], trained_tokens=saved["loop"]["trained_tokens"])
        for f in (metrics, samples):
            f.truncate_after(state.step)
        log(f"resumed from {resumed_from} (step {state.step} of {iters})")
    else:
        if tc.resume:
            log(f"train.resume: no complete checkpoint in {ckpt_dir}; starting from step 0")
        fresh_output(out, ("metrics.jsonl", "samples.jsonl", "checkpoints"))

    stepper = GrpoStep(model, optimizer, rollouts, LossSettings(
        g.loss_type, g.epsilon, g.epsilon_high, g.beta, g.max_completion_length, tc.grad_accumulation,
        rollouts.slices), tc.grad_clip, gen)

    def extra_state() -> dict:
        gen = stepper.gen
        rest = gen.state_dict() if gen is not None and gen.used < gen.slices else None
        return {"grpo": {**rollouts.state_dict(), "generation": rest}, "config": config_to_dict(cfg), "iters": iters}

    ckpt = checkpoint.CheckpointCallback(ckpt_dir, model, optimizer, tc.save_every, tc.keep_checkpoints, extra_state)
    progress = Progress(iters, state.step)

    log(f"grpo: {iters} steps; {tc.batch_size} prompts x {g.num_generations} completions per generation batch "
        f"(<= {g.max_completion_length} tokens), {rollouts.slices} micro-batch(es) each, "
        f"{tc.grad_accumulation} per optimizer step; {len(rows)} prompts; rewards {', '.join(r.spec for r in rewards)}")
    every = cfg.eval.every or tc.steps_per_eval
    seen: dict[int, dict] = {}  # held-out rewards by step (train.test reuses them when it is the same file)

    def held_out(step: int) -> None:  # the held-out reward, greedy, as the model is now
        tic = time.perf_counter()
        got = held_out_rewards(model, tokenizer, val_rows, rewards, g.max_completion_length, cfg.eval.batch_size)
        took = time.perf_counter() - tic
        seen[step] = got
        metrics.write({"step": step, **{f"val_{k}": v for k, v in got.items()}, "val_prompts": len(val_rows),
                       "val_time_s": round(took, 3)})
        progress.write(f"step {step}: val_reward_mean {got['reward_mean']:.3f} on {len(val_rows)} prompts of "
                       f"{val_file} (greedy), {took:.1f}s")

    window: list[dict] = []
    start = time.perf_counter()
    model.train()
    # On the CPU backend the server's quantized layers (a cached fp32 copy of the frozen base
    # within 1 GiB, as the live eval scorer allows) stay in for the whole run: sampling is
    # ~2x faster, and the training step computes the same values with them.
    with sigint_flag() as interrupted, serving_layers(model, 2**30):
        if val_rows and state.step == 0:
            held_out(0)  # the base model's (a fresh adapter changes nothing yet)
        while state.step < iters and not interrupted.is_set():
            mx.random.seed(step_key_seed(tc.seed, state.step + 1))  # dropout: a function of (seed, step)
            row = stepper.step()
            state.step += 1
            state.last_loss = row["loss"]
            state.trained_tokens += row.pop("tokens")
            if not row["finite"]:
                state.bad_steps += 1
                log(f"step {state.step}: non-finite loss {row['loss']} / gradient norm {row['grad_norm']}; "
                    f"update skipped ({state.bad_steps} in a row)")
                if state.bad_steps >= tc.max_bad_steps:
                    raise UserError(f"training stopped at step {state.step}: {state.bad_steps} steps in a row had a "
                                    f"non-finite loss or gradient (train.max_bad_steps={tc.max_bad_steps}); lower "
                                    "train.learning_rate or check the reward functions")
            else:
                state.bad_steps = 0
            row.pop("finite")
            row["learning_rate"] = _lr(optimizer)
            window.append(row)
            if state.step % tc.steps_per_report == 0 or state.step == iters:
                report = {**_window_row(state.step, window), "trained_tokens": state.trained_tokens}
                metrics.write(report)
                progress.on_report(report)
                window = []
                for sample_row in rollouts.last_samples:  # the latest generation batch's first completions
                    samples.write({"step": state.step, **sample_row})
                rollouts.last_samples = []
            if val_rows and (state.step % every == 0 or state.step == iters):
                held_out(state.step)
            progress.on_step_end(state)
            ckpt.on_step_end(state)
        if state.step < iters:
            state.interrupted = True
            ckpt.on_interrupt(state)
    progress.on_train_end(state)
    result = TrainResult(state, iters, 0, out, time.perf_counter() - start, ckpt.last_saved,
                        generations=rollouts.count)
    if state.interrupted:
        return result
    ckpt.on_train_end(state)
    result.last_checkpoint = ckpt.last_saved
    adapters.save_adapter(model, out, cfg.lora, info, chat_template=template, extra={"step": state.step})
    test_file = Path(cfg.data) / "test.jsonl"  # type: ignore[arg-type]
    if tc.test and not test_file.is_file():
        log(f"train.test: no {test_file}; the held-out reward is skipped")
    elif tc.test:
        test_rows = grpo_rollout.read_prompt_rows(test_file)
        same = val_file == test_file and len(val_rows) == len(test_rows)
        base, tuned = (seen.get(0), seen.get(state.step)) if same else (None, None)
        with serving_layers(model, 2**30):
            if base is None:
                with grpo_rollout.reference(model):
                    base = held_out_rewards(model, tokenizer, test_rows, rewards, g.max_completion_length)
            if tuned is None:
                tuned = held_out_rewards(model, tokenizer, test_rows, rewards, g.max_completion_length)
        metrics.write({"step": state.step, **{f"test_base_{k}": v for k, v in base.items()},
                       **{f"test_{k}": v for k, v in tuned.items()}})
        per = ", ".join(f"{r.name} {base[f'reward_{r.name}_mean']:.3f} -> {tuned[f'reward_{r.name}_mean']:.3f}"
                        for r in rewards)
        log(f"held-out reward on {len(test_rows)} prompts of {test_file} (greedy): base {base['reward_mean']:.3f} "
            f"-> tuned {tuned['reward_mean']:.3f} ({per})")
    result.plot = plot_losses(out / "metrics.jsonl", out / "loss.png")
    return result


def held_out_rows(cfg: Config) -> tuple[list[dict], Path | None]:
    """The prompts the held-out reward is measured on during training: data/valid.jsonl, else
    test.jsonl (the first ``eval.max_prompts``); none when neither exists."""
    for name in ("valid.jsonl", "test.jsonl"):
        path = Path(cfg.data) / name  # type: ignore[arg-type]
        if path.is_file():
            return grpo_rollout.read_prompt_rows(path)[: cfg.eval.max_prompts], path
    return [], None


def held_out_rewards(model, tokenizer, rows: list[dict], rewards: list[Reward], max_tokens: int,
                     max_batch: int = 64) -> dict:
    """Mean rewards (total and per function) of greedy completions to ``rows`` by ``model`` as it is."""
    prompt_ids = [grpo_rollout.encode_prompt(tokenizer, r) for r in rows]
    outs = grpo_rollout.sample(model, tokenizer, prompt_ids, [0] * len(rows), max_tokens=max_tokens, temperature=0.0,
                               top_p=1.0, max_batch=min(max_batch, len(rows)), swap_budget=None)
    _, _, total, per = score_completions(tokenizer, rows, outs, rewards)
    with np.errstate(all="ignore"):
        return {"reward_mean": float(np.nanmean(total)),
                **{f"reward_{r.name}_mean": float(np.nanmean(per[:, j])) for j, r in enumerate(rewards)},
                "completion_length": float(np.mean([len(c.ids) for c in outs]))}


def _lr(optimizer) -> float:
    lr = optimizer.state.get("learning_rate", None)
    if lr is None:
        lr = optimizer.learning_rate
    return float(np.asarray(lr)) if isinstance(lr, mx.array) else float(lr)
