"""Row lanes: a batch's rows split over CPU streams give the same step as one stream."""

from __future__ import annotations

import os
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_tune import adapters
from mlx_tune.config import LoraConfig
from mlx_tune.data import batching
from mlx_tune.errors import UserError
from mlx_tune.model import packing
from mlx_tune.runtime import backend, blas, scheduling
from mlx_tune.testing.tiny import tiny_model
from mlx_tune.training import lanes
from mlx_tune.training import loop as trainer
from mlx_tune.training.losses import batch_loss


def chat_batch(rows: int = 5, width: int = 64, seed: int = 0) -> batching.Batch:
    """Packed rows of short examples whose first half (the "prompt") is not trained."""
    rng = np.random.default_rng(seed)
    ids, train = [], []
    for _ in range(rows * 4):
        n = int(rng.integers(6, 15))
        ids.append(rng.integers(3, 250, size=n).astype(np.int32))
        train.append(np.arange(n) >= n // 2)
    ds = SimpleNamespace(ids=ids, train=train)
    return batching.collate(ds, [list(range(4 * r, 4 * r + 4)) for r in range(rows)], width, True)


def test_split_rows_keeps_every_row_and_gathers_each_parts_trained_slots():
    batch = chat_batch()
    assert batch.gather is not None  # under half of the slots are trained
    parts = lanes.split_rows(batch, 2)
    assert sorted(p.inputs.shape[0] for p in parts) == [2, 3]
    for f in ("inputs", "targets", "loss_mask", "segment_ids", "positions"):
        assert np.array_equal(np.concatenate([np.array(getattr(p, f)) for p in parts]), np.array(getattr(batch, f)))
    assert sum(p.n_trained for p in parts) == batch.n_trained
    assert sum(p.n_tokens for p in parts) == batch.n_tokens
    assert parts[0].gather.shape == parts[1].gather.shape  # one compiled shape per batch
    for p in parts:
        flat, g = np.array(p.loss_mask).reshape(-1), np.array(p.gather)
        assert set(g[flat[g] > 0]) == set(np.flatnonzero(flat > 0))  # every trained slot, once
        assert len(g[flat[g] > 0]) == p.n_trained
        assert (flat[g[p.n_trained:]] == 0).all()  # padding points at untrained slots


def test_split_rows_leaves_what_it_cannot_split():
    batch = chat_batch(rows=1)
    assert lanes.split_rows(batch, 2) is None  # one row
    assert lanes.split_rows(chat_batch(), 1) is None
    pairs = SimpleNamespace(**vars(chat_batch()))  # not a plain SFT batch (pairs tie rows together)
    assert lanes.split_rows(pairs, 2) is None


def test_a_fully_trained_part_that_cannot_pad_turns_gathering_off():
    batch = chat_batch(rows=3, width=64)
    mask = np.array(batch.loss_mask)
    mask[0], mask[0, -1] = 1.0, 0.0  # part 0 (rows 0-1): over 64 trained, a gather of 128
    mask[2] = 1.0  # part 1 (row 2): 64 slots, all trained: nothing to pad a gather of 128 with
    full = batching.Batch(**{**vars(batch), "loss_mask": mx.array(mask)})
    parts = lanes.split_rows(full, 2)
    assert all(p.gather is None for p in parts)


def adapted(seed: int = 0, model_type: str = "llama"):
    model = tiny_model(model_type, seed=0)
    mx.random.seed(seed)
    adapters.inject(model, LoraConfig(rank=4, alpha=8, dropout=0.0))
    for _, w in adapters.wrappers(model):  # non-zero B so gradients reach A too
        a = w.adapters["default"]
        a.lora_b = mx.random.normal(a.lora_b.shape) * 0.05
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("gather,reach,model_type", [(True, None, "llama"), (False, None, "llama"), (True, 16, "llama"),
                                                   (False, 16, "llama"), (True, 16, "qwen3"), (True, None, "gemma2")])
def test_two_lanes_give_the_one_lane_step(monkeypatch, gather, reach, model_type):
    # the width `mlx-tune train` sets (this process keeps MLX's: the values do not depend on it)
    monkeypatch.setenv(scheduling.WIDTH_ENV, scheduling.WIDTH)
    if not gather:
        monkeypatch.setattr(batching, "GATHER_BELOW", 0.0)
    batch = chat_batch(rows=4, width=64)
    model = adapted(model_type=model_type)
    assert packing.packing_support(model) is None  # as training.run asks (it sets the mask layout)
    packing.set_reach(model, reach)  # the band kernel (short examples) or block-causal attention
    try:
        import mlx.optimizers as optim

        two = trainer.Step(model, optim.AdamW(learning_rate=1e-3), batch_loss)
        monkeypatch.setattr(lanes, "ROW_LANES", 1)
        one = trainer.Step(model, optim.AdamW(learning_rate=1e-3), batch_loss)
    finally:
        packing.set_reach(model, None)
    assert (two.lanes, one.lanes) == (backend.row_lanes(2), 1)
    if two.lanes < 2:
        pytest.skip("one CPU core: no lanes")
    packing.set_reach(model, reach)
    try:
        got = two.micro_batch(batch, None)
        want = one.micro_batch(batch, None)
        again = two.micro_batch(batch, got)  # accumulation adds on top
    finally:
        packing.set_reach(model, None)
    assert got[1].item() == want[1].item() == batch.n_trained
    assert got[0].item() == pytest.approx(want[0].item(), rel=1e-5)
    gw, ww, ga = dict(tree_flatten(got[2])), dict(tree_flatten(want[2])), dict(tree_flatten(again[2]))
    assert gw.keys() == ww.keys() and gw
    for k in gw:
        tol = 1e-5 * float(np.abs(np.array(ww[k])).max()) + 1e-7  # float sums grouped differently
        assert np.allclose(np.array(gw[k]), np.array(ww[k]), rtol=1e-4, atol=tol), k
        assert np.allclose(np.array(ga[k]), 2 * np.array(ww[k]), rtol=1e-4, atol=tol), k


def test_lanes_follow_the_device_the_ranks_and_the_width(monkeypatch):
    monkeypatch.setenv(scheduling.WIDTH_ENV, scheduling.WIDTH)
    assert backend.row_lanes(2, world=2) == 1  # ranks share the cores
    assert backend.row_lanes(1) == 1
    cpu = backend.device_backend() == "cpu"
    assert backend.row_lanes(2) == (min(2, os.cpu_count() or 1) if cpu else 1)
    monkeypatch.setenv(scheduling.WIDTH_ENV, "20")  # MLX's narrow default: lanes would lose
    assert backend.row_lanes(2) == 1
    assert backend.row_lanes(2, assume_wide=True) == (min(2, os.cpu_count() or 1) if cpu else 1)
    monkeypatch.setenv(backend.LANES_ENV, "2")  # the user's word wins
    assert backend.row_lanes(2) == (min(2, os.cpu_count() or 1) if cpu else 1)
    monkeypatch.setenv(backend.LANES_ENV, "two")
    with pytest.raises(UserError, match="MLX_TUNE_ROW_LANES"):
        backend.row_lanes(2)


def test_blas_threads_is_set_inside_and_restored_after():
    lib = blas._openblas()
    if lib is None:
        pytest.skip("OpenBLAS is not loaded")
    before = lib.openblas_get_num_threads()
    with blas.blas_threads(1) as applied:
        assert applied and lib.openblas_get_num_threads() == 1
        a = mx.random.normal((256, 256))
        assert np.allclose(np.array(a @ a), np.array(a) @ np.array(a), rtol=1e-3, atol=1e-3)
    assert lib.openblas_get_num_threads() == before


def test_scheduling_width_is_set_once_and_the_users_value_wins():
    env: dict[str, str] = {}
    assert scheduling.enable(env) == scheduling.cpu_only_mlx()
    assert env.get(scheduling.WIDTH_ENV) == (scheduling.WIDTH if scheduling.cpu_only_mlx() else None)
    mine = {scheduling.WIDTH_ENV: "7"}
    assert scheduling.enable(mine) and mine[scheduling.WIDTH_ENV] == "7"


def test_the_wide_order_is_only_for_sft_runs_off_the_memory_bounded_paths(monkeypatch):
    monkeypatch.setenv(scheduling.WIDTH_ENV, "x")  # restored after the test, as it was
    monkeypatch.delenv(scheduling.WIDTH_ENV)
    for method, checkpointed, seq in (("dpo", False, 512), ("sft", True, 512), ("sft", False, 2048)):
        assert not lanes.wide_scheduling(method, checkpointed, seq)
        assert scheduling.WIDTH_ENV not in os.environ
    wide = lanes.wide_scheduling("sft", False, 512)
    assert wide == (scheduling.cpu_only_mlx() and backend.row_lanes(lanes.ROW_LANES, assume_wide=True) > 1)
    assert (os.environ.get(scheduling.WIDTH_ENV) == scheduling.WIDTH) == wide
