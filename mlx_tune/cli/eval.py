"""``mlx-tune eval``: score the base model and adapters in-process on a prompts file.

    mlx-tune eval CONFIG.yaml [KEY=VALUE ...] [--prompts FILE] [--adapter NAME=PATH ...]
    mlx-tune eval --model SOURCE [--adapter NAME=PATH ...] --prompts FILE

With a config: its model (quantized as ``quantize`` says), its trained adapter in
``output_dir`` (as ``serve.adapter_name``) and ``serve.adapters``; ``--prompts`` defaults
to ``eval.prompts``. The answers are greedy, decoded in batches by the server's engine
in this process (``evaluation.live``); the tables and the ``--report`` JSON are
test_mlx.py's (one model: its report; two: ``--compare``'s; more: ``{"reports": [...]}``).
Exit 1 when accuracy of the last model is below ``--min-accuracy``.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="*", metavar="CONFIG.yaml [KEY=VALUE ...]",
                        help="training config (its model, output_dir adapter, eval.prompts) and overrides")
    parser.add_argument("--model", help="model source (hub id, folder or .gguf) instead of a config's")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                        help="also score the adapter folder PATH as NAME (repeatable)")
    parser.add_argument("--prompts", metavar="FILE.jsonl", help="test_mlx.py prompts file (default: eval.prompts)")
    parser.add_argument("--max-tokens", type=int, default=None, help="tokens per answer (default: eval.max_tokens, 64)")
    parser.add_argument("--max-prompts", type=int, default=None, help="score the first N rows only")
    parser.add_argument("--batch-size", type=int, default=16, help="answers decoded together (default 16)")
    parser.add_argument("--no-base", action="store_true", help="score the adapters only")
    parser.add_argument("--report", metavar="OUT.json", help="write the JSON report here (atomically)")
    parser.add_argument("--min-accuracy", type=float, default=None, metavar="X",
                        help="exit 1 when the last model's accuracy is below X (0..1)")


def run(args: argparse.Namespace) -> int:
    import sys

    from mlx_tune.atomic import write_json_atomic
    from mlx_tune.cli.serve import settings
    from mlx_tune.config import EvalConfig, load_config
    from mlx_tune.errors import UserError
    from mlx_tune.evaluation.prompts import read_prompts
    from mlx_tune.evaluation.report import compare_report, format_compare, format_results, format_summary

    source, quantize, adapters, _, template = settings(args)
    ev = load_config(args.config[0], args.config[1:]).eval if args.config else EvalConfig()
    prompts = args.prompts or ev.prompts
    if not prompts:
        raise UserError("give --prompts FILE.jsonl (or eval.prompts in the config)")
    if args.no_base and not adapters:
        raise UserError("--no-base: no adapter to score; add --adapter NAME=PATH")
    rows = read_prompts(prompts)
    limit = args.max_prompts or ev.max_prompts
    rows = rows[:limit] if limit else rows
    max_tokens = args.max_tokens or ev.max_tokens

    from mlx_tune.evaluation.live import score_models
    from mlx_tune.model.chat_templates import use_chat_template
    from mlx_tune.model.loading import load_model

    model, tokenizer, info = load_model(source, quantize)
    use_chat_template(tokenizer, template)  # the config's chat_template, for a model without one
    print(f"scoring {len(rows)} prompts from {prompts} on {', '.join((['base'] if not args.no_base else []) + list(adapters))}",
          file=sys.stderr, flush=True)
    reports = score_models(model, tokenizer, info, adapters, rows, max_tokens=max_tokens,
                           max_batch=args.batch_size, base=not args.no_base)
    for report in reports:
        if len(reports) == 1:
            print(format_results(report))
        print(format_summary(report))
    final: dict
    if len(reports) == 2:
        final = compare_report(*reports)
        print()
        print(format_compare(final))
    elif len(reports) == 1:
        final = reports[0]
    else:
        final = {"reports": reports, "models": [r["model"] for r in reports],
                 "accuracy": {r["model"]: r["accuracy"] for r in reports}}
        for other in reports[1:]:
            print()
            print(format_compare(compare_report(reports[0], other)))
    if args.report:
        write_json_atomic(args.report, final)
        print(f"report written to {args.report}")
    acc = reports[-1]["accuracy"]
    if args.min_accuracy is not None and (acc is None or acc < args.min_accuracy):
        print(f"error: accuracy of {reports[-1]['model']} is {acc}, below --min-accuracy {args.min_accuracy}",
              file=sys.stderr)
        return 1
    return 0
