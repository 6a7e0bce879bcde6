"""LoRA / DoRA layers over nn.Linear and nn.QuantizedLinear: identity at init, scale,
dropout, fuse, enable/disable, gradients, several named adapters, bad input."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_tune.adapters.lora import DoRALinear, LoRALinear, lora_scale
from mlx_tune.model import quant

# Backend-sensitive: `make test-accelerator` runs this file on the Metal/CUDA code path too.
pytestmark = pytest.mark.accelerator

IN, OUT = 64, 48


def make_base(kind: str, bias: bool = False, seed: int = 0) -> nn.Module:
    mx.random.seed(seed)
    linear = nn.Linear(IN, OUT, bias=bias)
    if kind == "quantized":
        return nn.QuantizedLinear.from_linear(linear, group_size=32, bits=4)
    return linear


def randomize_b(layer: LoRALinear, seed: int = 1) -> None:
    """Give the adapter a non-zero B so it changes the output."""
    mx.random.seed(seed)
    for adapter in layer.adapters.values():
        adapter.lora_b = mx.random.normal(adapter.lora_b.shape) * 0.1


def x_batch(seed: int = 2) -> mx.array:
    mx.random.seed(seed)
    return mx.random.normal((3, 5, IN))


KINDS = ["linear", "quantized"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cls", [LoRALinear, DoRALinear])
def test_fresh_adapter_is_identity(kind, cls):
    base = make_base(kind, bias=True)
    x = x_batch()
    ref = base(x)
    layer = cls.from_base(base, rank=4, alpha=8.0)
    assert layer.base is base
    np.testing.assert_allclose(np.array(layer(x)), np.array(ref), atol=1e-5)


def test_init_shapes_and_bounds():
    layer = LoRALinear.from_base(make_base("quantized"), rank=8, alpha=16.0)
    a = layer.adapters["default"]
    assert a.lora_a.shape == (IN, 8) and a.lora_b.shape == (8, OUT)
    assert float(mx.abs(a.lora_a).max()) <= 1 / math.sqrt(IN) + 1e-7
    assert float(mx.abs(a.lora_a).max()) > 0.5 / math.sqrt(IN)  # really uniform, not zeros
    assert float(mx.abs(a.lora_b).max()) == 0.0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rslora", [False, True])
def test_forward_matches_formula(kind, rslora):
    base = make_base(kind, bias=True)
    layer = LoRALinear.from_base(base, rank=4, alpha=8.0, use_rslora=rslora)
    randomize_b(layer)
    a = layer.adapters["default"]
    s = 8.0 / (2.0 if rslora else 4.0)
    assert a.scale == pytest.approx(s) == lora_scale(4, 8.0, rslora)
    x = x_batch()
    want = base(x) + s * (x @ a.lora_a) @ a.lora_b
    np.testing.assert_allclose(np.array(layer(x)), np.array(want), atol=1e-5)


def test_dropout_only_in_training():
    layer = LoRALinear.from_base(make_base("linear"), rank=4, alpha=8.0, dropout=0.5)
    randomize_b(layer)
    x = x_batch()
    layer.train()
    y1, y2 = layer(x), layer(x)
    assert not np.allclose(np.array(y1), np.array(y2))  # a fresh mask each call
    layer.eval()
    y3, y4 = layer(x), layer(x)
    np.testing.assert_array_equal(np.array(y3), np.array(y4))
    a = layer.adapters["default"]
    want = layer.base(x) + a.scale * (x @ a.lora_a) @ a.lora_b
    np.testing.assert_allclose(np.array(y3), np.array(want), atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cls", [LoRALinear, DoRALinear])
@pytest.mark.parametrize("bias", [False, True])
def test_fuse_dense_and_requantized(kind, cls, bias):
    layer = cls.from_base(make_base(kind, bias=bias), rank=4, alpha=8.0)
    randomize_b(layer)
    if cls is DoRALinear:  # a magnitude away from the base norms, so DoRA really rescales
        layer.adapters["default"].m = layer.adapters["default"].m * mx.linspace(0.5, 1.5, OUT)
    layer.eval()
    x = x_batch()
    y = np.array(layer(x))
    dense = layer.fuse(dequantize=True)
    assert type(dense) is nn.Linear
    np.testing.assert_allclose(np.array(dense(x)), y, atol=1e-4)
    same = layer.fuse()
    assert type(same) is type(layer.base)
    if kind == "quantized":
        assert same.bits == layer.base.bits and same.group_size == layer.base.group_size
        # re-quantizing adds at most the 4-bit rounding of the merged weight
        err = np.abs(np.array(same(x)) - y).max()
        assert err < 0.25 * np.abs(y).max(), err
        np.testing.assert_allclose(
            np.array(quant.dense_weight(same)), np.array(quant.dense_weight(dense)), atol=0.1
        )
    else:
        np.testing.assert_allclose(np.array(same(x)), y, atol=1e-4)


def test_enable_disable_and_no_active():
    base = make_base("quantized")
    layer = LoRALinear.from_base(base, rank=4, alpha=8.0)
    randomize_b(layer)
    x = x_batch()
    adapted = np.array(layer(x))
    assert not np.allclose(adapted, np.array(base(x)), atol=1e-4)
    layer.enabled = False
    np.testing.assert_array_equal(np.array(layer(x)), np.array(base(x)))
    assert layer.fuse() is base  # nothing to merge: the base itself
    layer.enabled = True
    np.testing.assert_array_equal(np.array(layer(x)), adapted)
    layer.set_active(None)
    np.testing.assert_array_equal(np.array(layer(x)), np.array(base(x)))


@pytest.mark.parametrize("kind", KINDS)
def test_dora_forward_formula(kind):
    base = make_base(kind, bias=True)
    layer = DoRALinear.from_base(base, rank=4, alpha=8.0)
    randomize_b(layer)
    a = layer.adapters["default"]
    w0 = quant.dense_weight(base)
    np.testing.assert_allclose(np.array(a.m), np.linalg.norm(np.array(w0), axis=1), rtol=1e-5)
    a.m = a.m * 1.3
    x = x_batch()
    w = w0 + a.scale * a.lora_b.T @ a.lora_a.T
    want = x @ (a.m[:, None] * w / mx.linalg.norm(w, axis=1)[:, None]).T + base.bias
    np.testing.assert_allclose(np.array(layer(x)), np.array(want), atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cls", [LoRALinear, DoRALinear])
def test_gradients_only_on_adapter(kind, cls):
    model = nn.Sequential(cls.from_base(make_base(kind, bias=True), rank=4, alpha=8.0))
    names = sorted(k for k, _ in tree_flatten(model.trainable_parameters()))
    want = ["layers.0.adapters.default.lora_a", "layers.0.adapters.default.lora_b"]
    if cls is DoRALinear:
        want.append("layers.0.adapters.default.m")
    assert names == sorted(want)
    x = x_batch()

    def loss(m):
        return (m(x) ** 2).mean()

    _, grads = nn.value_and_grad(model, loss)(model)
    flat = dict(tree_flatten(grads))
    assert sorted(flat) == sorted(want)
    # B starts at zero, so dL/dA is zero and dL/dB carries the signal
    assert float(mx.abs(flat["layers.0.adapters.default.lora_b"]).max()) > 0


def test_gradient_matches_finite_difference():
    layer = LoRALinear.from_base(make_base("linear"), rank=2, alpha=4.0)
    randomize_b(layer)
    x = x_batch()

    def loss_of(b):
        layer.adapters["default"].lora_b = b
        return (layer(x) ** 2).sum()

    b0 = layer.adapters["default"].lora_b
    g = mx.grad(loss_of)(b0)
    eps = 1e-2
    e = mx.zeros(b0.shape).at[0, 3].add(eps)
    fd = (loss_of(b0 + e) - loss_of(b0 - e)) / (2 * eps)
    assert float(g[0, 3]) == pytest.approx(float(fd), rel=2e-2)


def test_named_adapters_switch_without_touching_base():
    base = make_base("quantized")
    weight_before = base.weight
    layer = LoRALinear.from_base(base, rank=4, alpha=8.0, name="a")
    layer.add_adapter("b", 2, 4.0)
    randomize_b(layer)
    x = x_batch()
    layer.set_active("a")
    ya = np.array(layer(x))
    layer.set_active("b")
    yb = np.array(layer(x))
    assert not np.allclose(ya, yb)
    trainable = sorted(k for k, _ in tree_flatten(layer.trainable_parameters()))
    assert trainable == ["adapters.b.lora_a", "adapters.b.lora_b"]
    layer.set_active("a")
    np.testing.assert_array_equal(np.array(layer(x)), ya)
    layer.remove_adapter("a")
    assert layer.active is None and list(layer.adapters) == ["b"]
    assert layer.base is base and base.weight is weight_before


def test_compiled_step_sees_adapter():
    layer = LoRALinear.from_base(make_base("linear"), rank=4, alpha=8.0)
    randomize_b(layer)
    x = x_batch()
    state = [layer.state]
    step = mx.compile(lambda x: layer(x), inputs=state, outputs=state)
    np.testing.assert_allclose(np.array(step(x)), np.array(layer(x)), atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"rank": 0}, "rank 0 must be a positive integer"),
        ({"rank": -2}, "rank -2"),
        ({"alpha": 0.0}, "alpha 0.0 must be"),
        ({"alpha": -1.0}, "alpha -1.0"),
        ({"dropout": 1.0}, "dropout 1.0 must be in [0, 1)"),
        ({"dropout": -0.1}, "dropout -0.1"),
    ],
)
def test_bad_hyperparameters(kwargs, fragment):
    args = {"rank": 4, "alpha": 8.0, "dropout": 0.0} | kwargs
    with pytest.raises(ValueError) as err:
        LoRALinear.from_base(make_base("linear"), **args)
    assert fragment in str(err.value)


def test_not_a_linear():
    with pytest.raises(TypeError, match="Embedding is not a linear layer"):
        LoRALinear.from_base(nn.Embedding(10, 4), rank=2, alpha=4.0)


def test_protocol_layer_is_wrapped_and_fused():
    """Any layer with dense_weight()/requantize_like() (e.g. NF4) works as a base."""

    class Scaled(nn.Module):  # a stand-in storage format: weight kept as w/2, doubled on use
        def __init__(self, w):
            super().__init__()
            self.half = w / 2

        def dense_weight(self):
            return self.half * 2

        def requantize_like(self, weight, bias=None):
            return Scaled(weight)

        def __call__(self, x):
            return x @ self.dense_weight().T

    mx.random.seed(3)
    base = Scaled(mx.random.normal((OUT, IN)) * 0.1)
    layer = LoRALinear.from_base(base, rank=4, alpha=8.0)
    randomize_b(layer)
    x = x_batch()
    y = np.array(layer(x))
    fused = layer.fuse()
    assert isinstance(fused, Scaled)
    np.testing.assert_allclose(np.array(fused(x)), y, atol=1e-4)
