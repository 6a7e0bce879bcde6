"""Batches of preference units (pairs, KTO rows): every sequence of a unit in one batch.

A batch holds ``P`` unit slots (a power of two, so the compiled step sees few shapes);
unit k's two sequences take sequence slots ``2k`` and ``2k + 1``. With packing, each
row holds whole units back to back (``batching.pack`` over unit lengths into rows of
``2 * max_seq_length`` slots), kept apart by ``segment_ids``; without, each sequence is a
row of its own.

Shared prefix (``shared=True``, packing only): both sequences of a unit start with the same
rendered prompt, so a unit is laid out as ``[prefix | side-0 suffix | side-1 suffix]``, three
segments: the prefix (``pairs.shared_prefix``: the common tokens before either side's first
loss) once, then each side's remaining inputs, whose ``prefix_ids`` name the prefix segment
(``model.attention.packed_mask``: a suffix sees the prefix and itself, never the other side)
and whose positions continue from the prefix length. Each suffix query then attends to
exactly the keys, at exactly the positions, it has in the sequence alone, so every hidden
state, log-prob and gradient is the plain layout's, with the prompt run once instead of twice
(and the row holds more units: packing counts ``prefix + both suffixes``). The last prefix
position predicts both sides' next token (usually their first response token), so it is
gathered twice, once per side with that side's target and slot.

Either way the scored tokens are gathered (``gather``: flat positions, ``gtargets`` their
targets, ``gslot`` their sequence slot; padding points at slot ``S = 2P``, which is dropped),
so the vocabulary head runs only on them and a slot's log-prob is a sum over its gathered
tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mlx_tune.data.batching import PAD_SEGMENT, BatchStream, gather_size, pad_to
from mlx_tune.data.pairs import PairDataset


@dataclass
class UnitBatch:
    """The arrays of one batch of units (mx arrays) and its counts."""

    inputs: Any
    segment_ids: Any
    positions: Any
    gather: Any  # (G,) flat indices of the scored positions (padding: index 0)
    gtargets: Any  # (G,) the token each gathered position predicts (a shared prefix's last position: once per side)
    gslot: Any  # (G,) their sequence slot (padding: S)
    gresp: Any  # (G,) 1.0 for a response token, 0.0 for a prompt token (gathered only for an NLL over it)
    slot_tokens: Any  # (S,) response tokens per slot
    slot_all_tokens: Any  # (S,) gathered tokens per slot (response, plus the prompt where gathered)
    unit_weight: Any  # (P,) 1.0 for a real unit, 0.0 for an empty slot
    prefix_ids: Any = None  # (B, L) the segment each position also sees (shared prefixes; None: none)
    labels: Any = None  # (P,) kto labels
    ref_logps: Any = None  # (S,) precomputed reference log-probs
    n_tokens: int = 0  # positions of the units' sequences, each counted whole (a shared prefix twice)
    n_trained: int = 0
    slot_seqs: tuple = ()  # sequence index per slot (-1: empty), host side


def _slots(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


# A row of the layout: groups (k, [(slot, sequence), ...]): the members share their first k
# input positions (k = 0: nothing shared, each member a plain segment).
Group = tuple[int, list[tuple[int, int]]]


def _fill(ds: PairDataset, rows: list[list[Group]], width: int, pad_id: int, nll_prompt: bool):
    """(inputs, segment_ids, positions, prefix_ids) of the rows and the gathered
    (flat index, target, slot, response) of every scored position, members in order."""
    B = len(rows)
    inputs = np.full((B, width), pad_id, dtype=np.int32)
    seg = np.full((B, width), PAD_SEGMENT, dtype=np.int32)
    prefix = np.full((B, width), PAD_SEGMENT, dtype=np.int32)
    pos = np.zeros((B, width), dtype=np.int32)
    picked: list[tuple[np.ndarray, ...]] = []
    for b, row in enumerate(rows):
        t, s = 0, 0
        for k, members in row:
            head, shared = t, s  # where the shared prefix starts, its segment
            if k:
                inputs[b, t:t + k], seg[b, t:t + k], prefix[b, t:t + k], pos[b, t:t + k] = (
                    ds.ids[members[0][1]][:k], s, s, np.arange(k))
                t, s = t + k, s + 1
            for slot, i in members:
                ids, tr = ds.ids[i], ds.train[i]
                n = len(ids) - 1
                m = n - k  # this member's own inputs after the prefix
                inputs[b, t:t + m], seg[b, t:t + m], pos[b, t:t + m] = ids[k:n], s, k + np.arange(m)
                prefix[b, t:t + m] = shared if k else s
                # input position p of the sequence sits at row index head + p (prefix) or t + p - k
                p = np.arange(n)
                where = np.where(p < k, head + p, t + p - k)
                resp = tr[1:].astype(bool)
                keep = resp | (nll_prompt and slot % 2 == 0)  # ORPO: the chosen side's prompt too
                picked.append((b * width + where[keep], ids[1:][keep], np.full(int(keep.sum()), slot), resp[keep]))
                t, s = t + m, s + 1
        pos[b, t:] = np.arange(width - t)
    return inputs, seg, pos, prefix, picked


def collate_units(ds: PairDataset, rows: list[list[int]], packed: bool, width: int, pad_id: int = 0,
                  ref: np.ndarray | None = None, nll_prompt: bool = False, shared: bool = False) -> UnitBatch:
    """A UnitBatch of ``rows`` (lists of unit indices; packed: several per row).

    ``shared`` (with ``packed``): each unit's common prefix once (``pairs.shared_prefix``,
    the module docstring's layout). ``nll_prompt`` also gathers the chosen sequences' prompt
    tokens (ORPO's NLL term runs over the whole chosen sequence, as TRL's ``ORPOTrainer``
    takes it); a shared prefix's tokens are gathered once, with the chosen slot."""
    import mlx.core as mx

    units = [u for row in rows for u in row]
    P = _slots(max(len(units), len(rows) if not packed else 1))
    slot_seqs = np.full(2 * P, -1, dtype=np.int64)
    for k, u in enumerate(units):
        slot_seqs[2 * k], slot_seqs[2 * k + 1] = ds.units[u]
    groups: list[list[Group]] = []
    if packed:
        prefix = ds.prefix_lengths() if shared else None
        base = 0
        for units_row in rows:
            groups.append([(int(prefix[u]) if prefix is not None else 0,
                            [(2 * (base + j) + s, ds.units[u][s]) for s in (0, 1)]) for j, u in enumerate(units_row)])
            base += len(units_row)
    else:  # a row per sequence (an empty slot: an empty row)
        groups = [[(0, [(j, int(slot_seqs[j]))])] if slot_seqs[j] >= 0 else []
                  for k in range(len(rows)) for j in (2 * k, 2 * k + 1)]
    inputs, seg, pos, prefix_ids, picked = _fill(ds, groups, width, pad_id, nll_prompt)
    idx, tgt, slot, resp = (np.concatenate([p[c] for p in picked]) if picked else np.zeros(0, np.int64)
                            for c in range(4))
    size = gather_size(len(idx))
    pad = size - len(idx)
    gather = np.concatenate([idx, np.zeros(pad, dtype=np.int64)]).astype(np.int32)
    gtargets = np.concatenate([tgt, np.full(pad, pad_id)]).astype(np.int32)
    gslot = np.concatenate([slot, np.full(pad, 2 * P)]).astype(np.int32)
    gresp = np.concatenate([resp, np.zeros(pad)]).astype(np.float32)
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
        inputs=mx.array(inputs), segment_ids=mx.array(seg) if packed else None,
        positions=mx.array(pos) if packed else None, prefix_ids=mx.array(prefix_ids) if packed and shared else None,
        gather=mx.array(gather), gtargets=mx.array(gtargets), gslot=mx.array(gslot), gresp=mx.array(gresp),
        slot_tokens=mx.array(slot_tokens), slot_all_tokens=mx.array(slot_all_tokens),
        unit_weight=mx.array(weight), labels=None if labels is None else mx.array(labels),
        ref_logps=None if ref_logps is None else mx.array(ref_logps),
        n_tokens=int(sum(len(ds.ids[s]) - 1 for s in slot_seqs if s >= 0)), n_trained=int(gresp.sum()),
        slot_seqs=tuple(int(x) for x in slot_seqs),
    )


class PairStream(BatchStream):
    """``BatchStream``'s seeded, resumable, shardable order over units instead of examples.

    ``batch_size`` counts packed rows of ``2 * max_seq_length`` slots with packing, units
    without. ``shared`` (packing only): each unit's prefix once (the module docstring), and
    packing fits units by that shared length. ``ref`` (per sequence) fills ``ref_logps``
    once reference log-probs are known.
    """

    def __init__(self, dataset: PairDataset, batch_size: int, max_seq_length: int, *, nll_prompt: bool = False,
                 shared: bool = False, **kw):
        self.shared = shared and kw.get("packing", True)
        super().__init__(dataset, batch_size, 2 * max_seq_length, **kw)
        self.seq_length, self.nll_prompt = max_seq_length, nll_prompt
        self.ref: np.ndarray | None = None

    def example_lengths(self) -> np.ndarray:
        return self.dataset.lengths(shared=self.shared)

    def collate_rows(self, rows: list[list[int]]) -> UnitBatch:
        if self.packing:
            width = self.max_seq_length
        else:
            ds = self.dataset
            longest = max((len(ds.ids[s]) - 1 for r in rows if r for s in ds.units[r[0]]), default=1)
            width = pad_to(longest, self.pad_multiple, self.seq_length)
        return collate_units(self.dataset, rows, self.packing, width, self.pad_id, self.ref, self.nll_prompt,
                             self.shared)


def pair_stream_for(dataset: PairDataset, train_cfg, *, train: bool = True, rank: int = 0, world_size: int = 1,
                    pad_id: int = 0, shared: bool = False) -> PairStream:
    """A PairStream configured from a ``TrainConfig`` (as ``batching.stream_for``); ORPO
    gathers the chosen prompts too (its NLL term). ``shared``: whether the model takes
    shared-prefix rows (the trainer asks ``packing.shares_prefix``)."""
    return PairStream(dataset, train_cfg.batch_size, train_cfg.max_seq_length, packing=train_cfg.packing,
                      seed=train_cfg.seed, shuffle=train, loop=train, rank=rank, world_size=world_size, pad_id=pad_id,
                      nll_prompt=train_cfg.method == "orpo", shared=shared)
