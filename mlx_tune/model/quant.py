"""Storage of the frozen base (affine 4-bit, NF4) and the backend-aware quantized matmul.

Two storage formats for a frozen (out, in) weight ``W``:

* **affine** (MLX's own, ``nn.QuantizedLinear``): per group of ``g`` weights along a row,
  ``W[i, j] = scale[i, j // g] * q[i, j] + bias[i, j // g]`` with ``q`` in ``0 .. 2**bits - 1``.
* **nf4** (QLoRA's 4-bit NormalFloat, ``NF4Linear``): per block of ``B`` weights along a row,
  ``W[i, j] = absmax[i, j // B] * NF4[c[i, j]]`` with ``c`` in ``0 .. 15`` and ``NF4`` the 16
  quantiles of N(0, 1) scaled to [-1, 1]. Codes are packed two per byte. With double
  quantization the fp32 ``absmax`` values are stored as 8-bit integers:
  ``absmax = offset + s2[k // 256] * a8[k] / 127`` (``offset`` their mean, ``s2`` the absmax of
  ``absmax - offset`` per block of 256), i.e. 4 + 8/64 + 32/(64*256) = 4.127 bits per weight.

Compute, ``y = x W^T``: on Metal/CUDA affine layers use ``mx.quantized_matmul``. On the CPU
backend that kernel runs at ~3 GFLOP/s while OpenBLAS's fp32 sgemm runs at ~340, so
``CPUQuantizedLinear`` dequantizes the layer's weight and uses the dense fp32 matmul; NF4 does
the same everywhere (no fused kernel exists; off the CPU the matmul runs in the activations'
dtype). Both go through a ``mx.custom_function`` whose backward ``dx = g W`` dequantizes
``W`` again instead of keeping the fp32 weight alive from the forward, so peak memory stays
that of the 4-bit model plus a layer's dense weight at a time. The base is frozen: its
storage arrays get zero cotangents. ``quantize_model`` stores a model; ``prepare_for_backend``
switches an already quantized model (an MLX folder, a GGUF file) to the fast CPU layers.

Protocol shared by every frozen base layer, so LoRA and fuse never switch on classes:
``dense_weight(layer) -> (out, in) float32`` and ``requantize_like(layer, weight, bias)``
returning a layer of the same kind (same bits / group size) holding ``weight``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from mlx_tune.errors import UserError
from mlx_tune.runtime.backend import on_cpu

log = logging.getLogger(__name__)

AFFINE_GROUP_SIZES = (32, 64, 128)
AFFINE_BITS = (2, 3, 4, 5, 6, 8)
NF4_BLOCK_SIZES = (32, 64, 128, 256)
DQ_BLOCK = 256  # absmax values per double-quantization block (QLoRA)
DECODE_ROWS = 4  # inputs with at most this many rows use mx.quantized_matmul on the CPU too

# The 16 NF4 code values (QLoRA paper, appendix E; bitsandbytes' table).
NF4_CODES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip


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
_NF4 = mx.array(NF4_CODES, dtype=mx.float32)
_NF4_MIDS = mx.array([(a + b) / 2 for a, b in zip(NF4_CODES, NF4_CODES[1:])], dtype=mx.float32)
# byte -> (NF4[low nibble], NF4[high nibble]): one gather per byte decodes both codes.
_NF4_PAIRS = mx.array([[NF4_CODES[b & 0xF], NF4_CODES[b >> 4]] for b in range(256)], dtype=mx.float32)


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
# NF4 storage
# ---------------------------------------------------------------------------


def pack_nibbles(codes: mx.array) -> mx.array:
    """(..., n) codes in 0..15 -> (..., n/2) uint8, element 2k in the low nibble of byte k."""
    codes = codes.astype(mx.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: mx.array) -> mx.array:
    """Inverse of ``pack_nibbles``: (..., m) uint8 -> (..., 2m) uint8 codes."""
    both = mx.stack([packed & 0xF, packed >> 4], axis=-1)
    return both.reshape(*packed.shape[:-1], -1)


def nf4_codes(normalized: mx.array) -> mx.array:
    """Index of the nearest NF4 value for each entry of ``normalized`` (in [-1, 1]).

    A 4-step vectorised binary search over the 15 midpoints between code values.
    """
    idx = mx.zeros(normalized.shape, dtype=mx.uint32)
    for step in (8, 4, 2, 1):
        probe = idx + (step - 1)
        idx = mx.where(normalized > _NF4_MIDS[probe], idx + step, idx)
    return idx.astype(mx.uint8)


def double_quantize(absmax: mx.array) -> dict[str, mx.array]:
    """fp32 absmax (any shape) -> int8 values in blocks of 256, a per-block fp32 scale and the mean."""
    flat = absmax.reshape(-1).astype(mx.float32)
    n = flat.size
    offset = mx.mean(flat)
    centred = flat - offset
    pad = (-n) % DQ_BLOCK
    if pad:
        centred = mx.concatenate([centred, mx.zeros((pad,), dtype=mx.float32)])
    blocks = centred.reshape(-1, DQ_BLOCK)
    scale = mx.max(mx.abs(blocks), axis=1)
    scale = mx.where(scale == 0, 1.0, scale)
    q = mx.clip(mx.round(blocks / scale[:, None] * 127.0), -127, 127).astype(mx.int8)
    return {"absmax_q": q.reshape(-1), "absmax_scale": scale, "absmax_offset": offset.reshape(1)}


def double_dequantize(absmax_q: mx.array, absmax_scale: mx.array, absmax_offset: mx.array, shape) -> mx.array:
    blocks = absmax_q.reshape(-1, DQ_BLOCK).astype(mx.float32) / 127.0 * absmax_scale[:, None]
    n = 1
    for d in shape:
        n *= d
    return (blocks.reshape(-1)[:n] + absmax_offset).reshape(shape)


def nf4_quantize(weight: mx.array, block_size: int = 64, double_quant: bool = False) -> dict[str, mx.array]:
    """(out, in) weight -> NF4 storage arrays: ``weight`` (out, in/2) uint8 plus the absmax arrays."""
    out_dims, in_dims = weight.shape
    w = weight.astype(mx.float32).reshape(out_dims, in_dims // block_size, block_size)
    absmax = mx.max(mx.abs(w), axis=-1)
    safe = mx.where(absmax == 0, 1.0, absmax)
    codes = nf4_codes(w / safe[..., None]).reshape(out_dims, in_dims)
    arrays = {"weight": pack_nibbles(codes)}
    arrays.update(double_quantize(absmax) if double_quant else {"absmax": absmax})
    return arrays


def nf4_dequantize(weight: mx.array, absmax: mx.array, block_size: int) -> mx.array:
    """Packed codes (out, in/2) and absmax (out, in/B) -> float32 (out, in)."""
    rows = weight.shape[0]
    values = _NF4_PAIRS[weight].reshape(rows, -1, block_size)
    return (values * absmax[..., None]).reshape(rows, -1)


# ---------------------------------------------------------------------------
# Dequantize + dense matmul with a re-dequantizing backward
# ---------------------------------------------------------------------------


@functools.cache
def dequant_matmul(kind: str, *static) -> Callable:
    """``f(x, *storage) = x @ W^T`` with ``W = DEQUANT[kind](*storage, *static)`` in fp32.

    The vjp recomputes ``W`` for ``dx = g @ W`` (so the fp32 weight never outlives a
    matmul) and returns zero cotangents for the frozen storage arrays.

    Each dequantization is tied with ``mx.depends`` to the array its matmul consumes
    (``x`` forward, the cotangent backward). The storage arrays are graph inputs, so
    otherwise the scheduler may dequantize many layers ahead of their matmuls, and
    ``mx.compile`` can merge the forward and backward dequantizations into one node that
    stays alive across the whole step: both would hold every layer's fp32 weight at once.
    """
    dequant = DEQUANT[kind]

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


def _nf4_dq_dequantize(weight, absmax_q, absmax_scale, absmax_offset, block_size):
    shape = (weight.shape[0], weight.shape[1] * 2 // block_size)
    return nf4_dequantize(weight, double_dequantize(absmax_q, absmax_scale, absmax_offset, shape), block_size)


# Registry: storage kind -> dequantize(*storage_arrays, *static_params) -> fp32 (out, in).
DEQUANT: dict[str, Callable[..., mx.array]] = {
    "affine": affine_dequantize,
    "nf4": nf4_dequantize,
    "nf4_dq": _nf4_dq_dequantize,
}


# ---------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------


def _set_arrays(module: nn.Module, arrays: dict) -> None:
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
        _set_arrays(new, dict(layer.items()))  # weight, scales, biases, bias: shared arrays
        new.freeze()
        return new

    def __call__(self, x):
        # Decoding (a few rows) reads each weight once: there the quantized kernel beats
        # dequantizing the whole matrix (576x1536, 4-bit: 3.7 ms vs 14 ms for one row).
        if not on_cpu() or self.mode != "affine" or x.size <= DECODE_ROWS * x.shape[-1]:
            return super().__call__(x)
        y = dequant_matmul("affine", self.group_size, self.bits)(x, self["weight"], self["scales"], self["biases"])
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
        _set_arrays(new, dict(layer.items()))
        new.freeze()
        return new

    def as_linear(self, x):
        if not on_cpu() or self.mode != "affine" or x.size <= DECODE_ROWS * x.shape[-1]:
            return super().as_linear(x)
        return dequant_matmul("affine", self.group_size, self.bits)(x, self["weight"], self["scales"], self["biases"])


class NF4Linear(nn.Module):
    """Linear layer with a frozen NF4 weight: ``y = x dequantize_nf4(W)^T + b``.

    Stored arrays: ``weight`` (out, in/2) uint8 (two codes per byte, low nibble first) and
    either ``absmax`` (out, in/B) fp32, or with ``double_quant`` ``absmax_q`` int8,
    ``absmax_scale`` fp32 (one per 256 absmax values) and ``absmax_offset`` fp32 (1,).
    The matmul is dequantize + dense matmul on every backend (fp32 on the CPU), through
    ``dequant_matmul``.
    """

    def __init__(self, input_dims: int, output_dims: int, bias: bool = True, block_size: int = 64,
                 double_quant: bool = False, name: str = "NF4Linear"):
        super().__init__()
        check_nf4_width(input_dims, block_size, name)
        self.input_dims, self.output_dims = input_dims, output_dims
        self.block_size, self.double_quant = block_size, double_quant
        _set_arrays(self, nf4_quantize(mx.zeros((output_dims, input_dims)), block_size, double_quant))
        if bias:
            self.bias = mx.zeros((output_dims,))
        self.freeze()

    @classmethod
    def from_weight(cls, weight: mx.array, bias: mx.array | None = None, block_size: int = 64,
                    double_quant: bool = False, name: str = "NF4Linear") -> NF4Linear:
        out_dims, in_dims = weight.shape
        layer = cls(in_dims, out_dims, bias is not None, block_size, double_quant, name)  # lazy zeros, replaced
        _set_arrays(layer, nf4_quantize(weight, block_size, double_quant))
        if bias is not None:
            layer.bias = bias
        layer.freeze()
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Module, block_size: int = 64, double_quant: bool = False,
                    name: str = "NF4Linear") -> NF4Linear:
        return cls.from_weight(dense_weight(linear), linear.get("bias"), block_size, double_quant, name)

    def _storage(self) -> tuple[str, tuple[mx.array, ...]]:
        if self.double_quant:
            return "nf4_dq", (self["weight"], self["absmax_q"], self["absmax_scale"], self["absmax_offset"])
        return "nf4", (self["weight"], self["absmax"])

    def __call__(self, x):
        kind, storage = self._storage()
        y = dequant_matmul(kind, self.block_size)(x, *storage)
        return y + self["bias"] if "bias" in self else y

    def dense_weight(self) -> mx.array:
        kind, storage = self._storage()
        return DEQUANT[kind](*storage, self.block_size)

    def requantize_like(self, weight: mx.array, bias: mx.array | None = None) -> NF4Linear:
        return NF4Linear.from_weight(weight, bias, self.block_size, self.double_quant)

    @property
    def bits_per_parameter(self) -> float:
        """Storage bits per weight (bias excluded): 4.5 plain (block 64), 4.127 with double quant."""
        n = self.input_dims * self.output_dims
        nbytes = sum(v.nbytes for k, v in self.items() if k != "bias" and isinstance(v, mx.array))
        return 8.0 * nbytes / n

    def _extra_repr(self):
        return (f"input_dims={self.input_dims}, output_dims={self.output_dims}, bias={'bias' in self}, "
                f"block_size={self.block_size}, double_quant={self.double_quant}")


def check_nf4_width(in_dims: int, block_size: int, name: str = "layer") -> None:
    if block_size not in NF4_BLOCK_SIZES:
        raise UserError(f"nf4: block size {block_size} is not supported; use 64 (or 32, 128, 256)")
    if in_dims % block_size or in_dims % 2:
        raise UserError(
            f"nf4: {name} has in_features={in_dims}, which is not a multiple of the block size {block_size}; "
            f"use a block size that divides {in_dims} or leave this layer unquantized"
        )


# ---------------------------------------------------------------------------
# The dense_weight / requantize_like protocol
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# Whole models
# ---------------------------------------------------------------------------

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


def _logical_params(module: nn.Module) -> int:
    """Weights a module represents (a quantized layer counts its unpacked weight)."""
    own = {k: v for k, v in module.items() if isinstance(v, mx.array)}
    if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        out_dims = module["weight"].shape[0]
        return out_dims * input_dims(module) + sum(v.size for k, v in own.items() if k == "bias")
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
