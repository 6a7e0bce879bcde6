"""A batch's rows dealt over CPU streams ("row lanes"), so both cores work all step long.

On MLX's CPU backend a step's element-wise work (norms, RoPE, softmax, the loss's exp)
runs on one stream thread, one core, while OpenBLAS spreads each sgemm over all of them:
on two cores one core idles through about half the step. With rows split into ``n``
parts, part ``i`` built on stream ``i`` and OpenBLAS single-threaded while the step runs,
each core runs one part's whole graph, sgemms and element-wise work alike.

The step's sums are additive over rows: with parts P_i of batch B,

    sum_{t in B} m_t CE_t = sum_i sum_{t in P_i} m_t CE_t,  and the same for its gradient,

so the summed loss, token count and gradient equal the unsplit ones (up to float
summation order). Only plain SFT batches (``data.batching.Batch``) are split: a
preference or GRPO batch ties rows together (pairs, shared prefixes).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from mlx_tune.data.batching import Batch, gather_size, padded_gather

# Parts per batch on a multi-core CPU device (``runtime.backend.row_lanes`` decides where).
ROW_LANES = 2


def wide_scheduling(method: str, grad_checkpoint: bool, max_seq_length: int) -> bool:
    """Give MLX the scheduling width that lets the lanes overlap (``runtime.scheduling``),
    for a run that splits rows (SFT on a multi-core CPU) and keeps off the paths whose
    memory bound needs MLX's narrow order (gradient checkpointing, flash-attention rows).
    Call before MLX evaluates anything; True when the width is in force."""
    from mlx_tune.model.attention_shapes import FLASH_MIN_LENGTH
    from mlx_tune.runtime import backend, scheduling

    if method != "sft" or grad_checkpoint or max_seq_length >= FLASH_MIN_LENGTH:
        return False
    if backend.row_lanes(ROW_LANES, assume_wide=True) < 2:
        return False
    return scheduling.enable()


def split_rows(batch: Any, n: int) -> list[Batch] | None:
    """``batch`` as ``n`` batches of consecutive rows (sizes differ by at most one), or
    None when it is not split (n < 2, fewer rows than n, or not a plain SFT batch).

    A batch that gathers its trained positions (``Batch.gather``) gives each part its own
    gather, all of one length (the largest part's ``gather_size``) so the compiled step
    sees one shape per batch; where a part has no untrained slot to pad with, no part
    gathers. ``n_tokens`` of the parts is 0 where the batch has no segment ids (the loop
    counts the whole batch's)."""
    if n < 2 or type(batch) is not Batch or batch.inputs.shape[0] < n:
        return None
    B = batch.inputs.shape[0]
    edges = np.linspace(0, B, n + 1).round().astype(int).tolist()
    bounds = list(zip(edges[:-1], edges[1:]))
    mask = np.array(batch.loss_mask)
    real = None if batch.segment_ids is None else np.array(batch.segment_ids) >= 0
    gathers = _gathers([mask[s:e] for s, e in bounds]) if batch.gather is not None else None
    parts = []
    for i, (s, e) in enumerate(bounds):
        fields = {f: getattr(batch, f)[s:e] for f in ("inputs", "targets", "loss_mask", "segment_ids", "positions")
                  if getattr(batch, f) is not None}
        parts.append(dataclasses.replace(
            batch, **fields, n_tokens=int(real[s:e].sum()) if real is not None else 0,
            n_trained=int(mask[s:e].sum()), gather=None if gathers is None else gathers[i]))
    return parts


def _gathers(masks: list[np.ndarray]) -> list | None:
    """Each part's trained slots padded to a common length (``batching.padded_gather``);
    None where some part would need padding and has no untrained slot."""
    import mlx.core as mx

    width = max(min(gather_size(int((m > 0).sum())), m.size) for m in masks)
    out = []
    for m in masks:
        g = padded_gather(m, width)
        if g is None:
            return None
        out.append(mx.array(g))
    return out
