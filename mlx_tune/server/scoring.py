"""Log-probabilities of a prompt's own tokens (completions ``echo`` with ``logprobs``), as
evaluation clients (lm-eval style) ask for them to score text.

One forward pass over the prompt with the request's adapter: token i's log-probability
is ``log_softmax(logits[i - 1])[token_i]``; the first token has none (``null``, as in
OpenAI's API). Runs on the engine's worker thread (``Engine.call``), between steps.
"""

from __future__ import annotations

import mlx.core as mx

from mlx_tune.server.engine import TokenInfo
from mlx_tune.server.sampling import top_alternatives


def prompt_logprobs(registry, adapter: str | None, ids: list[int], top: int) -> list[TokenInfo | None]:
    """[None, TokenInfo(token 1), ...] for ``ids`` under ``adapter`` with ``top`` alternatives each."""
    decode = registry.tokenizer.decode
    registry.acquire(adapter)
    try:
        with registry.lock:
            registry.activate(adapter)
            logits = registry.model(mx.array(ids)[None])[0].astype(mx.float32)
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            mx.eval(logprobs)
    finally:
        registry.release(adapter)
    out: list[TokenInfo | None] = [None]
    for i in range(1, len(ids)):
        row = logprobs[i - 1]
        out.append(TokenInfo(decode([ids[i]]), float(row[ids[i]].item()), top_alternatives(row, top, decode)))
    return out
