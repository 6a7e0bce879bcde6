"""Training records: their shapes, what makes one valid, and the ``Example`` it becomes.

This module is the one definition of a valid record: ``data_transform.py`` uses it to
convert raw data and the trainer uses it (through ``dataset.read_dataset``) to read the
JSONL it trains on.

Record shapes (``detect_shape``; the first field found decides, extra fields ignored):

==================  =====================================================
``openai``          ``{"messages": [{"role", "content"}...], "tools"?: [...]}``
``sharegpt``        ``{"conversations": [{"from": "human"|"gpt"|"system", "value"}...]}``
``alpaca``          ``{"instruction", "input"?, "output", "system"?}``
``prompt_completion`` ``{"prompt", "completion"}`` (strings, or message lists)
``question_answer`` ``{"question", "answer"}``
``text``            ``{"text"}``
==================  =====================================================

``to_example(record)`` validates a record and returns an ``Example``: a chat
(``messages`` + ``tools``) or a plain ``text`` (``render`` writes it out).

A chat is valid when every message has a known role and non-empty string content
(an assistant turn that only calls tools may have empty content), a system message
comes only first, user and assistant turns alternate (tool results follow an
assistant tool call and precede an assistant turn), and the last turn is the
assistant's. Problems raise ``RecordError`` with a one-line reason.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, NamedTuple

from mlx_tune.data.textio import json_reason


class RecordError(ValueError):
    """A record that cannot be used; ``str(err)`` is the one-line reason."""


class Example(NamedTuple):
    """A validated record: a chat (``messages``, optional ``tools``) or a ``text``.

    ``calls`` is True when an assistant message carries ``tool_calls``.
    """

    shape: str
    messages: list | None = None
    tools: list | None = None
    text: str | None = None
    calls: bool = False


_ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "tool": "tool",
    "function": "tool",
    "observation": "tool",
}
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "model": "assistant", "chatgpt": "assistant", "system": "system", "tool": "tool",
                   "observation": "tool", "function_response": "tool"}


def type_name(value: Any) -> str:
    """The JSON name of ``value``'s type, for reasons (``object``, ``array``, ``string``, ...)."""
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null",
            int: "number", float: "number"}.get(type(value), type(value).__name__)


def _string(record: dict, key: str, *, required: bool = True, empty_ok: bool = False) -> str:
    value = record.get(key)
    if value is None:
        if required:
            raise RecordError(f"missing field {key!r}")
        return ""
    if not isinstance(value, str):
        raise RecordError(f"field {key!r} must be a string, got {type_name(value)}")
    if not empty_ok and required and not value.strip():
        raise RecordError(f"field {key!r} is empty")
    return value


def _content(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # OpenAI content parts: keep the text parts
        parts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RecordError(f"{where}: only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)
    if value is None:
        raise RecordError(f"{where} is missing")
    raise RecordError(f"{where} must be a string, got {type_name(value)}")


def check_messages(messages: Any, field: str = "messages", tools: Any = None) -> list[dict]:
    """Validate a chat and return it normalised (known roles, string content).

    Raises ``RecordError`` naming the first problem (see the module doc for the rules).
    """
    if not isinstance(messages, list):
        raise RecordError(f"field {field!r} must be an array of messages, got {type_name(messages)}")
    if not messages:
        raise RecordError(f"field {field!r} is empty")
    out = []
    prev = None
    for i, m in enumerate(messages):
        where = f"{field}[{i}]"
        if not isinstance(m, dict):
            raise RecordError(f"{where} must be an object with role and content, got {type_name(m)}")
        role_name = m.get("role")
        if not isinstance(role_name, str):
            raise RecordError(f"{where}.role is missing" if role_name is None else f"{where}.role must be a string")
        role = _ROLES.get(role_name.lower())
        if role is None:
            raise RecordError(f"{where}.role {role_name!r} is not one of system, user, assistant, tool")
        msg = {"role": role}
        calls = m.get("tool_calls") if role == "assistant" else None
        if calls is not None:
            if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
                raise RecordError(f"{where}.tool_calls must be an array of objects")
        if calls and m.get("content") is None:
            content = ""
        else:
            content = _content(m.get("content"), f"{where}.content")
        if not content.strip() and not calls:
            raise RecordError(f"{where}.content is empty")
        msg["content"] = content
        if calls:
            msg["tool_calls"] = calls
        if role == "tool":
            for key in ("tool_call_id", "name"):
                if isinstance(m.get(key), str):
                    msg[key] = m[key]
        _check_order(prev, role, where, out)
        out.append(msg)
        prev = role
    if prev != "assistant":
        raise RecordError(f"conversation ends without an assistant turn (last role: {prev})")
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        raise RecordError("field 'tools' must be an array of objects")
    return out


def _check_order(prev: str | None, role: str, where: str, done: list[dict]) -> None:
    if role == "system":
        if prev is not None:
            raise RecordError(f"{where}: a system message may only come first")
    elif role == "user":
        if prev == "user":
            raise RecordError(f"{where}: two user turns in a row with no assistant turn between")
        if prev == "tool":
            raise RecordError(f"{where}: a tool result must be followed by an assistant turn, not user")
    elif role == "assistant":
        if prev == "assistant":
            raise RecordError(f"{where}: two assistant turns in a row with no user turn between")
        if prev in (None, "system"):
            raise RecordError(f"{where}: the conversation starts with an assistant turn; the first turn must be user")
    elif role == "tool":
        if not (prev == "tool" or prev == "assistant" and "tool_calls" in done[-1]):
            raise RecordError(f"{where}: a tool result must follow an assistant turn with tool_calls")


def _chat_example(shape: str, messages: list[dict], tools: Any) -> Example:
    return Example(shape, messages, tools or None, None, any("tool_calls" in m for m in messages))


def _from_openai(r: dict) -> Example:
    messages, tools = _json_text(r, "messages"), _json_text(r, "tools")
    return _chat_example("openai", check_messages(messages, "messages", tools), tools)


def _from_sharegpt(r: dict) -> Example:
    conv = _json_text(r, "conversations")
    if not isinstance(conv, list):
        raise RecordError(f"field 'conversations' must be an array, got {type_name(conv)}")
    messages = []
    system = r.get("system")
    if isinstance(system, str) and system.strip():
        messages.append({"role": "system", "content": system})
    for i, turn in enumerate(conv):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise RecordError(f"{where} must be an object with from and value, got {type_name(turn)}")
        who = turn.get("from")
        role = _SHAREGPT_ROLES.get(who.lower()) if isinstance(who, str) else None
        if role is None:
            raise RecordError(f"{where}.from {who!r} is not one of human, gpt, system")
        messages.append({"role": role, "content": turn.get("value")})
    tools = _json_text(r, "tools")
    return _chat_example("sharegpt", check_messages(messages, "conversations", tools), tools)


def _pair(shape: str, prompt: Any, answer: Any, pkey: str, akey: str, r: dict, strip: bool = True) -> Example:
    """A user/assistant chat from two string fields (the hot path of most datasets)."""
    if type(prompt) is not str or type(answer) is not str:
        _string(r, pkey), _string(r, akey)  # raises the precise reason
    if strip:
        prompt, answer = prompt.strip(), answer.strip()
    if not prompt or not answer.strip():
        raise RecordError(f"field {pkey if not prompt else akey!r} is empty")
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return _new(Example, (shape, messages, None, None, False))


_new = tuple.__new__  # Example(...) without NamedTuple's Python-level __new__: hot path


def _from_alpaca(r: dict) -> Example:
    instruction, output, extra = r.get("instruction"), r.get("output"), r.get("input")
    # Fast path for the common, valid record; anything else takes the checked path below.
    if type(instruction) is str and type(output) is str and (not extra or type(extra) is str) and "system" not in r:
        instruction, output = instruction.strip(), output.strip()
        if instruction and output:
            if extra:
                extra = extra.strip()
                if extra:
                    instruction = f"{instruction}\n\n{extra}"
            messages = [{"role": "user", "content": instruction}, {"role": "assistant", "content": output}]
            return _new(Example, ("alpaca", messages, None, None, False))
    instruction, extra = r.get("instruction"), r.get("input")
    if extra:
        if type(extra) is not str:
            raise RecordError(f"field 'input' must be a string, got {type_name(extra)}")
        extra = extra.strip()
        if extra and type(instruction) is str:
            instruction = f"{instruction.strip()}\n\n{extra}"
    ex = _pair("alpaca", instruction, r.get("output"), "instruction", "output", r)
    system = r.get("system")
    if system is not None:
        if type(system) is not str:
            raise RecordError(f"field 'system' must be a string, got {type_name(system)}")
        if system.strip():
            ex.messages.insert(0, {"role": "system", "content": system.strip()})
    return ex


def _from_prompt_completion(r: dict) -> Example:
    prompt, completion = r.get("prompt"), r.get("completion")
    if isinstance(prompt, list):  # conversational prompt/completion (TRL style)
        if not isinstance(completion, list):
            raise RecordError("field 'completion' must be a list of messages when 'prompt' is one")
        return _chat_example("prompt_completion", check_messages(prompt + completion, "prompt+completion"), None)
    # Kept verbatim: a completion's leading space or newline is part of what is learnt.
    return _pair("prompt_completion", prompt, completion, "prompt", "completion", r, strip=False)


def _from_qa(r: dict) -> Example:
    return _pair("question_answer", r.get("question"), r.get("answer"), "question", "answer", r)


def _from_text(r: dict) -> Example:
    return _new(Example, ("text", None, None, _string(r, "text"), False))


# shape -> (the fields that identify it, the first being decisive; converter)
SHAPES: dict[str, tuple[tuple[str, ...], Callable[[dict], Example]]] = {
    "openai": (("messages",), _from_openai),
    "sharegpt": (("conversations",), _from_sharegpt),
    "alpaca": (("instruction", "output"), _from_alpaca),
    "prompt_completion": (("prompt", "completion"), _from_prompt_completion),
    "question_answer": (("question", "answer"), _from_qa),
    "text": (("text",), _from_text),
}
# Every field a record of some shape is read from (the targets ``--map`` accepts).
RECORD_FIELDS = {f for fields, _ in SHAPES.values() for f in fields} | {"input", "system", "tools"}
_CONVERTERS = {name: convert for name, (_, convert) in SHAPES.items()}
_DECISIVE = [(fields[0], name) for name, (fields, _) in SHAPES.items()]
_PARTIAL = [(f, name) for name, (fields, _) in SHAPES.items() for f in fields[1:]]


def _json_text(r: dict, key: str) -> Any:
    """``r[key]``, decoded when it is JSON text (a CSV cell holding messages or tools)."""
    value = r.get(key)
    if isinstance(value, str):
        try:
            return json.loads(value)
        except (ValueError, RecursionError) as exc:
            raise RecordError(f"field {key!r} holds text that is not valid JSON: {json_reason(exc)}") from None
    return value


def guess_shape(record: dict) -> str | None:
    """The shape whose fields ``record`` has (decisive ones first), or None; no check."""
    for key, name in _DECISIVE:
        if key in record:
            return name
    for key, name in _PARTIAL:  # e.g. "output" without "instruction": say what is missing
        if key in record:
            return name
    return None


def detect_shape(record: Any) -> str:
    """The shape name of ``record`` (see the module doc); ``RecordError`` if none fits."""
    if not isinstance(record, dict):
        raise RecordError(f"record must be a JSON object, got {type_name(record)}")
    shape = guess_shape(record)
    if shape is None:
        keys = ", ".join(repr(k[:40]) for k in sorted(record)[:8]) or "none"
        raise RecordError(
            f"unknown record shape (fields: {keys}); expected messages, conversations, instruction/output, "
            "prompt/completion, question/answer or text (map other names with --map FIELD=SOURCE_FIELD)"
        )
    return shape


def to_example(record: Any, shape: str | None = None) -> Example:
    """Validate ``record`` (of ``shape``, detected when None) into an ``Example``."""
    if type(record) is not dict:
        raise RecordError(f"record must be a JSON object, got {type_name(record)}")
    return _CONVERTERS[shape or guess_shape(record) or detect_shape(record)](record)


def validate_record(record: Any, shape: str | None = None) -> str | None:
    """``None`` when ``record`` is a valid training example, else the reason."""
    try:
        to_example(record, shape)
    except RecordError as exc:
        return str(exc)
    return None


def apply_map(record: Any, mapping: list[tuple[str, list[str]]], hits: list[int] | None = None) -> Any:
    """Copy ``SOURCE_FIELD`` (a dotted path: ``answers.0.text``) into ``FIELD``.

    ``hits[i]`` counts the records where mapping ``i`` found its source.
    """
    if not isinstance(record, dict):
        return record
    record = dict(record)
    for i, (target, path) in enumerate(mapping):
        value: Any = record
        for part in path:
            if isinstance(value, dict) and part in value:
                value = value[part]
            elif isinstance(value, list) and part.lstrip("-").isdigit() and -len(value) <= int(part) < len(value):
                value = value[int(part)]
            else:
                break
        else:
            record[target] = value
            if hits is not None:
                hits[i] += 1
    return record
