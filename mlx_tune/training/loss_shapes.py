"""How the cross-entropy splits its work; plain Python, shared by ``losses`` and the planner.

``memory.plan`` must not import MLX, yet it has to predict the buffers ``losses`` makes,
so the sizes both rely on are decided here once.
"""

from __future__ import annotations

# Logit elements per chunk: 2**23 float32 is 32 MB (~170 tokens of a 49k vocabulary).
CHUNK_ELEMENTS = 1 << 23
# On the CPU backend a quantized frozen head is dequantized once per step when its fp32
# copy is at most this big (SmolLM2: 113 MB); a bigger one (Llama-3: 128k x 4096 is
# 2.1 GB) is dequantized one vocabulary tile at a time instead.
DENSE_HEAD_BYTES = 1 << 30
# Vocabulary-tiled loss: at most this many bytes of fp32 head weight, and of
# (tokens x tile) logits, live at once; tokens per pass over the tiles (each pass
# dequantizes the head once).
HEAD_TILE_BYTES = 1 << 27
TILED_TOKENS = 4096


def chunk_size_for(vocab: int, elements: int = CHUNK_ELEMENTS) -> int:
    """Tokens per chunk of the chunked loss: ``elements`` logits, a multiple of 16."""
    return max(16, (elements // max(1, vocab)) // 16 * 16)


def tile_rows_for(vocab: int, hidden: int, tokens: int, tile_bytes: int = HEAD_TILE_BYTES,
                  tiled_tokens: int = TILED_TOKENS) -> int:
    """Vocabulary rows per tile: the fp32 tile and its logits each at most ``tile_bytes``."""
    rows = tile_bytes // (4 * max(hidden, min(tokens, tiled_tokens)))
    return max(256, min(vocab, rows // 256 * 256))


def head_is_tiled(vocab: int, hidden: int, dense_head_bytes: int = DENSE_HEAD_BYTES) -> bool:
    """Whether the CPU path tiles a quantized head of this shape (rather than keeping it dense)."""
    return vocab * hidden * 4 > dense_head_bytes
