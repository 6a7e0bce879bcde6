"""``mlx-tune generate``: load a model (optionally with an adapter) and answer one prompt."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="hub repo id, model folder or .gguf file")
    parser.add_argument("--adapter", help="adapter folder (adapters.safetensors + adapter_config.json)")
    parser.add_argument("--prompt", required=True, help="user message (rendered with the chat template)")
    parser.add_argument("--max-tokens", type=int, default=100)
    parser.add_argument("--no-chat-template", action="store_true", help="send the prompt as raw text")


def run(args: argparse.Namespace) -> int:
    import time

    import mlx.core as mx
    from mlx_lm import generate

    from mlx_tune.model.loading import load_model

    model, tokenizer, info = load_model(args.model)
    print(f"loaded {info.kind} model in {info.load_seconds:.1f}s (quantization: {info.quantization})")
    if args.adapter:
        from mlx_tune.adapters.files import read_adapter_template
        from mlx_tune.adapters.manager import load_adapter
        from mlx_tune.model.chat_templates import set_chat_template

        load_adapter(model, args.adapter)
        template = read_adapter_template(args.adapter)  # render as the adapter was trained
        if template is not None:
            set_chat_template(tokenizer, template)
    if args.no_chat_template or not tokenizer.chat_template:
        prompt = tokenizer.encode(args.prompt)
    else:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
    start = time.perf_counter()
    text = generate(model, tokenizer, prompt, max_tokens=args.max_tokens)
    print(f"> {args.prompt}\n{text}")
    print(f"({time.perf_counter() - start:.1f}s, peak memory {mx.get_peak_memory() / 2**30:.2f} GB)")
    return 0
