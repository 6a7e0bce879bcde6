"""Preference pairs and KTO rows as token sequences, cached like SFT data.

A pair ``(prompt, chosen, rejected)`` becomes two sequences, each the prompt followed by
one side, rendered as the chat template renders a conversation (``tokenize.tokenize_record``:
a ``chat`` record for conversational rows, a ``completions`` record for string rows, which
goes through the chat template when the tokenizer has one). Only a side's response
tokens are marked for the loss, so both sides are scored after the same prompt.

A KTO row ``(prompt, completion, label)`` becomes its own sequence plus a *mismatched*
one, the prompt followed by the previous row's completion (row ``i - 1``, row 0 takes the
last): the policy and reference log-probs of those give KTO's KL estimate, as TRL's
``KTOTrainer`` builds its ``KL_completion`` column from completions rotated by one (TRL
rotates inside each batch, here over the file: the same estimate of a mismatched pair).

``units[k]`` lists the sequences of unit k: ``(chosen, rejected)`` or ``(completion,
mismatched)``; ``labels`` holds KTO's labels. Each sequence is cut to ``max_seq_length``
slots like an SFT example; a unit whose side has no response token left is dropped and
counted.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mlx_tune.atomic import write_file_atomic
from mlx_tune.data.cache import (
    CACHE_VERSION,
    DataStats,
    default_cache_dir,
    file_hash,
    fit_units,
    tokenizer_fingerprint,
)
from mlx_tune.data.masks import MaskPolicy
from mlx_tune.data.preference import convert_preference, detect_mode
from mlx_tune.data.readers import bad_records, read_jsonl_records
from mlx_tune.data.records import RecordError
from mlx_tune.data.tokenize import tokenize_record
from mlx_tune.errors import UserError

KINDS = ("pairs", "kto")


@dataclass
class PairDataset:
    """Sequences (ids, response mask) and the units (pairs, KTO rows) made of them."""

    ids: list[np.ndarray]
    train: list[np.ndarray]
    units: list[tuple[int, int]]
    kind: str  # "pairs" or "kto"
    labels: np.ndarray | None = None  # kto: 1.0 desirable, 0.0 undesirable, per unit
    stats: DataStats = field(default_factory=DataStats)
    key: str = ""  # the token cache key (what precomputed reference log-probs are keyed on)
    _prefix: np.ndarray | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.units)

    def lengths(self, shared: bool = False) -> np.ndarray:
        """Slots each unit takes: both its sequences' n - 1, less its shared prefix once
        (``prefix_lengths``) when ``shared``."""
        full = np.array([sum(len(self.ids[s]) - 1 for s in u) for u in self.units], dtype=np.int64)
        return full - self.prefix_lengths() if shared else full

    def prefix_lengths(self) -> np.ndarray:
        """Per unit, the input positions its two sequences share (``shared_prefix``), computed once."""
        if self._prefix is None:
            self._prefix = np.array([shared_prefix(self.ids[a], self.train[a], self.ids[b], self.train[b])
                                     for a, b in self.units], dtype=np.int64)
        return self._prefix


def shared_prefix(ids_a: np.ndarray, train_a: np.ndarray, ids_b: np.ndarray, train_b: np.ndarray) -> int:
    """How many input positions two sequences can run once for both: the longest ``k`` with
    ``ids_a[:k] == ids_b[:k]`` and no loss on either side before position ``k - 1``.

    Input position ``t`` reads ``ids[t]`` and predicts ``ids[t + 1]`` (trained where
    ``train[t + 1]``), so positions ``0 .. k - 1`` compute the same hidden states for both
    sides, and only the last of them, ``k - 1``, may predict a trained token (each side's own
    ``ids[k]``, usually its first response token). ``k`` stops at the first differing token,
    at each side's first trained token, and inside both sides' ``n - 1`` inputs; 0: none.
    """
    n = min(len(ids_a), len(ids_b)) - 1
    differ = np.flatnonzero(ids_a[:n] != ids_b[:n])
    k = int(differ[0]) if differ.size else max(n, 0)
    for train in (train_a, train_b):
        trained = np.flatnonzero(train[1:])
        if trained.size:
            k = min(k, int(trained[0]) + 1)
    return k


def _side_record(row: dict, side) -> tuple[dict, str]:
    """The SFT record (and its format) of the prompt followed by one answer."""
    if "messages" in row:
        return {"messages": list(row["messages"]) + list(side)}, "chat"
    if row.get("system"):
        msgs = [{"role": "system", "content": row["system"]}, {"role": "user", "content": row["prompt"]}]
        return {"messages": msgs + [{"role": "assistant", "content": side}]}, "chat"
    return {"prompt": row["prompt"], "completion": side}, "completions"


def _prompt_key(row: dict) -> str:
    return json.dumps(row.get("messages") or [row.get("system"), row.get("prompt")], sort_keys=True)


def read_units(path: Path, tokenizer, policy: MaskPolicy | None = None):
    """(kind, [(ids, mask) per side], labels, prompt_mismatch) for every row of ``path``;
    a bad row raises one ``UserError`` naming ``file:line``."""
    kinds: set[str] = set()
    sides: list[list[tuple[np.ndarray, np.ndarray]]] = []
    labels: list[float] = []
    errors: list[str] = []
    for line, value, error in read_jsonl_records(path):
        if error is None and not sides and not errors and detect_mode(value) != "preference":
            raise UserError(f"{path}:{line}: not a preference row (it needs 'chosen' and 'rejected', or 'completion' "
                            "and 'label' for KTO); convert pairs with data_transform.py --to preference, or set "
                            "train.method: sft for SFT data")
        if error is None:
            try:
                row, shape, _key, _pkey = convert_preference(value)
            except RecordError as exc:
                error = str(exc)
        if error is not None:
            errors.append(f"{path}:{line}: {error}")
            continue
        kind = "kto" if shape.startswith("kto") else "pairs"
        kinds.add(kind)
        answers = (row["completion"],) if kind == "kto" else (row["chosen"], row["rejected"])
        toks = []
        for answer in answers:
            rec, fmt = _side_record(row, answer)
            ids, mask, _ok = tokenize_record(tokenizer, rec, fmt, True, policy)
            toks.append((np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=bool)))
        sides.append(toks)
        labels.append(float(row["label"]) if kind == "kto" else 1.0)
    if errors:
        raise bad_records(path, errors, "preference row(s) (data_transform.py --to preference fixes or skips them)")
    if len(kinds) > 1:
        raise UserError(f"{path}: mixes preference pairs and KTO rows; keep one kind per file")
    if not sides:
        raise UserError(f"{path}: no records (the file is empty); run data_transform.py --to preference to build it")
    return kinds.pop(), sides, labels


def _mismatched(own: tuple, other: tuple) -> tuple[np.ndarray, np.ndarray]:
    """The prompt of ``own`` followed by the response of ``other`` (KTO's KL sequences)."""
    ids, mask = own
    start = int(np.argmax(mask)) if mask.any() else len(ids)
    o_ids, o_mask = other
    o_start = int(np.argmax(o_mask)) if o_mask.any() else len(o_ids)
    return np.concatenate([ids[:start], o_ids[o_start:]]), np.concatenate([mask[:start], o_mask[o_start:]])


def needs_chat_template(path: str | Path) -> bool:
    """Whether the first row of a preference file is conversational (message lists)."""
    for _line, value, error in read_jsonl_records(path):
        return error is None and isinstance(value, dict) and any(
            isinstance(value.get(k), list) for k in ("messages", "prompt", "chosen", "completion"))
    return False


def load_pairs(path: str | Path, tokenizer, *, max_seq_length: int, truncation: str = "truncate",
               cache_dir: str | Path | None = None, use_cache: bool = True,
               mask_policy: MaskPolicy | None = None) -> PairDataset:
    """Read, tokenise (or take from the token cache) and cut a preference JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    key = hashlib.sha256(json.dumps(["pairs", CACHE_VERSION, file_hash(path), tokenizer_fingerprint(tokenizer),
                                     repr(mask_policy or MaskPolicy())]).encode()).hexdigest()[:32]
    cache_file = Path(cache_dir or default_cache_dir()) / f"{path.stem}-pairs-{key}.npz"
    hit = False
    if use_cache and cache_file.is_file():
        try:
            with np.load(cache_file, allow_pickle=False) as z:
                offsets, flat_ids, flat_mask, labels = z["offsets"], z["ids"], z["train"], z["labels"]
                kind = str(z["kind"])
            ids, masks = np.split(flat_ids, offsets[1:-1]), np.split(flat_mask.astype(bool), offsets[1:-1])
            per = 1 if kind == "kto" else 2
            sides = [[(ids[per * k + j], masks[per * k + j]) for j in range(per)] for k in range(len(labels))]
            hit = True
        except (OSError, ValueError, KeyError):  # a damaged cache file is rebuilt, not trusted
            hit = False
    if not hit:
        kind, sides, label_list = read_units(path, tokenizer, mask_policy)
        labels = np.asarray(label_list, dtype=np.float32)
        if use_cache:
            flat = [s for unit in sides for s in unit]
            offsets = np.cumsum([0] + [len(i) for i, _ in flat]).astype(np.int64)
            flat_ids = np.concatenate([i for i, _ in flat]).astype(np.int32)
            flat_train = np.concatenate([m for _, m in flat]).astype(np.uint8)
            write_file_atomic(cache_file, lambda tmp: np.savez(tmp, offsets=offsets, ids=flat_ids, train=flat_train,
                                                               labels=labels, kind=np.array(kind)))
    if kind == "kto":  # each row's mismatched sequence: its prompt, the previous row's completion
        sides = [[u[0], _mismatched(u[0], sides[k - 1][0])] for k, u in enumerate(sides)]
    ds = _cut(path, kind, sides, labels, max_seq_length, truncation, hit)
    ds.key = f"{key}:{max_seq_length}:{truncation}"
    return ds


def _cut(path: Path, kind: str, sides: list, labels: np.ndarray, max_seq_length: int, truncation: str,
         hit: bool) -> PairDataset:
    stats = DataStats(path=str(path), format=f"preference {kind}", cache_hit=hit)
    kept, cut = fit_units(sides, max_seq_length, truncation, stats)
    ids: list[np.ndarray] = []
    train: list[np.ndarray] = []
    units: list[tuple[int, int]] = []
    for unit in cut:
        units.append((len(ids), len(ids) + 1))
        ids += [i for i, _ in unit]
        train += [m for _, m in unit]
    if not units:
        raise UserError(f"{path}: no usable pair ({stats.summary()}); raise train.max_seq_length")
    return PairDataset(ids, train, units, kind, labels[kept] if kind == "kto" else None, stats)
