"""``mlx-tune data inspect DATA_DIR --model M``: a few rows as training tokenizes them, trained tokens marked."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data_dir", metavar="DATA_DIR", help="folder holding train/valid/test.jsonl")
    parser.add_argument("--model", required=True, metavar="M", help="model whose tokenizer and chat template training uses")
    parser.add_argument("--split", default="train", help="which DATA_DIR/<split>.jsonl to read (default: train)")
    parser.add_argument("--rows", type=int, default=3, help="rows to show from the start of the file (default 3)")
    parser.add_argument("--max-seq-length", type=int, default=None, metavar="N",
                        help="mark where training would cut each row (train.max_seq_length)")
    parser.add_argument("--no-mask-prompt", action="store_true", help="train every token, as train.mask_prompt=false does")
    parser.add_argument("--chat-template", metavar="NAME|PATH.jinja",
                        help="for a model without one: chatml, llama3, gemma, mistral or a .jinja file (as chat_template:)")
    parser.add_argument("--reasoning", choices=("keep", "drop_previous", "mask"), default=None,
                        help="train.mask.reasoning (default: as the model's template does)")
    parser.add_argument("--tool-calls", choices=("train", "mask"), default="train", help="train.mask.tool_calls")
    parser.add_argument("--colour", choices=("auto", "always", "never"), default="auto",
                        help="highlight trained tokens with ANSI colour (auto: when stdout is a terminal), else [[ ]]")


def run(args: argparse.Namespace) -> int:
    from mlx_tune.data.inspect import format_row, inspect_data
    from mlx_tune.data.masks import MaskPolicy

    rows = inspect_data(args.data_dir, args.model, split=args.split, rows=args.rows,
                        max_seq_length=args.max_seq_length, mask_prompt=not args.no_mask_prompt,
                        chat_template=args.chat_template,
                        policy=MaskPolicy(reasoning=args.reasoning, tool_calls=args.tool_calls))
    colour = args.colour == "always" or (args.colour == "auto" and sys.stdout.isatty())
    print("\n\n".join(format_row(r, colour) for r in rows))
    return 0
