"""Records to token ids and a loss mask: the chat template, completion-only masks, EOS.

An example is a token sequence ``ids`` (n tokens) and a boolean ``train`` mask over it
(True where the model must learn to produce that token). It becomes n - 1 (input, target)
slots: ``inputs = ids[:-1]``, ``targets = ids[1:]``, ``loss_mask = train[1:]``.

- chat: the tokenizer's chat template renders the messages. With ``mask_prompt`` every
  assistant turn is trained (not only the last), up to and including the template's
  end-of-turn token so tuned models learn to stop; system/user/tool tokens are not.
  Turn boundaries come from rendering the prefixes ``messages[:i]`` and checking that
  each rendering is a prefix of the full one (counted as ``prefix_mismatch`` if not).
- completions: rendered as a user/assistant chat when the tokenizer has a template
  (as mlx-lm does), else ``prompt + completion + eos``; the prompt is not trained.
- text: every token is trained (an eos is appended).
"""

from __future__ import annotations

from mlx_tune.data.masks import chat_mask


def _template_ids(tokenizer, messages: list[dict], tools=None, gen: bool = False) -> list[int]:
    kwargs = {"tools": tools} if tools else {}
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen, **kwargs)
    if isinstance(out, dict) or hasattr(out, "input_ids"):  # transformers 5 may return a BatchEncoding
        out = out["input_ids"]
    return list(out)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def eos_ids(tokenizer) -> set[int]:
    """Every end-of-sequence id of ``tokenizer`` (``eos_token_ids`` and ``eos_token_id``)."""
    ids = set(getattr(tokenizer, "eos_token_ids", None) or ())
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def tokenize_chat(tokenizer, messages: list[dict], tools=None, mask_prompt: bool = True,
                  policy=None) -> tuple[list[int], list[bool], bool]:
    """(ids, train mask, prefix property held) for one chat.

    With ``mask_prompt`` the spans come from ``masks.chat_mask`` under ``policy`` (a
    ``masks.MaskPolicy``: reasoning, tool calls, tool results) where it applies; otherwise
    from prefix renderings, as follows.

    For assistant turn i the trained span runs from the end of the rendering of
    ``messages[:i]`` with the generation prompt to the end of ``messages[:i+1]``, cut
    after the span's last end-of-turn token (ChatML's trailing newline stays untrained).
    Where a prefix rendering is not a prefix of the full rendering (templates that rewrite
    earlier turns), the longest common prefix is used and the third value is False.
    """
    if mask_prompt:
        found = chat_mask(tokenizer, messages, tools, policy)
        if found is not None:
            return found
    full = _template_ids(tokenizer, messages, tools)
    if not mask_prompt:
        return full, [True] * len(full), True
    train = [False] * len(full)
    ok = True
    eos = eos_ids(tokenizer)
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        head = _template_ids(tokenizer, messages[:i], tools, gen=True) if i else []
        upto = _template_ids(tokenizer, messages[: i + 1], tools)
        start, end = _common_prefix(head, full), _common_prefix(upto, full)
        ok = ok and start == len(head) and end == len(upto)
        last = max((j for j in range(start, end) if full[j] in eos), default=None)
        if last is not None:
            end = last + 1
        for j in range(start, end):
            train[j] = True
    return full, train, ok


def tokenize_record(tokenizer, record: dict, fmt: str, mask_prompt: bool = True,
                    policy=None) -> tuple[list[int], list[bool], bool]:
    """(ids, train mask, prefix property held) for one record of trainer format ``fmt``."""
    if fmt == "chat":
        return tokenize_chat(tokenizer, record["messages"], record.get("tools"), mask_prompt, policy)
    if fmt == "completions":
        if getattr(tokenizer, "chat_template", None):
            msgs = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]
            return tokenize_chat(tokenizer, msgs, None, mask_prompt, policy)
        prompt = tokenizer.encode(record["prompt"])
        ids = prompt + tokenizer.encode(record["completion"], add_special_tokens=False)
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        n = len(prompt) if mask_prompt else 0
        return ids, [False] * n + [True] * (len(ids) - n), True
    ids = tokenizer.encode(record["text"])
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
    return ids, [True] * len(ids), True
