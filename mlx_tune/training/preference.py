"""Preference tuning on the SFT engine: sequence log-probs of unit batches, the reference
model, and the loss functions ``loop.train`` runs for dpo, orpo, simpo, cpo and kto.

A sequence's log-prob is the sum over its response tokens of ``log p(y_t | y_<t)``:
``-token_ce`` over the gathered positions and their targets (``data.pair_batches``), summed
per slot as ``onehot(gslot) @ logp`` (one small matmul, differentiable). Chosen and rejected
(or a KTO row and its mismatched sequence) go through one forward pass of the policy; with
packing, where the model allows it (``packing.shares_prefix``), their common prompt runs once in
that pass (and once in the reference pass), each side's answer after it at its own
positions, which computes what each sequence computes alone.

The reference model is the policy with its adapter switched off (no second copy of the
weights): ``adapters_disabled`` flips the wrappers' ``enabled`` flag and dropout off
while the reference forward is traced, under ``stop_gradient``. With
``preference.precompute_reference`` the reference log-probs are computed once per
dataset (``reference_logps``) and ride in the batches instead.

The losses themselves (TRL's definitions) are ``training.preference_losses``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_tune.adapters.lora import LoRALinear
from mlx_tune.data.pairs import load_pairs
from mlx_tune.errors import UserError
from mlx_tune.model.attention import hidden_states
from mlx_tune.training.loop import batch_arrays, traced_batch
from mlx_tune.training.losses import token_ce
from mlx_tune.training.preference_losses import KtoLogps, PairLogps, kto_loss, needs_reference, pair_loss


@contextlib.contextmanager
def adapters_disabled(model):
    """The reference model: every LoRA wrapper computes its base only, dropout off."""
    wrappers = [m for _, m in model.named_modules() if isinstance(m, LoRALinear)]
    was_training = model.training
    flags = [w.enabled for w in wrappers]
    for w in wrappers:
        w.enabled = False
    model.eval()
    try:
        yield model
    finally:
        for w, f in zip(wrappers, flags):
            w.enabled = f
        model.train(was_training)


def slot_sums(model, batch, with_grad: bool = True) -> tuple[mx.array, mx.array]:
    """(S,) response log-prob sums per sequence slot of a UnitBatch, and (S,) log-prob sums
    over every gathered token of the slot (the prompt too, where it was gathered)."""
    h = hidden_states(model, batch.inputs, batch.segment_ids, batch.positions, batch.prefix_ids)
    # a shared prefix's last position is gathered once per side (its targets differ): the
    # gradient of the gather adds both sides' contributions there
    h = h.reshape(-1, h.shape[-1])[batch.gather]
    lp = -token_ce(model, h, batch.gtargets, with_grad=with_grad)
    S = batch.slot_tokens.shape[0]
    onehot = (batch.gslot[None, :] == mx.arange(S, dtype=batch.gslot.dtype)[:, None]).astype(mx.float32)
    return onehot @ (lp * batch.gresp), onehot @ lp


def slot_logps(model, batch, with_grad: bool = True) -> mx.array:
    """(S,) response log-prob sums per sequence slot of a UnitBatch."""
    return slot_sums(model, batch, with_grad)[0]


def reference_slot_logps(model, batch) -> mx.array:
    if batch.ref_logps is not None:
        return batch.ref_logps
    with adapters_disabled(model):
        return mx.stop_gradient(slot_logps(model, batch, with_grad=False))


def method_loss(method: str, cfg, with_grad: bool = True) -> Callable:
    """``loss(model, batch) -> (mean loss, real units, {metric: mean})`` for ``loop.train``."""
    ref_needed = needs_reference(method)

    def loss(model, batch):
        pol, whole = slot_sums(model, batch, with_grad)
        ref = reference_slot_logps(model, batch) if ref_needed else None
        w = batch.unit_weight
        if method == "kto":
            lp = KtoLogps(policy=pol[0::2], reference=ref[0::2], label=batch.labels, kl_policy=pol[1::2],
                          kl_reference=ref[1::2], weight=w)
            value, metrics = kto_loss(cfg, lp)
        else:
            lp = PairLogps(chosen=pol[0::2], rejected=pol[1::2], chosen_tokens=batch.slot_tokens[0::2],
                           rejected_tokens=batch.slot_tokens[1::2],
                           ref_chosen=None if ref is None else ref[0::2],
                           ref_rejected=None if ref is None else ref[1::2], weight=w,
                           # ORPO: the NLL over the whole chosen sequence (prompt gathered too)
                           chosen_nll=-whole[0::2] if method == "orpo" else None,
                           nll_tokens=batch.slot_all_tokens[0::2] if method == "orpo" else None)
            value, metrics = pair_loss(method, cfg, lp)
        # The weight is counted as (w > 0), not w.sum(): the loss normalises by its own
        # w.sum(), and mx.compile (0.30) fails with "_Map_base::at" when a step output is an
        # expression the traced graph computes twice and merges.
        return value, (w > 0).sum().astype(mx.float32), metrics

    return loss


def reference_logps(model, stream, n_sequences: int, progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Reference log-prob of every sequence of a dataset: one forward-only pass of the
    adapter-free model over ``stream`` (a non-looping, unshuffled PairStream)."""
    out = np.zeros(n_sequences, dtype=np.float32)
    with adapters_disabled(model):
        def forward(arrays: dict) -> mx.array:
            return slot_logps(model, traced_batch(arrays), with_grad=False)

        fn = mx.compile(forward, inputs=[model.state])
        for batch in stream:
            vals = np.array(fn(batch_arrays(batch)), dtype=np.float32)
            for slot, seq in enumerate(batch.slot_seqs):
                if seq >= 0:
                    out[seq] = vals[slot]
            if progress is not None:
                progress(1)
    return out


def load_pair_splits(data_dir: Path, tokenizer, tc) -> dict:
    """``{split: PairDataset}`` for the ``DIR/<split>.jsonl`` files present (train required):
    pairs for dpo, orpo, simpo and cpo, KTO rows for kto."""
    from mlx_tune.data.masks import MaskPolicy

    out = {}
    want = "kto" if tc.method == "kto" else "pairs"
    for name in ("train", "valid", "test"):
        f = data_dir / f"{name}.jsonl"
        if f.is_file():
            ds = out[name] = load_pairs(f, tokenizer, max_seq_length=tc.max_seq_length, truncation=tc.truncation,
                                        mask_policy=MaskPolicy.of(tc.mask))
            if ds.kind != want:
                held = "KTO rows (completion + label)" if ds.kind == "kto" else "preference pairs (chosen + rejected)"
                fix = "kto" if ds.kind == "kto" else "dpo, orpo, simpo or cpo"
                raise UserError(f"{f}: holds {held}, which train.method {tc.method} cannot train on; "
                                f"set train.method: {fix}")
    return out


def _save_array(tmp: Path, array: np.ndarray) -> None:
    np.save(tmp, array)


def precomputed_references(model, splits: dict, make_stream: Callable, fingerprint: str,
                           log: Callable[[str], None], show: bool = True) -> dict[str, np.ndarray]:
    """``{split: reference log-prob per sequence}``, from the cache beside the token cache
    (keyed by the split's token cache key and ``fingerprint``: model, quantization) or
    computed once with the adapter off."""
    from mlx_tune.atomic import write_file_atomic
    from mlx_tune.data.cache import default_cache_dir

    out = {}
    for name, ds in splits.items():
        key = hashlib.sha256(json.dumps([ds.key, fingerprint]).encode()).hexdigest()[:32]
        path = default_cache_dir() / f"{Path(ds.stats.path).stem}-reference-{key}.npy"
        if path.is_file():
            try:
                ref = np.load(path, allow_pickle=False)
                if ref.shape == (len(ds.ids),):
                    out[name] = ref
                    log(f"reference log-probs of {name}: cached ({path.name})")
                    continue
            except (OSError, ValueError):  # damaged: recompute
                pass
        tic = time.perf_counter()
        stream = make_stream(ds, train=False)
        from tqdm import tqdm

        with tqdm(total=len(stream), desc=f"reference {name}", unit="batch", dynamic_ncols=True, leave=False,
                  disable=not show) as bar:
            ref = reference_logps(model, stream, len(ds.ids), progress=bar.update)
        write_file_atomic(path, functools.partial(_save_array, array=ref))
        out[name] = ref
        log(f"reference log-probs of {name}: {len(ds)} units in {time.perf_counter() - tic:.1f}s (cached)")
    return out
