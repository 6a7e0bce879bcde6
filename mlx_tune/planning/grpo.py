"""GRPO's share of a plan: what the rollout adds to the training step's memory.

A generation batch of ``batch_size x num_generations`` completions is decoded in one batch
(its KV cache: rows x (prompt budget + completion) per layer, freed before the step); on the
CPU a float32 copy of a quantized base's blocks (``evaluation.live.serving_layers``, within
1 GiB) stays in for the whole run, since sampling and the step both use it.
"""

from __future__ import annotations

GB = 1e9


def slices(cfg) -> int:
    """Micro-batches a GRPO generation batch is split into (TRL's steps_per_generation)."""
    return cfg.grpo.steps_per_generation or cfg.train.grad_accumulation


def add_rollout_parts(p, cfg, arch) -> None:
    """Add the decoder's KV cache (and the CPU serving copy) to plan ``p`` of ``cfg``."""
    g = cfg.grpo
    rows = cfg.train.batch_size * g.num_generations
    kv = (2 * arch.layers * arch.kv_heads * arch.head_dim * arch.dtype_bytes * rows
          * (cfg.train.max_seq_length + g.max_completion_length))
    p.parts["generation KV cache"] = float(kv)
    if p.settings.backend == "cpu" and p.settings.bits is not None:
        blocks = arch.params() - arch.vocab * arch.hidden * (1 if arch.tied else 2)
        p.parts["serving layers: fp32 copy of the quantized blocks (CPU)"] = float(min(4 * blocks, 2**30))
    p.notes.append(f"train.method grpo: {cfg.train.batch_size} prompts x {g.num_generations} generations, prompts "
                   f"up to train.max_seq_length {cfg.train.max_seq_length} + {g.max_completion_length} completion "
                   f"tokens; a micro-batch trains {p.settings.batch_size} rows of {p.settings.seq_len} positions; "
                   f"the decoder's KV cache for all {rows} is {kv / GB:.3f} GB, freed before the training step")
