"""Atomic writes, for files and whole folders: a temporary beside the target, flushed
and fsynced, then renamed over it (rename is atomic on one file system) and the parent
folder fsynced, so a crash leaves either the old output or the new one, never half of
one. Every writer of outputs and checkpoints in mlx_tune goes through this module.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def fsync_file(path: str | Path) -> None:
    """Flush ``path``'s data to the disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (a rename inside it) to the disk; a no-op where folders
    cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it: set and restore at once (at import,
    os.umask(mask)      # before any thread could create a file meanwhile)
    return mask


UMASK = _read_umask()


def write_file_atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` writes the content to a temporary path (same suffix as ``path``, so
    writers that look at the extension, such as savefig or np.savez, behave), which is
    then fsynced and renamed over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        # mkstemp makes the file 0600; give it the mode a plain open() would (0666 & ~umask).
        os.chmod(tmp, 0o666 & ~UMASK)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    def write(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")

    return write_file_atomic(path, write)


def write_json_atomic(path: str | Path, data: Any, indent: int | None = 2) -> Path:
    """``data`` as JSON (non-ASCII kept as is) plus a final newline."""
    return write_text_atomic(path, json.dumps(data, indent=indent, ensure_ascii=False) + "\n")


def temp_dir_beside(target: str | Path, tag: str = "tmp") -> Path:
    """A fresh hidden folder next to ``target`` (same file system, so it can be renamed
    into place); a leftover of an earlier crash with the same name is removed."""
    target = Path(target)
    tmp = target.parent / f".{target.name}.{tag}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit_dir(tmp: str | Path, target: str | Path) -> Path:
    """Move the finished folder ``tmp`` to ``target``: every file and the folder fsynced,
    an existing ``target`` moved aside first and removed only after the rename."""
    tmp, target = Path(tmp), Path(target)
    for p in tmp.rglob("*"):
        if p.is_file():
            fsync_file(p)
    fsync_dir(tmp)
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
    os.replace(tmp, target)
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target
