"""The model as export sees it: a list of units, and the arrays each unit is saved as.

A unit is a module that owns arrays (a LoRA wrapper is one unit, its base and adapters
inside it). ``Unit.dense_chunks`` yields a logical tensor in blocks of rows: an adapted
weight with its active adapter merged (``W0 + s B A``, DoRA ``m * (W0 + s B A) /
||W0 + s B A||_row``), an unadapted quantized one dequantized ``CHUNK_ROWS`` rows at a
time, so no whole float32 copy of a large embedding ever exists. ``mlx_arrays`` picks
the storage of a unit in an MLX / Hugging Face folder: as stored, dense, or fused and
quantized afresh like its base.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from mlx_tune.adapters.lora import LoRALinear, is_packed, logical_shape
from mlx_tune.model import quant

CHUNK_ROWS = 8192  # rows dequantized at once from an unadapted quantized layer (embeddings)


@dataclass
class Unit:
    """A module that owns arrays; ``layer`` is the base of a LoRA wrapper, or the module itself."""

    path: str
    module: nn.Module

    @property
    def layer(self) -> nn.Module:
        return self.module.base if isinstance(self.module, LoRALinear) else self.module

    @property
    def adapted(self) -> bool:
        return isinstance(self.module, LoRALinear) and self.module.adapter is not None

    @property
    def packed(self) -> bool:
        return is_packed(self.layer)

    def name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def keys(self) -> list[str]:
        """Logical parameter names (a packed weight counts once, as ``weight``)."""
        own = [k for k, v in self.layer.items() if isinstance(v, mx.array)]
        if self.packed:
            return ["weight"] + (["bias"] if "bias" in own else [])
        return sorted(own)

    def shape(self, key: str) -> tuple[int, ...]:
        if key == "weight" and self.packed:
            return logical_shape(self.layer)
        return tuple(self.layer[key].shape)

    def dense_chunks(self, key: str, dtype: mx.Dtype = mx.float32) -> Iterator[mx.array]:
        """The logical tensor in ``dtype``, in evaluated blocks of rows; an adapted weight has its adapter merged.

        A quantized layer without an adapter (an embedding of 150k rows, say) is dequantized
        ``CHUNK_ROWS`` rows at a time, so its float32 copy never exists whole; an adapted
        layer is fused whole (one layer).
        """
        layer = self.layer
        if key != "weight" or not (self.packed or self.adapted):
            yield layer[key].astype(dtype)
            return
        if self.adapted:
            w = self.module.adapter.fused_weight(quant.dense_weight(layer)).astype(dtype)
            mx.eval(w)
            yield w
            return
        if not isinstance(layer, (nn.QuantizedLinear, nn.QuantizedEmbedding)):  # NF4 and other protocol layers
            yield quant.dense_weight(layer).astype(dtype)
            return
        rows = self.shape("weight")[0]
        for start in range(0, rows, CHUNK_ROWS):
            block = _dequantize_rows(layer, start, min(start + CHUNK_ROWS, rows)).astype(dtype)
            mx.eval(block)
            yield block

    def dense(self, key: str, dtype: mx.Dtype = mx.float32) -> mx.array:
        parts = list(self.dense_chunks(key, dtype))
        return parts[0] if len(parts) == 1 else mx.concatenate(parts)


def _dequantize_rows(layer: nn.Module, start: int, stop: int) -> mx.array:
    """Rows ``start:stop`` of an affine-quantized (``nn.Quantized*``) layer's weight as float32."""
    w, s, b = layer["weight"][start:stop], layer["scales"][start:stop], layer.get("biases")
    if layer.mode == "affine":
        return quant.affine_dequantize(w, s, b[start:stop], layer.group_size, layer.bits)
    return mx.dequantize(w, s, None if b is None else b[start:stop], group_size=layer.group_size,
                         bits=layer.bits, mode=layer.mode).astype(mx.float32)


def units(model: nn.Module) -> list[Unit]:
    """Every array-owning module in path order; a LoRA wrapper's children belong to it."""
    found: list[Unit] = []
    wrapped: list[str] = []
    for path, module in sorted(model.named_modules(), key=lambda t: t[0]):
        if any(path.startswith(w + ".") for w in wrapped):
            continue
        if isinstance(module, LoRALinear):
            wrapped.append(path)
            found.append(Unit(path, module))
        elif any(isinstance(v, mx.array) for v in module.values()):
            found.append(Unit(path, module))
    return found


# ---------------------------------------------------------------------------
# Storage choices per unit
# ---------------------------------------------------------------------------


def mlx_quantized(layer: nn.Module) -> bool:
    """Stored in MLX's own quantized format (linear, embedding, or MoE expert stack)."""
    return isinstance(layer, (nn.QuantizedLinear, nn.QuantizedEmbedding)) or (
        quant.is_switch_linear(layer) and "scales" in layer)


def affine_params(layer: nn.Module) -> dict | None:
    """bits / group size / mode to re-quantize ``layer``'s kind of storage as MLX affine."""
    if mlx_quantized(layer):
        return {"group_size": layer.group_size, "bits": layer.bits, "mode": layer.mode}
    if is_packed(layer):  # NF4 and other protocol layers: MLX folders hold affine 4-bit
        block = getattr(layer, "block_size", 64)
        return {"group_size": block if block in quant.AFFINE_GROUP_SIZES else 64, "bits": 4, "mode": "affine"}
    return None


def _scales_dtype(layer: nn.Module, fallback: mx.Dtype) -> mx.Dtype:
    scales = layer.get("scales") if isinstance(layer, nn.Module) else None
    return scales.dtype if isinstance(scales, mx.array) else fallback


# Why afresh (scales from the fused group's min / max) and not on the base's own grid: the
# base weights sit exactly on their grid, so rounding W0 + dW back onto it returns W0 for
# every |dW| < step / 2, a deterministic erasure (SmolLM2, r=8 trained adapter: top-1
# agreement with base + adapter 0.44). A new grid rounds each weight from a different
# offset, which acts like dithering: the rounding errors average out across a row and
# the update survives (0.90 on the same adapter).
def mlx_arrays(unit: Unit, dense: bool, dtype: mx.Dtype, keep: str | None) -> tuple[dict[str, mx.array], dict | None]:
    """Arrays to save for ``unit`` and its quantization entry (None: dense).

    ``dense``: everything dense in ``dtype``. Otherwise quantized layers keep their storage,
    adapted ones are fused and quantized afresh like their base (``keep="8bit"``: at 8 bits,
    ``keep="dense"``: dense in ``dtype``), and every other array is written as stored.
    """
    layer = unit.layer
    params = None if dense else affine_params(layer)
    if not dense and params is None and not unit.adapted:  # norms, dense embeddings: stored as they are
        return {unit.name(k): layer[k] for k in unit.keys()}, None
    if params is None or (unit.adapted and keep == "dense"):
        out = {}
        for key in unit.keys():
            v = layer[key]
            floating = mx.issubdtype(v.dtype, mx.floating) or key == "weight"  # a packed weight is uint32
            out[unit.name(key)] = unit.dense(key, dtype) if floating else v
        return out, None
    bias = layer.get("bias")
    if unit.adapted or not mlx_quantized(layer):
        if unit.adapted and keep == "8bit":
            params = {**params, "bits": 8, "mode": "affine"}
        w = unit.dense("weight").astype(_scales_dtype(layer, dtype))
        q = mx.quantize(w, group_size=params["group_size"], bits=params["bits"], mode=params["mode"])
        arrays = {"weight": q[0], "scales": q[1]}
        if len(q) > 2:
            arrays["biases"] = q[2]
    else:
        arrays = {k: layer[k] for k in ("weight", "scales", "biases") if k in layer}
    if bias is not None:
        arrays["bias"] = bias
    return {unit.name(k): v for k, v in arrays.items()}, params
