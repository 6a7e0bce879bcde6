"""``mlx-tune train CONFIG.yaml [KEY=VALUE ...]`` (and ``./train_by_mlx.sh``): train an adapter.

The work is ``mlx_tune.training.run.run_train``; this module parses the arguments, loads
the config (every config error before any model loads) and prints the outcome.
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
import functools

EXIT_INTERRUPTED = 130


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config (see configs/demo.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.iters=50")


def run(args: argparse.Namespace) -> int:
    from mlx_tune.config import load_config

    cfg = load_config(args.config, args.overrides)  # every config error, before any model loads

    from mlx_tune.training.lanes import wide_scheduling
    from mlx_tune.training.run import run_train

    wide_scheduling(cfg.train.method, cfg.train.grad_checkpoint, cfg.train.max_seq_length)  # before MLX runs

    result = run_train(cfg, log=functools.partial(print, flush=True))
    if result.rank != 0:
        return EXIT_INTERRUPTED if result.interrupted else 0
    state = result.state
    if result.interrupted:
        print(f"interrupted at step {state.step}; checkpoint {result.last_checkpoint}; "
              f"continue with: ./train_by_mlx.sh {args.config} train.resume=true", flush=True)
        return EXIT_INTERRUPTED
    plot = result.plot
    val = f", validation loss {state.val_loss:.4f}" if state.val_loss is not None else ""
    print(f"done: {state.step} steps in {result.seconds:.1f}s, last loss {state.last_loss:.4f}{val}; "
          + (f"model in {result.output_dir / 'model'}" if cfg.train.finetune == "full" else f"adapter in {result.output_dir}")
          + (f", plot {plot}" if plot else " (no matplotlib: loss.png skipped)"),
          flush=True)
    return 0
