"""The training loop on tiny real models: schedules, accumulation, clipping, NaN guard, metrics."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_tune import adapters
from mlx_tune.config import LoraConfig, TrainConfig
from mlx_tune.testing.tiny import tiny_model
from mlx_tune.training import loop as trainer
from mlx_tune.training import recompute as recompute_blocks
from mlx_tune.training.callbacks import MetricsLog
from mlx_tune.training.optim import OPTIMIZERS, build_optimizer, build_schedule
from mlx_tune.training.recompute import grad_checkpoint


def masked_ce(model, batch):
    """Token-weighted mean cross-entropy over the loss mask (0/0 = NaN on an empty mask)."""
    logits = model(batch.inputs).astype(mx.float32)
    ce = nn.losses.cross_entropy(logits, batch.targets) * batch.loss_mask
    n = batch.loss_mask.sum()
    return ce.sum() / n, n


def make_batch(tokens: np.ndarray, mask: np.ndarray | None = None) -> SimpleNamespace:
    t = mx.array(tokens.astype(np.int32))
    m = mx.ones(t[:, 1:].shape) if mask is None else mx.array(mask.astype(np.float32))
    return SimpleNamespace(inputs=t[:, :-1], targets=t[:, 1:], loss_mask=m, n_tokens=int(m.sum().item()))


def rows(n: int, length: int = 17, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, 250, size=(n, length))


def ragged_mask(n: int, length: int = 16, seed: int = 1) -> np.ndarray:
    """Rows with different numbers of trained tokens, so per-row means and token means differ."""
    lens = np.random.default_rng(seed).integers(2, length + 1, size=n)
    return (np.arange(length)[None, :] < lens[:, None]).astype(np.float32)


def adapted(seed: int = 0, dropout: float = 0.0) -> nn.Module:
    model = tiny_model(seed=0)
    mx.random.seed(seed)
    adapters.inject(model, LoraConfig(rank=4, alpha=8, dropout=dropout))
    # Non-zero B so gradients reach A too (B starts at zero).
    for _, w in adapters.wrappers(model):
        a = w.adapters["default"]
        a.lora_b = mx.random.normal(a.lora_b.shape) * 0.05
    mx.eval(model.parameters())
    return model


def weights(model) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}


def run(model, batches, iters, **kw):
    opt = kw.pop("optimizer", None) or mx_sgd(kw.pop("lr", 0.1))
    callbacks = kw.pop("callbacks", [])
    settings = trainer.LoopSettings(iters=iters, eval_at_start=False, **kw)
    return trainer.train(model, opt, iter(batches), masked_ce, settings, callbacks)


def mx_sgd(lr):
    import mlx.optimizers as optim

    return optim.SGD(learning_rate=lr)


# ---------------------------------------------------------------------------


def test_schedules_warmup_then_decay():
    peak, total, warm = 1e-3, 20, 5
    cos = build_schedule("cosine", peak, total, warm)
    lin = build_schedule("linear", peak, total, warm)
    const = build_schedule("constant", peak, total, warm)
    for sched in (cos, lin, const):
        ramp = [float(sched(mx.array(s))) for s in range(warm + 1)]
        assert ramp[0] > 0 and all(b > a for a, b in zip(ramp, ramp[1:])), ramp
        assert ramp[warm] == pytest.approx(peak)
    assert float(cos(mx.array(warm + 7))) == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * 7 / 15)), rel=1e-5)
    assert float(lin(mx.array(warm + 6))) == pytest.approx(peak * (1 - 6 / 15), rel=1e-5)
    assert float(const(mx.array(total))) == pytest.approx(peak)
    assert build_schedule("constant", peak, total, 0) == peak
    with pytest.raises(Exception, match="lr_schedule"):
        build_schedule("exp", peak, total, 0)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_trains(name):
    model = adapted()
    before = weights(model)
    cfg = TrainConfig(iters=3, optimizer=name, learning_rate=1e-2, warmup_steps=1)
    opt = build_optimizer(cfg, 3)
    data = [make_batch(rows(2, seed=s)) for s in range(3)]
    state = trainer.train(model, opt, iter(data), masked_ce, trainer.LoopSettings(iters=3, eval_at_start=False))
    assert state.step == 3 and math.isfinite(state.last_loss)
    after = weights(model)
    assert any(not np.allclose(before[k], after[k]) for k in before)
    assert int(opt.state["step"]) == 3


def test_accumulation_equals_bigger_batch():
    """Two micro-batches of 2 rows accumulated == one batch of 4 rows (token-weighted)."""
    tok, mask = rows(4), ragged_mask(4)
    big = [make_batch(tok, mask)]
    micro = [make_batch(tok[:2], mask[:2]), make_batch(tok[2:], mask[2:])]
    m1, m2 = adapted(), adapted()
    run(m1, big, 1, grad_accumulation=1)
    run(m2, micro, 1, grad_accumulation=2)
    w1, w2 = weights(m1), weights(m2)
    assert any(not np.allclose(w1[k], weights(adapted())[k]) for k in w1)  # it did move
    for k in w1:
        np.testing.assert_allclose(w1[k], w2[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_clipping_bounds_the_update_by_the_global_norm():
    data = [make_batch(rows(2))]
    base = weights(adapted())
    m_free, m_clip = adapted(), adapted()
    run(m_free, data, 1, lr=1.0, grad_clip=None)
    run(m_clip, data, 1, lr=1.0, grad_clip=1e-3)

    def step_norm(m):
        return math.sqrt(sum(float(((weights(m)[k] - base[k]) ** 2).sum()) for k in base))

    assert step_norm(m_free) > 1e-2  # the raw gradient is far above the clip
    assert step_norm(m_clip) == pytest.approx(1e-3, rel=1e-3)  # SGD, lr 1: |update| = clip


def test_nan_step_is_skipped_then_training_goes_on():
    good = [make_batch(rows(2, seed=s)) for s in range(3)]
    empty = make_batch(rows(2, seed=9), np.zeros((2, 16)))  # 0/0: a real NaN loss
    model = adapted()
    bad_rows = []

    class Watch:
        def on_bad_step(self, row):
            bad_rows.append(row)

    snapshots = []

    class Snap:
        def on_step_end(self, state):
            snapshots.append(weights(model))

    state = run(model, [good[0], empty, good[1]], 3, callbacks=[Watch(), Snap()], max_bad_steps=2)
    assert state.step == 3 and [r["step"] for r in bad_rows] == [2]
    assert math.isnan(bad_rows[0]["loss"])
    for k in snapshots[0]:  # step 2 left the weights as step 1 made them
        np.testing.assert_array_equal(snapshots[0][k], snapshots[1][k])
    assert any(not np.array_equal(snapshots[1][k], snapshots[2][k]) for k in snapshots[1])
    assert all(np.isfinite(v).all() for v in snapshots[2].values())


def test_nan_steps_in_a_row_stop_the_run():
    empty = make_batch(rows(2), np.zeros((2, 16)))
    with pytest.raises(trainer.TrainingStopped, match=r"step 4: 3 steps in a row .*max_bad_steps=3"):
        run(adapted(), [make_batch(rows(2))] + [empty] * 5, 6, max_bad_steps=3)


def test_a_finite_stream_ends_the_run_cleanly():
    state = run(adapted(), [make_batch(rows(2, seed=s)) for s in range(2)], 5)
    assert state.step == 2 and not state.interrupted


def test_metrics_rows_and_eval(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    data = [make_batch(rows(2, seed=s)) for s in range(6)]
    val = [make_batch(rows(2, seed=100))]
    settings = trainer.LoopSettings(iters=6, steps_per_report=2, steps_per_eval=3)
    trainer.train(adapted(), mx_sgd(0.05), iter(data), masked_ce, settings, [log], val_batches=lambda: iter(val))
    got = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in got if "loss" in r]
    eval_rows = [r for r in got if "val_loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4, 6]
    assert [r["step"] for r in eval_rows] == [0, 3, 6]
    for r in train_rows:
        assert {"step", "loss", "learning_rate", "tokens_per_sec", "peak_memory_gb"} <= set(r)
        assert r["loss"] > 0 and r["tokens_per_sec"] > 0 and r["peak_memory_gb"] > 0 and r["learning_rate"] == 0.05
    assert train_rows[-1]["trained_tokens"] == 6 * 32
    assert eval_rows[-1]["val_loss"] < eval_rows[0]["val_loss"] + 1.0
    log.truncate_after(3)
    assert max(r["step"] for r in log.rows()) == 3


def test_grad_checkpoint_gives_the_same_training():
    data = [make_batch(rows(2, seed=s)) for s in range(3)]
    plain, ckpt = adapted(), adapted()
    assert grad_checkpoint(ckpt) == 2
    a = run(plain, data, 3)
    b = run(ckpt, data, 3)
    assert a.last_loss == pytest.approx(b.last_loss, rel=1e-5)
    wa, wb = weights(plain), weights(ckpt)
    for k in wa:
        np.testing.assert_allclose(wa[k], wb[k], rtol=1e-4, atol=1e-6)
    assert type(tiny_model().layers[0]).__call__ is not type(ckpt.layers[0]).__call__  # other models untouched


def test_grad_checkpoint_with_dropout_recomputes_the_same_masks(monkeypatch):
    """Checkpointed gradients with dropout == plain autodiff of the same masked forward pass."""
    batch = make_batch(rows(2))

    def grads(recompute):
        monkeypatch.setattr(recompute_blocks, "RECOMPUTE", recompute)
        model = adapted(dropout=0.5)
        grad_checkpoint(model)
        mx.random.seed(5)
        (loss, _), g = nn.value_and_grad(model, masked_ce)(model, batch)
        return loss.item(), {k: np.array(v) for k, v in tree_flatten(g)}

    loss_a, ga = grads(mx.checkpoint)
    loss_b, gb = grads(lambda f: f)
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    for k in ga:
        np.testing.assert_allclose(ga[k], gb[k], rtol=1e-4, atol=1e-6, err_msg=k)
    assert any(np.abs(v).max() > 0 for v in ga.values())


def test_eval_loss_equals_the_training_loss_and_follows_the_weights():
    from mlx_tune.data.batching import Batch
    from mlx_tune.training.losses import batch_loss, eval_loss

    model = adapted()
    t = mx.array(rows(2, 33))
    seg = mx.array([[0] * 10 + [1] * 22, [0] * 30 + [-1] * 2])
    pos = mx.array([list(range(10)) + list(range(22)), list(range(32))])
    mask = mx.array(ragged_mask(2, 32))
    b = Batch(t[:, :-1], t[:, 1:], mask, seg, pos)
    want, n = batch_loss(model, b)
    got, m = eval_loss(model, b)
    assert got.item() == pytest.approx(want.item(), rel=1e-5) and n.item() == m.item()
    before, _ = trainer.evaluate(model, [b], eval_loss)
    assert before == pytest.approx(want.item(), rel=1e-5)
    for _, w in adapters.wrappers(model):  # the compiled evaluation must see new weights
        w.adapters["default"].lora_b = w.adapters["default"].lora_b * 3
    after, _ = trainer.evaluate(model, [b], eval_loss)
    assert after == pytest.approx(batch_loss(model, b)[0].item(), rel=1e-5) and after != pytest.approx(before)


def test_memory_limit_stops_with_a_clear_message():
    with pytest.raises(trainer.TrainingStopped, match="memory_limit_gb"):
        run(adapted(), [make_batch(rows(2))] * 2, 2, memory_limit_gb=1e-6)
    mx.set_memory_limit(1 << 50)  # leave the process unlimited for other tests


# ---------------------------------------------------------------------------
# Real subprocesses: two ranks over mx.distributed, and ./train_by_mlx.sh end to end
# ---------------------------------------------------------------------------

import os  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from train_workspace import ROOT, env, losses, start_train, workspace  # noqa: E402

from tests.needs import missing

# Backend-sensitive: `make test-accelerator` runs this file on the Metal/CUDA code path too.
pytestmark = pytest.mark.accelerator


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_equal_one_process_with_the_same_global_batch(tmp_path, tiny_folder):
    """mlx.launch, ring backend over TCP on 127.0.0.1: 2 ranks x 2 rows == 1 process x (2 micro-batches of 2 rows)."""
    launcher = Path(sys.executable).parent / "mlx.launch"
    if not launcher.exists():
        missing(f"no mlx.launch next to {sys.executable}")
    common = {"iters": 4, "lr_schedule": "constant", "learning_rate": 5e-3}
    two = workspace(tmp_path, tiny_folder, "two", batch_size=4, **common)
    one = workspace(tmp_path, tiny_folder, "one", batch_size=2, grad_accumulation=2, **common)
    for cfg in (two, one):  # dropout masks are drawn per rank; the maths is compared without them
        cfg.write_text(cfg.read_text().replace("dropout: 0.1", "dropout: 0.0"))
    single = start_train(one)
    dist = subprocess.run(
        [str(launcher), "--backend", "ring", "-n", "2", "--hosts", "127.0.0.1", "--starting-port", str(_free_port()),
         sys.executable, "-m", "mlx_tune", "train", str(two)],
        env=env(), cwd=ROOT, capture_output=True, text=True, timeout=180,
    )
    out, err = single.communicate(timeout=180)
    assert single.returncode == 0, err[-2000:]
    assert dist.returncode == 0, (dist.stdout + dist.stderr)[-3000:]
    assert "2 rank(s)" in dist.stdout
    a = mx.load(str(tmp_path / "two" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "one" / "adapters.safetensors"))
    assert a.keys() == b.keys()
    # The adapters moved away from their init (B starts at zero).
    assert any(float(mx.abs(v).max()) > 0 for k, v in a.items() if k.endswith("lora_b"))
    for k in a:
        # atol 1e-5: the single process splits each micro-batch over its row lanes (1 + 1 rows)
        # where each rank computes its 2 rows together: the same sums, grouped differently
        np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), rtol=1e-5, atol=1e-5, err_msg=k)
    la, lb = losses(tmp_path / "two" / "metrics.jsonl"), losses(tmp_path / "one" / "metrics.jsonl")
    assert sorted(la) == sorted(lb) == [1, 2, 3, 4]
    for s in la:
        assert la[s] == pytest.approx(lb[s], rel=1e-5)


def test_train_by_mlx_sh_end_to_end(tmp_path, tiny_folder):
    cfg = workspace(tmp_path, tiny_folder, "e2e", iters=12, steps_per_report=4, steps_per_eval=6, save_every=6, test=True)
    script = ROOT / "train_by_mlx.sh"
    e = env()
    py = ROOT / ".venv" / "bin" / "python"
    if not py.exists():  # scripts/python falls back to python3; point it at this interpreter instead
        e["PATH"] = str(Path(sys.executable).parent) + os.pathsep + e.get("PATH", "")
    res = subprocess.run([str(script), str(cfg), "train.iters=12"], env=e, cwd=tmp_path, capture_output=True,
                         text=True, timeout=180)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    from mlx_tune.runtime import backend, scheduling

    if scheduling.cpu_only_mlx() and backend.row_lanes(2, assume_wide=True) > 1:  # as mlx-tune train decides
        assert "rows over 2 CPU streams (row lanes)" in res.stdout, res.stdout[-2000:]
    out = tmp_path / "e2e"
    for name in ("adapters.safetensors", "adapter_config.json", "metrics.jsonl"):
        assert (out / name).is_file(), name
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step_000006", "step_000012"]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [4, 8, 12]
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(vals) == 3 and vals[-1] < vals[0]  # steps 0, 6, 12: validation loss falls
    assert any("test_loss" in r and "test_perplexity" in r for r in rows)
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["rank"] == 4 and conf["base_model"] == str(tiny_folder)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "loss.png skipped" in res.stdout
    else:
        assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A bad key is reported before any model loads, as one line, exit 2.
    bad = subprocess.run([str(script), str(cfg), "train.iterz=3"], env=e, cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "train.iterz" in bad.stderr and "train.iters" in bad.stderr
    assert "Traceback" not in bad.stderr and "model:" not in bad.stdout
