"""Dedup and split keys: what identifies a record and its prompt, and which split it goes to.

``example_keys`` gives two normalised texts per example (whitespace collapsed, lower
case, NUL between fields): the whole record (dedup: the first of each is kept) and its
prompt, all turns but the last (records sharing it form a group).

Split: every prompt group gets the key ``u = splitmix64(prompt_hash XOR mix(seed))``,
a seeded pseudo-random order. Sorted by ``u``, the first ``round(n * test_ratio)``
records go to test and the next ``round(n * valid_ratio)`` to valid (each boundary
moved to the end of its group), the rest to train; the group that sorts last always
trains. Records sharing a prompt share ``u``, so no prompt, and hence no example, lands
in two splits; the same inputs and seed give the same assignment.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mlx_tune.data.records import Example


def split_sizes(n: int, valid_ratio: float, test_ratio: float) -> tuple[int, int]:
    """``(n_valid, n_test)``: rounded shares, at least 1 when asked for and n >= 3, train >= 1."""
    sizes = []
    for r in (valid_ratio, test_ratio):
        k = int(n * r + 0.5)
        sizes.append(max(1, k) if r > 0 and n >= 3 else k)
    n_valid, n_test = sizes
    while n_valid + n_test > max(n - 1, 0):
        if n_valid >= n_test:
            n_valid -= 1
        else:
            n_test -= 1
    return n_valid, n_test


_M64 = (1 << 64) - 1


def _splitmix64_int(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def assign_splits(group_hashes, n_valid: int, n_test: int, seed: int):
    """Per record 0 (train), 1 (valid) or 2 (test); see the module doc for the rule.

    ``group_hashes`` is a uint64 array (one prompt hash per record).
    """
    import numpy as np

    n = len(group_hashes)
    x = group_hashes ^ np.uint64(_splitmix64_int(seed & _M64))
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    key = x ^ (x >> np.uint64(31))
    order = np.argsort(key, kind="stable")
    ks = key[order]

    def boundary(i: int) -> int:  # first index >= i that starts a new group
        if i <= 0:
            return 0
        return int(np.searchsorted(ks, ks[min(i, n) - 1], side="right"))

    # The last group always trains, so one giant prompt group cannot empty train.
    last_group = int(np.searchsorted(ks, ks[-1], side="left")) if n else 0
    t_end = min(boundary(n_test), last_group)
    v_end = min(boundary(t_end + n_valid), last_group) if n_valid else t_end
    assign = np.zeros(n, dtype=np.uint8)
    assign[order[:t_end]] = 2
    assign[order[t_end:v_end]] = 1
    return assign


def example_keys(ex: Example, tools_text: Callable[[Any], str]) -> tuple[str, str]:
    """``(record_key, prompt_key)``: normalised text identifying the record and its prompt.

    NUL separates fields (it is not whitespace, so normalising cannot merge two fields).
    """
    if ex.text is not None:
        key = " ".join(ex.text.split()).lower()
        return key, key
    messages = ex.messages
    if len(messages) == 2 and not ex.calls and not ex.tools:  # the hot path: one user turn, one answer
        prompt = messages[0]["role"] + "\0" + " ".join(messages[0]["content"].split()).lower()
        return prompt + "\0\0assistant\0" + " ".join(messages[1]["content"].split()).lower(), prompt
    parts = [m["role"] + "\0" + " ".join(m["content"].split()).lower() for m in ex.messages]
    if ex.calls:
        parts = [p + "\0" + tools_text(m["tool_calls"]) if "tool_calls" in m else p for p, m in zip(parts, ex.messages)]
    prompt = "\0\0".join(parts[:-1])
    if ex.tools:
        prompt += "\0\0\0" + tools_text(ex.tools)
    return prompt + "\0\0" + parts[-1], prompt

