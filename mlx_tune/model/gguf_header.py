"""The GGUF header, metadata and tensor directory, read without touching tensor data.

A GGUF file is ``magic, version, n_tensors, n_kv``, then ``n_kv`` typed key/value pairs,
then ``n_tensors`` entries ``(name, n_dims, dims, type, offset)``, then the tensor data
aligned to ``general.alignment`` (32 by default). Everything the loader decides (the
architecture, the config, whether every tensor type is readable) comes from the part
before the data, so a file it cannot use is refused before any weight is read.

``gguf.GGUFReader`` reads the same header but builds numpy views for every metadata
item, which takes tens of seconds for a 262k-token vocabulary; this parser decodes
numeric arrays with one ``np.frombuffer`` and strings with ``struct``.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

GGUF_MAGIC = b"GGUF"
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    """One tensor directory entry. ``shape`` is in numpy order (rows first), the reverse
    of GGUF's ``ne``; ``offset`` is absolute in the file."""

    name: str
    shape: tuple[int, ...]
    type: int  # a gguf.GGMLQuantizationType value
    offset: int


@dataclass(frozen=True)
class Header:
    metadata: dict[str, Any]
    tensors: list[TensorInfo]


class _Cursor:
    def __init__(self, buf: Any):
        self.buf, self.pos = buf, 0

    def scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("<Q")
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type, n = self.scalar("<I"), self.scalar("<Q")
            if item_type in _NUMPY:
                dtype = np.dtype(_NUMPY[item_type])
                arr = np.frombuffer(self.buf, dtype=dtype, count=n, offset=self.pos)
                self.pos += n * dtype.itemsize
                return arr.tolist()
            if item_type == _STRING:  # vocabularies: hundreds of thousands of strings, kept to one loop
                buf, pos, out = self.buf, self.pos, []
                for _ in range(n):
                    size = int.from_bytes(buf[pos:pos + 8], "little")
                    out.append(buf[pos + 8:pos + 8 + size].decode("utf-8", errors="replace"))
                    pos += 8 + size
                self.pos = pos
                return out
            return [self.value(item_type) for _ in range(n)]
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        raise ValueError(f"unknown metadata value type {vtype}")


def read_header(path: Path, archs: Collection[str] | None = None) -> Header:
    """Metadata and tensor directory of the GGUF file at ``path`` (ValueError if malformed).

    With ``archs``, a ``general.architecture`` outside it ends the read there (it is the first
    key in llama.cpp's files), so an unsupported file is refused without walking its vocabulary."""
    with open(path, "rb") as fh:
        size = fh.seek(0, 2)
        if size < 24:
            raise ValueError("file too short for a GGUF header")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                return _parse(buf, size, archs)
            except struct.error as exc:
                raise ValueError(f"truncated header ({exc})") from None


def _parse(buf: Any, size: int, archs: Collection[str] | None) -> Header:
    cur = _Cursor(buf)
    if bytes(buf[:4]) != GGUF_MAGIC:
        raise ValueError("GGUF magic invalid")
    cur.pos = 4
    version = cur.scalar("<I")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} is not supported (2 or 3)")
    n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.scalar("<I"))
        if key == "general.architecture" and archs is not None and metadata[key] not in archs:
            return Header(metadata, [])
    entries = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.scalar("<I")
        ne = [cur.scalar("<Q") for _ in range(n_dims)]
        entries.append((name, tuple(int(d) for d in reversed(ne)), cur.scalar("<I"), cur.scalar("<Q")))
    align = int(metadata.get("general.alignment", 32))
    data_start = (cur.pos + align - 1) // align * align
    tensors = [TensorInfo(name, shape, ttype, data_start + off) for name, shape, ttype, off in entries]
    if tensors and max(t.offset for t in tensors) > size:
        raise ValueError("tensor data lies past the end of the file (truncated?)")
    return Header(metadata, tensors)
