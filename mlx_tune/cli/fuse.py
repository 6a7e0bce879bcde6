"""``mlx-tune fuse CONFIG.yaml [KEY=VALUE ...]``: merge output_dir's adapter into the base and export it.

Flags are shorthands for ``fuse.*`` overrides (``--format gguf`` is ``fuse.format=gguf``),
so the config, KEY=VALUE overrides and flags are validated in one place.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="the training config (model, quantize, output_dir, fused_dir, fuse.*)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. fuse.format=hf")
    parser.add_argument("--format", help="mlx (default), hf or gguf")
    parser.add_argument("--dequantize", action="store_true", help="write dense weights (mlx format)")
    parser.add_argument("--dtype", help="dense dtype: float16 (default), bfloat16 or float32")
    parser.add_argument("--gguf-type", help="GGUF tensor type: f16, q8_0 (default) or q4_0")
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")
    parser.add_argument("--out", help="output folder (default: the config's fused_dir)")


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """The flags as ``fuse.*`` overrides, after the positional ones (flags win)."""
    extra = []
    for flag, key in (("format", "format"), ("dtype", "dtype"), ("gguf_type", "gguf_type")):
        value = getattr(args, flag)
        if value is not None:
            extra.append(f"fuse.{key}={value}")
    if args.dequantize:
        extra.append("fuse.dequantize=true")
    if args.force:
        extra.append("fuse.force=true")
    return list(args.overrides) + extra


def run(args: argparse.Namespace) -> int:
    from mlx_tune.config import load_config

    cfg = load_config(args.config, flag_overrides(args))  # every bad key / value reported before loading

    from pathlib import Path

    from mlx_tune.adapters import ADAPTER_WEIGHTS
    from mlx_tune.export.full import export_full, full_output
    from mlx_tune.export.fuse import FuseOptions, run_fuse

    opts = FuseOptions.from_config(cfg.fuse)
    folder = full_output(cfg.output_dir)
    if folder is not None and not (Path(cfg.output_dir) / ADAPTER_WEIGHTS).is_file():  # a full fine-tune
        export_full(folder, Path(args.out) if args.out else cfg.fused_path, opts, data_dir=cfg.data)
        return 0
    run_fuse(cfg, opts, out=args.out)
    return 0  # a fidelity warning is printed; the output is still the best that could be written
