"""``mlx-tune adapter``: convert adapters to and from Hugging Face PEFT LoRA folders.

    mlx-tune adapter export --format peft ADAPTER_DIR OUT_DIR
    mlx-tune adapter import PEFT_DIR OUT_DIR
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="adapter_command", metavar="ACTION", required=True)
    exp = sub.add_parser("export", help="write an mlx_tune adapter as a PEFT LoRA folder")
    exp.add_argument("--format", choices=["peft"], default="peft", help="output format (peft)")
    exp.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="folder with adapters.safetensors + adapter_config.json")
    exp.add_argument("out_dir", metavar="OUT_DIR", help="folder to write adapter_model.safetensors + adapter_config.json")
    imp = sub.add_parser("import", help="write a PEFT LoRA folder as an mlx_tune adapter")
    imp.add_argument("peft_dir", metavar="PEFT_DIR", help="folder with adapter_model.safetensors + adapter_config.json")
    imp.add_argument("out_dir", metavar="OUT_DIR", help="folder to write adapters.safetensors + adapter_config.json")


def run(args: argparse.Namespace) -> int:
    from mlx_tune.adapters.peft import export_peft, import_peft

    if args.adapter_command == "export":
        out = export_peft(args.adapter_dir, args.out_dir)
        print(f"wrote PEFT LoRA adapter to {out}")
    else:
        out = import_peft(args.peft_dir, args.out_dir)
        print(f"wrote mlx_tune adapter to {out}")
    return 0
