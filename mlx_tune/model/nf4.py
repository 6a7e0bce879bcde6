"""NF4 (QLoRA's 4-bit NormalFloat) storage of a frozen (out, in) weight, and ``NF4Linear``.

Per block of ``B`` weights along a row, ``W[i, j] = absmax[i, j // B] * NF4[c[i, j]]``
with ``c`` in ``0 .. 15`` and ``NF4`` the 16 quantiles of N(0, 1) scaled to [-1, 1].
Codes are packed two per byte. With double quantization the fp32 ``absmax`` values are
stored as 8-bit integers: ``absmax = offset + s2[k // 256] * a8[k] / 127`` (``offset``
their mean, ``s2`` the absmax of ``absmax - offset`` per block of 256), i.e.
4 + 8/64 + 32/(64*256) = 4.127 bits per weight.

No fused kernel exists: the matmul is dequantize + dense matmul on every backend
(``quant.dequant_matmul``; fp32 on the CPU, the activations' dtype elsewhere).
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

from mlx_tune.errors import UserError
from mlx_tune.model.quant import dense_weight, dequant_matmul, set_arrays

NF4_BLOCK_SIZES = (32, 64, 128, 256)
DQ_BLOCK = 256  # absmax values per double-quantization block (QLoRA)

# The 16 NF4 code values (QLoRA paper, appendix E; bitsandbytes' table).
NF4_CODES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip

# Constants built from host lists (already materialised), never inside a traced function:
# an array first created during mx.compile would be a tracer, unusable once cached.
_NF4_MIDS = mx.array([(a + b) / 2 for a, b in zip(NF4_CODES, NF4_CODES[1:])], dtype=mx.float32)
# byte -> (NF4[low nibble], NF4[high nibble]): one gather per byte decodes both codes.
_NF4_PAIRS = mx.array([[NF4_CODES[b & 0xF], NF4_CODES[b >> 4]] for b in range(256)], dtype=mx.float32)


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


def nf4_dq_dequantize(weight, absmax_q, absmax_scale, absmax_offset, block_size):
    """Packed codes and double-quantized absmax -> float32 (out, in)."""
    shape = (weight.shape[0], weight.shape[1] * 2 // block_size)
    return nf4_dequantize(weight, double_dequantize(absmax_q, absmax_scale, absmax_offset, shape), block_size)


def check_nf4_width(in_dims: int, block_size: int, name: str = "layer") -> None:
    if block_size not in NF4_BLOCK_SIZES:
        raise UserError(f"nf4: block size {block_size} is not supported; use 64 (or 32, 128, 256)")
    if in_dims % block_size or in_dims % 2:
        raise UserError(
            f"nf4: {name} has in_features={in_dims}, which is not a multiple of the block size {block_size}; "
            f"use a block size that divides {in_dims} or leave this layer unquantized"
        )


class NF4Linear(nn.Module):
    """Linear layer with a frozen NF4 weight: ``y = x dequantize_nf4(W)^T + b``.

    Stored arrays: ``weight`` (out, in/2) uint8 (two codes per byte, low nibble first) and
    either ``absmax`` (out, in/B) fp32, or with ``double_quant`` ``absmax_q`` int8,
    ``absmax_scale`` fp32 (one per 256 absmax values) and ``absmax_offset`` fp32 (1,).
    The matmul is dequantize + dense matmul on every backend (fp32 on the CPU), through
    ``quant.dequant_matmul``.
    """

    def __init__(self, input_dims: int, output_dims: int, bias: bool = True, block_size: int = 64,
                 double_quant: bool = False, name: str = "NF4Linear"):
        super().__init__()
        check_nf4_width(input_dims, block_size, name)
        self.input_dims, self.output_dims = input_dims, output_dims
        self.block_size, self.double_quant = block_size, double_quant
        set_arrays(self, nf4_quantize(mx.zeros((output_dims, input_dims)), block_size, double_quant))
        if bias:
            self.bias = mx.zeros((output_dims,))
        self.freeze()

    @classmethod
    def from_weight(cls, weight: mx.array, bias: mx.array | None = None, block_size: int = 64,
                    double_quant: bool = False, name: str = "NF4Linear") -> NF4Linear:
        out_dims, in_dims = weight.shape
        layer = cls(in_dims, out_dims, bias is not None, block_size, double_quant, name)  # lazy zeros, replaced
        set_arrays(layer, nf4_quantize(weight, block_size, double_quant))
        if bias is not None:
            layer.bias = bias
        layer.freeze()
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Module, block_size: int = 64, double_quant: bool = False,
                    name: str = "NF4Linear") -> NF4Linear:
        return cls.from_weight(dense_weight(linear), linear.get("bias"), block_size, double_quant, name)

    def _storage(self) -> tuple[Callable[..., mx.array], tuple[mx.array, ...]]:
        """(dequantize function, its storage arrays)."""
        if self.double_quant:
            return nf4_dq_dequantize, (self["weight"], self["absmax_q"], self["absmax_scale"], self["absmax_offset"])
        return nf4_dequantize, (self["weight"], self["absmax"])

    def __call__(self, x):
        dequant, storage = self._storage()
        y = dequant_matmul(dequant, self.block_size)(x, *storage)
        return y + self["bias"] if "bias" in self else y

    def dense_weight(self) -> mx.array:
        dequant, storage = self._storage()
        return dequant(*storage, self.block_size)

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
