"""Scoring an answer against the expected one.

Each match mode is a function ``(output, expected) -> bool`` in ``MATCHERS``:

- ``exact``    ``output.strip() == expected.strip()`` (the default)
- ``contains`` ``expected.strip()`` occurs in ``output`` (case-sensitive)
- ``regex``    ``re.search(expected, output)`` finds a match (add ``(?i)``/``(?s)`` inline)
- ``json``     the first JSON value in the answer (a fenced ```json block is unwrapped)
               equals the expected value; ``expected`` is a JSON text or a JSON value.
               Equality is structural and typed: ``1 == 1.0`` but ``true != 1``.

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


MATCHERS: dict[str, Callable[[str, Any], bool]] = {
    "exact": _exact,
    "contains": _contains,
    "regex": _regex,
    "json": _json,
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


_CHECKS: dict[str, Callable[[Any], None]] = {
    "exact": _check_text,
    "contains": _check_text,
    "regex": _check_regex,
    "json": _check_json,
}


def check_expected(match: str, expected: Any) -> None:
    """Raise ``ValueError`` when ``expected`` cannot be used with ``match``."""
    _CHECKS[match](expected)


def score(output: str, expected: Any, match: str = DEFAULT_MATCH) -> bool | None:
    """True/False for a scored row, None when there is nothing to compare against."""
    if expected is None:
        return None
    return MATCHERS[match](output, expected)
