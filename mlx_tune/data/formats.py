"""Read dataset files and decide, record by record, what is a valid training example.

This module is the one definition of a valid record: ``data_transform.py`` uses it to
convert raw data and the trainer uses it to read the JSONL it trains on.

Files (``read_records``; the readers stream, so memory does not grow with the file,
except for a top-level JSON object, which is read whole):

* ``.jsonl`` / ``.ndjson``: one JSON object per line; a line longer than
  ``max_record_bytes`` is skipped without being held in memory.
* ``.json``: an array of records (streamed element by element), an object holding
  arrays of records (``{"data": [...]}``), one record, or JSON Lines / concatenated
  objects that happen to be named ``.json``.
* ``.csv`` / ``.tsv``: a header row, then one record per row (RFC 4180 quoting, so
  fields may hold commas and newlines).
* ``.txt`` / ``.md``: ``{"text": block}`` per blank-line separated block, or the whole
  file as one record (``text_mode="file"``).
* any of these gzipped (``.jsonl.gz``). UTF-8 with or without a BOM; any other
  encoding is a ``UserError`` naming the file and line.

Readers yield ``(line, value, error)``: ``line`` is the 1-based line where the record
starts, and exactly one of ``value`` (the parsed record) and ``error`` (why the item
could not be parsed) is ``None``. Every item counts as one record read.

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
(``messages`` + ``tools``) or a plain ``text``; ``render(example, to)`` writes it in
one of the trainer's formats (``TRAINER_FORMATS``):

* ``chat``: ``{"messages": [...], "tools"?: [...]}``
* ``completions``: ``{"prompt": str, "completion": str}``
* ``text``: ``{"text": str}``

A chat is valid when every message has a known role and non-empty string content
(an assistant turn that only calls tools may have empty content), a system message
comes only first, user and assistant turns alternate (tool results follow an
assistant tool call and precede an assistant turn), and the last turn is the
assistant's. Problems raise ``RecordError`` with a one-line reason.

The trainer's entry point is ``read_dataset(path, to=None)``: it reads a JSONL file,
checks every record, converts all of them to one trainer format (by default the first
record's, see ``detect_format``) and raises a ``UserError`` listing ``file:line: reason``
for the bad ones. Lower level, the same check line by line::

    for line, value, error in read_jsonl_records(path):
        reason = error or validate_record(value)   # None: a valid record
"""

from __future__ import annotations

import codecs
import csv
import gzip
import json
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from mlx_tune.errors import UserError

TRAINER_FORMATS = ("chat", "completions", "text")
# A record (a JSONL line, a CSV row, a JSON array element) longer than this is skipped
# with a reason; it also bounds the memory one bad record can take.
MAX_RECORD_BYTES = 8 * 1024 * 1024
FILE_TYPES = ("jsonl", "json", "csv", "tsv", "text")

# File suffix -> reader name (after a ".gz" is removed).
SUFFIXES = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".txt": "text",
    ".text": "text",
    ".md": "text",
}

Item = tuple  # (line, value | None, error | None)


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


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------

_BAD_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32"),
    (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"),
    (codecs.BOM_UTF16_BE, "UTF-16"),
)


def file_type(path: str | Path) -> str:
    """The reader for ``path`` from its suffix (``.gz`` looked through)."""
    name = Path(path).name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    suffix = Path(name).suffix
    if suffix not in SUFFIXES:
        raise UserError(
            f"{path}: unknown file type {suffix or '(no suffix)'!r}; expected "
            f"{', '.join(sorted(SUFFIXES))} (optionally .gz), or pass --input-format"
        )
    return SUFFIXES[suffix]


def _open(path: str | Path):
    """``(stream, file)``: a binary stream after any UTF-8 BOM, and the file to close.

    A UTF-16/32 BOM or NUL bytes at the start are a ``UserError``; invalid UTF-8 later
    on is found (and reported with its line) by the readers.
    """
    path = Path(path)
    try:
        raw = open(path, "rb", buffering=1 << 16)  # peek() below sees up to 64 KiB
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder; give the data files inside it") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None
    stream = gzip.GzipFile(fileobj=raw) if path.name.lower().endswith(".gz") else raw
    try:
        head = stream.peek(4096)[:4096] if hasattr(stream, "peek") else b""
    except (OSError, EOFError, zlib.error) as exc:
        raw.close()
        raise UserError(f"{path}: cannot read ({exc})") from None
    for bom, name in _BAD_BOMS:
        if head.startswith(bom):
            raw.close()
            raise UserError(
                f"{path}: is {name}-encoded; only UTF-8 is read. Re-save it as UTF-8 "
                f"(for example: iconv -f {name} -t UTF-8 {path.name} > {path.stem}.utf8{path.suffix})"
            )
    if b"\x00" in head:
        raw.close()
        raise UserError(
            f"{path}: contains NUL bytes, so it is binary or UTF-16/32 without a BOM; "
            "only UTF-8 text is read (re-save it as UTF-8)"
        )
    if head.startswith(codecs.BOM_UTF8):
        stream.read(3)
    return stream, raw


def _encoding_error(path, line: int, exc: UnicodeDecodeError) -> UserError:
    byte = exc.object[exc.start : exc.start + 1].hex() if isinstance(exc.object, bytes) else "?"
    return UserError(
        f"{path}:{line}: not valid UTF-8 (byte 0x{byte}); only UTF-8 (with or without BOM) is read. "
        f"Convert it first, for example: iconv -f latin1 -t UTF-8 {Path(path).name} > utf8_{Path(path).name}"
    )


def read_records(
    path: str | Path,
    file_format: str | None = None,
    *,
    text_mode: str = "blocks",
    max_record_bytes: int = MAX_RECORD_BYTES,
) -> Iterator[Item]:
    """Yield ``(line, value, error)`` for every record of ``path`` (see module doc).

    Raises ``UserError`` for a file that cannot be read at all (missing, a folder,
    not UTF-8, unknown type).
    """
    kind = file_format or file_type(path)
    if kind not in READERS:
        raise UserError(f"unknown input format {kind!r}; use one of {', '.join(FILE_TYPES)}")
    stream, raw = _open(path)
    try:
        if kind == "text":
            yield from _read_text(stream, path, text_mode, max_record_bytes)
        else:
            yield from READERS[kind](stream, path, max_record_bytes)
    except (OSError, EOFError, zlib.error) as exc:  # a corrupt .gz, a disk error mid-file
        raise UserError(f"{path}: cannot read ({exc})") from None
    finally:
        raw.close()


def read_jsonl_records(path: str | Path, *, max_record_bytes: int = MAX_RECORD_BYTES) -> Iterator[Item]:
    """``read_records`` for a JSONL file whatever its name."""
    return read_records(path, "jsonl", max_record_bytes=max_record_bytes)


def _read_jsonl(stream, path, max_bytes: int) -> Iterator[Item]:
    loads = json.loads
    line_no = 0
    readline = stream.readline
    while True:
        raw = readline(max_bytes + 1)
        if not raw:
            return
        line_no += 1
        if len(raw) > max_bytes and not raw.endswith(b"\n"):
            size = len(raw)
            while raw and not raw.endswith(b"\n"):  # skip the rest of the line in bounded pieces
                raw = readline(max_bytes)
                size += len(raw)
            yield line_no, None, f"line is {size} bytes, over the {max_bytes}-byte limit (--max-record-bytes)"
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _encoding_error(path, line_no, exc) from None
        if not text.strip():
            continue  # blank lines are layout, not records
        try:
            value = loads(text)
        except (ValueError, RecursionError) as exc:
            yield line_no, None, f"not valid JSON: {_json_reason(exc)}"
            continue
        yield line_no, value, None


def _json_reason(exc: Exception) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at column {exc.colno}"
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return str(exc).split("\n")[0]


def _utf8_reader(stream, path) -> Callable[[int], str]:
    """``read(n)``: the next ``n`` bytes of ``stream`` decoded, naming the line of bad UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    newlines = 0  # in the bytes decoded so far

    def read(n: int) -> str:
        nonlocal newlines
        raw = stream.read(n)
        try:
            text = decoder.decode(raw, final=not raw)
        except UnicodeDecodeError as exc:  # exc.object: undecoded bytes left over + raw
            raise _encoding_error(path, newlines + exc.object[: exc.start].count(b"\n") + 1, exc) from None
        newlines += raw.count(b"\n")
        return text

    return read


def _utf8_lines(stream, path) -> Iterator[str]:
    """Decoded lines of ``stream`` (line ends kept), naming the line of bad UTF-8."""
    for line_no, raw in enumerate(stream, 1):
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _encoding_error(path, line_no, exc) from None


class _TextBuffer:
    """Decoded text read in chunks, with the line number of any position."""

    CHUNK = 1 << 20

    def __init__(self, read: Callable[[int], str] | None, text: str = "", path: Any = ""):
        self.read, self.buf, self.path = read, text, path
        self.pos, self.line, self.eof = 0, 1, read is None

    def more(self) -> bool:
        """Append a chunk (dropping what was consumed); False at end of file."""
        if self.eof:
            return False
        chunk = self.read(self.CHUNK)
        if not chunk:
            self.eof = True
            return False
        self.buf = self.buf[self.pos :] + chunk
        self.pos = 0
        return True

    def advance(self, end: int) -> None:
        self.line += self.buf.count("\n", self.pos, end)
        self.pos = end

    def skip_ws(self) -> str:
        """The next non-whitespace character ('' at end of file), not consumed."""
        while True:
            buf, pos, n = self.buf, self.pos, len(self.buf)
            while pos < n and buf[pos] in " \t\r\n":
                pos += 1
            self.advance(pos)
            if pos < n:
                return buf[pos]
            if not self.more():
                return ""


def _iter_json_array(tb: _TextBuffer, max_bytes: int):
    """Elements of the array whose '[' is at ``tb.pos``, decoded one at a time.

    The generator returns True when the array closed cleanly, False after an error.
    """
    decode = json.JSONDecoder().raw_decode
    tb.advance(tb.pos + 1)
    expect_value = True
    first = True
    while True:
        ch = tb.skip_ws()
        if ch == "":
            yield tb.line, None, "file ends before the closing ']' of the JSON array (truncated file?)"
            return False
        if ch == "]" and (first or not expect_value):
            tb.advance(tb.pos + 1)
            return True
        if not expect_value:
            if ch != ",":
                yield tb.line, None, f"invalid JSON: expected ',' or ']' but found {ch!r}; the rest of the file was not read"
                return False
            tb.advance(tb.pos + 1)
            expect_value = True
            continue
        start_line = tb.line
        while True:
            try:
                value, end = decode(tb.buf, tb.pos)
            except RecursionError:
                yield start_line, None, "invalid JSON: nested too deeply; the rest of the file was not read"
                return False
            except json.JSONDecodeError as exc:
                # Maybe the element is cut by the chunk boundary: read on, within the limit.
                if len(tb.buf) - tb.pos <= max_bytes and tb.more():
                    continue
                if tb.eof and len(tb.buf) - tb.pos <= max_bytes:
                    reason = f"invalid or truncated JSON ({exc.msg}); the rest of the file was not read"
                else:
                    reason = f"record over the {max_bytes}-byte limit or invalid JSON; the rest of the file was not read"
                yield start_line, None, reason
                return False
            if end == len(tb.buf) and tb.more():
                continue  # a number or literal could go on in the next chunk
            break
        size = end - tb.pos
        tb.advance(end)
        first, expect_value = False, False
        if size > max_bytes:
            yield start_line, None, f"record is {size} bytes, over the {max_bytes}-byte limit (--max-record-bytes)"
        else:
            yield start_line, value, None


def _read_json(stream, path, max_bytes: int) -> Iterator[Item]:
    head = stream.peek(1 << 16) if hasattr(stream, "peek") else b""
    first_line = head.split(b"\n", 1)[0]
    # JSONL named .json: the first line is a complete object on its own.
    if first_line.lstrip().startswith(b"{"):
        try:
            if isinstance(json.loads(first_line.decode("utf-8")), dict):
                yield from _read_jsonl(stream, path, max_bytes)
                return
        except (ValueError, UnicodeDecodeError, RecursionError):
            pass
    read = _utf8_reader(stream, path)
    tb = _TextBuffer(read, path=path)
    ch = tb.skip_ws()
    if ch == "":
        return
    if ch == "[":
        if (yield from _iter_json_array(tb, max_bytes)):
            yield from _trailing(tb)
        return
    # An object (or a bare value): small by nature, read whole.
    tb.buf, tb.pos, tb.eof = tb.buf[tb.pos :] + "".join(iter(lambda: read(tb.CHUNK), "")), 0, True
    try:
        value, end = json.JSONDecoder().raw_decode(tb.buf, tb.pos)
    except json.JSONDecodeError as exc:
        yield tb.line, None, f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        return
    except RecursionError:
        yield tb.line, None, "not valid JSON: nested too deeply"
        return
    if not isinstance(value, dict):
        yield tb.line, None, f"top-level JSON must be an array of records or an object, got {_type(value)}"
        return
    lists = [k for k, v in value.items()
             if isinstance(v, list) and k not in _RECORD_FIELDS and any(isinstance(x, dict) for x in v)]
    start = tb.line
    tb.advance(end)
    if tb.skip_ws() != "":
        # Several top-level values: JSON Lines (or concatenated objects) named .json.
        yield start, value, None
        yield from _concatenated(tb)
        return
    if _guess_shape(value) is not None or not lists:
        yield start, value, None
        return
    tb.pos, tb.line = 0, 1
    # {"data": [...], ...}: every member array holds records; re-scan for line numbers.
    decode = json.JSONDecoder().raw_decode
    tb.skip_ws()
    tb.advance(tb.pos + 1)
    while True:
        ch = tb.skip_ws()
        if ch in ("}", ""):
            break
        if ch == ",":
            tb.advance(tb.pos + 1)
            continue
        key, kend = decode(tb.buf, tb.pos)
        tb.advance(kend)
        tb.skip_ws()
        tb.advance(tb.pos + 1)  # the ':'
        if tb.skip_ws() == "[" and key in lists:
            if not (yield from _iter_json_array(tb, max_bytes)):
                return
        else:
            _, vend = decode(tb.buf, tb.pos)
            tb.advance(vend)


def _concatenated(tb: _TextBuffer) -> Iterator[Item]:
    """Top-level values one after another; a bad one is skipped up to the next line."""
    decode = json.JSONDecoder().raw_decode
    while tb.skip_ws() != "":
        start = tb.line
        try:
            value, end = decode(tb.buf, tb.pos)
        except (json.JSONDecodeError, RecursionError) as exc:
            yield start, None, f"not valid JSON: {_json_reason(exc)}"
            nl = tb.buf.find("\n", tb.pos)
            tb.advance(len(tb.buf) if nl < 0 else nl + 1)
            continue
        tb.advance(end)
        yield start, value, None


def _trailing(tb: _TextBuffer) -> Iterator[Item]:
    if tb.skip_ws() != "":
        yield tb.line, None, "unexpected content after the end of the JSON value; the rest of the file was not read"


def _read_delimited(stream, path, max_bytes: int, delimiter: str) -> Iterator[Item]:
    if csv.field_size_limit() != max_bytes:
        csv.field_size_limit(max_bytes)
    reader = csv.reader(_utf8_lines(stream, path), delimiter=delimiter)

    def next_row():
        try:
            return next(reader), None
        except StopIteration:
            return None, None
        except csv.Error as exc:
            return [], f"unreadable row: {exc}"

    header, error = next_row()
    if error:
        raise UserError(f"{path}:1: cannot read the header row ({error})")
    if not header:
        return
    header = [h.strip() for h in header]
    seen = set()
    for h in header:
        if h in seen and h:
            raise UserError(f"{path}:1: column {h!r} appears twice in the header; rename one")
        seen.add(h)
    width = len(header)
    while True:
        start = reader.line_num + 1
        row, error = next_row()
        if error:
            yield start, None, error
            continue
        if row is None:
            return
        if not row:
            continue  # a blank line
        if len(row) != width:
            if len(row) < width or any(c.strip() for c in row[width:]):
                yield start, None, f"row has {len(row)} fields but the header has {width} (unquoted separator or newline?)"
                continue
            row = row[:width]
        if sum(map(len, row)) > max_bytes:
            yield start, None, f"row is over the {max_bytes}-byte limit (--max-record-bytes)"
            continue
        yield start, dict(zip(header, row)), None


def _read_text(stream, path, mode: str, max_bytes: int) -> Iterator[Item]:
    if mode == "file":
        read = _utf8_reader(stream, path)
        parts, size = [], 0
        while chunk := read(1 << 20):
            parts.append(chunk)
            size += len(chunk.encode("utf-8", "surrogatepass"))
            if size > max_bytes:
                yield 1, None, f"file is over the {max_bytes}-byte limit for one record (--max-record-bytes)"
                return
        body = "".join(parts).replace("\r\n", "\n")
        if body.strip():
            yield 1, {"text": body.strip("\n")}, None
        return
    block: list[str] = []
    size, start = 0, 0
    for line_no, line in enumerate(_utf8_lines(stream, path), 1):
        if line.strip():
            if not block:
                start = line_no
            block.append(line[:-2] + "\n" if line.endswith("\r\n") else line)
            size += len(line)
            continue
        if block:
            yield _text_block(block, size, start, max_bytes)
            block, size = [], 0
    if block:
        yield _text_block(block, size, start, max_bytes)


def _text_block(block: list[str], size: int, start: int, max_bytes: int) -> Item:
    if size > max_bytes:
        return start, None, f"text block is {size} bytes, over the {max_bytes}-byte limit (--max-record-bytes)"
    return start, {"text": "".join(block).rstrip("\n")}, None


READERS: dict[str, Callable[..., Iterator[Item]]] = {
    "jsonl": _read_jsonl,
    "json": _read_json,
    "csv": lambda s, p, m: _read_delimited(s, p, m, ","),
    "tsv": lambda s, p, m: _read_delimited(s, p, m, "\t"),
    "text": _read_text,
}


# ---------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------

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


def _type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null",
            int: "number", float: "number"}.get(type(value), type(value).__name__)


def _string(record: dict, key: str, *, required: bool = True, empty_ok: bool = False) -> str:
    value = record.get(key)
    if value is None:
        if required:
            raise RecordError(f"missing field {key!r}")
        return ""
    if not isinstance(value, str):
        raise RecordError(f"field {key!r} must be a string, got {_type(value)}")
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
    raise RecordError(f"{where} must be a string, got {_type(value)}")


def check_messages(messages: Any, field: str = "messages", tools: Any = None) -> list[dict]:
    """Validate a chat and return it normalised (known roles, string content).

    Raises ``RecordError`` naming the first problem (see the module doc for the rules).
    """
    if not isinstance(messages, list):
        raise RecordError(f"field {field!r} must be an array of messages, got {_type(messages)}")
    if not messages:
        raise RecordError(f"field {field!r} is empty")
    out = []
    prev = None
    for i, m in enumerate(messages):
        where = f"{field}[{i}]"
        if not isinstance(m, dict):
            raise RecordError(f"{where} must be an object with role and content, got {_type(m)}")
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
        raise RecordError(f"field 'conversations' must be an array, got {_type(conv)}")
    messages = []
    system = r.get("system")
    if isinstance(system, str) and system.strip():
        messages.append({"role": "system", "content": system})
    for i, turn in enumerate(conv):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise RecordError(f"{where} must be an object with from and value, got {_type(turn)}")
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
            raise RecordError(f"field 'input' must be a string, got {_type(extra)}")
        extra = extra.strip()
        if extra and type(instruction) is str:
            instruction = f"{instruction.strip()}\n\n{extra}"
    ex = _pair("alpaca", instruction, r.get("output"), "instruction", "output", r)
    system = r.get("system")
    if system is not None:
        if type(system) is not str:
            raise RecordError(f"field 'system' must be a string, got {_type(system)}")
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
_RECORD_FIELDS = {f for fields, _ in SHAPES.values() for f in fields} | {"input", "system", "tools"}
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
            raise RecordError(f"field {key!r} holds text that is not valid JSON: {_json_reason(exc)}") from None
    return value


def _guess_shape(record: dict) -> str | None:
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
        raise RecordError(f"record must be a JSON object, got {_type(record)}")
    shape = _guess_shape(record)
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
        raise RecordError(f"record must be a JSON object, got {_type(record)}")
    return _CONVERTERS[shape or _guess_shape(record) or detect_shape(record)](record)


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


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------


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
    return {"text": "\n".join(f"{m['role']}: {m['content']}" for m in ex.messages)}


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


# ---------------------------------------------------------------------------
# The trainer's side
# ---------------------------------------------------------------------------

# The trainer format a shape becomes when none is asked for.
_NATURAL_FORMAT = {"prompt_completion": "completions", "text": "text"}


def detect_format(record: Any) -> str:
    """The trainer format (``chat``, ``completions``, ``text``) ``record`` is closest to."""
    return _NATURAL_FORMAT.get(detect_shape(record), "chat")


class Dataset(NamedTuple):
    format: str
    records: list[dict]
    lines: list[int]


def read_dataset(path: str | Path, to: str | None = None, *, max_errors: int = 20) -> Dataset:
    """Read a JSONL file for training: every record valid, all in one trainer format.

    ``to`` picks the format (default: the first record's, see ``detect_format``). Any
    bad record raises ``UserError`` listing up to ``max_errors`` lines as ``file:line: reason``.
    """
    if to is not None and to not in RENDERERS:
        raise UserError(f"unknown data format {to!r}; use one of {', '.join(TRAINER_FORMATS)}")
    records, lines, errors = [], [], []
    for line, value, error in read_jsonl_records(path):
        if error is None:
            try:
                ex = to_example(value)
                if to is None:
                    to = _NATURAL_FORMAT.get(ex.shape, "chat")
                records.append(render(ex, to))
                lines.append(line)
                continue
            except RecordError as exc:
                error = str(exc)
        errors.append(f"{path}:{line}: {error}")
    if errors:
        more = f"\n... and {len(errors) - max_errors} more" if len(errors) > max_errors else ""
        raise UserError(f"{path}: {len(errors)} bad record(s):\n" + "\n".join(errors[:max_errors]) + more)
    if not records:
        raise UserError(f"{path}: no records (the file is empty); run data_transform.py to build it")
    return Dataset(to, records, lines)
