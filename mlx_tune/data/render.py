"""Write an ``Example`` as a record of one of the trainer's formats (``TRAINER_FORMATS``).

* ``chat``: ``{"messages": [...], "tools"?: [...]}``
* ``completions``: ``{"prompt": str, "completion": str}``
* ``text``: ``{"text": str}``

``render`` gives the dict (``RecordError`` where an example cannot take the format:
a text record as a chat, a multi-turn chat as prompt/completion, ...); ``dumps_example``
and ``dumps_record`` give its JSON line, byte for byte ``json.dumps(..., ensure_ascii=False)``.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from mlx_tune.data.records import Example, RecordError

TRAINER_FORMATS = ("chat", "completions", "text")


def _render_chat(ex: Example, system: str | None) -> dict:
    if ex.messages is None:
        raise RecordError("a text record cannot become a chat; use --to text")
    messages = ex.messages
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    out: dict = {"messages": messages}
    if ex.tools:
        out["tools"] = ex.tools
    return out


def _render_completions(ex: Example, system: str | None) -> dict:
    if ex.messages is None:
        raise RecordError("a text record cannot become prompt/completion; use --to text")
    if ex.tools:
        raise RecordError("a chat with tools cannot become prompt/completion; use --to chat")
    msgs = ex.messages
    sys_text = system
    if msgs[0]["role"] == "system":
        sys_text, msgs = msgs[0]["content"], msgs[1:]
    if len(msgs) != 2:
        raise RecordError(f"a {len(msgs)}-turn conversation cannot become prompt/completion; use --to chat")
    prompt = f"{sys_text}\n\n{msgs[0]['content']}" if sys_text else msgs[0]["content"]
    return {"prompt": prompt, "completion": msgs[1]["content"]}


def _render_text(ex: Example, system: str | None) -> dict:
    if ex.text is not None:
        return {"text": ex.text}
    if ex.tools:
        raise RecordError("a chat with tools cannot become plain text; use --to chat")
    return {"text": chat_as_text(ex.messages)}


def chat_as_text(messages: list[dict]) -> str:
    """A chat as plain text, one ``role: content`` line per message (the ``text`` format)."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


RENDERERS: dict[str, Callable[[Example, str | None], dict]] = {
    "chat": _render_chat,
    "completions": _render_completions,
    "text": _render_text,
}

_encode = json.JSONEncoder(ensure_ascii=False).encode
_string_json = json.encoder.encode_basestring  # what _encode uses for each string


def dumps_example(ex: Example, to: str = "chat", system: str | None = None) -> str:
    """``dumps_record(render(ex, to, system))``, with a fast path for plain chats."""
    messages = ex.messages
    if to == "chat" and messages is not None and not ex.calls and not ex.tools:
        # No tool calls means no tool messages: every message is exactly {role, content}.
        head = '{"messages": ['
        if system and messages[0]["role"] != "system":
            head += '{"role": "system", "content": ' + _string_json(system) + "}, "
        if len(messages) == 2:
            m0, m1 = messages
            return (head + '{"role": "' + m0["role"] + '", "content": ' + _string_json(m0["content"])
                    + '}, {"role": "' + m1["role"] + '", "content": ' + _string_json(m1["content"]) + "}]}")
        return head + ", ".join(
            ['{"role": "' + m["role"] + '", "content": ' + _string_json(m["content"]) + "}" for m in messages]
        ) + "]}"
    return dumps_record(render(ex, to, system))


def dumps_record(record: dict) -> str:
    """``json.dumps(record, ensure_ascii=False)``, byte for byte, ~3x faster on plain chats."""
    messages = record.get("messages")
    if messages is not None and len(record) == 1 and all(len(m) == 2 for m in messages):
        return '{"messages": [' + ", ".join(
            ['{"role": "' + m["role"] + '", "content": ' + _string_json(m["content"]) + "}" for m in messages]
        ) + "]}"
    return _encode(record)


def render(example: Example, to: str = "chat", system: str | None = None) -> dict:
    """``example`` as a record of trainer format ``to`` (``RecordError`` if it cannot be)."""
    return RENDERERS[to](example, system)
