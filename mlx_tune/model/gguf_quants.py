"""GGUF tensor types: which ones mlx_tune reads, and how their bytes become MLX arrays.

Q4_0, Q4_1 and Q8_0 blocks are affine quantizations with 32 weights per group, so they
map to MLX's ``(weight, scales, biases)`` exactly, with no re-quantization:

    Q4_0: w = d * (q - 8)  -> scale d, bias -8d      (q in 0..15)
    Q4_1: w = d * q + m    -> scale d, bias m
    Q8_0: w = d * q        -> scale d, bias -128d    (q + 128 in 0..255)

Every other block type the ``gguf`` package can dequantize (K-quants Q2_K..Q6_K, Q5_0,
Q5_1, the IQ and TQ types) is dequantized to float32 and marked ``Dequantized`` so the
loader re-quantizes it to the requested MLX format.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np
from gguf import GGML_QUANT_SIZES, quants
from gguf import GGMLQuantizationType as T

from mlx_tune.model.gguf_header import TensorInfo

DENSE = (T.F32, T.F16, T.BF16)
EXACT_AFFINE = (T.Q4_0, T.Q4_1, T.Q8_0)
# The block types whose dequantizer the installed gguf package implements.
REQUANTIZED = tuple(
    t for t in T if t not in DENSE + EXACT_AFFINE and isinstance(getattr(quants, t.name, None), type)
)
READABLE = DENSE + EXACT_AFFINE + REQUANTIZED


def type_name(ttype: int) -> str:
    try:
        return T(ttype).name
    except ValueError:
        return f"type {ttype}"


def readable_names() -> str:
    return ", ".join(t.name for t in READABLE)


class Dequantized:
    """A tensor that was stored in a block type MLX has no exact layout for; re-quantize it."""

    def __init__(self, array: mx.array):
        self.array = array


def nbytes(info: TensorInfo) -> int:
    block, size = GGML_QUANT_SIZES[T(info.type)]
    return int(np.prod(info.shape, dtype=np.int64)) // block * size


def read_tensor(buf: np.ndarray, info: TensorInfo) -> dict[str, Any]:
    """The MLX arrays of one tensor from the file's bytes ``buf`` (a uint8 memmap).

    Exact affine types give ``{base.weight, base.scales, base.biases}``; the others ``{name: array}``.
    """
    ttype = T(info.type)
    raw = buf[info.offset:info.offset + nbytes(info)]
    lead, cols = info.shape[:-1], info.shape[-1]
    if ttype == T.F32:
        return {info.name: mx.array(raw.view(np.float32).reshape(info.shape))}
    if ttype == T.F16:
        return {info.name: mx.array(raw.view(np.float16).reshape(info.shape))}
    if ttype == T.BF16:
        wide = raw.view(np.uint16).astype(np.uint32) << 16
        return {info.name: mx.array(wide.view(np.float32).reshape(info.shape))}
    blocks = raw.reshape(*lead, -1)
    if ttype in EXACT_AFFINE:
        w, s, b = _DECODERS[ttype](blocks)
        base = info.name[: -len(".weight")] if info.name.endswith(".weight") else info.name
        return {f"{base}.weight": w, f"{base}.scales": s, f"{base}.biases": b}
    dense = quants.dequantize(blocks, ttype).reshape(*lead, cols).astype(np.float32)
    return {info.name: Dequantized(mx.array(dense))}


def _pack4(q: np.ndarray) -> np.ndarray:
    """uint8 codes (..., n) in 0..15 -> MLX uint32 words, element i at bits 4*(i%8)."""
    q = q.astype(np.uint32).reshape(*q.shape[:-1], -1, 8)
    return (q << (4 * np.arange(8, dtype=np.uint32))).sum(axis=-1, dtype=np.uint32)


def _fp16(b: np.ndarray, start: int) -> np.ndarray:
    return np.ascontiguousarray(b[..., start:start + 2]).view(np.float16)[..., 0]


def _q4_0(blocks: np.ndarray):
    b = blocks.reshape(*blocks.shape[:-1], -1, 18)
    d, qs = _fp16(b, 0), b[..., 2:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(*blocks.shape[:-1], -1)
    return mx.array(_pack4(q)), mx.array(d), mx.array((-8 * d.astype(np.float32)).astype(np.float16))


def _q4_1(blocks: np.ndarray):
    b = blocks.reshape(*blocks.shape[:-1], -1, 20)
    d, m, qs = _fp16(b, 0), _fp16(b, 2), b[..., 4:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(*blocks.shape[:-1], -1)
    return mx.array(_pack4(q)), mx.array(d), mx.array(m)


def _q8_0(blocks: np.ndarray):
    b = blocks.reshape(*blocks.shape[:-1], -1, 34)
    d = _fp16(b, 0)
    q = (np.ascontiguousarray(b[..., 2:]).view(np.int8).astype(np.int16) + 128).astype(np.uint32)
    q = q.reshape(*blocks.shape[:-1], -1, 4)
    words = (q << (8 * np.arange(4, dtype=np.uint32))).sum(axis=-1, dtype=np.uint32)
    return mx.array(words), mx.array(d), mx.array((-128 * d.astype(np.float32)).astype(np.float16))


_DECODERS = {T.Q4_0: _q4_0, T.Q4_1: _q4_1, T.Q8_0: _q8_0}
