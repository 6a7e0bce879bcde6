"""Which tokens of a chat are trained (``train.mask``): assistant turns, reasoning, tool turns.

The chat is rendered once by the model's own template; trained spans are found in that
text and mapped to tokens through the tokenizer's character offsets, so templates that
rewrite earlier turns (Qwen3 drops their think blocks, gpt-oss ends the last turn with
``<|return|>`` and earlier ones with ``<|end|>``) get exact spans too.

An assistant turn's span starts after the template's generation prompt ``G`` (what
``add_generation_prompt`` appends: ``<|im_start|>assistant\\n``, Llama's assistant header,
gpt-oss's ``<|start|>assistant``) and ends after the first end-of-turn token (an eos id,
or the token the template closes an assistant turn with) that follows the turn's last
own text: its answer, its reasoning, or its last tool call's function name. Inside it:

- ``reasoning``: a turn's reasoning is ``reasoning_content`` / ``thinking`` or a leading
  ``<think>...</think>`` in its content. ``keep`` renders and trains it on every turn
  (inline as ``<think>`` text where the template would drop or ignore it);
  ``drop_previous`` removes it from assistant turns before the last user message (what
  Qwen3's template does); ``mask`` renders it as ``keep`` but trains none of it (nor the
  markup closing it: ``</think>``, gpt-oss's ``<|end|>`` and the next header). Default
  (null): ``drop_previous`` where the template drops earlier turns' reasoning, else ``keep``.
- an empty think block the template inserts (``<think>\\n\\n</think>\\n\\n`` on Qwen3's last
  turn) is never trained: the model did not write it.
- ``tool_calls: train`` trains the call markup and JSON; ``mask`` leaves it untrained.
- ``tool_results: mask``: tool messages lie outside assistant spans: never trained.

``chat_mask`` returns None where this cannot apply (a tokenizer without offsets, a
template whose generation prompt is not found); ``tokenize`` then falls back to its
prefix renderings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

THINK = re.compile(r"^\s*<think>(.*?)</think>\s*", re.DOTALL)
EMPTY_THINK = re.compile(r"\s*<think>\s*</think>\s*")
THINK_CLOSE = re.compile(r"\s*</think>\s*")


@dataclass(frozen=True)
class MaskPolicy:
    reasoning: str | None = None  # keep | drop_previous | mask | None: as the template does
    tool_calls: str = "train"
    tool_results: str = "mask"

    @classmethod
    def of(cls, cfg: Any) -> MaskPolicy:
        """From a ``train.mask`` config (or None: the defaults)."""
        if cfg is None:
            return cls()
        return cls(getattr(cfg, "reasoning", None), getattr(cfg, "tool_calls", "train"),
                   getattr(cfg, "tool_results", "mask"))


def split_reasoning(message: dict) -> tuple[str, str]:
    """(reasoning, answer) of an assistant message."""
    content = message.get("content") or ""
    for key in ("reasoning_content", "thinking", "reasoning"):
        if isinstance(message.get(key), str) and message[key]:
            return message[key].strip("\n"), content
    m = THINK.match(content)
    if m:
        return m.group(1).strip("\n"), content[m.end():]
    return "", content


def _text(tokenizer, messages: list[dict], tools=None, gen: bool = False) -> str:
    kwargs = {"tools": tools} if tools else {}
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen, **kwargs)


@dataclass(frozen=True)
class TemplateTraits:
    renders_reasoning: bool  # a reasoning_content / thinking field shows in the text
    keeps_previous: bool  # ... also on a turn before the last user message
    gen_prompt: str  # G
    closers: tuple[str, ...]  # texts of tokens that close an assistant turn


_traits: dict[tuple[int, str], TemplateTraits] = {}


def template_traits(tokenizer) -> TemplateTraits:
    """What the template does with reasoning, its generation prompt and turn closers (probed once)."""
    key = (id(tokenizer), str(getattr(tokenizer, "chat_template", None)))
    if key in _traits:
        return _traits[key]
    u = {"role": "user", "content": "UPROBE1"}

    def a(r: str, c: str) -> dict:
        return {"role": "assistant", "content": c, "reasoning_content": r, "thinking": r}

    one = _text(tokenizer, [u, a("RPROBE1", "APROBE1")])
    two = _text(tokenizer, [u, a("RPROBE1", "APROBE1"), {"role": "user", "content": "UPROBE2"}, a("RPROBE2", "APROBE2")])
    head = _text(tokenizer, [u])
    with_gen = _text(tokenizer, [u], gen=True)
    gen = with_gen[len(head):] if with_gen.startswith(head) else ""
    specials = sorted((t for t in getattr(tokenizer, "all_special_tokens", []) or [] if t), key=len, reverse=True)
    closers = set()
    for text, probe in ((one, "APROBE1"), (two, "APROBE1"), (two, "APROBE2")):
        rest = text[text.find(probe) + len(probe):]
        hits = [(rest.find(s), s) for s in specials if s in rest]
        if hits:
            closers.add(min(hits)[1])
    for i in eos_token_ids(tokenizer):
        closers.add(tokenizer.convert_ids_to_tokens(i) if hasattr(tokenizer, "convert_ids_to_tokens") else "")
    closers.discard("")
    traits = TemplateTraits("RPROBE1" in one, "RPROBE1" in two, gen, tuple(sorted(closers)))
    _traits[key] = traits
    return traits


def eos_token_ids(tokenizer) -> set[int]:
    ids = set(getattr(tokenizer, "eos_token_ids", None) or ())
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def effective_reasoning(policy: MaskPolicy, traits: TemplateTraits) -> str:
    if policy.reasoning is not None:
        return policy.reasoning
    return "drop_previous" if traits.renders_reasoning and not traits.keeps_previous else "keep"


def render_messages(messages: list[dict], reasoning: str, traits: TemplateTraits) -> tuple[list[dict], list[str]]:
    """Messages as the template gets them under the reasoning policy, and each one's kept reasoning."""
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    out, kept = [], []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            out.append(m)
            kept.append("")
            continue
        r, answer = split_reasoning(m)
        msg = {k: v for k, v in m.items() if k not in ("reasoning_content", "thinking", "reasoning")}
        if not r or (reasoning == "drop_previous" and i < last_user):
            msg["content"] = answer
            kept.append("")
        elif traits.renders_reasoning and (i > last_user or traits.keeps_previous):
            msg.update(content=answer, reasoning_content=r, thinking=r)
            kept.append(r)
        else:  # the template would drop or ignore it: inline, as text the template passes through
            msg.update(content=f"<think>\n{r}\n</think>\n\n{answer.lstrip()}", reasoning_content="")
            kept.append(r)
        out.append(msg)
    return out, kept


def _offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]] | None:
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    try:
        enc = hf(text, add_special_tokens=False, return_offsets_mapping=True)
    except (TypeError, ValueError, NotImplementedError):
        return None
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def chat_mask(tokenizer, messages: list[dict], tools=None, policy: MaskPolicy | None = None):
    """(ids, train mask, True) for one chat under ``policy``; None where the method cannot apply."""
    policy = policy or MaskPolicy()
    traits = template_traits(tokenizer)
    if not traits.gen_prompt:
        return None
    msgs, kept = render_messages(messages, effective_reasoning(policy, traits), traits)
    text = _text(tokenizer, msgs, tools)
    enc = _offsets(tokenizer, text)
    if enc is None:
        return None
    ids, offsets = enc
    regions: list[tuple[int, int]] = []
    cursor = 0
    for m, r in zip(msgs, kept):
        if m["role"] != "assistant":
            anchor = text.find(m["content"], cursor) if m.get("content") else -1
            cursor = anchor + len(m["content"]) if anchor >= 0 else cursor
            continue
        g = text.find(traits.gen_prompt, cursor)
        if g < 0:
            return None
        start = g + len(traits.gen_prompt)
        spans = _turn_spans(text, start, m, r, traits, policy, effective_reasoning(policy, traits))
        if spans is None:
            return None
        regions.extend(spans[0])
        cursor = spans[1]
    train = [any(a <= s < b for a, b in regions) for s, _ in offsets]
    return ids, train, True


def _turn_spans(text: str, start: int, m: dict, r: str, traits: TemplateTraits, policy: MaskPolicy,
                reasoning: str) -> tuple[list[tuple[int, int]], int] | None:
    """(trained character ranges, end) of the assistant turn whose text starts at ``start``."""
    pos, r_end, answer_at = start, None, None
    if r:
        i = text.find(r, pos)
        if i >= 0:
            r_end = pos = i + len(r)
    answer = split_reasoning(m)[1].strip()
    if answer:
        i = text.find(answer, pos)
        if i >= 0:
            answer_at, pos = i, i + len(answer)
    for call in m.get("tool_calls") or []:
        fn = call.get("function", call)
        name = fn.get("name") if isinstance(fn, dict) else None
        i = text.find(name, pos) if isinstance(name, str) and name else -1
        if i >= 0:
            pos = i + len(str(name))
    ends = [(text.find(c, pos), c) for c in traits.closers if text.find(c, pos) >= 0]
    if not ends:
        return None
    at, closer = min(ends)
    end = at + len(closer)
    cut_to = start
    if r and reasoning == "mask" and r_end is not None:
        cut_to = r_end
        close = THINK_CLOSE.match(text, cut_to)
        if close and close.end() > cut_to:
            cut_to = close.end()
        else:
            nxt = [(text.find(c, cut_to), c) for c in traits.closers if text.find(c, cut_to) >= 0]
            if nxt and not text[cut_to:min(nxt)[0]].strip():
                cut_to = min(nxt)[0] + len(min(nxt)[1])
                if text.startswith(traits.gen_prompt, cut_to):
                    cut_to += len(traits.gen_prompt)
    elif not r:
        empty = EMPTY_THINK.match(text, start)
        if empty:
            cut_to = empty.end()
    trained = [(cut_to, end)]
    if policy.tool_calls == "mask" and m.get("tool_calls"):
        call_start = answer_at + len(answer) if answer_at is not None else cut_to
        trained = [(cut_to, call_start), (at, end)] if call_start > cut_to else [(at, end)]
    return trained, end
