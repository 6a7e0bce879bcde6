"""Prompt prefix cache across requests: the KV cache of tokens already computed, reused.

When a row finishes, mlx-lm hands back its KV cache and the tokens it holds (prompt and
answer); it is kept under ``(adapter, tokens)``: an adapter changes the keys and values,
so a prefix computed on one is never served to another. A new request looks for the
entry sharing the longest prefix with its prompt (all but the prompt's last token, which
must run to give the first answer token); a copy of that entry's cache, trimmed to the
shared part, starts the row, and only the rest of the prompt is computed.

Least recently used entries go first when the total exceeds ``max_bytes`` (the caches'
own ``nbytes``); an entry alone over the budget is not kept. Caches that cannot be
trimmed (sliding-window rotations past their window) are reused only on an exact prefix.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass

MIN_REUSE = 16  # shared tokens below this are not worth a cache copy


@dataclass
class _Entry:
    cache: list
    nbytes: int


def _nbytes(cache: list) -> int:
    return int(sum(getattr(c, "nbytes", 0) for c in cache))


def _common(a: tuple, b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixCache:
    """LRU of KV caches keyed by (adapter, tokens); bounded in bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self.total = 0
        self.hits = 0
        self.reused_tokens = 0

    def lookup(self, adapter: str | None, prompt: list[int]) -> tuple[list | None, int]:
        """(a private copy of the best cache trimmed to the shared prefix, its length) or (None, 0)."""
        best, best_n = self._best(adapter, prompt)
        if best is None:
            return None, 0
        self.entries.move_to_end(best)
        cache = copy.deepcopy(self.entries[best].cache)
        extra = len(best[1]) - best_n
        if extra:
            for c in cache:
                c.trim(extra)
        self.hits += 1
        self.reused_tokens += best_n
        return cache, best_n

    def peek(self, adapter: str | None, prompt: list[int]) -> int:
        """How many prompt tokens ``lookup`` would reuse, without copying or counting a hit."""
        return self._best(adapter, prompt)[1]

    def _best(self, adapter: str | None, prompt: list[int]) -> tuple[tuple | None, int]:
        if not self.max_bytes:
            return None, 0
        target = prompt[:-1]
        best, best_n = None, 0
        for key in self.entries:
            if key[0] != adapter:
                continue
            n = _common(key[1], target)
            trimmable = all(c.is_trimmable() for c in self.entries[key].cache)
            if n < len(key[1]) and not trimmable:
                continue
            if n > best_n:
                best, best_n = key, n
        if best is None or best_n < MIN_REUSE:
            return None, 0
        return best, best_n

    def store(self, adapter: str | None, tokens: list[int], cache: list) -> None:
        if not self.max_bytes or len(tokens) < MIN_REUSE or not cache:
            return
        size = _nbytes(cache)
        if size > self.max_bytes:
            return
        key = (adapter, tuple(tokens))
        old = self.entries.pop(key, None)
        if old is not None:
            self.total -= old.nbytes
        if all(c.is_trimmable() for c in cache):  # it serves every prefix of itself: those entries go
            for k in [k for k in self.entries if k[0] == adapter and len(k[1]) <= len(tokens)
                      and k[1] == key[1][: len(k[1])]]:
                self.total -= self.entries.pop(k).nbytes
        self.entries[key] = _Entry(cache, size)
        self.total += size
        while self.total > self.max_bytes and self.entries:
            _, gone = self.entries.popitem(last=False)
            self.total -= gone.nbytes

    def drop_adapter(self, adapter: str | None) -> None:
        """Forget an adapter's entries (it was unloaded or replaced)."""
        for k in [k for k in self.entries if k[0] == adapter]:
            self.total -= self.entries.pop(k).nbytes

    def stats(self) -> dict:
        return {"entries": len(self.entries), "bytes": self.total, "hits": self.hits,
                "reused_tokens": self.reused_tokens}


def prefill(model, tokens: list[int], step: int = 512) -> list:
    """A fresh KV cache of ``model`` holding ``tokens`` (computed ``step`` tokens at a time)."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    x = mx.array(tokens)[None]
    for at in range(0, len(tokens), step):
        model(x[:, at: at + step], cache=cache)
        mx.eval([c.state for c in cache])
    return cache
