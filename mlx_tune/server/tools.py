"""Tool calling: requests' tools into the chat template, tool calls out of the text.

The model's chat template decides how tools are shown and how calls are written; the
call syntax (start and end markers, parser) is mlx-lm's tool parser for the template's
family (``mlx_lm.tool_parsers``), else the common ``<tool_call>{"name", "arguments"}
</tool_call>`` JSON form, which the generic parser also accepts bare (a whole answer that
is one ``{"name", "arguments"}`` object).

``tool_choice`` ``required`` or a named function is kept by constrained decoding: the
answer must be a call, in the template's syntax, whose ``name`` is one of the offered
functions and whose ``arguments`` validate against that function's ``parameters``
schema (an llguidance Lark grammar with the JSON schema embedded).

``CallSplitter`` cuts streamed text into content and completed calls, holding back any
tail that could be the start of a call marker, so no marker reaches the client as text.
"""

from __future__ import annotations

import importlib
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mlx_tune.server.errors import bad_request

GENERIC = ("<tool_call>", "</tool_call>")


@dataclass(frozen=True)
class ToolSyntax:
    start: str
    end: str
    parse: Callable[[str, Any], Any]
    family: str


def _generic_parse(text: str, tools=None) -> Any:
    return json.loads(text.strip())


def template_text(tokenizer, override: str | None = None) -> str:
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    template = override or getattr(hf, "chat_template", None)
    return template if isinstance(template, str) else json.dumps(template or "")


def supports_tools(tokenizer, override: str | None = None) -> bool:
    """Whether the chat template (an adapter's own, else the model's) renders a ``tools`` list."""
    return "tools" in template_text(tokenizer, override)


class _TemplateView:
    """What mlx-lm's parser inference reads of a tokenizer, with another chat template."""

    def __init__(self, hf, template: str):
        self.chat_template = template
        self.get_vocab = hf.get_vocab


def syntax(tokenizer, override: str | None = None) -> ToolSyntax:
    """The call syntax of the template's family (mlx-lm's parsers), else the generic JSON form."""
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    name = None
    try:
        from mlx_lm import tokenizer_utils

        # mlx-lm's own choice for this template
        name = tokenizer_utils._infer_tool_parser(_TemplateView(hf, override) if override else hf)
    except Exception:
        name = None
    if name:
        try:
            module = importlib.import_module(f"mlx_lm.tool_parsers.{name}")
            return ToolSyntax(module.tool_call_start, module.tool_call_end, module.parse_tool_call, name)
        except (ImportError, AttributeError):
            pass
    return ToolSyntax(GENERIC[0], GENERIC[1], _generic_parse, "json")


def template_tools(tools) -> list[dict] | None:
    return [t.model_dump(exclude_none=True) for t in tools] if tools else None


def history_message(m) -> dict:
    """One request message as the chat template expects it (tool calls with dict arguments)."""
    content = m.content if isinstance(m.content, str) or m.content is None else "".join(p.text for p in m.content)
    out: dict[str, Any] = {"role": m.role, "content": content or ""}
    if m.tool_calls:
        calls = []
        for c in m.tool_calls:
            try:
                args = json.loads(c.function.arguments) if c.function.arguments else {}
            except json.JSONDecodeError:
                raise bad_request(f"messages: tool call {c.id!r}: function.arguments is not JSON", "messages") from None
            calls.append({"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": args}})
        out["tool_calls"] = calls
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    if m.name is not None:
        out["name"] = m.name
    return out


def _literal(text: str) -> str:
    return json.dumps(text)  # a Lark string literal: JSON escaping is valid there


def call_grammar(tools, choice: str | None, parallel: bool, fmt: ToolSyntax) -> str:
    """Lark grammar of one call (or several, if ``parallel``) to ``choice`` or any of ``tools``."""
    from llguidance import LLMatcher

    chosen = [t for t in tools if choice is None or t.function.name == choice]
    options = []
    for t in chosen:
        params = t.function.parameters or {"type": "object"}
        options.append({"type": "object", "properties": {"name": {"const": t.function.name}, "arguments": params},
                        "required": ["name", "arguments"], "additionalProperties": False})
    from mlx_tune.server.constrain import JSON_STYLE

    schema = dict(options[0] if len(options) == 1 else {"anyOf": options}, **{"x-guidance": JSON_STYLE})
    call = f"{_literal(fmt.start)} \"\\n\" json_call \"\\n\" {_literal(fmt.end)}"
    body = f"start: call{'+' if parallel else ''}\ncall: {call}\njson_call: %json {json.dumps(schema)}\n"
    return LLMatcher.grammar_from_lark(body)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def as_call(parsed: Any) -> dict | None:
    """``{"name", "arguments" (JSON string)}`` from a parser's result, or None."""
    if isinstance(parsed, list):
        parsed = parsed[0] if len(parsed) == 1 else None
    if not isinstance(parsed, dict) or not isinstance(parsed.get("name"), str):
        return None
    args = parsed.get("arguments", parsed.get("parameters", {}))
    if not isinstance(args, str):
        args = json.dumps(args, ensure_ascii=False)
    return {"id": new_call_id(), "name": parsed["name"], "arguments": args}


class CallSplitter:
    """Streamed text in; content pieces and completed calls out, in order."""

    def __init__(self, fmt: ToolSyntax, tools=None):
        self.fmt, self.tools = fmt, tools
        self.buffer = ""
        self.inside = False
        self.calls: list[dict] = []

    def _parse(self, body: str) -> dict | None:
        try:
            return as_call(self.fmt.parse(body, self.tools))
        except Exception:
            return None

    def feed(self, text: str) -> list[tuple[str, Any]]:
        """[("text", str) | ("call", dict)]; marker text never appears as content."""
        self.buffer += text
        out: list[tuple[str, Any]] = []
        while True:
            if not self.inside:
                at = self.buffer.find(self.fmt.start)
                if at < 0:
                    keep = _partial_suffix(self.buffer, self.fmt.start)
                    emit, self.buffer = self.buffer[: len(self.buffer) - keep], self.buffer[len(self.buffer) - keep:]
                    if emit:
                        out.append(("text", emit))
                    return out
                if at:
                    out.append(("text", self.buffer[:at]))
                self.buffer = self.buffer[at + len(self.fmt.start):]
                self.inside = True
            end = self.buffer.find(self.fmt.end) if self.fmt.end else -1
            if end < 0:
                return out
            body, self.buffer = self.buffer[:end], self.buffer[end + len(self.fmt.end):]
            self.inside = False
            call = self._parse(body)
            if call is None:
                out.append(("text", self.fmt.start + body + self.fmt.end))  # not a call after all: keep the text
            else:
                self.calls.append(call)
                out.append(("call", call))

    def finish(self) -> list[tuple[str, Any]]:
        """The held-back tail: an unterminated call that parses is a call; anything else is text."""
        rest, self.buffer = self.buffer, ""
        if self.inside:
            self.inside = False
            call = self._parse(rest)
            if call is not None:
                self.calls.append(call)
                return [("call", call)]
            return [("text", self.fmt.start + rest)]
        return [("text", rest)] if rest else []

    def bare_call(self, text: str) -> dict | None:
        """The generic form: a whole answer that is one ``{"name", "arguments"}`` object."""
        if self.calls or not text.strip().startswith("{"):
            return None
        call = self._parse(text)
        if call is not None:
            self.calls.append(call)
        return call


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
