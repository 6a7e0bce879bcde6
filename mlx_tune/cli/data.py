"""``mlx-tune data``: the same converter as ``data_transform.py`` (``data inspect`` is ``cli.data_inspect``)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mlx_tune.data.transform import add_arguments as add

    add(parser)
    parser.epilog = "mlx-tune data inspect DATA_DIR --model M: show rows as training tokenizes them (see its --help)"


def run(args: argparse.Namespace) -> int:
    from mlx_tune.data.transform import run as convert

    return convert(args)
