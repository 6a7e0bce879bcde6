"""Token-length statistics of trainer-format records (``data_transform.py --tokenizer``).

Each record is tokenised as the trainer will see it: chats and prompt/completion pairs
through the tokenizer's chat template when it has one, else as plain text.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from mlx_tune.data.render import chat_as_text
from mlx_tune.errors import UserError


def load_tokenizer(source: str):
    """The tokenizer of any model source the loader accepts (imports mlx lazily)."""
    try:
        from mlx_tune.model import loading
    except ImportError as exc:
        raise UserError(f"--tokenizer needs the model loader, which cannot be imported here ({exc})") from None
    _, tokenizer, _ = loading.load_model(source)
    return tokenizer


def _ids(result: Any) -> list:
    # Tokenizers return a list of ids, or a mapping holding "input_ids" (transformers v5).
    if isinstance(result, dict) or hasattr(result, "keys"):
        result = result["input_ids"]
    return result


def token_length(record: dict, tokenizer: Any) -> int:
    """Tokens the trainer will see for ``record`` (a chat / completions / text record)."""
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if "messages" in record:
        if has_template:
            kwargs = {"tools": record["tools"]} if record.get("tools") else {}
            return len(_ids(tokenizer.apply_chat_template(record["messages"], tokenize=True, **kwargs)))
        return len(tokenizer.encode(chat_as_text(record["messages"])))
    if "prompt" in record:
        if has_template:
            chat = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]
            return len(_ids(tokenizer.apply_chat_template(chat, tokenize=True)))
        return len(tokenizer.encode(record["prompt"] + record["completion"]))
    return len(tokenizer.encode(record["text"]))


def length_stats(lengths: list[int], max_seq_length: int | None) -> dict:
    """min / median / p95 (nearest rank) / max / mean, and how many exceed ``max_seq_length``."""
    if not lengths:
        return {"count": 0}
    s = sorted(lengths)
    n = len(s)
    stats = {
        "count": n,
        "min": s[0],
        "median": s[(n - 1) // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2,
        "p95": s[max(0, -(-95 * n // 100) - 1)],
        "max": s[-1],
        "mean": round(sum(s) / n, 2),
        "max_seq_length": max_seq_length,
    }
    stats["truncated"] = sum(1 for x in s if max_seq_length is not None and x > max_seq_length)
    return stats


def token_stats(records: Iterable[dict], tokenizer: Any, max_seq_length: int | None = None) -> dict:
    """``length_stats`` over trainer-format ``records`` tokenised as the trainer will."""
    return length_stats([token_length(r, tokenizer) for r in records], max_seq_length)
