"""``mlx-tune runs DIR [--json]``: a table comparing the training runs under DIR."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", metavar="DIR", help="folder holding run folders (each with a metrics.jsonl), up to 3 levels deep")
    parser.add_argument("--json", action="store_true", help="print one JSON list, one object per run")


def run(args: argparse.Namespace) -> int:
    from mlx_tune.training.runs import format_runs, list_runs, runs_as_dicts

    runs = list_runs(args.dir)
    print(json.dumps(runs_as_dicts(runs), indent=2) if args.json else format_runs(runs, args.dir))
    return 0
