"""Scoring an answer against the expected one.

Each match mode is a function ``(output, expected) -> bool`` in ``MATCHERS``:

- ``exact``    ``output.strip() == expected.strip()`` (the default)
- ``contains`` ``expected.strip()`` occurs in ``output`` (case-sensitive)
- ``regex``    ``re.search(expected, output)`` finds a match (add ``(?i)``/``(?s)`` inline)
- ``json``     the first JSON value in the answer (a fenced ```json block is unwrapped)
               equals the expected value; ``expected`` is a JSON text or a JSON value.
               Equality is structural and typed: ``1 == 1.0`` but ``true != 1``.
- ``tool_call`` the answer is a tool call: ``expected`` is ``{"name": F, "arguments": {...}}``
               (or a list of them, in order) and the calls parsed from the answer must have
               the same names and (structurally) equal arguments. A call is a JSON object
               ``{"name", "arguments" | "parameters"}`` or OpenAI's ``{"function": {"name",
               "arguments"}}`` (arguments may be a JSON text), bare or inside
               ``<tool_call>...</tool_call>`` tags (one per tag).

``check_expected`` validates an expected value for a mode once, when the prompts
file is read, so a bad regex or JSON text is reported as ``file:line`` before any
request is sent.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

_FENCE = re.compile(r"```(?:json)?\s*\n?(.*?)```", re.DOTALL | re.IGNORECASE)


def _exact(output: str, expected: Any) -> bool:
    return output.strip() == str(expected).strip()


def _contains(output: str, expected: Any) -> bool:
    return str(expected).strip() in output


def _regex(output: str, expected: Any) -> bool:
    return re.search(str(expected), output) is not None


def extract_json(text: str) -> tuple[bool, Any]:
    """``(found, value)``: the whole text as JSON, else the first JSON object/array in it.

    Models often wrap structured answers in prose or a Markdown fence; scanning for the
    first decodable ``{`` or ``[`` accepts those without accepting a wrong value.
    """
    fenced = _FENCE.search(text)
    candidates = [fenced.group(1)] if fenced else []
    candidates.append(text)
    decoder = json.JSONDecoder()
    for candidate in candidates:
        stripped = candidate.strip()
        try:
            return True, json.loads(stripped)
        except ValueError:
            pass
        for i, ch in enumerate(stripped):
            if ch in "{[":
                try:
                    return True, decoder.raw_decode(stripped, i)[0]
                except ValueError:
                    continue
    return False, None


def expected_json(expected: Any) -> Any:
    """The expected JSON value: a string is parsed as JSON text, anything else is the value."""
    return json.loads(expected) if isinstance(expected, str) else expected


def json_equal(a: Any, b: Any) -> bool:
    """Structural equality where booleans are not numbers (Python says ``True == 1``)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _json(output: str, expected: Any) -> bool:
    found, value = extract_json(output)
    return found and json_equal(value, expected_json(expected))


_TOOL_TAG = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def _as_call(value: Any) -> tuple[str, Any] | None:
    """``(name, arguments)`` of one tool call object, None if it is not one."""
    if not isinstance(value, dict):
        return None
    if isinstance(value.get("function"), dict):  # OpenAI's {"type": "function", "function": {...}}
        value = value["function"]
    name = value.get("name")
    args = value.get("arguments", value.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    return (name, args) if isinstance(name, str) else None


def tool_calls(text: str) -> list[tuple[str, Any]]:
    """Every tool call in a generated answer: one per ``<tool_call>`` tag, else the first JSON value."""
    tagged = _TOOL_TAG.findall(text)
    values = []
    for chunk in tagged or [text]:
        found, value = extract_json(chunk)
        if found:
            values.extend(value if isinstance(value, list) else [value])
    calls = [_as_call(v) for v in values]
    return [c for c in calls if c is not None]


def _tool_call(output: str, expected: Any) -> bool:
    want = expected_json(expected)
    want_calls = [_as_call(w) for w in (want if isinstance(want, list) else [want])]
    got = tool_calls(output)
    return len(got) == len(want_calls) and all(
        w is not None and g[0] == w[0] and json_equal(g[1], w[1]) for g, w in zip(got, want_calls))


MATCHERS: dict[str, Callable[[str, Any], bool]] = {
    "exact": _exact,
    "contains": _contains,
    "regex": _regex,
    "json": _json,
    "tool_call": _tool_call,
}
DEFAULT_MATCH = "exact"


def _check_text(expected: Any) -> None:
    if not isinstance(expected, (str, int, float)) or isinstance(expected, bool):
        raise ValueError(f"'expected' must be a string for this match mode, got {type(expected).__name__}")


def _check_regex(expected: Any) -> None:
    _check_text(expected)
    try:
        re.compile(str(expected))
    except re.error as exc:
        raise ValueError(f"'expected' is not a valid regular expression: {exc}") from None


def _check_json(expected: Any) -> None:
    if isinstance(expected, str):
        try:
            json.loads(expected)
        except ValueError as exc:
            raise ValueError(
                f"'expected' is not valid JSON text ({exc}); write the value itself or a JSON string"
            ) from None


def _check_tool_call(expected: Any) -> None:
    _check_json(expected)
    want = expected_json(expected)
    for call in want if isinstance(want, list) else [want]:
        if _as_call(call) is None:
            raise ValueError("'expected' for match tool_call must be {\"name\": FUNCTION, \"arguments\": {...}} "
                             "(or a list of them)")


_CHECKS: dict[str, Callable[[Any], None]] = {
    "exact": _check_text,
    "contains": _check_text,
    "regex": _check_regex,
    "json": _check_json,
    "tool_call": _check_tool_call,
}


def check_expected(match: str, expected: Any) -> None:
    """Raise ``ValueError`` when ``expected`` cannot be used with ``match``."""
    _CHECKS[match](expected)


def score(output: str, expected: Any, match: str = DEFAULT_MATCH) -> bool | None:
    """True/False for a scored row, None when there is nothing to compare against."""
    if expected is None:
        return None
    return MATCHERS[match](output, expected)
