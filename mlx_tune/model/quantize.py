"""Whole-model quantization of the frozen base, and storage reports.

``quantize_model(model, qcfg)`` stores every linear layer (and embedding) in ``qcfg``'s
format, affine (``nn.QuantizedLinear``, ``model.quant``) or NF4 (``model.nf4``), layer by
layer in place; ``storage_report`` counts the weights a model represents and the bytes
that hold them (bits per parameter = 8 * bytes / weights).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from mlx_tune.model.nf4 import NF4Linear
from mlx_tune.model.quant import AFFINE_GROUP_SIZES, dense_weight, is_switch_linear, prepare_for_backend, switch_dims

log = logging.getLogger(__name__)

LINEAR_TYPES = (nn.Linear, nn.QuantizedLinear, NF4Linear)
EMBEDDING_TYPES = (nn.Embedding, nn.QuantizedEmbedding)


@dataclass
class QuantSummary:
    """What ``quantize_model`` did: counts, the layers it left alone, and the storage size."""

    mode: str
    quantized: int = 0
    kept: int = 0  # already in the requested format
    skipped: list[tuple[str, int]] = field(default_factory=list)  # (path, in_features) that do not fit
    bits_per_parameter: float = 0.0
    bytes: int = 0


def input_dims(layer: nn.Module) -> int:
    """in_features of a linear or embedding width of an (affine-quantized) embedding."""
    if hasattr(layer, "input_dims"):
        return layer.input_dims
    if isinstance(layer, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        return layer["weight"].shape[1] * 32 // layer.bits
    return layer["weight"].shape[1]


def _same_affine(layer: nn.Module, group_size: int, bits: int) -> bool:
    return getattr(layer, "mode", "affine") == "affine" and layer.group_size == group_size and layer.bits == bits


def _affine_linear(layer: nn.Module, path: str, group_size: int, bits: int) -> nn.Module | None:
    if isinstance(layer, nn.QuantizedLinear) and _same_affine(layer, group_size, bits):
        return None
    source = layer
    if type(layer) is not nn.Linear:  # re-quantize from the dense weight (GGUF g32 -> g64, NF4 -> affine)
        source = nn.Linear(1, 1, bias=False)
        source.weight = dense_weight(layer)
        if "bias" in layer:
            source.bias = layer["bias"]
    return nn.QuantizedLinear.from_linear(source, group_size, bits)


def _nf4_linear(layer: nn.Module, path: str, block_size: int, double_quant: bool) -> nn.Module | None:
    if isinstance(layer, NF4Linear) and (layer.block_size, layer.double_quant) == (block_size, double_quant):
        return None
    return NF4Linear.from_linear(layer, block_size, double_quant, name=path)


def _affine_embedding(layer: nn.Module, group_size: int, bits: int) -> nn.Module | None:
    if isinstance(layer, nn.QuantizedEmbedding):
        if _same_affine(layer, group_size, bits):
            return None
        dense = nn.Embedding(layer.num_embeddings, layer.dims)
        dense.weight = mx.dequantize(layer["weight"], layer["scales"], layer.get("biases"), group_size=layer.group_size,
                                     bits=layer.bits, mode=layer.mode)
        layer = dense
    return nn.QuantizedEmbedding.from_embedding(layer, group_size, bits)


def quantize_model(model: nn.Module, qcfg, *, fast_cpu: bool = True) -> QuantSummary:
    """Store the frozen base in ``qcfg``'s format, layer by layer, in place.

    * ``affine``: every linear layer and embedding (a tied LM head included), as
      ``nn.quantize`` / mlx-lm do, with ``qcfg.bits`` and ``qcfg.group_size``.
    * ``nf4``: every linear layer (an untied LM head included) becomes ``NF4Linear`` with
      block ``qcfg.group_size`` (+ double quantization); embeddings are stored affine 4-bit
      (group 64, or the block size when MLX supports it), so both modes differ only in the
      linear layers.
    * MoE expert stacks (``SwitchLinear``) become mlx-lm's ``QuantizedSwitchLinear``, affine
      like the embeddings (its ``gather_qmm`` has no NF4 form).

    Layers already quantized in another format (a GGUF's Q4_1 as affine g32, say) are
    re-quantized from their dense weight. Layers whose width is not a multiple of the
    group / block stay as they are and are listed in ``summary.skipped`` (and logged).
    Each new layer is evaluated at once so the dense and quantized copies of the whole
    model never coexist. With ``fast_cpu`` the CPU fast path is switched on afterwards.
    """
    from mlx_tune.config import QuantizeConfig
    from mlx_tune.errors import ConfigError

    qcfg = qcfg or QuantizeConfig()
    if errors := qcfg.check():
        raise ConfigError("; ".join(errors))
    group = qcfg.group_size
    if qcfg.mode == "affine":
        make_linear = lambda m, p: _affine_linear(m, p, group, qcfg.bits)  # noqa: E731
        emb_group, emb_bits = group, qcfg.bits
    else:
        make_linear = lambda m, p: _nf4_linear(m, p, group, qcfg.double_quant)  # noqa: E731
        emb_group, emb_bits = (group if group in AFFINE_GROUP_SIZES else 64), 4

    summary = QuantSummary(mode=qcfg.mode + ("+dq" if qcfg.double_quant else ""))
    for path, layer in list(model.named_modules()):
        if isinstance(layer, LINEAR_TYPES):
            width, need, build = input_dims(layer), group, make_linear
        elif isinstance(layer, EMBEDDING_TYPES):
            width, need, build = input_dims(layer), emb_group, lambda m, p: _affine_embedding(m, emb_group, emb_bits)
        elif is_switch_linear(layer) and "scales" not in layer:  # MoE experts: mlx-lm's own quantized stack
            width, need = layer["weight"].shape[-1], emb_group
            build = lambda m, p: m.to_quantized(group_size=emb_group, bits=emb_bits)  # noqa: E731
        else:
            continue
        if width % need:
            summary.skipped.append((path, width))
            continue
        new = build(layer, path)
        if new is None:
            summary.kept += 1
            continue
        new.freeze()  # the base is frozen (nn.QuantizedLinear.from_linear leaves a bias trainable)
        mx.eval(new.parameters())
        model.update_modules(tree_unflatten([(path, new)]))
        summary.quantized += 1

    if summary.skipped:
        names = [f"{p} ({w})" for p, w in summary.skipped]
        more = f" and {len(names) - 5} more" if len(names) > 5 else ""
        log.warning("quantize: %d layer(s) left unquantized, width not a multiple of %d: %s%s", len(names), group,
                    ", ".join(names[:5]), more)
    if fast_cpu:
        prepare_for_backend(model)
    report = storage_report(model)
    summary.bits_per_parameter, summary.bytes = report["bits_per_parameter"], report["bytes"]
    log.info("quantize: %s, %d layers quantized, %d kept, %.3f bits/parameter", summary.mode, summary.quantized,
             summary.kept, summary.bits_per_parameter)
    return summary


def _logical_params(module: nn.Module) -> int:
    """Weights a module represents (a quantized layer counts its unpacked weight)."""
    own = {k: v for k, v in module.items() if isinstance(v, mx.array)}
    if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        out_dims = module["weight"].shape[0]
        return out_dims * input_dims(module) + sum(v.size for k, v in own.items() if k == "bias")
    if is_switch_linear(module) and "scales" in module:
        experts, out_dims, in_dims = switch_dims(module)
        return experts * out_dims * in_dims + sum(v.size for k, v in own.items() if k == "bias")
    if isinstance(module, NF4Linear):
        return module.output_dims * module.input_dims + sum(v.size for k, v in own.items() if k == "bias")
    return sum(v.size for v in own.values())


def storage_report(model: nn.Module) -> dict:
    """Parameters, bytes and bits per parameter of the whole model (frozen and trainable)."""
    params = nbytes = 0
    for _, module in model.named_modules():
        params += _logical_params(module)
        nbytes += sum(v.nbytes for v in module.values() if isinstance(v, mx.array))
    return {"params": params, "bytes": nbytes, "bits_per_parameter": 8.0 * nbytes / max(params, 1)}


def model_bits_per_parameter(model: nn.Module) -> float:
    """Average storage bits per represented weight (fp32: 32; affine-4 g64 fp16 scales: 4.5)."""
    return storage_report(model)["bits_per_parameter"]
