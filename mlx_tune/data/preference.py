"""Preference and prompt-only rows: their shapes, what makes one valid, and the row written.

``data_transform.py --to preference`` (or auto-detected from the first record) reads:

==========================  ==========================================================
string pairs                ``{"prompt": str, "chosen": str, "rejected": str, "system"?: str}``
TRL conversational pairs    ``{"prompt" | "messages": [msgs...], "chosen": [assistant msgs],
                            "rejected": [assistant msgs]}``
shared-prefix conversations ``{"chosen": [whole chat], "rejected": [whole chat]}`` (HH,
                            UltraFeedback): split after the last shared user turn
KTO (unpaired)              ``{"prompt" | "messages", "completion", "label": true | false}``
==========================  ==========================================================

and writes ``{"prompt", "chosen", "rejected"}`` (``system`` kept) for string data,
``{"messages": [prompt msgs], "chosen": [...], "rejected": [...]}`` for conversational
data (``system`` folded in as the first message), ``{"prompt" | "messages",
"completion", "label"}`` for KTO. ``--to prompts`` (GRPO) writes ``{"prompt": str}`` or
``{"messages": [... ending in a user turn]}`` with every other column kept as it is.

Each converter returns ``(row, shape, record_key, prompt_key)``: the keys are normalised
text (whitespace collapsed, lower case, NUL between fields) for dedup and for the
prompt-keyed split, so every pair of one prompt lands in one split. Problems raise
``RecordError`` with a one-line reason.
"""

from __future__ import annotations

import json
from typing import Any

from mlx_tune.data.records import RecordError, check_messages, type_name

MODES = ("preference", "prompts")
# Fields --map may fill besides the SFT ones (records.RECORD_FIELDS).
PREFERENCE_FIELDS = {"prompt", "messages", "system", "chosen", "rejected", "completion", "label"}
_ASSISTANT = {"assistant", "gpt", "model", "chatgpt"}
# A record with any of these is not a prompt-only row (auto-detection only; --to prompts keeps them).
_ANSWER_FIELDS = ("completion", "answer", "chosen", "rejected", "output", "instruction", "conversations")
_canonical = json.JSONEncoder(ensure_ascii=False, sort_keys=True).encode


def _norm(text: str) -> str:
    return " ".join(text.split()).lower()


def _msgs_key(messages: list[dict]) -> str:
    return "\0\0".join(m["role"] + "\0" + _norm(m["content"]) + ("\0" + _canonical(m["tool_calls"]) if "tool_calls" in m else "")
                       for m in messages)


def _role(m: Any) -> str:
    return m.get("role", "").lower() if isinstance(m, dict) and isinstance(m.get("role"), str) else ""


def _ends_in_user(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and _role(value[-1]) in ("user", "human")


def detect_mode(record: Any) -> str | None:
    """``"preference"`` or ``"prompts"`` when ``record`` is one of those rows, else None (SFT)."""
    if type(record) is not dict:
        return None
    if "chosen" in record or "rejected" in record:
        return "preference"
    if type(record.get("label")) is bool and "completion" in record:
        return "preference"
    prompt = record.get("prompt")
    if (isinstance(prompt, (str, list)) or _ends_in_user(record.get("messages"))) and not any(
        f in record for f in _ANSWER_FIELDS
    ):
        return "prompts"
    return None


def trainer_kind(record: Any) -> str | None:
    """What the trainer cannot read yet: ``"preference pairs"``, ``"KTO rows"``, ``"prompt-only rows"`` or None."""
    mode = detect_mode(record)
    if mode == "preference":
        return "preference pairs" if "chosen" in record or "rejected" in record else "KTO rows"
    if mode == "prompts" or type(record) is dict and "completion" not in record and (
        isinstance(record.get("prompt"), (str, list)) or _ends_in_user(record.get("messages"))
    ):  # the trainer asks only of rows it cannot read, so an answer column does not hide a prompt row
        return "prompt-only rows"
    return None


def _system(record: dict) -> str | None:
    system = record.get("system")
    if system is None:
        return None
    if not isinstance(system, str):
        raise RecordError(f"field 'system' must be a string, got {type_name(system)}")
    return system if system.strip() else None


def _prompt_messages(value: list, field: str, system: str | None) -> list[dict]:
    """A validated prompt chat ending in a user turn (``system`` first when it has none)."""
    if not value:
        raise RecordError(f"field {field!r} is empty")
    if not _ends_in_user(value):
        raise RecordError(f"field {field!r} must end with a user turn (last role: {_role(value[-1]) or 'none'})")
    msgs = check_messages(value + [{"role": "assistant", "content": "-"}], field)[:-1]
    if system and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": system})
    return msgs


def _text(record: dict, key: str) -> str:
    value = record.get(key)
    if value is None:
        raise RecordError(f"missing field {key!r}")
    if not isinstance(value, str):
        raise RecordError(f"field {key!r} must be a string, got {type_name(value)}")
    if not value.strip():
        raise RecordError(f"field {key!r} is empty")
    return value


def _side(prompt: list[dict], value: Any, field: str) -> list[dict]:
    """An answer as assistant messages, validated as the continuation of ``prompt``."""
    if isinstance(value, str):
        if not value.strip():
            raise RecordError(f"field {field!r} is empty")
        value = [{"role": "assistant", "content": value}]
    if not isinstance(value, list):
        raise RecordError(f"field {field!r} must be a string or a list of messages, got {type_name(value)}")
    if not value:
        raise RecordError(f"field {field!r} is empty")
    for i, m in enumerate(value):
        if _role(m) not in _ASSISTANT and _role(m) != "tool":
            raise RecordError(f"field {field!r} must hold assistant turns only ({field}[{i}] is {_role(m) or 'no role'!r})")
    return check_messages(prompt + value, f"prompt+{field}")[len(prompt):]


def _get_prompt(record: dict, system: str | None) -> tuple[str | None, list[dict] | None]:
    """(string prompt, or prompt messages) of a record; RecordError if it has neither."""
    prompt = record.get("prompt")
    if prompt is None and "messages" in record:
        prompt, field = record["messages"], "messages"
    else:
        field = "prompt"
    if prompt is None:
        raise RecordError("missing field 'prompt' (or 'messages')")
    if isinstance(prompt, list):
        return None, _prompt_messages(prompt, field, system)
    if not isinstance(prompt, str):
        raise RecordError(f"field {field!r} must be a string or a list of messages, got {type_name(prompt)}")
    if not prompt.strip():
        raise RecordError(f"field {field!r} is empty")
    return prompt, None


def _whole_chat(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and _role(value[0]) not in _ASSISTANT


def split_shared_prefix(chosen: Any, rejected: Any) -> tuple[list[dict], list[dict], list[dict]]:
    """``(prompt, chosen, rejected)`` of two whole chats: the prompt is every turn up to the
    last user turn they share; what follows must be assistant turns on both sides."""
    sides = []
    for value, field in ((chosen, "chosen"), (rejected, "rejected")):
        try:
            sides.append(check_messages(value, field))
        except RecordError as exc:
            raise RecordError(f"field {field!r}: {exc}") from None
    c, r = sides
    ck, rk = [_msgs_key([m]) for m in c], [_msgs_key([m]) for m in r]
    if ck == rk:
        raise RecordError("chosen and rejected are identical")
    k = 0
    while k < min(len(c), len(r)) and ck[k] == rk[k]:
        k += 1
    users = [i for i in range(k) if c[i]["role"] == "user"]
    if not users:
        raise RecordError("chosen and rejected share no prompt (their first user turns differ)")
    p = users[-1] + 1
    for side, field in ((c, "chosen"), (r, "rejected")):
        if len(side) == p:
            raise RecordError(f"field {field!r} has no answer after the shared prompt")
        if any(m["role"] not in ("assistant", "tool") for m in side[p:]):
            raise RecordError(f"chosen and rejected prompts differ (they part at turn {k}, before the last assistant turn)")
    return c[:p], c[p:], r[p:]


def _check_given_prompt(record: dict, prompt: list[dict]) -> None:
    """A ``prompt`` given beside whole chats must be their shared prompt (or its last user turn)."""
    given = record.get("prompt", record.get("messages"))
    if given is None:
        return
    if isinstance(given, str):
        ok = _norm(given) == _norm(prompt[-1]["content"])
    else:
        plain = [m for m in prompt if m["role"] != "system"]
        ok = isinstance(given, list) and _msgs_key([m for m in _prompt_messages(given, "prompt", None)
                                                    if m["role"] != "system"]) == _msgs_key(plain)
    if not ok:
        raise RecordError("field 'prompt' is not the prompt that chosen and rejected share")


def _pair(record: dict) -> tuple[dict, str, str, str]:
    system = _system(record)
    chosen, rejected = record.get("chosen"), record.get("rejected")
    for value, field in ((chosen, "chosen"), (rejected, "rejected")):
        if value is None:
            raise RecordError(f"missing field {field!r}")
    if _whole_chat(chosen) and _whole_chat(rejected):
        prompt, c, r = split_shared_prefix(chosen, rejected)
        _check_given_prompt(record, prompt)
        if system and prompt[0]["role"] != "system":
            prompt.insert(0, {"role": "system", "content": system})
        return _conversational_pair(prompt, c, r, "preference_shared_prefix")
    text, msgs = _get_prompt(record, system)
    if text is not None and isinstance(chosen, str) and isinstance(rejected, str):
        cs, rs = _text(record, "chosen"), _text(record, "rejected")
        if _norm(cs) == _norm(rs):
            raise RecordError("chosen and rejected are identical")
        row = {"prompt": text, "chosen": cs, "rejected": rs}
        if system:
            row["system"] = system
        pkey = _norm(system or "") + "\0" + _norm(text)
        return row, "preference", pkey + "\0\0\0" + _norm(cs) + "\0\0\0" + _norm(rs), pkey
    if msgs is None:
        msgs = _prompt_messages([{"role": "user", "content": text}], "prompt", system)
    c, r = _side(msgs, chosen, "chosen"), _side(msgs, rejected, "rejected")
    return _conversational_pair(msgs, c, r, "preference_conversational")


def _conversational_pair(prompt: list[dict], c: list[dict], r: list[dict], shape: str) -> tuple[dict, str, str, str]:
    ckey, rkey = _msgs_key(c), _msgs_key(r)
    if ckey == rkey:
        raise RecordError("chosen and rejected are identical")
    pkey = _msgs_key(prompt)
    return {"messages": prompt, "chosen": c, "rejected": r}, shape, pkey + "\0\0\0" + ckey + "\0\0\0" + rkey, pkey


def _kto(record: dict) -> tuple[dict, str, str, str]:
    label = record.get("label")
    if label is None:
        raise RecordError("missing field 'label' (true or false)")
    if isinstance(label, str) and label.strip().lower() in ("true", "false"):  # a CSV cell
        label = label.strip().lower() == "true"
    if type(label) is not bool:
        raise RecordError(f"field 'label' must be true or false, got {type_name(label)} {json.dumps(label)[:40]}")
    system = _system(record)
    text, msgs = _get_prompt(record, system)
    completion = record.get("completion")
    if completion is None:
        raise RecordError("missing field 'completion'")
    flag = "\0\0\0" + ("true" if label else "false")
    if text is not None and isinstance(completion, str):
        answer = _text(record, "completion")
        row: dict = {"prompt": text, "completion": answer, "label": label}
        if system:
            row["system"] = system
        pkey = _norm(system or "") + "\0" + _norm(text)
        return row, "kto", pkey + "\0\0\0" + _norm(answer) + flag, pkey
    if msgs is None:
        msgs = _prompt_messages([{"role": "user", "content": text}], "prompt", system)
    side = _side(msgs, completion, "completion")
    pkey = _msgs_key(msgs)
    row = {"messages": msgs, "completion": side, "label": label}
    return row, "kto_conversational", pkey + "\0\0\0" + _msgs_key(side) + flag, pkey


def convert_preference(record: Any) -> tuple[dict, str, str, str]:
    """A preference pair or KTO row: ``(row, shape, record_key, prompt_key)`` (module doc)."""
    if type(record) is not dict:
        raise RecordError(f"record must be a JSON object, got {type_name(record)}")
    if "chosen" in record or "rejected" in record:
        return _pair(record)
    if "label" in record or "completion" in record:
        return _kto(record)
    raise RecordError("not a preference row: needs 'chosen' and 'rejected' (or 'completion' and 'label' for KTO)")


def convert_prompts(record: Any) -> tuple[dict, str, str, str]:
    """A prompt-only row (GRPO): the prompt normalised, every other column kept as it is."""
    if type(record) is not dict:
        raise RecordError(f"record must be a JSON object, got {type_name(record)}")
    system = _system(record)
    if "prompt" not in record and isinstance(record.get("messages"), list) and not _ends_in_user(record["messages"]):
        last = _role(record["messages"][-1]) if record["messages"] else "none"
        raise RecordError(f"field 'messages' must end with a user turn for a prompt-only row (last role: {last})")
    text, msgs = _get_prompt(record, None if "prompt" in record and isinstance(record["prompt"], str) else system)
    used = {"prompt"} if "prompt" in record else {"messages"}
    if msgs is not None:
        row: dict = {"messages": msgs}
        used.add("system")
        pkey = _msgs_key(msgs)
    else:
        row = {"prompt": text}
        pkey = _norm(text or "")
    extras = {k: v for k, v in record.items() if k not in used}
    row.update(extras)
    shape = "prompts" if msgs is None else "prompts_conversational"
    return row, shape, pkey + "\0\0\0" + _norm(_canonical(extras)), pkey


CONVERTERS = {"preference": convert_preference, "prompts": convert_prompts}
