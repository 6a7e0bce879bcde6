"""Affine storage of the frozen base, the backend-aware quantized matmul, and the layer protocol.

Affine storage (MLX's own, ``nn.QuantizedLinear``) of a frozen (out, in) weight ``W``: per
group of ``g`` weights along a row, ``W[i, j] = scale[i, j // g] * q[i, j] + bias[i, j // g]``
with ``q`` in ``0 .. 2**bits - 1``. NF4 storage is ``model.nf4``; whole-model quantization
and storage reports are ``model.quantize``.

Compute, ``y = x W^T``: on Metal/CUDA affine layers use ``mx.quantized_matmul``. On the CPU
backend that kernel runs at ~3 GFLOP/s while OpenBLAS's fp32 sgemm runs at ~340, so
``CPUQuantizedLinear`` dequantizes the layer's weight and uses the dense fp32 matmul; NF4 does
the same everywhere (no fused kernel exists; off the CPU the matmul runs in the activations'
dtype). Both go through a ``mx.custom_function`` (``dequant_matmul``) whose backward
``dx = g W`` dequantizes ``W`` again instead of keeping the fp32 weight alive from the forward,
so peak memory stays that of the 4-bit model plus a layer's dense weight at a time. The base
is frozen: its storage arrays get zero cotangents. ``prepare_for_backend`` switches an
already quantized model (an MLX folder, a GGUF file) to the fast CPU layers.

Protocol shared by every frozen base layer, so LoRA and fuse never switch on classes:
``dense_weight(layer) -> (out, in) float32`` and ``requantize_like(layer, weight, bias)``
returning a layer of the same kind (same bits / group size) holding ``weight``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from mlx_tune.errors import UserError
from mlx_tune.runtime.backend import on_cpu

AFFINE_GROUP_SIZES = (32, 64, 128)
AFFINE_BITS = (2, 3, 4, 5, 6, 8)
DECODE_ROWS = 4  # inputs with at most this many rows use mx.quantized_matmul on the CPU too

# ---------------------------------------------------------------------------
# Affine storage
# ---------------------------------------------------------------------------


def check_affine(group_size: int, bits: int, where: str = "quantize") -> None:
    if group_size not in AFFINE_GROUP_SIZES:
        raise UserError(f"{where}: group_size {group_size} is not supported by MLX; use 32, 64 or 128")
    if bits not in AFFINE_BITS:
        raise UserError(f"{where}: bits {bits} is not supported by MLX affine quantization; use 2, 3, 4, 5, 6 or 8")


# Constants built from host lists (already materialised), never inside a traced function:
# an array first created during mx.compile would be a tracer, unusable once cached.
_SHIFTS = {bits: mx.array(list(range(0, 32, bits)), dtype=mx.uint32) for bits in (2, 4, 8)}


def affine_dequantize(weight: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int) -> mx.array:
    """``scales * q + biases`` as float32 (out, in).

    For 2/4/8 bits this unpacks with shifts in fp32, about 2x faster than ``mx.dequantize``
    on the CPU backend and exactly equal; other widths use ``mx.dequantize``.
    """
    if bits not in (2, 4, 8):
        return mx.dequantize(weight, scales, biases, group_size=group_size, bits=bits).astype(mx.float32)
    rows = weight.shape[0]
    q = (weight[..., None] >> _SHIFTS[bits]) & ((1 << bits) - 1)
    q = q.reshape(rows, -1, group_size).astype(mx.float32)
    w = q * scales.astype(mx.float32)[..., None] + biases.astype(mx.float32)[..., None]
    return w.reshape(rows, -1)


# ---------------------------------------------------------------------------
# Dequantize + dense matmul with a re-dequantizing backward
# ---------------------------------------------------------------------------


@functools.cache
def dequant_matmul(dequant: Callable[..., mx.array], *static) -> Callable:
    """``f(x, *storage) = x @ W^T`` with ``W = dequant(*storage, *static)`` in fp32.

    ``dequant`` is a storage format's dequantize function (``affine_dequantize``,
    ``nf4.nf4_dequantize``, ...); one ``f`` is built per (function, static parameters).

    The vjp recomputes ``W`` for ``dx = g @ W`` (so the fp32 weight never outlives a
    matmul) and returns zero cotangents for the frozen storage arrays.

    Each dequantization is tied with ``mx.depends`` to the array its matmul consumes
    (``x`` forward, the cotangent backward). The storage arrays are graph inputs, so
    otherwise the scheduler may dequantize many layers ahead of their matmuls, and
    ``mx.compile`` can merge the forward and backward dequantizations into one node that
    stays alive across the whole step: both would hold every layer's fp32 weight at once.
    """

    def compute_dtype(x):
        # fp32 sgemm on the CPU (fast there, and exact); the activations' dtype on GPUs.
        return mx.float32 if on_cpu() else x.dtype

    @mx.custom_function
    def f(x, *storage):
        dt = compute_dtype(x)
        w = dequant(*mx.depends(list(storage), [x]), *static).astype(dt)
        return (x.astype(dt) @ w.T).astype(x.dtype)

    @f.vjp
    def f_vjp(primals, cotangent, output):
        x, *storage = primals
        dt = compute_dtype(x)
        w = dequant(*mx.depends(storage, [cotangent]), *static).astype(dt)
        dx = (cotangent.astype(dt) @ w).astype(x.dtype)
        return (dx, *(mx.zeros_like(a) for a in storage))

    return f


# ---------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------


def set_arrays(module: nn.Module, arrays: dict) -> None:
    """Set a layer's storage arrays by key (``module[key] = value``)."""
    for key, value in arrays.items():
        module[key] = value


class CPUQuantizedLinear(nn.QuantizedLinear):
    """``nn.QuantizedLinear`` (same arrays and keys) whose CPU matmul is dequantize + fp32 sgemm.

    ``y = x dequantize(W)^T + b``. On the CPU backend it goes through ``dequant_matmul``; on
    Metal/CUDA it is ``mx.quantized_matmul``, exactly as ``nn.QuantizedLinear``.
    """

    @classmethod
    def from_quantized(cls, layer: nn.QuantizedLinear) -> CPUQuantizedLinear:
        """Wrap an existing layer's arrays (no copy)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.group_size, new.bits, new.mode = layer.group_size, layer.bits, layer.mode
        set_arrays(new, dict(layer.items()))  # weight, scales, biases, bias: shared arrays
        new.freeze()
        return new

    def __call__(self, x):
        # Decoding (a few rows) reads each weight once: there the quantized kernel beats
        # dequantizing the whole matrix (576x1536, 4-bit: 3.7 ms vs 14 ms for one row).
        if not on_cpu() or self.mode != "affine" or x.size <= DECODE_ROWS * x.shape[-1]:
            return super().__call__(x)
        y = dequant_matmul(affine_dequantize, self.group_size, self.bits)(x, self["weight"], self["scales"], self["biases"])
        return y + self["bias"] if "bias" in self else y

    def dense_weight(self) -> mx.array:
        if self.mode != "affine":
            return mx.dequantize(self["weight"], self["scales"], self.get("biases"), group_size=self.group_size,
                                 bits=self.bits, mode=self.mode).astype(mx.float32)
        return affine_dequantize(self["weight"], self["scales"], self["biases"], self.group_size, self.bits)

    def requantize_like(self, weight: mx.array, bias: mx.array | None = None) -> CPUQuantizedLinear:
        out_dims, in_dims = weight.shape
        plain = nn.QuantizedLinear(in_dims, out_dims, bias=False, group_size=self.group_size, bits=self.bits,
                                   mode=self.mode)
        plain.weight, plain.scales, *rest = mx.quantize(weight, group_size=self.group_size, bits=self.bits,
                                                         mode=self.mode)
        plain.biases = rest[0] if rest else None
        if bias is not None:
            plain.bias = bias
        return CPUQuantizedLinear.from_quantized(plain)


class CPUQuantizedEmbedding(nn.QuantizedEmbedding):
    """``nn.QuantizedEmbedding`` whose ``as_linear`` (a tied LM head) uses the CPU fast path."""

    @classmethod
    def from_quantized(cls, layer: nn.QuantizedEmbedding) -> CPUQuantizedEmbedding:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.group_size, new.bits, new.mode = layer.group_size, layer.bits, layer.mode
        new.num_embeddings, new.dims = layer.num_embeddings, layer.dims
        set_arrays(new, dict(layer.items()))
        new.freeze()
        return new

    def as_linear(self, x):
        if not on_cpu() or self.mode != "affine" or x.size <= DECODE_ROWS * x.shape[-1]:
            return super().as_linear(x)
        return dequant_matmul(affine_dequantize, self.group_size, self.bits)(x, self["weight"], self["scales"], self["biases"])


# ---------------------------------------------------------------------------
# The dense_weight / requantize_like protocol
# ---------------------------------------------------------------------------


def is_switch_linear(layer) -> bool:
    """An MoE expert stack: mlx-lm's ``SwitchLinear`` / ``QuantizedSwitchLinear``, weight (experts, out, in).

    Recognised by shape, not class, so this module does not import mlx-lm (and transformers).
    """
    if not isinstance(layer, nn.Module) or not isinstance(getattr(layer, "num_experts", None), int):
        return False
    weight = layer.get("weight")
    return isinstance(weight, mx.array) and weight.ndim == 3


def switch_dims(layer: nn.Module) -> tuple[int, int, int]:
    """(experts, out, in) of an expert stack, without computing anything."""
    experts, out_dims, stored_in = layer["weight"].shape
    return experts, out_dims, (stored_in * 32 // layer.bits if "scales" in layer else stored_in)


def _switch_dense(layer: nn.Module) -> mx.array:
    if "scales" not in layer:
        return layer["weight"].astype(mx.float32)
    return mx.dequantize(layer["weight"], layer["scales"], layer.get("biases"), group_size=layer.group_size,
                         bits=layer.bits, mode=layer.mode).astype(mx.float32)


def _switch_like(layer: nn.Module, weight: mx.array, bias: mx.array | None) -> nn.Module:
    from mlx_lm.models.switch_layers import SwitchLinear

    experts, out_dims, in_dims = weight.shape
    new = SwitchLinear(in_dims, out_dims, experts, bias=False)
    new.weight = weight.astype(layer["scales"].dtype if "scales" in layer else layer["weight"].dtype)
    if "scales" in layer:
        new = new.to_quantized(group_size=layer.group_size, bits=layer.bits, mode=layer.mode)
    if bias is not None:
        new.bias = bias
    return new


def dense_weight(layer: nn.Module) -> mx.array:
    """The layer's weight as a dense float32 (out, in) matrix ((experts, out, in) for an expert stack)."""
    if hasattr(layer, "dense_weight"):
        return layer.dense_weight()
    if is_switch_linear(layer):
        return _switch_dense(layer)
    if isinstance(layer, nn.QuantizedLinear):
        return mx.dequantize(
            layer.weight, layer.scales, layer.get("biases"), group_size=layer.group_size, bits=layer.bits
        ).astype(mx.float32)
    if isinstance(layer, nn.Linear):
        return layer.weight.astype(mx.float32)
    raise TypeError(f"{type(layer).__name__} is not a linear layer mlx_tune can adapt")


def requantize_like(layer: nn.Module, weight: mx.array, bias: mx.array | None = None) -> nn.Module:
    """A new layer of ``layer``'s kind (same storage format) holding ``weight`` (out, in)."""
    if hasattr(layer, "requantize_like"):
        return layer.requantize_like(weight, bias)
    if is_switch_linear(layer):
        return _switch_like(layer, weight, bias)
    out_dims, in_dims = weight.shape
    if isinstance(layer, nn.QuantizedLinear):
        new = nn.QuantizedLinear(in_dims, out_dims, bias=bias is not None, group_size=layer.group_size, bits=layer.bits)
        new.weight, new.scales, *rest = mx.quantize(weight, group_size=layer.group_size, bits=layer.bits)
        if rest:
            new.biases = rest[0]
    elif isinstance(layer, nn.Linear):
        new = nn.Linear(in_dims, out_dims, bias=bias is not None)
        new.weight = weight.astype(layer.weight.dtype)
    else:
        raise TypeError(f"{type(layer).__name__} is not a linear layer mlx_tune can adapt")
    if bias is not None:
        new.bias = bias
    return new


# ---------------------------------------------------------------------------
# The CPU fast path for an already quantized model
# ---------------------------------------------------------------------------


def prepare_for_backend(model: nn.Module) -> int:
    """On the CPU backend, swap ``nn.QuantizedLinear`` / ``nn.QuantizedEmbedding`` for the
    dequantize + sgemm subclasses (sharing the same arrays); elsewhere do nothing.

    Returns the number of layers swapped. Keys and arrays are unchanged, so saving,
    fusing and mlx-lm's own code see ordinary quantized layers.
    """
    if not on_cpu():
        return 0
    swaps = {nn.QuantizedLinear: CPUQuantizedLinear, nn.QuantizedEmbedding: CPUQuantizedEmbedding}
    new = [(path, swaps[type(m)].from_quantized(m)) for path, m in model.named_modules() if type(m) in swaps]
    if new:
        model.update_modules(tree_unflatten(new))
    return len(new)


use_fast_cpu_path = prepare_for_backend  # the name the brief's interface list uses

