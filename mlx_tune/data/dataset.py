"""The trainer's side: read a JSONL training file, every record valid, in one format.

``read_dataset(path, to=None)`` reads a JSONL file, checks every record, converts all
of them to one trainer format (by default the first record's, see ``detect_format``)
and raises a ``UserError`` listing ``file:line: reason`` for the bad ones. Lower level,
the same check line by line::

    for line, value, error in read_jsonl_records(path):
        reason = error or validate_record(value)   # None: a valid record
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from mlx_tune.data.preference import trainer_kind
from mlx_tune.data.readers import bad_records, convert_jsonl, read_jsonl_records
from mlx_tune.data.records import RecordError, detect_shape, to_example
from mlx_tune.data.render import RENDERERS, TRAINER_FORMATS, render
from mlx_tune.errors import UserError

# The trainer format a shape becomes when none is asked for.
_NATURAL_FORMAT = {"prompt_completion": "completions", "text": "text"}


def detect_format(record: Any) -> str:
    """The trainer format (``chat``, ``completions``, ``text``) ``record`` is closest to."""
    return _NATURAL_FORMAT.get(detect_shape(record), "chat")


def peek_format(path: str | Path) -> str | None:
    """The trainer format of the first valid record of ``path`` (None: none, or no file)."""
    if not Path(path).is_file():
        return None
    for _line, value, error in read_jsonl_records(path):
        if error is None:
            try:
                return detect_format(value)
            except RecordError:  # read_dataset reports bad records with their lines
                continue
    return None


_METHODS = {"preference pairs": "dpo (or orpo, simpo, cpo)", "KTO rows": "kto", "prompt-only rows": "grpo"}


def _refuse(path, line: int, record: Any) -> None:
    """A one-line ``UserError`` for rows only a method other than SFT can train on."""
    kind = trainer_kind(record)
    if kind is not None:
        to = "prompts" if kind.startswith("prompt") else "preference"
        raise UserError(f"{path}:{line}: this file holds {kind} (data_transform.py --to {to}), which SFT cannot "
                        f"train on; set train.method: {_METHODS[kind]} (SFT needs chat, completions or text rows)")


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
    def convert(line: int, value: Any) -> dict:
        nonlocal to
        if type(value) is dict and ("chosen" in value or "rejected" in value or type(value.get("label")) is bool):
            _refuse(path, line, value)
        try:
            ex = to_example(value)
            if to is None:
                to = _NATURAL_FORMAT.get(ex.shape, "chat")
            return render(ex, to)
        except RecordError:
            _refuse(path, line, value)
            raise

    records, lines, errors = convert_jsonl(path, convert, RecordError)
    if errors:
        raise bad_records(path, errors, "record(s)", max_errors=max_errors)
    if not records or to is None:  # (to is set by the first record)
        raise UserError(f"{path}: no records (the file is empty); run data_transform.py to build it")
    return Dataset(to, records, lines)


def read_training_file(path: str | Path, fmt: str | None = None) -> tuple[str, list[dict], list[int]]:
    """(format, records, line numbers) of a JSONL file; bad lines raise ``UserError`` as file:line.

    ``read_dataset`` decides, so data_transform.py and the trainer agree on every record.
    """
    if fmt is not None and fmt not in TRAINER_FORMATS:
        raise UserError(f"unknown data format {fmt!r}; use one of {', '.join(TRAINER_FORMATS)}")
    if not Path(path).is_file():
        raise UserError(f"{path}: file not found")
    ds = read_dataset(path, fmt)
    return ds.format, ds.records, ds.lines
