"""Preference tuning on the engine: pair and KTO sequences, unit batches, sequence
log-probs, the reference model, the compiled step, and whole runs through the CLI."""

from __future__ import annotations

import json
import random
import signal

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map
from train_workspace import losses, run_train, start_and_signal, start_train, workspace

from mlx_tune.adapters import inject
from mlx_tune.config import LoraConfig, PreferenceConfig
from mlx_tune.data.pair_batches import PairStream
from mlx_tune.data.pairs import load_pairs
from mlx_tune.errors import UserError
from mlx_tune.testing.tiny import tiny_model, tiny_tokenizer
from mlx_tune.training.loop import Step, batch_arrays
from mlx_tune.training.preference import adapters_disabled, method_loss, reference_logps, slot_logps

# Backend-sensitive (the head's gathered per-token CE): `make test-accelerator` runs it too.
pytestmark = pytest.mark.accelerator


def _pairs(n: int = 12, seed: int = 0) -> list[dict]:
    rnd = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rnd.randint(0, 99), rnd.randint(0, 99)
        rows.append({"prompt": f"What is {a} plus {b}?", "chosen": f"{a + b}", "rejected": f"{a + b + rnd.randint(1, 9)} maybe"})
    return rows


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _lora(seed=1):
    model = tiny_model("llama", seed=seed)
    inject(model, LoraConfig(rank=4, alpha=8.0))
    mx.random.seed(seed)
    model.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.05, model.trainable_parameters()))
    return model


def _plain_logp(model, ids, train) -> mx.array:
    logits = model(mx.array(ids[None, :-1])).astype(mx.float32)
    lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    tgt = mx.take_along_axis(lp, mx.array(ids[None, 1:, None].astype(np.int32)), axis=-1)[0, :, 0]
    return (tgt * mx.array(train[1:].astype(np.float32))).sum()


@pytest.fixture(scope="module")
def pair_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    return load_pairs(_write(d / "train.jsonl", _pairs()), tiny_tokenizer(), max_seq_length=64, cache_dir=d)


def test_pairs_share_the_prompt_and_train_only_the_responses(pair_data):
    assert pair_data.kind == "pairs" and len(pair_data) == 12 and len(pair_data.ids) == 24
    for c, r in pair_data.units:
        ci, ct = pair_data.ids[c], pair_data.train[c]
        ri, rt = pair_data.ids[r], pair_data.train[r]
        start = int(np.argmax(ct))
        assert start == int(np.argmax(rt)) and (ci[:start] == ri[:start]).all()  # the same prompt tokens
        assert not ct[:start].any() and ct[start:].any() and rt[start:].any()


@pytest.mark.parametrize(("packing", "shared"), [(True, False), (False, False), (True, True)],
                         ids=["packed", "unpacked", "shared-prefix"])
def test_slot_logps_equal_each_sequence_alone_in_value_and_gradient(pair_data, packing, shared):
    model = _lora()
    batch = next(PairStream(pair_data, 2, 64, packing=packing, seed=0, shared=shared))
    assert (batch.prefix_ids is not None) == shared
    seqs = [s for s in batch.slot_seqs if s >= 0]
    assert len(seqs) >= 4 and len(set(seqs)) == len(seqs)
    got = slot_logps(model, batch)
    want = [_plain_logp(model, pair_data.ids[s], pair_data.train[s]).item() if s >= 0 else 0.0 for s in batch.slot_seqs]
    np.testing.assert_allclose(np.array(got), want, rtol=1e-5, atol=1e-4)
    coef = mx.array(np.random.default_rng(0).normal(size=len(batch.slot_seqs)).astype(np.float32))

    def ours(model):
        return (slot_logps(model, batch) * coef).sum()

    def plain(model):
        return sum((_plain_logp(model, pair_data.ids[s], pair_data.train[s]) * coef[k]
                    for k, s in enumerate(batch.slot_seqs) if s >= 0), mx.array(0.0))

    g1, g2 = nn.value_and_grad(model, ours)(model)[1], nn.value_and_grad(model, plain)(model)[1]
    for (k, a), (_, b) in zip(tree_flatten(g1), tree_flatten(g2)):
        assert mx.allclose(a, b, atol=1e-5, rtol=1e-4).item(), k


def test_reference_is_the_base_model_and_the_adapter_comes_back(pair_data):
    model = _lora()
    batch = next(PairStream(pair_data, 2, 64, packing=True, seed=0))
    policy = slot_logps(model, batch)
    with adapters_disabled(model):
        ref = slot_logps(model, batch, with_grad=False)
    base = tiny_model("llama", seed=1)  # the same base weights, no adapter
    np.testing.assert_allclose(np.array(ref), np.array(slot_logps(base, batch, with_grad=False)), rtol=1e-5, atol=1e-4)
    assert not np.allclose(np.array(ref), np.array(policy))
    np.testing.assert_allclose(np.array(slot_logps(model, batch)), np.array(policy), rtol=1e-6)
    assert model.training


@pytest.mark.parametrize("method", ["dpo", "orpo", "simpo", "cpo"])
def test_every_pair_method_runs_in_the_compiled_step_and_precomputed_reference_agrees(pair_data, method):
    model = _lora()
    stream = PairStream(pair_data, 2, 64, packing=True, seed=0)
    batch = next(stream)
    step = Step(model, optim.Adam(1e-3), method_loss(method, PreferenceConfig()))
    loss, n, grads, norm, metrics = step.finish(*step.accumulate(batch_arrays(batch), None))
    assert np.isfinite(loss.item()) and norm.item() > 0 and n.item() == sum(s >= 0 for s in batch.slot_seqs) / 2
    for key in ("reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward", "chosen_logps", "rejected_logps"):
        assert np.isfinite(metrics[key].item()), key
    if method == "dpo":  # the same loss from reference log-probs computed once per dataset
        stream.ref = reference_logps(model, PairStream(pair_data, 2, 64, packing=True, seed=0, shuffle=False,
                                                       loop=False), len(pair_data.ids))
        live = method_loss(method, PreferenceConfig())(model, batch)[0]
        cached = method_loss(method, PreferenceConfig())(model, stream.collate_rows(stream.batch_rows(0)))[0]
        assert abs(live.item() - cached.item()) < 1e-5


def test_kto_rows_get_a_mismatched_sequence_and_train(tmp_path):
    rows = [{"prompt": f"Say {w}", "completion": w if k % 3 else w.upper(), "label": bool(k % 3)}
            for k, w in enumerate(["apple", "pear", "plum", "fig", "kiwi", "lime"])]
    ds = load_pairs(_write(tmp_path / "train.jsonl", rows), tiny_tokenizer(), max_seq_length=64, cache_dir=tmp_path)
    assert ds.kind == "kto" and ds.labels.tolist() == [0.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    own, kl = ds.units[0]
    start = int(np.argmax(ds.train[own]))
    last = ds.units[-1][0]
    assert (ds.ids[kl][:start] == ds.ids[own][:start]).all()  # row 0's prompt ...
    assert (ds.ids[kl][start:] == ds.ids[last][int(np.argmax(ds.train[last])):]).all()  # ... the last row's completion
    model = _lora()
    step = Step(model, optim.Adam(1e-3), method_loss("kto", PreferenceConfig()))
    loss, _, _, norm, metrics = step.finish(*step.accumulate(batch_arrays(next(PairStream(ds, 4, 64, seed=0))), None))
    assert np.isfinite(loss.item()) and norm.item() > 0 and "kl" in metrics


def test_wrong_data_for_the_method_is_one_line(tmp_path, tiny_folder):
    data = tmp_path / "data"
    _write(data / "train.jsonl", [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}])
    res = run_train(workspace(tmp_path, tiny_folder, "out", method="dpo"))
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "not a preference row" in res.stderr and "train.method: sft" in res.stderr
    _write(data / "train.jsonl", _pairs(4))
    res = run_train(workspace(tmp_path, tiny_folder, "out", method="kto"))
    assert res.returncode != 0 and "Traceback" not in res.stderr and "set train.method: dpo" in res.stderr
    with pytest.raises(UserError, match="SFT cannot train on"):
        from mlx_tune.data.dataset import read_dataset
        read_dataset(data / "train.jsonl")


@pytest.mark.slow
def test_dpo_run_learns_the_preference_and_resumes_exactly_after_sigkill(tmp_path, tiny_folder):
    """Through the CLI: reward accuracy and margin rise, metrics rows carry the reward
    keys (validation too), and a run killed mid-way resumes to the same per-step losses."""
    data = tmp_path / "data"
    _write(data / "train.jsonl", _pairs(48))
    _write(data / "valid.jsonl", _pairs(8, seed=1))
    settings = dict(method="dpo", iters=24, steps_per_eval=12, save_every=5)
    full = workspace(tmp_path, tiny_folder, "full", **settings)
    killed = workspace(tmp_path, tiny_folder, "killed", **settings)
    reference = start_train(full)
    proc, seen = start_and_signal(killed, 13, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL and 13 <= seen < 24
    _, err = reference.communicate(timeout=180)
    assert reference.returncode == 0, err[-2000:]
    res = run_train(killed, "train.resume=true", timeout=180)
    assert res.returncode == 0 and "resumed from" in res.stdout, res.stderr[-2000:]
    want, got = losses(tmp_path / "full" / "metrics.jsonl"), losses(tmp_path / "killed" / "metrics.jsonl")
    assert sorted(got) == sorted(want) == list(range(1, 25))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7), step
    rows = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    val_rows = [r for r in rows if "val_loss" in r]
    for key in ("reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward", "chosen_logps", "rejected_logps"):
        assert key in train_rows[-1] and f"val_{key}" in val_rows[-1], key
    first, last = np.mean([r["reward_margin"] for r in train_rows[:4]]), np.mean([r["reward_margin"] for r in train_rows[-4:]])
    assert last > first and val_rows[-1]["val_loss"] < val_rows[0]["val_loss"] == pytest.approx(np.log(2), abs=1e-4)
    assert (tmp_path / "full" / "adapters.safetensors").is_file()


def test_orpo_batches_gather_the_chosen_prompt_for_its_nll(pair_data):
    """ORPO's NLL runs over the whole chosen sequence (TRL): those slots' every-token sums
    equal the plain log-prob of all their targets; response sums are unchanged."""
    from mlx_tune.training.preference import slot_sums

    model = _lora()
    plain_batch = next(PairStream(pair_data, 2, 64, packing=True, seed=0))
    batch = next(PairStream(pair_data, 2, 64, packing=True, seed=0, nll_prompt=True))
    resp, whole = slot_sums(model, batch)
    np.testing.assert_allclose(np.array(resp), np.array(slot_logps(model, plain_batch)), rtol=1e-5, atol=1e-4)
    for k, s in enumerate(batch.slot_seqs):
        if s < 0:
            continue
        ids = pair_data.ids[s]
        want = _plain_logp(model, ids, np.ones(len(ids), bool)) if k % 2 == 0 else _plain_logp(model, ids, pair_data.train[s])
        assert abs(whole[k].item() - want.item()) < 1e-3, k
        assert batch.slot_all_tokens[k].item() == (len(ids) - 1 if k % 2 == 0 else pair_data.train[s][1:].sum())


def test_an_adapter_reference_stays_frozen_under_the_new_one_and_saves_as_one(tmp_path, tiny_folder):
    """preference.reference: DPO on top of an SFT adapter. At step 0 the policy equals the
    reference (val loss ln 2); the saved adapter alone reproduces base + reference + new."""
    from mlx_tune.adapters import save_adapter
    from mlx_tune.adapters.manager import load_adapter
    from mlx_tune.adapters.stack import REFERENCE, build_stacked, load_reference, remove_stacked
    from mlx_tune.model.loading import load_model

    sft, _, info = load_model(str(tiny_folder), None)
    inject(sft, LoraConfig(rank=4, alpha=8.0, target_modules=["q_proj", "v_proj"]))
    mx.random.seed(3)
    sft.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.1, sft.trainable_parameters()))
    save_adapter(sft, tmp_path / "sft", None, info)

    model, _, info = load_model(str(tiny_folder), None)
    inject(model, LoraConfig(rank=2, alpha=4.0))  # all linears: more layers than the reference
    model.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.1, model.trainable_parameters()))
    assert load_reference(model, tmp_path / "sft") > 0
    names = {k for k, _ in tree_flatten(model.trainable_parameters())}
    assert names and not any(REFERENCE in k for k in names)  # the reference is frozen
    x = mx.array([[1, 5, 9, 14, 3, 7]])
    want = model(x)
    rank = build_stacked(model, "default")
    assert rank == 6
    save_adapter(model, tmp_path / "dpo", None, info, name="stacked")
    remove_stacked(model)
    np.testing.assert_allclose(np.array(model(x)), np.array(want), rtol=1e-6)
    fresh, _, _ = load_model(str(tiny_folder), None)
    load_adapter(fresh, tmp_path / "dpo")
    np.testing.assert_allclose(np.array(fresh(x)), np.array(want), rtol=1e-4, atol=1e-4)

    data = tmp_path / "data"
    _write(data / "train.jsonl", _pairs(8))
    _write(data / "valid.jsonl", _pairs(4, seed=1))
    res = run_train(workspace(tmp_path, tiny_folder, "out", method="dpo", iters=2, steps_per_eval=2),
                    f"preference.reference={tmp_path / 'sft'}")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "frozen under the new adapter" in res.stdout
    rows = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and rows[0]["val_loss"] == pytest.approx(np.log(2), abs=1e-5)
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert saved["stacked_on"] == str(tmp_path / "sft") and saved["rank"] == 4 + 4


def test_dpo_with_full_fine_tuning_uses_reference_logps_from_the_start(tmp_path, tiny_folder):
    data = tmp_path / "data"
    _write(data / "train.jsonl", _pairs(8))
    _write(data / "valid.jsonl", _pairs(4, seed=1))
    res = run_train(workspace(tmp_path, tiny_folder, "out", method="dpo", finetune="full", iters=3, steps_per_eval=3,
                              learning_rate=1e-3), "train.seed=5")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "computed once from the starting weights" in res.stdout
    rows = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val_loss" in r]
    assert val[0]["val_loss"] == pytest.approx(np.log(2), abs=1e-5) and val[-1]["val_loss"] != val[0]["val_loss"]
    assert (tmp_path / "out" / "model" / "config.json").is_file()
