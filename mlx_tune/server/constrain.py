"""Grammar-constrained decoding for one row of the batch, by llguidance.

A constrained row gets a logits processor: before each token it lets the row's
``LLMatcher`` consume the token sampled last, asks it for the set of tokens the grammar
allows next, and sets every other logit to -inf, so whatever the sampler draws keeps the
text inside the grammar (a JSON schema, any JSON object, or a tool call). Rows without a
constraint get no processor and pay nothing. When the grammar is complete only the
end-of-sequence token is allowed, so the row ends there.

Why llguidance (``bench/bench_grammar.py`` measures it): no dependency beyond its own
wheel, full JSON Schema coverage with a report of what it cannot enforce, and a mask in
tens of microseconds per token on a 49k vocabulary with no per-schema index to build.
xgrammar needs torch and triton; outlines-core builds a per-schema index over the whole
vocabulary first.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import mlx.core as mx
import numpy as np

from mlx_tune.server.errors import bad_request

# One space after ',' and ':' and no other whitespace: how models write JSON, and no room
# for a run of blank lines.
JSON_STYLE: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_TOKENIZERS: dict[int, Any] = {}
_LOCK = threading.Lock()


def available() -> bool:
    try:
        import llguidance  # noqa: F401
    except ImportError:
        return False
    return True


def ll_tokenizer(tokenizer, vocab_size: int):
    """llguidance's view of ``tokenizer`` (built once per tokenizer: ~1 s)."""
    key = id(tokenizer)
    with _LOCK:
        if key not in _TOKENIZERS:
            from llguidance import LLTokenizer

            hf = getattr(tokenizer, "_tokenizer", tokenizer)
            backend = hf.backend_tokenizer
            eos = sorted(getattr(tokenizer, "eos_token_ids", None) or [hf.eos_token_id])
            _TOKENIZERS[key] = LLTokenizer(backend.to_str(), n_vocab=vocab_size, eos_token=eos[0])
        return _TOKENIZERS[key]


def schema_grammar(schema: dict | None, param: str) -> str:
    """The llguidance grammar of a JSON schema (``None``: any JSON object)."""
    from llguidance import LLMatcher

    target = {"type": "object"} if schema is None else schema
    try:
        return LLMatcher.grammar_from_json_schema(json.dumps(target), defaults=JSON_STYLE)
    except (ValueError, TypeError) as exc:
        raise bad_request(f"{param}: not a usable JSON schema ({exc})", param, "invalid_schema") from None


def check_grammar(grammar: str, tokenizer, vocab_size: int, param: str) -> None:
    """400 naming what the schema asks that the grammar library cannot enforce."""
    from llguidance import LLMatcher

    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, ll_tokenizer(tokenizer, vocab_size))
    if is_error or messages:
        what = "; ".join(m.strip() for m in messages) or "invalid grammar"
        raise bad_request(f"{param}: cannot be enforced: {what}", param, "unsupported_schema")


class GrammarProcessor:
    """mlx-lm logits processor keeping one row inside ``grammar``.

    ``tokens`` (mlx-lm's context) ends with the prompt on the first call and grows by the
    token sampled at each step; what is new since the last call is fed to the matcher.
    """

    def __init__(self, grammar: str, tokenizer, vocab_size: int):
        from llguidance import LLMatcher

        self.matcher = LLMatcher(ll_tokenizer(tokenizer, vocab_size), grammar, log_level=0)
        self.vocab_size = vocab_size
        self.seen: int | None = None

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        n = int(tokens.shape[0])
        if self.seen is not None and n > self.seen:
            self.matcher.consume_tokens([int(t) for t in tokens[self.seen:].tolist()])
        self.seen = n
        if self.matcher.is_error():
            return logits  # cannot happen with tokens drawn from the mask; never block the row
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(bits, bitorder="little")[: logits.shape[-1]].astype(bool)
        if allowed.shape[0] < logits.shape[-1]:
            allowed = np.pad(allowed, (0, logits.shape[-1] - allowed.shape[0]))
        return mx.where(mx.array(allowed), logits, mx.array(-mx.inf, dtype=logits.dtype))
