"""Chunked cross-entropy and the packing proof: packed batches train exactly like single examples."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from mlx_tune.adapters import inject
from mlx_tune.config import LoraConfig
from mlx_tune.data.batching import BatchStream
from mlx_tune.data.cache import load_dataset
from mlx_tune.runtime.backend import on_cpu
from mlx_tune.testing.tiny import tiny_model, tiny_tokenizer
from mlx_tune.training import losses as L

# Backend-sensitive: `make test-accelerator` runs this file on the Metal/CUDA code path too.
pytestmark = pytest.mark.accelerator


def _plain_ce_sum(model, h, targets, mask):
    logits = L.lm_head(model)(h).astype(mx.float32)
    ce = mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return (ce * mask).sum()


def _close_trees(a, b, atol=1e-5, rtol=1e-4):
    a, b = dict(tree_flatten(a)), dict(tree_flatten(b))
    assert a.keys() == b.keys() and a
    for k in a:
        assert mx.allclose(a[k], b[k], atol=atol, rtol=rtol).item(), (k, mx.abs(a[k] - b[k]).max().item())


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
@pytest.mark.parametrize("head_trainable", [False, True])
def test_chunked_ce_equals_full_ce_in_value_and_gradient(model_type, head_trainable):
    model = tiny_model(model_type, seed=4)
    model.freeze()
    if head_trainable:  # autodiff per chunk under mx.checkpoint
        L.head_module(model).unfreeze()
    rng = np.random.default_rng(0)
    h = mx.array(rng.normal(size=(3, 23, 64)).astype(np.float32))
    t = mx.array(rng.integers(0, 259, size=(3, 23)).astype(np.int32))
    m = mx.array((rng.random((3, 23)) > 0.4).astype(np.float32))
    assert L.head_is_trainable(model) == head_trainable

    def ours(model, h):
        return L.masked_ce_sum(model, h, t, m, chunk=16)  # 69 tokens: 5 chunks, the last short

    def ref(model, h):
        return _plain_ce_sum(model, h, t, m)

    v1, v2 = ours(model, h), ref(model, h)
    assert abs(v1.item() - v2.item()) <= 1e-5 * abs(v2.item())
    if head_trainable:
        _close_trees(nn.value_and_grad(model, ours)(model, h)[1], nn.value_and_grad(model, ref)(model, h)[1])
    gh1 = mx.grad(lambda h: ours(model, h))(h)
    gh2 = mx.grad(lambda h: ref(model, h))(h)
    assert mx.allclose(gh1, gh2, atol=1e-6, rtol=1e-4).item()
    gh3 = mx.compile(mx.grad(lambda h: ours(model, h)))(h)
    assert mx.allclose(gh3, gh2, atol=1e-6, rtol=1e-4).item()


def test_chunked_ce_on_a_quantized_tied_head():
    model = tiny_model("llama", seed=5)
    nn.quantize(model, group_size=32, bits=4)
    model.freeze()
    rng = np.random.default_rng(1)
    h = mx.array(rng.normal(size=(40, 64)).astype(np.float32))
    t = mx.array(rng.integers(0, 259, size=(40,)).astype(np.int32))
    m = mx.ones((40,))
    v1, g1 = mx.value_and_grad(lambda h: L.masked_ce_sum(model, h, t, m, chunk=16))(h)
    v2, g2 = mx.value_and_grad(lambda h: _plain_ce_sum(model, h, t, m))(h)
    assert abs(v1.item() - v2.item()) <= 1e-5 * abs(v2.item())
    assert mx.allclose(g1, g2, atol=1e-6, rtol=1e-4).item()


@pytest.mark.parametrize("mode", ["tied", "untied", "nf4"])
def test_vocabulary_tiled_ce_on_a_big_quantized_head(monkeypatch, mode):
    """A quantized head too big to keep dense is dequantized a vocabulary tile at a time
    (online softmax): value and gradient equal the plain CE, with a ragged last tile and
    several token passes."""
    from mlx_tune.config import QuantizeConfig
    from mlx_tune.model.quant import prepare_for_backend
    from mlx_tune.model.quantize import quantize_model

    model = tiny_model("llama", seed=6, tie_word_embeddings=(mode == "tied"))
    assert (getattr(model, "lm_head", None) is None) == (mode == "tied")
    if mode == "nf4":
        quantize_model(model, QuantizeConfig(mode="nf4", group_size=32))
    else:
        nn.quantize(model, group_size=32, bits=4)
        prepare_for_backend(model)
    model.freeze()
    monkeypatch.setattr(L, "DENSE_HEAD_BYTES", 0)  # 259 x 64 counts as "big" here
    monkeypatch.setattr(L, "TILED_TOKENS", 16)
    monkeypatch.setattr(L, "HEAD_TILE_BYTES", 256 * 64 * 4)  # 256-row tiles: 259 = 256 + 3
    # The CPU path tiles the dequantized head; the accelerator path runs it as qmm, untiled.
    assert (L._tiled_head(model) is not None) == on_cpu()
    rng = np.random.default_rng(2)
    h = mx.array(rng.normal(size=(37, 64)).astype(np.float32) * 3)
    t = mx.array(rng.integers(0, 259, size=(37,)).astype(np.int32))
    m = mx.array((rng.random(37) > 0.3).astype(np.float32))
    v1, g1 = mx.value_and_grad(lambda h: L.masked_ce_sum(model, h, t, m))(h)
    v2, g2 = mx.value_and_grad(lambda h: _plain_ce_sum(model, h, t, m))(h)
    assert abs(v1.item() - v2.item()) <= 1e-5 * abs(v2.item())
    assert mx.allclose(g1, g2, atol=1e-5, rtol=1e-4).item(), mx.abs(g1 - g2).max().item()
    g3 = mx.compile(mx.grad(lambda h: L.masked_ce_sum(model, h, t, m)))(h)
    assert mx.allclose(g3, g2, atol=1e-5, rtol=1e-4).item()
    v4 = L.masked_ce_value(model, h, t, m)  # validation's forward-only form
    assert abs(v4.item() - v2.item()) <= 1e-5 * abs(v2.item())
    monkeypatch.setattr(L, "DENSE_HEAD_BYTES", 1 << 30)  # the chunked forward-only form too
    assert L._tiled_head(model) is None
    assert abs(L.masked_ce_value(model, h, t, m).item() - v2.item()) <= 1e-5 * abs(v2.item())


@pytest.mark.parametrize("tiled", [False, True])
def test_bf16_model_with_a_quantized_head_trains(monkeypatch, tiled):
    """bf16 hidden states with a float32 dequantized head (MLX-community 4-bit folders):
    the gradient comes back in the hidden states' dtype, through the compiled step too."""
    from mlx_tune.model.quant import prepare_for_backend

    model = tiny_model("llama", seed=7)
    nn.quantize(model, group_size=32, bits=4)
    prepare_for_backend(model)
    model.set_dtype(mx.bfloat16)
    model.freeze()
    if tiled:
        monkeypatch.setattr(L, "DENSE_HEAD_BYTES", 0)
    rng = np.random.default_rng(3)
    h = mx.array(rng.normal(size=(2, 19, 64)).astype(np.float32)).astype(mx.bfloat16)
    t = mx.array(rng.integers(0, 259, size=(2, 19)).astype(np.int32))
    m = mx.ones((2, 19))
    g1 = mx.grad(lambda h: L.masked_ce_sum(model, h, t, m))(h)
    g2 = mx.grad(lambda h: _plain_ce_sum(model, h.astype(mx.float32), t, m))(h)
    assert g1.dtype == mx.bfloat16
    assert mx.allclose(g1.astype(mx.float32), g2.astype(mx.float32), atol=2e-2, rtol=2e-2).item()
    g3 = mx.compile(mx.grad(lambda h: L.masked_ce_sum(model, h, t, m)))(h)
    assert mx.allclose(g3.astype(mx.float32), g1.astype(mx.float32), atol=1e-2).item()


def test_chunked_ce_keeps_memory_bounded():
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = nn.Linear(64, 8192, bias=False)

    model = Head()
    model.freeze()
    N = 2048
    h = mx.random.normal((N, 64))
    t = mx.random.randint(0, 8192, (N,))
    m = mx.ones((N,))
    mx.eval(h, t, m, model.parameters())
    fn = mx.value_and_grad(lambda h: L.masked_ce_sum(model, h, t, m, chunk=64))
    mx.eval(fn(h))
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    mx.eval(fn(h))
    full_logits = N * 8192 * 4
    # measured ~11-13 chunk-sized buffers (2 MB each here) whatever N, not the 64 MB logits
    assert mx.get_peak_memory() - base < 0.5 * full_logits


# ---------------------------------------------------------------------------
# The packing proof
# ---------------------------------------------------------------------------

CHATS = [
    [("user", "hello"), ("assistant", "hi there")],
    [("system", "Be terse."), ("user", "2+2?"), ("assistant", "4"), ("user", "and 3+3?"), ("assistant", "6, of course")],
    [("user", "name a colour"), ("assistant", "teal")],
    [("user", "a longer question about packing rows"), ("assistant", "a longer answer, split nowhere")],
    [("user", "q"), ("assistant", "a")],
    [("user", "why?"), ("assistant", "because examples never see each other")],
]


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("chats")
    path = d / "train.jsonl"
    path.write_text("".join(
        json.dumps({"messages": [{"role": r, "content": c} for r, c in chat]}) + "\n" for chat in CHATS
    ))
    return load_dataset(path, tiny_tokenizer(), max_seq_length=160, cache_dir=d / "cache")


def _lora_model(model_type):
    model = tiny_model(model_type, seed=6)
    inject(model, LoraConfig(rank=4, alpha=8.0))
    # Random B (fresh adapters have B = 0, which would make the A gradients trivially 0).
    mx.random.seed(7)
    model.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.05, model.trainable_parameters()))
    return model


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_packed_batch_equals_examples_one_by_one(model_type, chat_data):
    model = _lora_model(model_type)
    stream = BatchStream(chat_data, 2, 160, packing=True, seed=0)
    rows = stream.batch_rows(0)
    batch = next(stream)
    in_batch = [i for r in rows for i in r]
    assert len(in_batch) >= 4 and any(len(r) > 1 for r in rows)  # rows really hold several examples

    loss_and_grad = nn.value_and_grad(model, L.loss_fn)
    (loss, n), grads = loss_and_grad(model, *batch.arrays())
    assert n.item() == batch.n_trained

    # The same examples alone through the untouched mlx-lm forward and plain cross-entropy:
    # sum of their CE sums over the total trained tokens.
    def one_by_one(model):
        total = 0.0
        for i in in_batch:
            ids, train = chat_data.ids[i], chat_data.train[i]
            x, y = mx.array(ids[None, :-1]), mx.array(ids[None, 1:])
            m = mx.array(train[None, 1:].astype(np.float32))
            logits = model(x).astype(mx.float32)
            ce = mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
            total = total + (ce * m).sum()
        return total / batch.n_trained

    ref_loss, ref_grads = nn.value_and_grad(model, one_by_one)(model)
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    _close_trees(grads, ref_grads, atol=2e-6, rtol=1e-4)

    # compiled, as the trainer runs it
    step = mx.compile(lambda *a: loss_and_grad(model, *a))
    (loss_c, _), grads_c = step(*batch.arrays())
    assert abs(loss_c.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    _close_trees(grads_c, ref_grads, atol=2e-6, rtol=1e-4)


def test_loss_fn_without_packing_matches_reference(chat_data):
    model = _lora_model("llama")
    batch = next(BatchStream(chat_data, 3, 160, packing=False, seed=0))
    (l1, n1), g1 = nn.value_and_grad(model, L.loss_fn)(model, *batch.arrays())
    (l2, n2), g2 = nn.value_and_grad(model, L.full_loss_reference)(model, *batch.arrays())
    assert n1.item() == n2.item() == batch.n_trained
    assert abs(l1.item() - l2.item()) <= 1e-5 * abs(l2.item())
    _close_trees(g1, g2, atol=2e-6, rtol=1e-4)


@pytest.mark.slow
def test_smollm2_packed_loss_and_lora_gradients_equal_the_plain_computation(smollm2_path):
    from mlx_tune.model import quant
    from mlx_tune.model.loading import load_model

    model, _, _ = load_model(smollm2_path)
    quant.prepare_for_backend(model)
    inject(model, LoraConfig(rank=8, alpha=16.0, target_modules=["q_proj", "v_proj"]))
    mx.random.seed(0)
    model.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.02, model.trainable_parameters()))
    rng = np.random.default_rng(0)
    ids = mx.array(rng.integers(3, 49152, size=(1, 97)).astype(np.int32))
    seg = mx.array([[0] * 40 + [1] * 50 + [-1] * 6])
    pos = mx.array([list(range(40)) + list(range(50)) + list(range(6))])
    mask = mx.array([[0.0] * 10 + [1.0] * 30 + [0.0] * 5 + [1.0] * 45 + [0.0] * 6])
    args = (ids[:, :-1], ids[:, 1:], mask, seg, pos)
    (l1, _), g1 = nn.value_and_grad(model, L.loss_fn)(model, *args)  # quantized tied head: the one-pass path
    (l2, _), g2 = nn.value_and_grad(model, L.full_loss_reference)(model, *args)
    assert abs(l1.item() - l2.item()) <= 1e-5 * abs(l2.item())
    _close_trees(g1, g2, atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("packing", [True, False])
def test_head_only_on_trained_positions_changes_nothing(chat_data, packing):
    """The head runs on the gathered trained positions only (chat data: most slots are
    prompt or padding): loss and LoRA gradients equal the ungathered computation."""
    model = _lora_model("llama")
    batch = next(BatchStream(chat_data, 3, 160, packing=packing, seed=0))
    assert batch.gather is not None and batch.gather.size < batch.inputs.size
    assert batch.gather.size >= batch.n_trained
    (l1, n1), g1 = nn.value_and_grad(model, L.batch_loss)(model, batch)
    (l2, n2), g2 = nn.value_and_grad(model, L.loss_fn)(model, *batch.arrays())  # no gather
    assert n1.item() == n2.item() == batch.n_trained
    assert abs(l1.item() - l2.item()) <= 1e-5 * abs(l2.item())
    _close_trees(g1, g2, atol=2e-6, rtol=1e-4)
    assert abs(L.eval_loss(model, batch)[0].item() - l2.item()) <= 1e-5 * abs(l2.item())


@pytest.mark.parametrize("head", ["dense", "trainable", "tiled"])
def test_token_ce_equals_plain_per_token_ce(monkeypatch, head):
    """Per-token CE (what sequence log-probs sum) in value and in its gradient for any
    cotangent, on the fused, trainable and vocabulary-tiled heads, and forward-only."""
    from mlx_tune.model.quant import prepare_for_backend

    model = tiny_model("llama", seed=8)
    if head == "tiled":
        nn.quantize(model, group_size=32, bits=4)
        prepare_for_backend(model)
        monkeypatch.setattr(L, "DENSE_HEAD_BYTES", 0)
        monkeypatch.setattr(L, "TILED_TOKENS", 16)
        monkeypatch.setattr(L, "HEAD_TILE_BYTES", 256 * 64 * 4)
    model.freeze()
    if head == "trainable":
        L.head_module(model).unfreeze()
    rng = np.random.default_rng(3)
    h = mx.array(rng.normal(size=(41, 64)).astype(np.float32))
    t = mx.array(rng.integers(0, 259, size=(41,)).astype(np.int32))
    w = mx.array(rng.normal(size=(41,)).astype(np.float32))  # any cotangent

    def plain(h):
        logits = L.lm_head(model)(h).astype(mx.float32)
        return mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, t[:, None], axis=-1)[:, 0]

    ce, ref = L.token_ce(model, h, t), plain(h)
    assert ce.shape == (41,) and mx.allclose(ce, ref, atol=1e-5, rtol=1e-5).item()
    assert mx.allclose(L.token_ce(model, h, t, with_grad=False), ref, atol=1e-5, rtol=1e-5).item()
    g1 = mx.grad(lambda h: (L.token_ce(model, h, t) * w).sum())(h)
    g2 = mx.grad(lambda h: (plain(h) * w).sum())(h)
    assert mx.allclose(g1, g2, atol=1e-5, rtol=1e-4).item(), mx.abs(g1 - g2).max().item()
