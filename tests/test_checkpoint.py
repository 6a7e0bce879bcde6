"""Checkpoints: atomic folders, keep-last-K, exact restore, and real SIGKILL / Ctrl-C resume."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_tune import adapters
from mlx_tune.config import LoraConfig
from mlx_tune.testing.tiny import tiny_model
from mlx_tune.training import checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from train_workspace import losses, run_train, start_and_signal, start_train, workspace  # noqa: E402

# Backend-sensitive: `make test-accelerator` runs this file on the Metal/CUDA code path too.
pytestmark = pytest.mark.accelerator


def adapted_model(seed=0):
    model = tiny_model(seed=0)
    mx.random.seed(seed)
    adapters.inject(model, LoraConfig(rank=4, alpha=8))
    return model


def trained_optimizer(model):
    opt = optim.AdamW(learning_rate=1e-2)
    grads = {k: mx.ones_like(v) for k, v in tree_flatten(model.trainable_parameters())}
    from mlx.utils import tree_unflatten

    opt.update(model, tree_unflatten(list(grads.items())))
    mx.eval(model.parameters(), opt.state)
    return opt


def flat(tree):
    return {k: np.array(v) for k, v in tree_flatten(tree)}


def test_save_restore_roundtrip_and_keep_last_k(tmp_path):
    model = adapted_model()
    opt = trained_optimizer(model)
    mx.random.seed(42)
    for step in range(1, 6):
        last = checkpoint.save_checkpoint(tmp_path, step, model, opt, {"loop": {"step": step}, "data": {"index": step}}, keep=2)
    assert [s for s, _ in checkpoint.checkpoint_steps(tmp_path)] == [4, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000004", "step_000005"]
    assert last.name == "step_000005" and (last / "COMPLETE").is_file()
    want_w, want_o = flat(model.trainable_parameters()), flat(opt.state)

    other = adapted_model(seed=7)  # different adapter init, fresh optimizer, other key
    other_opt = optim.AdamW(learning_rate=1e-2)
    mx.random.seed(0)
    saved = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(tmp_path), other, other_opt)
    assert saved["loop"] == {"step": 5} and saved["data"] == {"index": 5}
    got_w, got_o = flat(other.trainable_parameters()), flat(other_opt.state)
    assert got_w.keys() == want_w.keys() and got_o.keys() == want_o.keys()
    for k in want_w:
        np.testing.assert_array_equal(got_w[k], want_w[k])
    for k in want_o:
        np.testing.assert_array_equal(got_o[k], want_o[k])


def test_half_written_checkpoints_are_never_picked(tmp_path):
    model = adapted_model()
    opt = trained_optimizer(model)
    good = checkpoint.save_checkpoint(tmp_path, 3, model, opt, {}, keep=5)
    # A writer killed before its rename: a temporary folder with everything but the marker.
    tmp = tmp_path / ".tmp-step_000009-99999"
    tmp.mkdir()
    (tmp / "adapter.safetensors").write_bytes((good / "adapter.safetensors").read_bytes())
    # A step folder without its marker, and one whose file was cut short after the marker.
    (tmp_path / "step_000010").mkdir()
    (tmp_path / "step_000010" / "state.json").write_text("{}")
    cut = tmp_path / "step_000011"
    import shutil

    shutil.copytree(good, cut)
    data = (cut / "optimizer.safetensors").read_bytes()
    (cut / "optimizer.safetensors").write_bytes(data[: len(data) // 2])
    assert checkpoint.latest_checkpoint(tmp_path) == good
    with pytest.raises(Exception, match="not a complete checkpoint"):
        checkpoint.load_checkpoint(cut, model, opt)
    checkpoint.prune(tmp_path, keep=5)
    assert not tmp.exists()  # a dead writer's leftovers are cleared


def test_mismatched_checkpoint_is_a_clear_error(tmp_path):
    model = adapted_model()
    opt = trained_optimizer(model)
    path = checkpoint.save_checkpoint(tmp_path, 1, model, opt, {}, keep=1)
    other = tiny_model(seed=0)
    adapters.inject(other, LoraConfig(rank=8, alpha=8))
    with pytest.raises(Exception, match="does not match this model"):
        checkpoint.load_checkpoint(path, other, optim.AdamW(learning_rate=1e-3))


# ---------------------------------------------------------------------------
# Real subprocesses: SIGKILL mid-run, Ctrl-C
# ---------------------------------------------------------------------------


def test_sigkill_then_resume_gives_the_same_losses(tmp_path, tiny_folder):
    """A run killed at any step and resumed reproduces the uninterrupted run's per-step losses."""
    iters = 24
    full = workspace(tmp_path, tiny_folder, "full", iters=iters, grad_accumulation=2)
    killed = workspace(tmp_path, tiny_folder, "killed", iters=iters, grad_accumulation=2)
    reference = start_train(full)  # the uninterrupted run, alongside
    proc, seen = start_and_signal(killed, 13, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert 13 <= seen < iters
    first = losses(tmp_path / "killed" / "metrics.jsonl")
    assert max(first) < iters and not (tmp_path / "killed" / "adapters.safetensors").exists()

    _, err = reference.communicate(timeout=120)
    assert reference.returncode == 0, err[-2000:]
    res = run_train(killed, "train.resume=true")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resumed from" in res.stdout and "step_000010" in res.stdout  # keep=2, every 5: newest before the kill
    want, got = losses(tmp_path / "full" / "metrics.jsonl"), losses(tmp_path / "killed" / "metrics.jsonl")
    assert sorted(got) == list(range(1, iters + 1)) == sorted(want)
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7), (step, got[step], want[step])
    assert want[iters] < want[1]  # it learned
    import mlx.core as mx

    a, b = mx.load(str(tmp_path / "full" / "adapters.safetensors")), mx.load(str(tmp_path / "killed" / "adapters.safetensors"))
    for k in a:
        np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), rtol=1e-5, atol=1e-7)


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tmp_path, tiny_folder):
    cfg = workspace(tmp_path, tiny_folder, "run", iters=400, save_every=1000)
    proc, seen = start_and_signal(cfg, 3, signal.SIGINT)
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert "train.resume=true" in proc.stdout and "Traceback" not in proc.stderr
    saved = checkpoint.checkpoint_steps(tmp_path / "run" / "checkpoints")
    assert len(saved) == 1 and saved[0][0] >= seen >= 3  # saved at the step it stopped on, not at save_every
    state = json.loads((saved[0][1] / "state.json").read_text())
    assert state["loop"]["step"] == saved[0][0] and state["data"]["index"] >= 1
    assert not (tmp_path / "run" / "adapters.safetensors").exists()  # an interrupted run is not a finished one
