"""JSON Lines and JSON documents, streamed record by record.

* JSONL: one JSON object per line; a line longer than ``max_bytes`` is skipped without
  being held in memory.
* JSON: an array of records (streamed element by element through a ``TextBuffer``), an
  object holding arrays of records (``{"data": [...]}``), one record, or JSON Lines /
  concatenated objects that happen to be named ``.json``. A top-level object is read
  whole; whether it is one record or a holder of record arrays is decided by the record
  shapes (``records.guess_shape``, ``records.RECORD_FIELDS``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from mlx_tune.data.records import RECORD_FIELDS, guess_shape, type_name
from mlx_tune.data.textio import Item, TextBuffer, encoding_error, json_reason, utf8_reader


def read_jsonl(stream, path, max_bytes: int) -> Iterator[Item]:
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
            raise encoding_error(path, line_no, exc) from None
        if not text.strip():
            continue  # blank lines are layout, not records
        try:
            value = loads(text)
        except (ValueError, RecursionError) as exc:
            yield line_no, None, f"not valid JSON: {json_reason(exc)}"
            continue
        yield line_no, value, None


def _iter_json_array(tb: TextBuffer, max_bytes: int):
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


def read_json(stream, path, max_bytes: int) -> Iterator[Item]:
    head = stream.peek(1 << 16) if hasattr(stream, "peek") else b""
    first_line = head.split(b"\n", 1)[0]
    # JSONL named .json: the first line is a complete object on its own.
    if first_line.lstrip().startswith(b"{"):
        try:
            if isinstance(json.loads(first_line.decode("utf-8")), dict):
                yield from read_jsonl(stream, path, max_bytes)
                return
        except (ValueError, UnicodeDecodeError, RecursionError):
            pass
    read = utf8_reader(stream, path)
    tb = TextBuffer(read, path=path)
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
        yield tb.line, None, f"top-level JSON must be an array of records or an object, got {type_name(value)}"
        return
    lists = [k for k, v in value.items()
             if isinstance(v, list) and k not in RECORD_FIELDS and any(isinstance(x, dict) for x in v)]
    start = tb.line
    tb.advance(end)
    if tb.skip_ws() != "":
        # Several top-level values: JSON Lines (or concatenated objects) named .json.
        yield start, value, None
        yield from _concatenated(tb)
        return
    if guess_shape(value) is not None or not lists:
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


def _concatenated(tb: TextBuffer) -> Iterator[Item]:
    """Top-level values one after another; a bad one is skipped up to the next line."""
    decode = json.JSONDecoder().raw_decode
    while tb.skip_ws() != "":
        start = tb.line
        try:
            value, end = decode(tb.buf, tb.pos)
        except (json.JSONDecodeError, RecursionError) as exc:
            yield start, None, f"not valid JSON: {json_reason(exc)}"
            nl = tb.buf.find("\n", tb.pos)
            tb.advance(len(tb.buf) if nl < 0 else nl + 1)
            continue
        tb.advance(end)
        yield start, value, None


def _trailing(tb: TextBuffer) -> Iterator[Item]:
    if tb.skip_ws() != "":
        yield tb.line, None, "unexpected content after the end of the JSON value; the rest of the file was not read"
