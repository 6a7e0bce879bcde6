"""``mlx-tune adapter``: convert adapters to and from Hugging Face PEFT LoRA folders, and
to llama.cpp LoRA GGUF files.

    mlx-tune adapter export --format peft ADAPTER_DIR OUT_DIR
    mlx-tune adapter export --format gguf ADAPTER_DIR OUT.gguf [--base BASE]
    mlx-tune adapter import PEFT_DIR OUT_DIR
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="adapter_command", metavar="ACTION", required=True)
    exp = sub.add_parser("export", help="write an mlx_tune adapter as a PEFT LoRA folder or a llama.cpp LoRA GGUF")
    exp.add_argument("--format", choices=["peft", "gguf"], default="peft",
                     help="peft: a PEFT LoRA folder; gguf: one llama.cpp LoRA file (llama-cli --lora, Ollama ADAPTER)")
    exp.add_argument("--base", metavar="BASE", help="gguf: the base model (folder or .gguf), when the adapter's "
                     "recorded base_model path is not readable here (llama-family Q/K layout needs its heads)")
    exp.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="folder with adapters.safetensors + adapter_config.json")
    exp.add_argument("out_dir", metavar="OUT", help="peft: folder to write; gguf: the .gguf file to write")
    imp = sub.add_parser("import", help="write a PEFT LoRA folder as an mlx_tune adapter")
    imp.add_argument("peft_dir", metavar="PEFT_DIR", help="folder with adapter_model.safetensors + adapter_config.json")
    imp.add_argument("out_dir", metavar="OUT_DIR", help="folder to write adapters.safetensors + adapter_config.json")


def run(args: argparse.Namespace) -> int:
    from mlx_tune.adapters.peft import export_peft, import_peft

    if args.adapter_command == "export" and args.format == "gguf":
        from mlx_tune.export.lora_gguf import export_lora_gguf

        out = export_lora_gguf(args.adapter_dir, args.out_dir, args.base)
        print(f"wrote llama.cpp LoRA adapter to {out} (llama-cli -m BASE.gguf --lora {out})")
    elif args.adapter_command == "export":
        out = export_peft(args.adapter_dir, args.out_dir)
        print(f"wrote PEFT LoRA adapter to {out}")
    else:
        out = import_peft(args.peft_dir, args.out_dir)
        print(f"wrote mlx_tune adapter to {out}")
    return 0
