"""Helpers for the server tests: the real app on uvicorn in a thread, tiny adapters on disk."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import uvicorn


@contextmanager
def serve_in_thread(app) -> Iterator[str]:
    """Run ``app`` (lifespan on: the engine starts and stops with it) on a free port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def make_adapter(base_folder: Path, out_dir: Path, *, rank: int = 4, seed: int = 1, scale: float = 0.5,
                 targets="all-linear") -> Path:
    """An adapter with random non-zero B for the model in ``base_folder``, saved to ``out_dir``."""
    from mlx_tune.adapters import inject, save_adapter, wrappers
    from mlx_tune.config import LoraConfig
    from mlx_tune.model.loading import load_model

    model, _, info = load_model(str(base_folder))
    cfg = LoraConfig(rank=rank, alpha=2.0 * rank, target_modules=targets)
    mx.random.seed(seed)
    inject(model, cfg)
    for _, w in wrappers(model):
        a = w.adapters["default"]
        a.lora_b = mx.random.normal(a.lora_b.shape) * scale
    save_adapter(model, out_dir, cfg, info)
    return out_dir


def letter_bias(tokenizer, letters: str = "abcd", bias: float = 60.0) -> dict[str, float]:
    """A logit_bias that makes a random model write only ``letters`` (readable text)."""
    ids = {tokenizer.encode(ch)[0] for ch in letters}
    return {str(i): bias for i in sorted(ids)}
