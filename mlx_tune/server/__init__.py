"""The OpenAI-compatible server: ``schemas`` (wire shapes), ``app`` (routes), ``engine``
(the generation queue), ``registry`` (base model + named adapters), ``protocol``
(requests to engine jobs, events to responses).

``build_app`` wires them for one loaded model; ``mlx-tune serve`` and the tests use it.
"""

from __future__ import annotations


def build_app(model, tokenizer, info=None, *, adapters: dict[str, str] | None = None, api_key: str | None = None,
              adapters_root: str | None = None, max_loras: int = 8, max_lora_rank: int = 256, max_queue: int = 64,
              max_batch: int = 16, max_body_bytes: int = 4_000_000, cors_origins: list[str] | None = None,
              context: int | None = None, prompt_cache_bytes: int = 512 * 2**20):
    """(FastAPI app, registry, engine) serving ``model`` as ``base`` plus ``adapters`` {name: folder}."""
    import mlx.core as mx

    from mlx_tune.server.app import create_app
    from mlx_tune.server.engine import Engine
    from mlx_tune.server.registry import ModelRegistry

    model.eval()
    # Lazy arrays belong to this thread; the engine computes on its own thread.
    mx.eval(model.parameters())
    registry = ModelRegistry(model, tokenizer, info, adapters_root=adapters_root, max_loras=max_loras,
                             max_lora_rank=max_lora_rank)
    for name, path in (adapters or {}).items():
        registry.add(name, path, trusted=True)
    engine = Engine(registry, max_queue=max_queue, max_batch=max_batch, prefix_cache_bytes=prompt_cache_bytes)
    app = create_app(registry, engine, api_key=api_key, max_body_bytes=max_body_bytes, cors_origins=cors_origins,
                     context=context)
    return app, registry, engine
