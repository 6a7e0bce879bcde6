"""Tokenised datasets and their token cache.

``load_dataset`` reads a JSONL training file (``dataset.read_training_file``), tokenises
and masks it (``tokenize``), then cuts every example to ``max_seq_length`` slots.
Tokenisation runs once per (file content, tokenizer, options): the key hashes the file's
bytes, ``tokenizer_fingerprint`` (vocabulary, special tokens, chat template) and the
options, and the ids and masks are kept as one ``.npz`` (no pickle) under
``~/.cache/mlx_tune/tokens`` (``MLX_TUNE_CACHE``) or a given folder, written through
``mlx_tune.atomic``; a damaged cache file is rebuilt, never trusted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mlx_tune.atomic import write_file_atomic
from mlx_tune.data.dataset import read_training_file
from mlx_tune.data.masks import MaskPolicy
from mlx_tune.data.tokenize import eos_ids, tokenize_record
from mlx_tune.errors import UserError

CACHE_VERSION = 2  # 2: chat masks from masks.chat_mask (train.mask policies)


def default_cache_dir() -> Path:
    root = os.environ.get("MLX_TUNE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mlx_tune")
    return Path(root) / "tokens"


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides the token ids: vocabulary, special tokens and chat template."""
    h = hashlib.sha256()
    try:
        vocab = tokenizer.get_vocab()
        h.update(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode())
    except Exception:  # a tokenizer without get_vocab: fall back to its class and size
        h.update(f"{type(tokenizer).__name__}:{getattr(tokenizer, 'vocab_size', '?')}".encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    h.update(str(sorted(eos_ids(tokenizer))).encode())
    h.update(str(getattr(tokenizer, "bos_token_id", None)).encode())
    h.update(repr(tokenizer.encode("a b\n")).encode())  # catches normaliser / bos-adding changes
    return h.hexdigest()


def file_hash(path: Path) -> str:
    """sha256 of a file's bytes (the token cache keys on content, not on names or times)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class DataStats:
    """What happened to a file's examples (all of it goes to the log)."""

    path: str = ""
    format: str = ""
    examples: int = 0
    truncated: int = 0
    dropped_long: int = 0
    dropped_untrained: int = 0
    prefix_mismatch: int = 0
    tokens: int = 0
    trained: int = 0
    cache_hit: bool = False

    def summary(self) -> str:
        parts = [f"{self.path}: {self.examples} {self.format} examples, {self.tokens} tokens ({self.trained} trained)"]
        if self.truncated:
            parts.append(f"{self.truncated} truncated to max_seq_length")
        if self.dropped_long:
            parts.append(f"{self.dropped_long} over max_seq_length dropped (train.truncation: drop)")
        if self.dropped_untrained:
            parts.append(f"{self.dropped_untrained} dropped with no trained token left")
        if self.prefix_mismatch:
            parts.append(f"{self.prefix_mismatch} chats whose template rewrites earlier turns (mask from common prefix)")
        parts.append("token cache hit" if self.cache_hit else "tokenised")
        return "; ".join(parts)

    def count(self, ids: np.ndarray, train: np.ndarray) -> None:
        """One example kept: its tokens (targets) and trained targets."""
        self.tokens += len(ids) - 1
        self.trained += int(train[1:].sum())


LONG, UNTRAINED = "long", "untrained"  # why fit_example drops an example


def fit_example(ids: np.ndarray, train: np.ndarray, max_seq_length: int,
                truncation: str) -> tuple[np.ndarray, np.ndarray] | str:
    """``(ids, train)`` cut to ``max_seq_length`` targets (``max_seq_length + 1`` tokens), or
    why the example is dropped: ``LONG`` (over the limit with ``truncation: drop``) or
    ``UNTRAINED`` (no trained target left)."""
    if len(ids) - 1 > max_seq_length:
        if truncation == "drop":
            return LONG
        ids, train = ids[: max_seq_length + 1], train[: max_seq_length + 1]
    if len(ids) < 2 or not train[1:].any():
        return UNTRAINED
    return ids, train


Sequence = tuple[np.ndarray, np.ndarray]  # (ids, train mask)


def fit_units(units: Iterable[list[Sequence]], max_seq_length: int, truncation: str,
              stats: DataStats) -> tuple[list[int], list[list[Sequence]]]:
    """Each unit (one example, or the sequences a pair trains together) cut by ``fit_example``.

    A unit is kept whole or left out whole: one sequence dropped drops it, counted in
    ``stats`` (``dropped_long`` before ``dropped_untrained``); a kept unit counts once as
    truncated if any of its sequences was cut, and its tokens are counted. Returns the
    indices of the kept units and their cut sequences; ``stats.examples`` is their number.
    """
    kept: list[int] = []
    out: list[list[Sequence]] = []
    for k, unit in enumerate(units):
        fits = [fit_example(i, m, max_seq_length, truncation) for i, m in unit]
        if LONG in fits:
            stats.dropped_long += 1
            continue
        if UNTRAINED in fits:
            stats.dropped_untrained += 1
            continue
        cut = [f for f in fits if not isinstance(f, str)]
        stats.truncated += any(len(i) < len(u[0]) for (i, _), u in zip(cut, unit))
        for i, m in cut:
            stats.count(i, m)
        kept.append(k)
        out.append(cut)
    stats.examples = len(kept)
    return kept, out


@dataclass
class TokenizedDataset:
    """Examples as (ids, train mask) numpy arrays, already cut to ``max_seq_length`` slots."""

    ids: list[np.ndarray]
    train: list[np.ndarray]
    stats: DataStats = field(default_factory=DataStats)

    def __len__(self) -> int:
        return len(self.ids)

    def lengths(self) -> np.ndarray:
        """Slots each example takes in a row: n - 1 (input, target) pairs."""
        return np.array([len(x) - 1 for x in self.ids], dtype=np.int64)


def _tokenize_file(path: Path, tokenizer, fmt: str | None, mask_prompt: bool,
                   policy: MaskPolicy | None = None) -> tuple[str, list, list, int]:
    fmt, records, _lines = read_training_file(path, fmt)
    ids, masks, mismatch = [], [], 0
    for rec in records:
        i, m, ok = tokenize_record(tokenizer, rec, fmt, mask_prompt, policy)
        ids.append(np.asarray(i, dtype=np.int32))
        masks.append(np.asarray(m, dtype=bool))
        mismatch += not ok
    return fmt, ids, masks, mismatch


def load_dataset(
    path: str | Path,
    tokenizer,
    *,
    max_seq_length: int,
    mask_prompt: bool = True,
    truncation: str = "truncate",
    fmt: str | None = None,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    mask_policy: MaskPolicy | None = None,
) -> TokenizedDataset:
    """Read, tokenise (or take from the cache), mask and cut one JSONL file.

    An example of n tokens fills n - 1 slots; over ``max_seq_length`` slots it is cut to
    ``max_seq_length + 1`` tokens (``truncation="truncate"``) or left out (``"drop"``),
    counted either way. Examples with no trained token left are left out and counted.
    """
    if truncation not in ("truncate", "drop"):
        raise UserError(f"train.truncation: {truncation!r} is not valid; use 'truncate' or 'drop'")
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    key = hashlib.sha256(
        json.dumps([CACHE_VERSION, file_hash(path), tokenizer_fingerprint(tokenizer), fmt, mask_prompt,
                    dataclasses.astuple(mask_policy or MaskPolicy())]).encode()
    ).hexdigest()[:32]
    cache_file = Path(cache_dir or default_cache_dir()) / f"{path.stem}-{key}.npz"
    hit = False
    if use_cache and cache_file.is_file():
        try:
            with np.load(cache_file, allow_pickle=False) as z:
                offsets, flat_ids, flat_mask = z["offsets"], z["ids"], z["train"]
                meta = json.loads(str(z["meta"]))
            ids = np.split(flat_ids, offsets[1:-1])
            masks = np.split(flat_mask.astype(bool), offsets[1:-1])
            fmt_used, mismatch, hit = meta["format"], meta["prefix_mismatch"], True
        except (OSError, ValueError, KeyError):  # a damaged cache file is rebuilt, not trusted
            hit = False
    if not hit:
        fmt_used, ids, masks, mismatch = _tokenize_file(path, tokenizer, fmt, mask_prompt, mask_policy)
        if use_cache:
            offsets = np.cumsum([0] + [len(x) for x in ids]).astype(np.int64)
            meta = {"format": fmt_used, "prefix_mismatch": mismatch, "source": str(path)}
            arrays = {
                "offsets": offsets,
                "ids": np.concatenate(ids).astype(np.int32),
                "train": np.concatenate(masks).astype(np.uint8),
                "meta": np.array(json.dumps(meta)),
            }
            write_file_atomic(cache_file, lambda tmp: np.savez(tmp, **arrays))
    stats = DataStats(path=str(path), format=fmt_used, prefix_mismatch=mismatch, cache_hit=hit)
    _, units = fit_units(([(i, m)] for i, m in zip(ids, masks)), max_seq_length, truncation, stats)
    out_ids, out_train = [u[0][0] for u in units], [u[0][1] for u in units]
    if not out_ids:
        raise UserError(f"{path}: no usable example ({stats.summary()})")
    return TokenizedDataset(out_ids, out_train, stats)


def load_splits(
    data_dir: str | Path,
    tokenizer,
    *,
    max_seq_length: int,
    mask_prompt: bool = True,
    truncation: str = "truncate",
    cache_dir: str | Path | None = None,
    splits: Iterable[str] = ("train", "valid", "test"),
    mask_policy: MaskPolicy | None = None,
) -> dict[str, TokenizedDataset]:
    """``{split: dataset}`` for the ``DIR/<split>.jsonl`` files present; train is required."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"data: {data_dir} is not a folder; give the folder holding train.jsonl (see data_transform.py)")
    out = {}
    for name in splits:
        f = data_dir / f"{name}.jsonl"
        if f.is_file():
            out[name] = load_dataset(f, tokenizer, max_seq_length=max_seq_length, mask_prompt=mask_prompt,
                                     truncation=truncation, cache_dir=cache_dir, mask_policy=mask_policy)
        elif name == "train":
            raise UserError(f"data: {f} not found; run data_transform.py INPUT --out {data_dir}")
    return out
