"""Shared-prefix unit rows (``data.pair_batches``, ``shared=True``): a unit's common prompt
once, each side's suffix after it at its own positions. The layout itself; every method's
loss, metrics and LoRA gradients in the compiled step equal the plain packed layout's on the
same units (units without a common prefix, and a side that lies wholly in the prefix,
included); the reference pass; the stream's packing and order; which models take it."""

from __future__ import annotations

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from mlx_tune.adapters import inject
from mlx_tune.config import LoraConfig, PreferenceConfig
from mlx_tune.data.pair_batches import PairStream, collate_units
from mlx_tune.data.pairs import PairDataset, shared_prefix
from mlx_tune.model.packing import shares_prefix
from mlx_tune.testing.families import FAMILIES
from mlx_tune.testing.tiny import tiny_model
from mlx_tune.training.loop import Step, batch_arrays
from mlx_tune.training.preference import method_loss, reference_logps

pytestmark = pytest.mark.accelerator


def _dataset(pairs: list[tuple[list[int], list[int], list[int], list[int]]], labels=None) -> PairDataset:
    """(ids_a, train_a, ids_b, train_b) per unit -> a PairDataset (0/1 lists as masks)."""
    ids, train, units = [], [], []
    for a, ta, b, tb in pairs:
        units.append((len(ids), len(ids) + 1))
        ids += [np.array(a, np.int32), np.array(b, np.int32)]
        train += [np.array(ta, bool), np.array(tb, bool)]
    return PairDataset(ids, train, units, "kto" if labels is not None else "pairs",
                       None if labels is None else np.array(labels, np.float32))


def test_layout_prefix_suffixes_positions_and_the_doubled_gather():
    ds = _dataset([
        ([1, 2, 3, 4, 5], [0, 0, 0, 1, 1], [1, 2, 3, 6, 7, 8], [0, 0, 0, 1, 1, 1]),  # 3 shared inputs
        ([9, 2, 3], [0, 1, 1], [8, 2, 3, 5], [0, 0, 1, 1]),  # differs from the first token: none shared
    ])
    assert ds.prefix_lengths().tolist() == [3, 0] and ds.lengths(shared=True).tolist() == [9 - 3, 5]
    b = collate_units(ds, [[0, 1]], True, 16, shared=True)
    row = lambda a: np.array(a)[0, :11].tolist()  # noqa: E731
    assert row(b.inputs) == [1, 2, 3, 4, 6, 7, 9, 2, 8, 2, 3]
    assert row(b.segment_ids) == [0, 0, 0, 1, 2, 2, 3, 3, 4, 4, 4]
    assert row(b.prefix_ids) == [0, 0, 0, 0, 0, 0, 3, 3, 4, 4, 4]  # both suffixes see segment 0
    assert row(b.positions) == [0, 1, 2, 3, 3, 4, 0, 1, 0, 1, 2]  # suffixes continue from the prefix
    assert np.array(b.segment_ids)[0, 11:].tolist() == [-1] * 5
    # the prefix's last position (row index 2) predicts both sides' first answer token
    n = 9
    assert np.array(b.gather)[:n].tolist() == [2, 3, 2, 4, 5, 6, 7, 9, 10]
    assert np.array(b.gtargets)[:n].tolist() == [4, 5, 6, 7, 8, 2, 3, 3, 5]
    assert np.array(b.gslot)[:n].tolist() == [0, 0, 1, 1, 1, 2, 2, 3, 3]
    assert np.array(b.gslot)[n:].tolist() == [4] * (len(b.gather.tolist()) - n)  # padding: the dropped slot
    assert np.array(b.slot_tokens).tolist() == [2, 3, 2, 2] and b.n_trained == 9
    assert b.n_tokens == 4 + 5 + 2 + 3  # each sequence counted whole, as without sharing
    # ORPO gathers the chosen side's prompt: the shared tokens once, with the chosen slot
    o = collate_units(ds, [[0, 1]], True, 16, nll_prompt=True, shared=True)
    assert np.array(o.gather)[:4].tolist() == [0, 1, 2, 3] and np.array(o.gtargets)[:4].tolist() == [2, 3, 4, 5]
    assert np.array(o.slot_all_tokens).tolist() == [4, 3, 2, 2] and np.array(o.gresp)[:4].tolist() == [0, 0, 1, 1]
    plain = collate_units(ds, [[0, 1]], True, 16)
    assert plain.prefix_ids is None and np.array(plain.segment_ids)[0, :14].tolist() == [0] * 4 + [1] * 5 + [2] * 2 + [3] * 3


def test_shared_prefix_stops_at_a_difference_or_the_first_loss():
    a, b = np.array([5, 6, 7, 8, 9]), np.array([5, 6, 7, 1, 2])
    none, ans = np.zeros(5, bool), np.array([0, 0, 0, 1, 1], bool)
    assert shared_prefix(a, ans, b, ans) == 3  # both answers start at token 3
    assert shared_prefix(a, none, b, np.array([0, 1, 1, 1, 1], bool)) == 1  # b trains token 1: only input 0 shared
    assert shared_prefix(a, none, a, none) == 4  # identical: every input (n - 1)
    assert shared_prefix(a, none, np.array([4, 6, 7]), none) == 0


def _units(seed: int = 0):
    """Eight units of random tokens: a common prompt then two answers, plus the edge cases."""
    rng = np.random.default_rng(seed)
    out, tok = [], lambda n: rng.integers(3, 250, n).tolist()  # noqa: E731
    for k in range(8):
        prompt = tok(int(rng.integers(4, 20)))
        a, b = tok(int(rng.integers(1, 9))), tok(int(rng.integers(2, 9)))
        if k == 1:  # one-token answer: that side's only input is in the prefix
            a = a[:1]
        pa, pb = prompt, list(prompt)
        if k == 2:  # the sides differ from the first token: no common prefix
            pb = [pb[0] % 200 + 1] + pb[1:]
        if k == 3:  # the prompts differ in the middle: the prefix ends before the answers
            pb[len(pb) // 2] = pb[len(pb) // 2] % 200 + 1
        out.append((pa + a, [0] * len(pa) + [1] * len(a), pb + b, [0] * len(pb) + [1] * len(b)))
    return out


def _lora(seed: int = 1):
    model = tiny_model("llama", seed=seed)
    inject(model, LoraConfig(rank=4, alpha=8.0, dropout=0.0))
    mx.random.seed(seed)
    model.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.05, model.trainable_parameters()))
    return model


METHODS = [("dpo", {}), ("dpo", {"loss_type": "ipo"}), ("dpo", {"loss_type": "hinge"}),
           ("dpo", {"loss_type": "robust", "label_smoothing": 0.1}), ("orpo", {}), ("simpo", {}), ("cpo", {}),
           ("kto", {})]


@pytest.mark.parametrize(("method", "cfg"), METHODS, ids=[m + "-" + c.get("loss_type", "") for m, c in METHODS])
def test_shared_rows_equal_plain_rows_in_loss_metrics_and_gradients(method, cfg):
    ds = _dataset(_units(), labels=[1, 0, 1, 1, 0, 1, 0, 0] if method == "kto" else None)
    pre = ds.prefix_lengths()
    a3 = ds.units[3][0]
    assert pre[2] == 0 and 0 < pre[3] < np.argmax(ds.train[a3]) and len(ds.ids[ds.units[1][0]]) - 1 == pre[1]
    rows = [[0, 1, 2], [3, 4], [5, 6, 7]]
    width = -(-max(int(ds.lengths()[r].sum()) for r in rows) // 32) * 32
    nll = method == "orpo"
    plain = collate_units(ds, rows, True, width, nll_prompt=nll)
    shared = collate_units(ds, rows, True, width, nll_prompt=nll, shared=True)
    model = _lora()
    step = Step(model, optim.Adam(1e-3), method_loss(method, PreferenceConfig(**cfg)))
    want = step.accumulate(batch_arrays(plain), None)
    got = step.accumulate(batch_arrays(shared), None)
    loss_p, n_p, g_p, m_p = want
    loss_s, n_s, g_s, m_s = got
    assert n_s.item() == n_p.item() == 8 and np.isfinite(loss_p.item()) and abs(loss_p.item()) > 1e-3
    np.testing.assert_allclose(loss_s.item(), loss_p.item(), rtol=1e-5, atol=1e-6)
    for k in m_p:
        np.testing.assert_allclose(m_s[k].item(), m_p[k].item(), rtol=1e-5, atol=1e-5, err_msg=k)
    flat_p, flat_s = dict(tree_flatten(g_p)), dict(tree_flatten(g_s))
    assert set(flat_p) == set(flat_s) and flat_p
    for k, ref in flat_p.items():
        ref = np.array(ref)
        assert np.abs(ref).max() > 0, k
        np.testing.assert_allclose(np.array(flat_s[k]), ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max(), err_msg=k)


def test_reference_pass_and_stream_over_shared_rows():
    ds = _dataset(_units(1) * 3)  # 24 units
    model = _lora()

    def stream(shared, **kw):
        return PairStream(ds, 2, 48, packing=True, seed=0, shared=shared, **kw)

    ref_p = reference_logps(model, stream(False, shuffle=False, loop=False), len(ds.ids))
    ref_s = reference_logps(model, stream(True, shuffle=False, loop=False), len(ds.ids))
    assert np.abs(ref_p).min() > 0
    np.testing.assert_allclose(ref_s, ref_p, rtol=1e-5, atol=1e-5)
    plain, shared = stream(False), stream(True)
    assert sum(map(len, shared.rows)) == sum(map(len, plain.rows)) == len(ds)  # every unit once
    assert len(shared.rows) < len(plain.rows)  # more units fit a row
    for r in shared.rows:
        assert ds.lengths(shared=True)[r].sum() <= 96
    # the order stays seeded and resumable
    assert shared.n_batches >= 3
    next(shared)
    state = shared.state_dict()
    rest = [next(shared).slot_seqs for _ in range(2)]
    again = stream(True)
    again.load_state_dict(state)
    assert [next(again).slot_seqs for _ in range(2)] == rest


def test_models_that_take_shared_rows():
    assert shares_prefix(tiny_model("llama", seed=0), 512)
    gemma3 = tiny_model("gemma3_text", seed=0, **FAMILIES["gemma3_text"].overrides)  # a window of a few tokens
    assert not shares_prefix(gemma3, 512)
    mamba = tiny_model("mamba", seed=0, **FAMILIES["mamba"].overrides)  # state crosses segments: no packing
    assert not shares_prefix(mamba, 512)
