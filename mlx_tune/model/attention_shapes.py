"""When training attention recomputes its probabilities block by block (MLX-free: the planner reads it too).

``attention.attend`` sends rows of ``FLASH_MIN_LENGTH`` or more to ``flash.flash_attention``,
whose backward scores ``FLASH_BLOCK`` query rows at a time against their causal prefix
instead of keeping the (T, T) probabilities; ``planning.planner`` models the same choice.
"""

from __future__ import annotations

__all__ = ["FLASH_BLOCK", "FLASH_MIN_LENGTH", "SCORE_BIAS_MODELS", "cudnn_backward", "flash_applies"]

# Measured on the CPU (B=1, H=4, D=32, forward + backward, block 128): at 2048 rows a 36 vs
# 100 MiB peak for ~1.3x the attention's time; at 1024 17 vs 29 MiB, too small a part of a
# step's memory to pay ~1.5x the attention's time.
FLASH_MIN_LENGTH = 2048
FLASH_BLOCK = 128  # query rows recomputed at a time: the working set is a few B x H x FLASH_BLOCK x T fp32

# mlx-lm model files whose attention passes part of its scores as an additive mask (MLA's
# rotary scores, a function of the trained projections): they keep the autodiff kernels.
SCORE_BIAS_MODELS = frozenset({"bailing_hybrid", "bailing_moe_v3", "deepseek_v3", "deepseek_v32", "glm4_moe_lite",
                               "kimi_k3", "kimi_linear", "longcat_flash", "mistral4"})


def flash_applies(seq_len: int, has_bias: bool) -> bool:
    """Whether rows of ``seq_len`` attend blockwise (before the fused-backward exception)."""
    return not has_bias and seq_len >= FLASH_MIN_LENGTH


def cudnn_backward(dtype_bytes: int, head_dim: int, value_dim: int, seq_len: int) -> bool:
    """Whether MLX's CUDA attention has a fused (cuDNN) backward for these shapes, which
    keeps no (T, T) probabilities: half precision, head widths a multiple of 8 up to 128,
    rows a multiple of 128 (MLX 0.32 ``ScaledDotProductAttentionVJP::use_fallback`` and
    ``supports_sdpa_cudnn``; Ampere or newer assumed)."""
    dims_ok = all(d % 8 == 0 and d <= 128 for d in (head_dim, value_dim))
    return dtype_bytes == 2 and dims_ok and seq_len % 128 == 0
