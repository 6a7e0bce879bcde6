"""Dataset rows as training sees them (``mlx-tune data inspect``): tokens, trained spans, the cut.

``inspect_rows(path, tokenizer)`` reads a split file with ``dataset.read_training_file``
and tokenizes each row with ``tokenize.tokenize_record``, the calls the trainer's data
load makes, so the trained mask shown is the one training uses. ``format_row`` prints a
row's text with the trained spans in ANSI colour or between ``[[`` and ``]]``, the tokens
past ``max_seq_length + 1`` (which training cuts off) after a ``<<cut>>`` marker, and a
counts line. ``inspect_data(data_dir, model)`` loads the model's tokenizer first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mlx_tune.data.dataset import peek_format, read_training_file
from mlx_tune.data.masks import MaskPolicy
from mlx_tune.data.token_stats import load_tokenizer
from mlx_tune.data.tokenize import tokenize_record
from mlx_tune.errors import UserError
from mlx_tune.model.chat_templates import require_chat_template, use_chat_template

OPEN, CLOSE, CUT = "[[", "]]", "<<cut>>"
GREEN, DIM, RESET = "\x1b[42;30m", "\x1b[2m", "\x1b[0m"


@dataclass
class Segment:
    """Consecutive tokens alike in being trained and in being kept by truncation."""

    text: str
    trained: bool
    cut: bool
    tokens: int


@dataclass
class InspectedRow:
    """One record: where it is, its token ids and trained mask, and its text in segments."""

    line: int
    format: str
    ids: list[int]
    train: list[bool]
    segments: list[Segment]
    max_seq_length: int | None = None
    prefix_ok: bool = True

    @property
    def kept(self) -> int:
        """Tokens training keeps: all, or ``max_seq_length + 1`` (n tokens fill n - 1 slots)."""
        if self.max_seq_length is None or len(self.ids) - 1 <= self.max_seq_length:
            return len(self.ids)
        return self.max_seq_length + 1

    @property
    def truncated(self) -> bool:
        return self.kept < len(self.ids)

    def counts(self) -> str:
        n, t = len(self.ids), sum(self.train)
        line = f"{n} tokens, {t} trained ({100 * t / n if n else 0:.1f}%)"
        if self.truncated:
            kt = sum(self.train[: self.kept])
            line += (f"; truncated at --max-seq-length {self.max_seq_length}: {self.kept} tokens kept, "
                     f"{kt} trained ({100 * kt / self.kept:.1f}%)")
            if not any(self.train[1: self.kept]):
                line += ", so training leaves it out (no trained token left)"
        if not self.prefix_ok:
            line += "; the chat template rewrites earlier turns (prefix mismatch), spans approximate"
        return line


def _decode(tokenizer, ids: list[int]) -> str:
    try:
        return tokenizer.decode(ids, skip_special_tokens=False)
    except TypeError:
        return tokenizer.decode(ids)


def segments(tokenizer, ids: list[int], train: list[bool], kept: int) -> list[Segment]:
    """The text of ``ids`` cut where the trained mask changes and at ``kept``.

    Each segment's text is the growth of the decoded prefix, so a tokenizer that joins
    tokens with spaces or merges bytes across a boundary still gives the full text.
    """
    bounds = [0] + [i for i in range(1, len(ids)) if train[i] != train[i - 1] or i == kept] + [len(ids)]
    out, before = [], ""
    for a, b in zip(bounds, bounds[1:]):
        upto = _decode(tokenizer, ids[:b])
        text = upto[len(before):] if upto.startswith(before) else _decode(tokenizer, ids[a:b])
        out.append(Segment(text, train[a], a >= kept, b - a))
        before = upto
    return out


def inspect_rows(path: str | Path, tokenizer, *, rows: int = 3, max_seq_length: int | None = None,
                 mask_prompt: bool = True, policy: MaskPolicy | None = None) -> list[InspectedRow]:
    """The first ``rows`` records of a JSONL split file, tokenized exactly as training does."""
    if rows < 1:
        raise UserError(f"--rows: {rows} must be at least 1")
    if max_seq_length is not None and max_seq_length < 1:
        raise UserError(f"--max-seq-length: {max_seq_length} must be at least 1")
    fmt, records, lines = read_training_file(path)
    out = []
    for record, line in zip(records[:rows], lines):
        ids, train, ok = tokenize_record(tokenizer, record, fmt, mask_prompt, policy)
        ids, train = [int(i) for i in ids], [bool(m) for m in train]
        row = InspectedRow(line, fmt, ids, train, [], max_seq_length, ok)
        row.segments = segments(tokenizer, ids, train, row.kept)
        out.append(row)
    return out


def inspect_data(data_dir: str | Path, model: str, *, split: str = "train", rows: int = 3,
                 max_seq_length: int | None = None, mask_prompt: bool = True,
                 chat_template: str | None = None, policy: MaskPolicy | None = None) -> list[InspectedRow]:
    """``inspect_rows`` of ``DATA_DIR/<split>.jsonl`` with ``model``'s tokenizer (checked before loading it);
    ``chat_template`` (a name or .jinja path) for a model without one, as training's config key."""
    path = Path(data_dir) / f"{split}.jsonl"
    if not Path(data_dir).is_dir():
        raise UserError(f"{data_dir}: no such folder; give the folder data_transform.py wrote (train/valid/test.jsonl)")
    if not path.is_file():
        have = sorted(p.stem for p in Path(data_dir).glob("*.jsonl"))
        raise UserError(f"{path}: file not found; --split is one of: {', '.join(have) or 'none here'}")
    tokenizer = load_tokenizer(model)
    use_chat_template(tokenizer, chat_template)
    if peek_format(path) == "chat":
        require_chat_template(tokenizer, model, str(path), "--chat-template")
    return inspect_rows(path, tokenizer, rows=rows, max_seq_length=max_seq_length, mask_prompt=mask_prompt,
                        policy=policy)


def format_row(row: InspectedRow, colour: bool) -> str:
    """The row's text, trained spans in green (``colour``) or between ``[[ ]]``, then the counts."""
    parts = [f"--- line {row.line} ({row.format})"]
    text = []
    for i, seg in enumerate(row.segments):
        if seg.cut and (i == 0 or not row.segments[i - 1].cut):
            text.append(f"{DIM}{CUT}" if colour else CUT)
        if seg.cut:
            text.append(seg.text)  # past the cut nothing is trained
        elif seg.trained:
            text.append(f"{GREEN}{seg.text}{RESET}" if colour else f"{OPEN}{seg.text}{CLOSE}")
        else:
            text.append(seg.text)
    if colour and row.truncated:
        text.append(RESET)
    body = "".join(text)
    return "\n".join(parts) + "\n" + body + ("" if body.endswith("\n") else "\n") + row.counts()
