"""Per-request sampling for the engine: mlx-lm's sampler chain and logits processors
(bias, penalties) plus, for a constrained row, the grammar mask (``constrain``)."""

from __future__ import annotations

import mlx.core as mx


def vocab_size(model, tokenizer) -> int:
    """Rows of the model's output (may exceed the tokenizer's ids: padded embeddings)."""
    args = getattr(model, "args", None)
    size = getattr(args, "vocab_size", None)
    return int(size) if isinstance(size, int) and size > 0 else len(tokenizer)


def make_request_sampler(req):
    """mlx-lm's sampler chain; with a seed, the draw uses the request's own key sequence."""
    from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_sampler

    if req.temperature == 0:
        return make_sampler(0.0)
    if req.seed is None:
        return make_sampler(req.temperature, top_p=req.top_p, min_p=req.min_p, top_k=req.top_k)
    filters = []
    if 0 < req.top_p < 1.0:
        filters.append(lambda x: apply_top_p(x, req.top_p))
    if req.min_p != 0.0:
        filters.append(lambda x: apply_min_p(x, req.min_p))
    if req.top_k > 0:
        filters.append(lambda x: apply_top_k(x, req.top_k))
    state = {"key": mx.random.key(req.seed & 0xFFFFFFFFFFFFFFFF)}
    inv_temp = 1.0 / req.temperature

    def sampler(logprobs: mx.array) -> mx.array:
        for f in filters:
            logprobs = f(logprobs)
        state["key"], sub = mx.random.split(state["key"])
        return mx.random.categorical(logprobs * inv_temp, key=sub)

    return sampler


def make_request_processors(req, tokenizer=None, vocab_size: int | None = None) -> list:
    from mlx_lm.sample_utils import make_logits_processors

    processors = make_logits_processors(req.logit_bias or None, req.repetition_penalty, 20, req.presence_penalty, 20,
                                        req.frequency_penalty, 20)
    if req.grammar is not None:
        from mlx_tune.server.constrain import GrammarProcessor

        # Last: bias and penalties reshape the allowed tokens, never re-allow a masked one.
        processors.append(GrammarProcessor(req.grammar, tokenizer, vocab_size))
    return processors


def top_alternatives(logprobs: mx.array, top: int, decode) -> list[tuple[str, float]]:
    """The ``top`` most likely tokens of one row of log-probabilities, best first, as (text, logprob)."""
    if top <= 0:
        return []
    k = min(top, logprobs.shape[-1])
    idx = mx.argpartition(-logprobs, k - 1)[:k]
    values = logprobs[idx]
    order = mx.argsort(-values)
    return [(decode([int(i)]), float(v)) for i, v in zip(idx[order].tolist(), values[order].tolist())]
