"""The prompts file: one JSON object per line.

A row is either a completion prompt or a chat::

    {"prompt": "2+2=", "expected": "4"}
    {"messages": [{"role": "user", "content": "Capital of France?"}], "expected": "Paris",
     "match": "contains"}

Keys: ``prompt`` | ``messages`` (exactly one), optional ``expected`` (rows without it
are sent and timed but not scored), optional ``match`` (see ``scoring.MATCHERS``;
default ``exact``) and optional ``id`` (any label, copied to the report). Blank lines
are skipped.

A held-out split written by ``data_transform.py`` can be used as it is: a row's
``completion`` (prompt/completion format) is its expected answer, and so is a chat's
final ``assistant`` turn, which is then not sent (the model is asked to write it). Any
other problem stops the run before a request is sent, with one line per bad row:
``file:line: reason``.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_tune.errors import UserError
from mlx_tune.evaluation.scoring import DEFAULT_MATCH, MATCHERS, check_expected

ALLOWED_KEYS = ("prompt", "messages", "expected", "match", "id", "completion")
ROLES = ("system", "user", "assistant", "tool", "developer")


class PromptsFileError(UserError):
    """The prompts file is missing, empty or has bad rows (every bad row is listed)."""


@dataclass(frozen=True)
class PromptRow:
    """One request to send: ``prompt`` text or chat ``messages``, and how to score it."""

    line: int
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    expected: Any = None
    match: str = DEFAULT_MATCH
    id: Any = None

    @property
    def is_chat(self) -> bool:
        return self.messages is not None

    @property
    def display(self) -> str:
        """The text a reader recognises the row by: the prompt, or the last user turn."""
        if self.prompt is not None:
            return self.prompt
        users = [m for m in self.messages or [] if m.get("role") == "user"] or self.messages or [{}]
        return content_text(users[-1].get("content", ""))


def content_text(content: Any) -> str:
    """Text of an OpenAI message content: a string, or a list of ``{"type": "text"}`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _nearest(key: str, options: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, options, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list of {\"role\", \"content\"} objects")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ValueError(f"messages[{i}] must be an object with 'role' and 'content'")
        role = msg.get("role")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role is {role!r}; allowed: {', '.join(ROLES)}")
        content = msg.get("content")
        if not isinstance(content, (str, list)):
            raise ValueError(f"messages[{i}].content must be a string (or a list of text parts)")


def parse_row(obj: Any, line: int) -> PromptRow:
    """One decoded JSON line to a ``PromptRow``; ``ValueError`` says what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    for key in obj:
        if key not in ALLOWED_KEYS:
            raise ValueError(f"unknown key '{key}'{_nearest(key, ALLOWED_KEYS)}; allowed: {', '.join(ALLOWED_KEYS)}")
    has_prompt, has_messages = "prompt" in obj, "messages" in obj
    if has_prompt == has_messages:
        raise ValueError("a row needs exactly one of 'prompt' (text) or 'messages' (chat)")
    if has_prompt and (not isinstance(obj["prompt"], str) or not obj["prompt"]):
        raise ValueError("'prompt' must be a non-empty string")
    if has_messages:
        _check_messages(obj["messages"])
    messages, expected = obj.get("messages"), obj.get("expected")
    if "completion" in obj:
        if not has_prompt or not isinstance(obj["completion"], str):
            raise ValueError("'completion' (the expected answer) must be a string beside a 'prompt'")
        if expected is not None:
            raise ValueError("give the expected answer once: 'expected' or 'completion', not both")
        expected = obj["completion"]
    if has_messages and messages[-1]["role"] == "assistant" and expected is None:
        if len(messages) == 1:
            raise ValueError("'messages' has only an assistant turn: nothing to ask")
        expected = content_text(messages[-1]["content"])
        messages = messages[:-1]
    match = obj.get("match", DEFAULT_MATCH)
    if match not in MATCHERS:
        raise ValueError(
            f"'match' is {match!r}{_nearest(str(match), tuple(MATCHERS))}; allowed: {', '.join(MATCHERS)}"
        )
    if "match" in obj and expected is None:
        raise ValueError(f"'match': {match!r} needs an 'expected' value")
    if expected is not None:
        check_expected(match, expected)
    return PromptRow(
        line=line,
        prompt=obj.get("prompt"),
        messages=messages,
        expected=expected,
        match=match,
        id=obj.get("id"),
    )


def read_prompts(path: str | Path) -> list[PromptRow]:
    """Every row of the prompts file, or ``PromptsFileError`` listing every bad line."""
    path = Path(path)
    if not path.is_file():
        raise PromptsFileError(f"{path}: prompts file not found (one JSON object per line)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PromptsFileError(f"{path}: cannot read prompts file: {exc}") from None
    rows: list[PromptRow] = []
    problems: list[str] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except ValueError as exc:
            problems.append(f"{path}:{lineno}: invalid JSON: {exc}")
            continue
        try:
            rows.append(parse_row(obj, lineno))
        except ValueError as exc:
            problems.append(f"{path}:{lineno}: {exc}")
    if problems:
        raise PromptsFileError("\n".join(problems))
    if not rows:
        raise PromptsFileError(f"{path}: no prompts (the file is empty)")
    return rows
