"""Input files as UTF-8 text, for the readers (``mlx_tune.data.readers``).

UTF-8 with or without a BOM is read; a UTF-16/32 BOM or NUL bytes at the start are a
``UserError`` naming the file, invalid UTF-8 later on one naming the file and line.
``TextBuffer`` holds decoded text read in chunks and knows the line of any position.
Every reader yields ``Item`` triples ``(line, value, error)`` (see ``readers``).
"""

from __future__ import annotations

import codecs
import gzip
import json
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mlx_tune.errors import UserError

Item = tuple  # (line, value | None, error | None)

_BAD_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32"),
    (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"),
    (codecs.BOM_UTF16_BE, "UTF-16"),
)


def open_input(path: str | Path):
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


def encoding_error(path, line: int, exc: UnicodeDecodeError) -> UserError:
    byte = exc.object[exc.start : exc.start + 1].hex() if isinstance(exc.object, bytes) else "?"
    return UserError(
        f"{path}:{line}: not valid UTF-8 (byte 0x{byte}); only UTF-8 (with or without BOM) is read. "
        f"Convert it first, for example: iconv -f latin1 -t UTF-8 {Path(path).name} > utf8_{Path(path).name}"
    )


def json_reason(exc: Exception) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at column {exc.colno}"
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return str(exc).split("\n")[0]


def utf8_reader(stream, path) -> Callable[[int], str]:
    """``read(n)``: the next ``n`` bytes of ``stream`` decoded, naming the line of bad UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    newlines = 0  # in the bytes decoded so far

    def read(n: int) -> str:
        nonlocal newlines
        raw = stream.read(n)
        try:
            text = decoder.decode(raw, final=not raw)
        except UnicodeDecodeError as exc:  # exc.object: undecoded bytes left over + raw
            raise encoding_error(path, newlines + exc.object[: exc.start].count(b"\n") + 1, exc) from None
        newlines += raw.count(b"\n")
        return text

    return read


def utf8_lines(stream, path) -> Iterator[str]:
    """Decoded lines of ``stream`` (line ends kept), naming the line of bad UTF-8."""
    for line_no, raw in enumerate(stream, 1):
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise encoding_error(path, line_no, exc) from None


class TextBuffer:
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
