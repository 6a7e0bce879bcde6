"""Every tested model family: packed rows train exactly as their examples one by one.

Each family of ``mlx_tune.testing.families`` is built from its real mlx-lm class with a
tiny random config (float32), given LoRA by the project's injection, and run through the
compiled training step (``loop.Step`` over ``losses.batch_loss``): the loss sum, token
count and every LoRA gradient of one packed row must equal those of its examples run
alone. Families whose state runs across tokens must be refused packing (so training
falls back to unpacked rows) and their unpacked batch must equal the examples alone.
"""

from __future__ import annotations

from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from mlx_tune.adapters import inject
from mlx_tune.config import LoraConfig
from mlx_tune.data.batching import collate
from mlx_tune.model import attention
from mlx_tune.model.packing import packing_support
from mlx_tune.testing.families import FAMILIES
from mlx_tune.testing.tiny import tiny_model
from mlx_tune.training.loop import Step, batch_arrays
from mlx_tune.training.losses import batch_loss

# Backend-sensitive: `make test-accelerator` runs this file on the Metal/CUDA code path too.
pytestmark = pytest.mark.accelerator

LENGTHS = [9, 13, 7]  # tokens per example (a row of 26 slots + 3 of padding)


def family_model(model_type: str, seed: int = 0) -> nn.Module:
    """A tiny model of the family with LoRA on every linear layer, adapter weights random (B != 0)."""
    model = tiny_model(model_type, seed=seed, **FAMILIES[model_type].overrides)
    inject(model, LoraConfig(rank=4, alpha=8, dropout=0.0, target_modules="all-linear"))
    mx.random.seed(seed + 1)
    model.update(tree_map(lambda p: 0.05 * mx.random.normal(p.shape, dtype=p.dtype), model.trainable_parameters()))
    mx.eval(model.parameters())
    return model


def examples(seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = [rng.integers(3, 250, size=n).astype(np.int32) for n in LENGTHS]
    train = [np.r_[np.zeros(3), np.ones(n - 3)].astype(np.float32) for n in LENGTHS]  # a 3-token prompt
    return SimpleNamespace(ids=ids, train=train)


def _close(a: mx.array, b: mx.array, rtol: float = 2e-4) -> bool:
    scale = max(float(mx.abs(b).max()), 1e-6)
    return float(mx.abs(a - b).max()) <= rtol * scale


def _compare(model, batch, alone_batches) -> None:
    step = Step(model, optim.Adam(1e-3), batch_loss)
    loss, ntoks, grads = step.accumulate(batch_arrays(batch), None)
    acc = None
    for b in alone_batches:
        acc = step.accumulate(batch_arrays(b), acc)
    mx.eval(loss, ntoks, grads, acc)
    assert ntoks.item() == acc[1].item() == sum(n - 3 for n in LENGTHS)
    assert _close(loss, acc[0]), (loss.item(), acc[0].item())
    flat, ref = dict(tree_flatten(grads)), dict(tree_flatten(acc[2]))
    assert flat.keys() == ref.keys() and len(flat) > 0
    bad = [k for k in flat if not _close(flat[k], ref[k])]
    assert not bad, f"gradients differ: {bad[:4]}"


@pytest.mark.parametrize("model_type", [pytest.param(t, marks=pytest.mark.slow) if f.slow else t
                                        for t, f in FAMILIES.items()])
def test_packed_row_trains_as_its_examples_alone(model_type):
    family = FAMILIES[model_type]
    model = family_model(model_type)
    ds = examples()
    alone = [collate(ds, [[i]], n - 1, packed=False) for i, n in enumerate(LENGTHS)]
    reason = packing_support(model)
    if family.recurrent:
        # refused packing: training falls back to unpacked rows, which must not mix examples either
        assert reason is not None and "state runs across tokens" in reason
        batch = collate(ds, [[0], [1], [2]], max(LENGTHS) - 1, packed=False)
    else:
        assert reason is None, reason
        batch = collate(ds, [[0, 1, 2]], sum(n - 1 for n in LENGTHS) + 3, packed=True)
    _compare(model, batch, alone)


def test_packing_is_exact_with_recompute():
    """Blocks recomputed in the backward pass (train.grad_checkpoint) still see the segment mask."""
    from mlx_tune.training.recompute import grad_checkpoint

    model = family_model("gemma3_text", seed=3)
    grad_checkpoint(model)
    ds = examples(1)
    batch = collate(ds, [[0, 1, 2]], sum(n - 1 for n in LENGTHS) + 3, packed=True)
    _compare(model, batch, [collate(ds, [[i]], n - 1, packed=False) for i, n in enumerate(LENGTHS)])


def test_hooks_leave_plain_calls_and_generation_unchanged():
    model = tiny_model("gemma3_text", seed=2, **FAMILIES["gemma3_text"].overrides)
    x = mx.array([[5, 9, 11, 40, 41, 42, 43, 44]])
    before, cache = model(x), model.make_cache()
    step_before = model(x[:, :6], cache=cache)
    attention.enable_packing(model)
    assert attention.is_enabled(model)
    assert mx.array_equal(model(x), before).item()  # outside hidden_states: the original path
    cache = model.make_cache()
    assert mx.array_equal(model(x[:, :6], cache=cache), step_before).item()  # KV-cache generation
    attention.disable_packing(model)
    assert not attention.is_enabled(model)


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_training_logits_are_the_models_own(model_type):
    """The loss scores the logits the model serves: its head and its logit map (softcap, scale)."""
    model = tiny_model(model_type, seed=4, **FAMILIES[model_type].overrides)
    x = mx.array([[5, 9, 11, 40, 41, 42, 43]])
    assert _close(attention.forward(model, x), model(x), 1e-5)


@pytest.mark.parametrize("model_type", ["gemma2", "granite", "cohere"])
def test_one_pass_loss_and_gradient_with_a_logit_map(model_type):
    from mlx_tune.training.losses import full_loss_reference, loss_fn

    model = family_model(model_type, seed=5)
    b = collate(examples(2), [[0, 1, 2]], sum(n - 1 for n in LENGTHS) + 3, packed=True)

    def ours(m):
        return loss_fn(m, *b.arrays())[0]

    def ref(m):
        return full_loss_reference(m, *b.arrays())[0]

    (l1, g1), (l2, g2) = nn.value_and_grad(model, ours)(model), nn.value_and_grad(model, ref)(model)
    assert _close(l1, l2, 1e-5)
    g1, g2 = dict(tree_flatten(g1)), dict(tree_flatten(g2))
    assert all(_close(g1[k], g2[k]) for k in g2)
