"""Storage of the frozen base (affine 4-bit, NF4) and the backend-aware quantized matmul.

Protocol shared by every frozen base layer, so LoRA and fuse never switch on classes:
``dense_weight(layer) -> (out, in) float32`` and ``requantize_like(layer, weight, bias)``
returning a layer of the same kind (same bits / group size) holding ``weight``.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


def dense_weight(layer: nn.Module) -> mx.array:
    """The layer's weight as a dense float32 (out, in) matrix."""
    if hasattr(layer, "dense_weight"):
        return layer.dense_weight()
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
