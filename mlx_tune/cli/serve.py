"""``mlx-tune serve``: the OpenAI-compatible server over a base model and its adapters.

    mlx-tune serve CONFIG.yaml [KEY=VALUE ...] [--adapter NAME=PATH ...] [--host H] [--port P] ...
    mlx-tune serve --model SOURCE [--adapter NAME=PATH ...] ...

With a config the base model is ``model`` (quantized as ``quantize`` says), the adapter
in ``output_dir`` (when trained) is served as ``serve.adapter_name``, and
``serve.adapters`` are added; command-line flags override the ``serve:`` section.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, NamedTuple

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="*", metavar="CONFIG.yaml [KEY=VALUE ...]",
                        help="training config (its model, output_dir adapter and serve: section) and overrides")
    parser.add_argument("--model", help="serve this model source (hub id, folder or .gguf) instead of a config's")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                        help="serve the adapter folder PATH as model NAME (repeatable)")
    parser.add_argument("--host", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="TCP port (default 8080)")
    parser.add_argument("--api-key", default=os.environ.get("MLX_TUNE_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1 (default: $MLX_TUNE_API_KEY)")
    parser.add_argument("--adapters-root", help="folder POST /v1/adapters may load adapters from")
    parser.add_argument("--runs-dir", help="training runs shown by the studio at /studio#runs (default: the config's "
                        "output_dir parent); also the adapters root unless --adapters-root is given")
    parser.add_argument("--no-studio", action="store_true", help="leave out the /studio page and its routes")
    parser.add_argument("--max-loras", type=int, help="adapters resident at once (least recently used evicted)")
    parser.add_argument("--max-lora-rank", type=int, help="refuse adapters of a larger rank")
    parser.add_argument("--max-queue", type=int, help="waiting requests before 429")
    parser.add_argument("--max-batch", type=int, help="requests decoded together")
    parser.add_argument("--chat-template", metavar="NAME|PATH.jinja",
                        help="for a model without one: chatml, llama3, gemma, mistral or a .jinja file "
                             "(default: the config's chat_template; adapters carrying a template use their own)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def _parse_adapters(items: list[str]) -> dict[str, str]:
    from mlx_tune.errors import UserError

    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--adapter {item!r}: expected NAME=PATH, e.g. --adapter support=outputs/support")
        if name in out:
            raise UserError(f"--adapter {name}: given twice")
        out[name] = path
    return out


class Settings(NamedTuple):
    source: str | None
    quantize: Any
    adapters: dict[str, str]
    serve: Any  # ServeConfig
    chat_template: str | None = None  # a name or .jinja path (checked when applied)


def settings(args: argparse.Namespace) -> Settings:
    """(model source, quantize config, adapters {name: path}, ServeConfig, chat template) from a config and flags."""
    from pathlib import Path

    from mlx_tune.config import CHAT_TEMPLATE_NAMES, ServeConfig, load_config
    from mlx_tune.errors import UserError

    if not args.config and not args.model:
        raise UserError("give a CONFIG.yaml or --model SOURCE (e.g. mlx-tune serve --model models/x.gguf)")
    adapters: dict[str, str] = {}
    template = None
    if args.config:
        path, overrides = args.config[0], args.config[1:]
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise UserError(f"{bad[0]!r}: overrides are KEY=VALUE, e.g. serve.port=8081")
        cfg = load_config(path, overrides)
        serve, source, quantize, template = cfg.serve, cfg.model, cfg.quantize, cfg.chat_template
        trained = Path(cfg.output_dir)
        if (trained / "adapters.safetensors").is_file():
            adapters[serve.adapter_name] = str(trained)
        elif (trained / "model" / "config.json").is_file():  # a full fine-tune: its model is the base
            source = str(trained / "model")
        adapters.update(serve.adapters or {})
    else:
        serve, source, quantize = ServeConfig(), None, None
    if args.model:
        source, quantize = args.model, None if not args.config else quantize
    for name, path in _parse_adapters(args.adapter).items():
        adapters[name] = path
    for flag, key in (("host", "host"), ("port", "port"), ("api_key", "api_key"), ("adapters_root", "adapters_root"),
                      ("max_loras", "max_loras"), ("max_lora_rank", "max_lora_rank"), ("max_queue", "max_queue"),
                      ("max_batch", "max_batch"), ("runs_dir", "runs_dir")):
        value = getattr(args, flag, None)
        if value is not None:
            setattr(serve, key, value)
    if serve.runs_dir is None and args.config:
        serve.runs_dir = str(trained.parent)
    # The studio's one-click load of a run's adapter goes through POST /v1/adapters, so the
    # runs folder is the adapters root unless one is named.
    if serve.adapters_root is None and serve.runs_dir is not None:
        serve.adapters_root = serve.runs_dir
    errs = serve.check()
    if errs:
        raise UserError("; ".join(errs))
    template = getattr(args, "chat_template", None) or template
    if template is not None and template not in CHAT_TEMPLATE_NAMES and not template.endswith(".jinja"):
        raise UserError(f"--chat-template {template!r}: use {', '.join(CHAT_TEMPLATE_NAMES)} or a .jinja file")
    return Settings(source, quantize, adapters, serve, template)


def studio_folders(args: argparse.Namespace, serve) -> dict[str, str]:
    """The data roots the studio may preview: the runs folder, the adapters root, the config's data folder."""
    roots = {"runs": serve.runs_dir, "adapters": serve.adapters_root}
    if args.config:
        from mlx_tune.config import load_config

        roots["data"] = load_config(args.config[0], args.config[1:]).data
    out: dict[str, str] = {}
    for label, path in roots.items():
        if path and path not in out.values():
            out[label] = path
    return out


def run(args: argparse.Namespace) -> int:
    import logging
    import sys

    source, quantize, adapters, serve, template = settings(args)

    import uvicorn

    from mlx_tune.errors import UserError
    from mlx_tune.model.chat_templates import use_chat_template
    from mlx_tune.model.loading import load_model
    from mlx_tune.server import build_app
    from mlx_tune.server.errors import ApiError
    from mlx_tune.server.fastpath import prepare_for_serving

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if serve.host not in LOCAL_HOSTS and not serve.api_key:
        print(f"warning: binding {serve.host} without an API key: anyone who can reach this port can use the "
              "model; pass --api-key KEY (or set MLX_TUNE_API_KEY)", file=sys.stderr)
    model, tokenizer, info = load_model(source, quantize)
    use_chat_template(tokenizer, template)
    print(f"loaded {info.kind} model {source} in {info.load_seconds:.1f}s (quantization: {info.quantization})",
          file=sys.stderr)
    note = prepare_for_serving(model)
    if note:
        print(note, file=sys.stderr)
    try:
        app, registry, _ = build_app(
            model, tokenizer, info, adapters=adapters, api_key=serve.api_key, adapters_root=serve.adapters_root,
            max_loras=serve.max_loras, max_lora_rank=serve.max_lora_rank, max_queue=serve.max_queue,
            max_batch=serve.max_batch, max_body_bytes=serve.max_body_bytes, cors_origins=serve.cors_origins,
            prompt_cache_bytes=serve.prompt_cache_bytes,
        )
    except ApiError as exc:
        raise UserError(exc.message) from None
    if not args.no_studio:
        from mlx_tune.studio.routes import attach

        attach(app, registry, runs_dir=serve.runs_dir, data_dirs=studio_folders(args, serve), api_key=serve.api_key)
    names = ", ".join(registry.model_names())
    print(f"serving {names} at http://{serve.host}:{serve.port}/v1 (Ctrl-C stops)"
          + ("" if args.no_studio else f"; studio: http://{serve.host}:{serve.port}/studio"), file=sys.stderr)
    uvicorn.run(app, host=serve.host, port=serve.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0
