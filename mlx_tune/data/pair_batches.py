"""Batches of preference units (pairs, KTO rows): every sequence of a unit in one batch.

A batch holds ``P`` unit slots (a power of two, so the compiled step sees few shapes);
unit k's two sequences take sequence slots ``2k`` and ``2k + 1``. With packing, each
row holds whole units back to back (``batching.pack`` over unit lengths into rows of
``2 * max_seq_length`` slots), kept apart by ``segment_ids``; without, each sequence is a
row of its own. Either way the response tokens are gathered (``gather``, with their slot
in ``gslot``; padding points at slot ``S = 2P``, which is dropped), so the vocabulary head
runs only on them and a slot's log-prob is a sum over its gathered tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mlx_tune.data.batching import PAD_SEGMENT, BatchStream, fill_rows, gather_size, pad_to
from mlx_tune.data.pairs import PairDataset


@dataclass
class UnitBatch:
    """The arrays of one batch of units (mx arrays) and its counts."""

    inputs: Any
    targets: Any
    loss_mask: Any
    segment_ids: Any
    positions: Any
    gather: Any  # (G,) flat indices of response tokens (padding: index 0)
    gslot: Any  # (G,) their sequence slot (padding: S)
    gresp: Any  # (G,) 1.0 for a response token, 0.0 for a prompt token (gathered only for an NLL over it)
    slot_tokens: Any  # (S,) response tokens per slot
    slot_all_tokens: Any  # (S,) gathered tokens per slot (response, plus the prompt where gathered)
    unit_weight: Any  # (P,) 1.0 for a real unit, 0.0 for an empty slot
    labels: Any = None  # (P,) kto labels
    ref_logps: Any = None  # (S,) precomputed reference log-probs
    n_tokens: int = 0
    n_trained: int = 0
    slot_seqs: tuple = ()  # sequence index per slot (-1: empty), host side


def _slots(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


def collate_units(ds: PairDataset, rows: list[list[int]], packed: bool, width: int, pad_id: int = 0,
                  ref: np.ndarray | None = None, nll_prompt: bool = False) -> UnitBatch:
    """A UnitBatch of ``rows`` (lists of unit indices; packed: several per row).

    ``nll_prompt`` also gathers the chosen sequences' prompt tokens (ORPO's NLL term runs
    over the whole chosen sequence, as TRL's ``ORPOTrainer`` takes it)."""
    import mlx.core as mx

    units = [u for row in rows for u in row]
    P = _slots(max(len(units), len(rows) if not packed else 1))
    slot_seqs = np.full(2 * P, -1, dtype=np.int64)
    for k, u in enumerate(units):
        slot_seqs[2 * k], slot_seqs[2 * k + 1] = ds.units[u]
    # physical rows: lists of (slot, sequence)
    phys: list[list[tuple[int, int]]] = []
    if packed:
        base = 0
        for units_row in rows:
            phys.append([(2 * (base + j) + s, ds.units[u][s]) for j, u in enumerate(units_row) for s in (0, 1)])
            base += len(units_row)
    else:
        for k in range(len(rows)):
            for side in (0, 1):
                j = 2 * k + side
                phys.append([(j, int(slot_seqs[j]))] if slot_seqs[j] >= 0 else [])
    inputs, targets, mask, seg, pos, slot = fill_rows(ds, phys, width, pad_id, no_slot=2 * P)
    flat, flat_slot = mask.reshape(-1), slot.reshape(-1)
    if nll_prompt:  # every real position of a chosen (even) slot, prompt included
        keep = (flat > 0) | ((flat_slot < 2 * P) & (flat_slot % 2 == 0))
    else:
        keep = flat > 0
    idx = np.flatnonzero(keep)
    size = gather_size(len(idx))
    pad = size - len(idx)
    gather = np.concatenate([idx, np.zeros(pad, dtype=idx.dtype)]).astype(np.int32)
    gslot = np.concatenate([flat_slot[idx], np.full(pad, 2 * P)]).astype(np.int32)
    gresp = np.concatenate([(flat[idx] > 0), np.zeros(pad, dtype=bool)]).astype(np.float32)
    slot_tokens = np.bincount(gslot, weights=gresp, minlength=2 * P + 1)[: 2 * P].astype(np.float32)
    slot_all_tokens = np.bincount(gslot, minlength=2 * P + 1)[: 2 * P].astype(np.float32)
    weight = np.zeros(P, dtype=np.float32)
    weight[: len(units)] = 1.0
    labels = None
    if ds.labels is not None:
        labels = np.zeros(P, dtype=np.float32)
        labels[: len(units)] = ds.labels[units]
    ref_logps = None
    if ref is not None:
        ref_logps = np.where(slot_seqs >= 0, ref[np.maximum(slot_seqs, 0)], 0.0).astype(np.float32)
    return UnitBatch(
        inputs=mx.array(inputs), targets=mx.array(targets), loss_mask=mx.array(mask),
        segment_ids=mx.array(seg) if packed else None, positions=mx.array(pos) if packed else None,
        gather=mx.array(gather), gslot=mx.array(gslot), gresp=mx.array(gresp), slot_tokens=mx.array(slot_tokens),
        slot_all_tokens=mx.array(slot_all_tokens),
        unit_weight=mx.array(weight), labels=None if labels is None else mx.array(labels),
        ref_logps=None if ref_logps is None else mx.array(ref_logps),
        n_tokens=int((seg != PAD_SEGMENT).sum()), n_trained=int(gresp.sum()), slot_seqs=tuple(int(x) for x in slot_seqs),
    )


class PairStream(BatchStream):
    """``BatchStream``'s seeded, resumable, shardable order over units instead of examples.

    ``batch_size`` counts packed rows of ``2 * max_seq_length`` slots with packing, units
    without. ``ref`` (per sequence) fills ``ref_logps`` once reference log-probs are known.
    """

    def __init__(self, dataset: PairDataset, batch_size: int, max_seq_length: int, *, nll_prompt: bool = False,
                 **kw):
        super().__init__(dataset, batch_size, 2 * max_seq_length, **kw)
        self.seq_length, self.nll_prompt = max_seq_length, nll_prompt
        self.ref: np.ndarray | None = None

    def collate_rows(self, rows: list[list[int]]) -> UnitBatch:
        if self.packing:
            width = self.max_seq_length
        else:
            ds = self.dataset
            longest = max((len(ds.ids[s]) - 1 for r in rows if r for s in ds.units[r[0]]), default=1)
            width = pad_to(longest, self.pad_multiple, self.seq_length)
        return collate_units(self.dataset, rows, self.packing, width, self.pad_id, self.ref, self.nll_prompt)


def pair_stream_for(dataset: PairDataset, train_cfg, *, train: bool = True, rank: int = 0, world_size: int = 1,
                    pad_id: int = 0) -> PairStream:
    """A PairStream configured from a ``TrainConfig`` (as ``batching.stream_for``); ORPO
    gathers the chosen prompts too (its NLL term)."""
    return PairStream(dataset, train_cfg.batch_size, train_cfg.max_seq_length, packing=train_cfg.packing,
                      seed=train_cfg.seed, shuffle=train, loop=train, rank=rank, world_size=world_size, pad_id=pad_id,
                      nll_prompt=train_cfg.method == "orpo")
