"""The ``mlx-tune`` command: thin subcommands over the package.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; the registry below maps names to modules so this file never
grows with the features. A ``UserError`` becomes one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from mlx_tune.errors import run_reporting_errors
from mlx_tune.runtime.blas import ensure_fast_blas

# name -> (module, one-line help). Modules are imported only when their command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("mlx_tune.cli.train", "train an adapter as CONFIG.yaml says"),
    "fuse": ("mlx_tune.cli.fuse", "merge the adapter into the base model"),
    "serve": ("mlx_tune.cli.serve", "start the OpenAI-compatible server"),
    "plan": ("mlx_tune.cli.plan", "predict peak training memory without loading weights"),
    "doctor": ("mlx_tune.cli.doctor", "backend, BLAS speed, memory and versions"),
    "adapter": ("mlx_tune.cli.adapter", "export / import adapters (Hugging Face PEFT)"),
    "generate": ("mlx_tune.cli.generate", "load a model (and adapter) and answer one prompt"),
    "data": ("mlx_tune.cli.data", "convert datasets (same as data_transform.py); `data inspect`: see rows as trained"),
    "runs": ("mlx_tune.cli.runs", "compare the training runs under a folder"),
    "eval": ("mlx_tune.cli.eval", "score the base model and adapters in-process on a prompts file"),
}
# (command, first word) -> (module, help): a word that, right after the command, selects
# another parser (``mlx-tune data inspect ...``); anything else goes to the command itself.
SUBCOMMANDS: dict[tuple[str, str], tuple[str, str]] = {
    ("data", "inspect"): ("mlx_tune.cli.data_inspect", "show dataset rows as training tokenizes them, trained tokens marked"),
}


def _attach(parser: argparse.ArgumentParser, module_name: str) -> None:
    """``module``'s arguments and ``run`` on ``parser`` (imported only now)."""
    module = importlib.import_module(module_name)
    module.add_arguments(parser)
    parser.set_defaults(_run=module.run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlx-tune", description="LoRA / QLoRA fine-tuning on MLX.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:
            _attach(p, module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            p.set_defaults(_missing=name)
    return parser


def build_subparser(command: str, word: str) -> argparse.ArgumentParser:
    module_name, help_text = SUBCOMMANDS[(command, word)]
    parser = argparse.ArgumentParser(prog=f"mlx-tune {command} {word}", description=help_text)
    _attach(parser, module_name)
    parser.set_defaults(command=f"{command} {word}")
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        ensure_fast_blas()
    words = sys.argv[1:] if argv is None else list(argv)
    sub = tuple(words[:2]) in SUBCOMMANDS
    parser = build_subparser(words[0], words[1]) if sub else build_parser()
    args = parser.parse_args(words[2:] if sub else words)
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "_missing", None):
        print(f"mlx-tune {args._missing}: not yet available in this version", file=sys.stderr)
        return 3
    return run_reporting_errors(lambda: args._run(args))


if __name__ == "__main__":
    raise SystemExit(main())
