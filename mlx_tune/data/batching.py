"""Data to batches: chat template, loss masks, truncation, packing, resumable batch order.

An example is a token sequence ``ids`` (n tokens) and a boolean ``train`` mask over it
(True where the model must learn to produce that token). It becomes n - 1 (input, target)
slots: ``inputs = ids[:-1]``, ``targets = ids[1:]``, ``loss_mask = train[1:]``.

- chat: the tokenizer's chat template renders the messages. With ``mask_prompt`` every
  assistant turn is trained (not only the last), up to and including the template's
  end-of-turn token so tuned models learn to stop; system/user/tool tokens are not.
  Turn boundaries come from rendering the prefixes ``messages[:i]`` and checking that
  each rendering is a prefix of the full one (counted as ``prefix_mismatch`` if not).
- completions: rendered as a user/assistant chat when the tokenizer has a template
  (as mlx-lm does), else ``prompt + completion + eos``; the prompt is not trained.
- text: every token is trained (an eos is appended).

Tokenisation runs once per (file content, tokenizer, options) and is cached as ``.npz``
(no pickle) under ``~/.cache/mlx_tune/tokens`` or a given folder, written atomically.

Packing (default): best-fit-decreasing concatenation of examples into rows of exactly
``max_seq_length`` slots; ``segment_ids`` numbers the examples of a row (padding -1) and
``positions`` restart at 0 for each example, so the attention (``mlx_tune.model.attention``)
keeps examples apart. Without packing, batches hold examples of similar length.
``BatchStream`` walks a seeded permutation of batches epoch after epoch; its position is
two integers (``state_dict``) so a resumed run sees exactly the same batches, and rank k
of n takes every n-th batch of the same global sequence (data-parallel shards).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mlx_tune.errors import UserError

FORMATS = ("chat", "completions", "text")
CACHE_VERSION = 1
PAD_SEGMENT = -1


# ---------------------------------------------------------------------------
# Reading records
# ---------------------------------------------------------------------------


def read_records(path: str | Path, fmt: str | None = None) -> tuple[str, list[dict], list[int]]:
    """(format, records, line numbers) of a JSONL file; bad lines raise ``UserError`` as file:line.

    The data package's reader (``mlx_tune.data.read_dataset``) decides, so data_transform.py
    and the trainer agree on every record.
    """
    from mlx_tune.data import read_dataset

    if fmt is not None and fmt not in FORMATS:
        raise UserError(f"unknown data format {fmt!r}; use one of {', '.join(FORMATS)}")
    if not Path(path).is_file():
        raise UserError(f"{path}: file not found")
    ds = read_dataset(path, fmt)
    return ds.format, ds.records, ds.lines


# ---------------------------------------------------------------------------
# Tokenising and masking
# ---------------------------------------------------------------------------


def _template_ids(tokenizer, messages: list[dict], tools=None, gen: bool = False) -> list[int]:
    kwargs = {"tools": tools} if tools else {}
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen, **kwargs)
    if isinstance(out, dict) or hasattr(out, "input_ids"):  # transformers 5 may return a BatchEncoding
        out = out["input_ids"]
    return list(out)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _eos_ids(tokenizer) -> set[int]:
    ids = set(getattr(tokenizer, "eos_token_ids", None) or ())
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def tokenize_chat(tokenizer, messages: list[dict], tools=None, mask_prompt: bool = True) -> tuple[list[int], list[bool], bool]:
    """(ids, train mask, prefix property held) for one chat.

    For assistant turn i the trained span runs from the end of the rendering of
    ``messages[:i]`` with the generation prompt to the end of ``messages[:i+1]``, cut
    after the span's last end-of-turn token (ChatML's trailing newline stays untrained).
    Where a prefix rendering is not a prefix of the full rendering (templates that rewrite
    earlier turns), the longest common prefix is used and the third value is False.
    """
    full = _template_ids(tokenizer, messages, tools)
    if not mask_prompt:
        return full, [True] * len(full), True
    train = [False] * len(full)
    ok = True
    eos = _eos_ids(tokenizer)
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        head = _template_ids(tokenizer, messages[:i], tools, gen=True) if i else []
        upto = _template_ids(tokenizer, messages[: i + 1], tools)
        start, end = _common_prefix(head, full), _common_prefix(upto, full)
        ok = ok and start == len(head) and end == len(upto)
        last = max((j for j in range(start, end) if full[j] in eos), default=None)
        if last is not None:
            end = last + 1
        for j in range(start, end):
            train[j] = True
    return full, train, ok


def tokenize_record(tokenizer, record: dict, fmt: str, mask_prompt: bool = True) -> tuple[list[int], list[bool], bool]:
    """(ids, train mask, prefix property held) for one record of trainer format ``fmt``."""
    if fmt == "chat":
        return tokenize_chat(tokenizer, record["messages"], record.get("tools"), mask_prompt)
    if fmt == "completions":
        if getattr(tokenizer, "chat_template", None):
            msgs = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]
            return tokenize_chat(tokenizer, msgs, None, mask_prompt)
        prompt = tokenizer.encode(record["prompt"])
        ids = prompt + tokenizer.encode(record["completion"], add_special_tokens=False)
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        n = len(prompt) if mask_prompt else 0
        return ids, [False] * n + [True] * (len(ids) - n), True
    ids = tokenizer.encode(record["text"])
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
    return ids, [True] * len(ids), True


# ---------------------------------------------------------------------------
# The token cache
# ---------------------------------------------------------------------------


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
    h.update(str(sorted(_eos_ids(tokenizer))).encode())
    h.update(str(getattr(tokenizer, "bos_token_id", None)).encode())
    h.update(repr(tokenizer.encode("a b\n")).encode())  # catches normaliser / bos-adding changes
    return h.hexdigest()


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------
# A tokenised dataset
# ---------------------------------------------------------------------------


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


def _tokenize_file(path: Path, tokenizer, fmt: str | None, mask_prompt: bool) -> tuple[str, list, list, int]:
    fmt, records, _lines = read_records(path, fmt)
    ids, masks, mismatch = [], [], 0
    for rec in records:
        i, m, ok = tokenize_record(tokenizer, rec, fmt, mask_prompt)
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
        json.dumps([CACHE_VERSION, _file_hash(path), tokenizer_fingerprint(tokenizer), fmt, mask_prompt]).encode()
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
        fmt_used, ids, masks, mismatch = _tokenize_file(path, tokenizer, fmt, mask_prompt)
        if use_cache:
            offsets = np.cumsum([0] + [len(x) for x in ids]).astype(np.int64)
            meta = {"format": fmt_used, "prefix_mismatch": mismatch, "source": str(path)}
            _atomic_write_npz(cache_file, {
                "offsets": offsets,
                "ids": np.concatenate(ids).astype(np.int32),
                "train": np.concatenate(masks).astype(np.uint8),
                "meta": np.array(json.dumps(meta)),
            })
    stats = DataStats(path=str(path), format=fmt_used, prefix_mismatch=mismatch, cache_hit=hit)
    out_ids, out_train = [], []
    for i, m in zip(ids, masks):
        if len(i) - 1 > max_seq_length:
            if truncation == "drop":
                stats.dropped_long += 1
                continue
            stats.truncated += 1
            i, m = i[: max_seq_length + 1], m[: max_seq_length + 1]
        if len(i) < 2 or not m[1:].any():
            stats.dropped_untrained += 1
            continue
        out_ids.append(i)
        out_train.append(m)
        stats.tokens += len(i) - 1
        stats.trained += int(m[1:].sum())
    stats.examples = len(out_ids)
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
                                     truncation=truncation, cache_dir=cache_dir)
        elif name == "train":
            raise UserError(f"data: {f} not found; run data_transform.py INPUT --out {data_dir}")
    return out


# ---------------------------------------------------------------------------
# Rows: packing and length grouping
# ---------------------------------------------------------------------------


def pack(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Best-fit-decreasing bins of example indices whose lengths sum to <= ``capacity``.

    Longest first, each into the open row with the least room that still fits it
    (a sorted list of (room, row) and bisect: O(n log n)). Deterministic.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    rows: list[list[int]] = []
    rooms: list[tuple[int, int]] = []  # sorted (room left, row index)
    for i in order:
        n = int(lengths[i])
        if n > capacity:
            raise ValueError(f"example {i} has {n} slots, over the row capacity {capacity}")
        k = bisect.bisect_left(rooms, (n, -1))
        if k < len(rooms):
            room, r = rooms.pop(k)
        else:
            room, r = capacity, len(rows)
            rows.append([])
        rows[r].append(i)
        if room - n > 0:
            bisect.insort(rooms, (room - n, r))
    for r in rows:
        r.sort()  # dataset order inside a row
    return rows


def _pad_to(n: int, multiple: int, cap: int) -> int:
    return min(cap, -(-n // multiple) * multiple)


@dataclass
class Batch:
    """One batch of rows (mx arrays). ``n_tokens``: real slots; ``n_trained``: slots with loss."""

    inputs: Any
    targets: Any
    loss_mask: Any
    segment_ids: Any = None
    positions: Any = None
    n_tokens: int = 0
    n_trained: int = 0

    def arrays(self) -> tuple:
        """(inputs, targets, loss_mask, segment_ids, positions) for ``losses.loss_fn``."""
        return self.inputs, self.targets, self.loss_mask, self.segment_ids, self.positions


def collate(dataset: TokenizedDataset, rows: list[list[int]], width: int, packed: bool, pad_id: int = 0) -> Batch:
    """Build a Batch of ``len(rows)`` rows of ``width`` slots (an empty row is all padding)."""
    import mlx.core as mx

    B = len(rows)
    inputs = np.full((B, width), pad_id, dtype=np.int32)
    targets = np.full((B, width), pad_id, dtype=np.int32)
    mask = np.zeros((B, width), dtype=np.float32)
    seg = np.full((B, width), PAD_SEGMENT, dtype=np.int32)
    pos = np.zeros((B, width), dtype=np.int32)
    for b, row in enumerate(rows):
        t = 0
        for s, i in enumerate(row):
            ids, tr = dataset.ids[i], dataset.train[i]
            n = len(ids) - 1
            inputs[b, t:t + n] = ids[:-1]
            targets[b, t:t + n] = ids[1:]
            mask[b, t:t + n] = tr[1:]
            seg[b, t:t + n] = s
            pos[b, t:t + n] = np.arange(n)
            t += n
        pos[b, t:] = np.arange(width - t)  # padding: its own segment, causal among itself
    n_tokens = int((seg != PAD_SEGMENT).sum())
    return Batch(
        inputs=mx.array(inputs), targets=mx.array(targets), loss_mask=mx.array(mask),
        segment_ids=mx.array(seg) if packed else None, positions=mx.array(pos) if packed else None,
        n_tokens=n_tokens, n_trained=int(mask.sum()),
    )


class BatchStream:
    """Seeded, resumable, shardable batches over a TokenizedDataset.

    Batches are groups of ``batch_size`` rows (packed rows, or length-sorted examples).
    Epoch e visits the batches in ``permutation(seed, e)``; the global sequence is all
    epochs one after another, and rank k of n yields global batches k, k+n, k+2n, ...
    With ``loop=False`` it makes one ordered pass (for validation) and stops; the last
    batch is filled with empty rows so every batch has the same shape.
    """

    def __init__(
        self,
        dataset: TokenizedDataset,
        batch_size: int,
        max_seq_length: int,
        *,
        packing: bool = True,
        seed: int = 0,
        shuffle: bool = True,
        loop: bool = True,
        rank: int = 0,
        world_size: int = 1,
        pad_id: int = 0,
        pad_multiple: int = 32,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        self.dataset, self.batch_size, self.max_seq_length = dataset, batch_size, max_seq_length
        self.packing, self.seed, self.shuffle, self.loop = packing, seed, shuffle, loop
        self.rank, self.world_size, self.pad_id, self.pad_multiple = rank, world_size, pad_id, pad_multiple
        lengths = dataset.lengths()
        if packing:
            rows = pack(lengths, max_seq_length)
            rows.sort(key=lambda r: r[0])
            self.rows = rows
        else:
            order = np.argsort(lengths, kind="stable")
            self.rows = [[int(i)] for i in order]
        n_rows = len(self.rows)
        if packing and loop:
            # Training rows are re-grouped every epoch: full batches only; the rows left
            # over differ from epoch to epoch.
            self.n_batches = max(1, n_rows // batch_size)
        else:
            # Length groups are fixed (similar lengths together) and their order shuffled;
            # the last group is filled with empty rows.
            self.n_batches = -(-n_rows // batch_size)
        self._next = rank  # next global batch index this rank yields
        self._perm_epoch, self._perm = -1, None

    # -- position -----------------------------------------------------------
    def __len__(self) -> int:
        """Batches this rank yields per epoch."""
        return max(1, self.n_batches // self.world_size) if self.loop else -(-(self.n_batches - self.rank) // self.world_size)

    @property
    def epoch(self) -> float:
        """Epochs done, fractional (global batches consumed / batches per epoch)."""
        return (self._next - self.rank) / self.n_batches

    def state_dict(self) -> dict:
        e, i = divmod(self._next, self.n_batches)
        return {"epoch": int(e), "index": int(i), "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "n_batches": self.n_batches}

    def load_state_dict(self, state: dict) -> None:
        if state.get("n_batches") != self.n_batches or state.get("seed") != self.seed:
            raise UserError(
                f"cannot resume the data position: the checkpoint has {state.get('n_batches')} batches per "
                f"epoch with seed {state.get('seed')}, the data now gives {self.n_batches} with seed {self.seed} "
                "(the data, batch_size, max_seq_length, packing or seed changed)"
            )
        if state.get("world_size", 1) != self.world_size or state.get("rank", 0) != self.rank:
            raise UserError(f"cannot resume rank {state.get('rank')}/{state.get('world_size')} "
                            f"as rank {self.rank}/{self.world_size}")
        self._next = int(state["epoch"]) * self.n_batches + int(state["index"])

    # -- iteration ----------------------------------------------------------
    def _order(self, epoch: int) -> np.ndarray:
        """Epoch ``epoch``'s permutation: of rows when packing, else of length groups."""
        if epoch != self._perm_epoch:
            n = len(self.rows) if self.packing else self.n_batches
            if self.shuffle:
                self._perm = np.random.default_rng([self.seed, epoch]).permutation(n)
            else:
                self._perm = np.arange(n)
            self._perm_epoch = epoch
        return self._perm

    def batch_rows(self, g: int) -> list[list[int]]:
        """The rows (lists of example indices) of global batch ``g``."""
        epoch, i = divmod(g, self.n_batches)
        order = self._order(epoch)
        B = self.batch_size
        if self.packing:
            idx = order[i * B:(i + 1) * B]
        else:
            k = int(order[i])
            idx = range(k * B, min((k + 1) * B, len(self.rows)))
        rows = [self.rows[j] for j in idx]
        return rows + [[]] * (self.batch_size - len(rows))

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        g = self._next
        if not self.loop and g >= self.n_batches:
            raise StopIteration
        self._next += self.world_size
        rows = self.batch_rows(g)
        if self.packing:
            width = self.max_seq_length
        else:
            longest = max((len(self.dataset.ids[r[0]]) - 1 for r in rows if r), default=1)
            width = _pad_to(longest, self.pad_multiple, self.max_seq_length)
        return collate(self.dataset, rows, width, self.packing, self.pad_id)


def stream_for(dataset: TokenizedDataset, train_cfg, *, train: bool = True, rank: int = 0, world_size: int = 1,
               pad_id: int = 0) -> BatchStream:
    """A BatchStream configured from a ``TrainConfig`` (shuffled and endless for training,
    one ordered pass for validation / test)."""
    return BatchStream(
        dataset, train_cfg.batch_size, train_cfg.max_seq_length, packing=train_cfg.packing, seed=train_cfg.seed,
        shuffle=train, loop=train, rank=rank, world_size=world_size, pad_id=pad_id,
    )
