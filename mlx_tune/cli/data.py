"""``mlx-tune data``: the same converter as ``data_transform.py``."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mlx_tune.data.transform import add_arguments as add

    add(parser)


def run(args: argparse.Namespace) -> int:
    from mlx_tune.data.transform import run as convert

    return convert(args)
