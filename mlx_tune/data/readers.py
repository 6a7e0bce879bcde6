"""Read dataset files: ``read_records(path)`` yields every record of a file.

The readers stream, so memory does not grow with the file, except for a top-level JSON
object, which is read whole:

* ``.jsonl`` / ``.ndjson``: one JSON object per line; a line longer than
  ``max_record_bytes`` is skipped without being held in memory.
* ``.json``: an array of records (streamed element by element), an object holding
  arrays of records (``{"data": [...]}``), one record, or JSON Lines / concatenated
  objects that happen to be named ``.json`` (both in ``json_reader``).
* ``.csv`` / ``.tsv``: a header row, then one record per row (RFC 4180 quoting, so
  fields may hold commas and newlines).
* ``.txt`` / ``.md``: ``{"text": block}`` per blank-line separated block, or the whole
  file as one record (``text_mode="file"``).
* any of these gzipped (``.jsonl.gz``). UTF-8 with or without a BOM; any other
  encoding is a ``UserError`` naming the file and line (``textio``).

Readers yield ``(line, value, error)``: ``line`` is the 1-based line where the record
starts, and exactly one of ``value`` (the parsed record) and ``error`` (why the item
could not be parsed) is ``None``. Every item counts as one record read.
"""

from __future__ import annotations

import csv
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mlx_tune.data.json_reader import read_json, read_jsonl
from mlx_tune.data.textio import Item, open_input, utf8_lines, utf8_reader
from mlx_tune.errors import UserError

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
    stream, raw = open_input(path)
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


def convert_jsonl(path: str | Path, convert: Callable[[int, Any], Any],
                  catch: type[Exception] | tuple[type[Exception], ...] = ValueError) -> tuple[list, list[int], list[str]]:
    """``convert(line, record)`` for every record of a JSONL file: ``(kept, their lines, errors)``.

    A record that does not parse, or whose ``convert`` raises ``catch`` (the reason), is not
    kept; its error reads ``file:line: reason`` (``bad_records`` words them as one error).
    """
    kept, lines, errors = [], [], []
    for line, value, error in read_jsonl_records(path):
        if error is None:
            try:
                kept.append(convert(line, value))
                lines.append(line)
                continue
            except catch as exc:
                error = str(exc)
        errors.append(f"{path}:{line}: {error}")
    return kept, lines, errors


def bad_records(path: str | Path, errors: list[str], what: str, *, max_errors: int = 20,
                one_line: bool = False) -> UserError:
    """One ``UserError`` for a file's bad records: ``path: N bad WHAT:``, then the first
    ``max_errors`` ``file:line: reason`` one a line (``one_line``: joined by ``; ``), and how many more."""
    more = len(errors) - max_errors
    if one_line:
        tail = f" (and {more} more)" if more > 0 else ""
        return UserError(f"{path}: {len(errors)} bad {what}: " + "; ".join(errors[:max_errors]) + tail)
    tail = f"\n... and {more} more" if more > 0 else ""
    return UserError(f"{path}: {len(errors)} bad {what}:\n" + "\n".join(errors[:max_errors]) + tail)


def _read_delimited(stream, path, max_bytes: int, delimiter: str) -> Iterator[Item]:
    if csv.field_size_limit() != max_bytes:
        csv.field_size_limit(max_bytes)
    reader = csv.reader(utf8_lines(stream, path), delimiter=delimiter)

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
        read = utf8_reader(stream, path)
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
    for line_no, line in enumerate(utf8_lines(stream, path), 1):
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
    "jsonl": read_jsonl,
    "json": read_json,
    "csv": lambda s, p, m: _read_delimited(s, p, m, ","),
    "tsv": lambda s, p, m: _read_delimited(s, p, m, "\t"),
    "text": _read_text,
}
