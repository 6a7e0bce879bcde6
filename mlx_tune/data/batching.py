"""Tokenised examples to batches: packing, padding, resumable and shardable batch order.

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
from dataclasses import dataclass
from typing import Any

import numpy as np

from mlx_tune.data.cache import TokenizedDataset
from mlx_tune.errors import UserError

PAD_SEGMENT = -1


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


# Gather the trained positions for the vocabulary head when fewer than this share of a
# batch's slots carries a loss (chat data: prompts and padding are most of a batch); the
# gathered count is rounded up to a few sizes so the compiled step sees few shapes.
GATHER_BELOW = 0.75


def gather_size(n: int) -> int:
    """``n`` rounded up to 64, 128, 192, ... then steps of about 25%: few distinct shapes."""
    b = 64
    while b < n:
        b = max(b + 64, -(-int(b * 1.25) // 64) * 64)
    return b


def gather_index(mask: np.ndarray) -> np.ndarray | None:
    """Flat indices of the trained slots of ``mask``, padded to ``gather_size`` with an
    untrained slot (so padding adds nothing); None when most slots are trained."""
    flat = mask.reshape(-1)
    n = int((flat > 0).sum())
    size = gather_size(n)
    if n >= GATHER_BELOW * flat.size or size >= flat.size:
        return None
    return padded_gather(flat, size)


def padded_gather(mask: np.ndarray, size: int) -> np.ndarray | None:
    """Flat indices of the trained slots of ``mask`` padded to ``size`` with its first
    untrained slot; None when padding is needed and every slot is trained."""
    flat = mask.reshape(-1)
    idx, untrained = np.flatnonzero(flat > 0), np.flatnonzero(flat <= 0)
    if len(idx) < size and not len(untrained):
        return None
    return np.concatenate([idx, np.full(size - len(idx), untrained[0] if len(untrained) else 0)]).astype(np.int32)


def pad_to(n: int, multiple: int, cap: int) -> int:
    """``n`` rounded up to ``multiple``, at most ``cap``."""
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
    gather: Any = None  # flat indices of the trained slots (``gather_index``), or None

    def arrays(self) -> tuple:
        """(inputs, targets, loss_mask, segment_ids, positions) for ``losses.loss_fn``."""
        return self.inputs, self.targets, self.loss_mask, self.segment_ids, self.positions


def fill_rows(dataset: Any, rows: list[list[tuple[int, int]]], width: int, pad_id: int = 0,
              no_slot: int = -1) -> tuple[np.ndarray, ...]:
    """(inputs, targets, loss_mask, segment_ids, positions, slot) arrays of ``len(rows)``
    rows of ``width`` positions, each row its ``(slot, example index)`` pairs laid end to
    end: example s of a row is segment s with positions from 0, its positions carry
    ``slot``; the rest is padding (its own segment, causal among itself; slot ``no_slot``).
    """
    B = len(rows)
    inputs = np.full((B, width), pad_id, dtype=np.int32)
    targets = np.full((B, width), pad_id, dtype=np.int32)
    mask = np.zeros((B, width), dtype=np.float32)
    seg = np.full((B, width), PAD_SEGMENT, dtype=np.int32)
    pos = np.zeros((B, width), dtype=np.int32)
    slot = np.full((B, width), no_slot, dtype=np.int32)
    for b, row in enumerate(rows):
        t = 0
        for s, (sl, i) in enumerate(row):
            ids, tr = dataset.ids[i], dataset.train[i]
            n = len(ids) - 1
            inputs[b, t:t + n], targets[b, t:t + n], mask[b, t:t + n] = ids[:-1], ids[1:], tr[1:]
            seg[b, t:t + n], pos[b, t:t + n], slot[b, t:t + n] = s, np.arange(n), sl
            t += n
        pos[b, t:] = np.arange(width - t)
    return inputs, targets, mask, seg, pos, slot


def collate(dataset: TokenizedDataset, rows: list[list[int]], width: int, packed: bool, pad_id: int = 0) -> Batch:
    """Build a Batch of ``len(rows)`` rows of ``width`` slots (an empty row is all padding)."""
    import mlx.core as mx

    inputs, targets, mask, seg, pos, _ = fill_rows(dataset, [[(0, i) for i in row] for row in rows], width, pad_id)
    n_tokens = int((seg != PAD_SEGMENT).sum())
    gather = gather_index(mask)
    return Batch(
        inputs=mx.array(inputs), targets=mx.array(targets), loss_mask=mx.array(mask),
        segment_ids=mx.array(seg) if packed else None, positions=mx.array(pos) if packed else None,
        n_tokens=n_tokens, n_trained=int(mask.sum()), gather=None if gather is None else mx.array(gather),
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
        dataset: Any,
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
        lengths = self.example_lengths()
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

    def example_lengths(self) -> np.ndarray:
        """The slots each example takes in a row (what packing fits)."""
        return self.dataset.lengths()

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
        return self.collate_rows(self.batch_rows(g))

    def collate_rows(self, rows: list[list[int]]) -> Any:
        """The Batch of these rows (a subclass batches other units: ``data.pair_batches``)."""
        if self.packing:
            width = self.max_seq_length
        else:
            longest = max((len(self.dataset.ids[r[0]]) - 1 for r in rows if r), default=1)
            width = pad_to(longest, self.pad_multiple, self.max_seq_length)
        return collate(self.dataset, rows, width, self.packing, self.pad_id)


def stream_for(dataset: TokenizedDataset, train_cfg, *, train: bool = True, rank: int = 0, world_size: int = 1,
               pad_id: int = 0) -> BatchStream:
    """A BatchStream configured from a ``TrainConfig`` (shuffled and endless for training,
    one ordered pass for validation / test)."""
    return BatchStream(
        dataset, train_cfg.batch_size, train_cfg.max_seq_length, packing=train_cfg.packing, seed=train_cfg.seed,
        shuffle=train, loop=train, rank=rank, world_size=world_size, pad_id=pad_id,
    )
