"""GGUF architectures onto mlx-lm model types: config from metadata, tensor names, conventions.

llama.cpp's ``convert_hf_to_gguf.py`` renames Hugging Face tensors with gguf-py's
``TensorNameMap`` and changes a few of them; reading undoes each change:

- llama-family Q/K rows are permuted for llama.cpp's rotary layout (``unpermute``);
- Gemma norm weights are stored as ``1 + w`` (llama.cpp multiplies by the stored
  weight; mlx-lm's Gemma adds the 1 at run time), so 1 is subtracted on read. The
  ``sqrt(hidden)`` embedding scale is applied at run time by both, nothing is baked in;
- experts are stacked into ``(experts, out, in)`` tensors, the layout of mlx-lm's
  ``SwitchGLU`` (``mlp.switch_mlp.*_proj``), which reads them as they are;
- a tied head has no ``output`` tensor.

Names are found by asking ``TensorNameMap`` for the GGUF name of every parameter of the
mlx-lm model (mlx-lm keeps the Hugging Face names, except ``switch_mlp`` for ``experts``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
from gguf.constants import MODEL_ARCH, MODEL_ARCH_NAMES

from mlx_tune.errors import ModelLoadError


@dataclass(frozen=True)
class GGUFArch:
    """How one GGUF architecture maps onto an mlx-lm model type."""

    model_type: str
    permute_qk: bool  # llama.cpp permuted Q/K rows for this arch at conversion
    norm_offset: float = 0.0  # the converter stored norm weights as w + offset (Gemma: 1)


ARCHS: dict[str, GGUFArch] = {
    "llama": GGUFArch("llama", permute_qk=True),  # Llama 1-3, Mistral 7B, SmolLM/SmolLM2
    "mistral": GGUFArch("llama", permute_qk=True),
    "granite": GGUFArch("granite", permute_qk=True),  # converted by llama.cpp's LlamaModel
    "qwen2": GGUFArch("qwen2", permute_qk=False),
    "qwen3": GGUFArch("qwen3", permute_qk=False),
    "qwen2moe": GGUFArch("qwen2_moe", permute_qk=False),
    "qwen3moe": GGUFArch("qwen3_moe", permute_qk=False),
    "gemma2": GGUFArch("gemma2", permute_qk=False, norm_offset=1.0),
    "gemma3": GGUFArch("gemma3_text", permute_qk=False, norm_offset=1.0),
    "phi3": GGUFArch("phi3", permute_qk=False),
    "olmo2": GGUFArch("olmo2", permute_qk=False),
    "starcoder2": GGUFArch("starcoder2", permute_qk=False),
    "deepseek2": GGUFArch("deepseek_v2", permute_qk=False),  # DeepSeek V2 / V2-Lite (softmax routing)
}
# RoPE tables: read into the config (rope_scaling), recomputed by mlx-lm's rope from it.
_SKIP = {"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"}


def check_arch(metadata: dict[str, Any], path: Path) -> tuple[str, GGUFArch]:
    name = metadata.get("general.architecture")
    if name not in ARCHS:
        raise ModelLoadError(
            f"{path}: GGUF architecture {name!r} is not supported; supported: {', '.join(sorted(ARCHS))}"
        )
    return name, ARCHS[name]


def gguf_config(metadata: dict[str, Any], tensor_names: set[str], path: Path,
                rope: dict[str, list[float]] | None = None) -> tuple[dict, GGUFArch]:
    """A Hugging Face style config.json dict for the mlx-lm model type, from GGUF metadata
    and the RoPE tensors ``rope`` (name -> values) where llama.cpp keeps RoPE scaling:
    ``rope_freqs`` (Llama 3), ``rope_factors_long/short`` (Phi-3 longrope)."""
    rope = rope or {}
    arch_name, arch = check_arch(metadata, path)

    def get(key: str, default: Any = None) -> Any:
        return metadata.get(f"{arch_name}.{key}", default)

    try:
        n_heads = int(get("attention.head_count"))
        hidden = int(get("embedding_length"))
        n_layers = int(get("block_count"))
    except TypeError:
        raise ModelLoadError(f"{path}: GGUF metadata lacks {arch_name}.block_count, .embedding_length or "
                             ".attention.head_count") from None
    tokens = metadata.get("tokenizer.ggml.tokens") or []
    rope_dims = get("rope.dimension_count")
    head_dim = get("attention.key_length") or (rope_dims if arch_name not in ("phi3",) else None) or hidden // n_heads
    config: dict[str, Any] = {
        "model_type": arch.model_type,
        "hidden_size": hidden,
        "num_hidden_layers": n_layers,
        "intermediate_size": int(get("feed_forward_length") or get("expert_feed_forward_length") or 0),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(get("attention.head_count_kv", n_heads)),
        "head_dim": int(head_dim),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "vocab_size": int(get("vocab_size", len(tokens))),
        "max_position_embeddings": int(get("context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
    }
    scaling = get("rope.scaling.type")
    if scaling == "linear" and get("rope.scaling.factor"):
        config["rope_scaling"] = {"type": "linear", "factor": float(get("rope.scaling.factor"))}
    if "rope_freqs.weight" in rope and arch.model_type in ("llama", "granite"):
        config["rope_scaling"] = llama3_rope_scaling(rope["rope_freqs.weight"], config["rope_theta"],
                                                     config["head_dim"], path)
    if "rope_factors_long.weight" in rope:
        long = rope["rope_factors_long.weight"]
        config["rope_scaling"] = {"type": "longrope", "long_factor": long,
                                  "short_factor": rope.get("rope_factors_short.weight", [1.0] * len(long))}
    extra = _EXTRA.get(arch_name)
    if extra is not None:
        try:
            config.update(extra(get, config, tensor_names))
        except ModelLoadError as exc:
            raise ModelLoadError(f"{path}: {exc}") from None
        except (TypeError, ValueError):  # a key the architecture needs is missing or malformed
            raise ModelLoadError(f"{path}: GGUF metadata for {arch_name} lacks a hyperparameter mlx_tune needs "
                                 f"(expert counts, MLA ranks, ...)") from None
    return config, arch


def llama3_rope_factors(theta: float, dim: int, factor: float, low: float, high: float, old_ctx: int) -> list[float]:
    """Llama 3's per-frequency RoPE divisors, as llama.cpp's converter computes ``rope_freqs``:
    1 for wavelengths under ``old_ctx / high``, ``factor`` over ``old_ctx / low``, smooth between."""
    out = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * theta ** (i / dim)
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return out


def llama3_rope_scaling(freqs: list[float], theta: float, dim: int, path: Path) -> dict:
    """The ``rope_scaling`` whose factors are the file's ``rope_freqs`` (Llama 3.1-3.3 use
    low 1, high 4, original context 8192; the factor is the largest divisor)."""
    factor = max(freqs)
    for low, high, old_ctx in ((1.0, 4.0, 8192), (1.0, 4.0, 4096), (1.0, 4.0, 131072)):
        want = llama3_rope_factors(theta, dim, factor, low, high, old_ctx)
        if len(want) == len(freqs) and all(abs(a - b) <= 1e-4 * max(1.0, b) for a, b in zip(freqs, want)):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                    "original_max_position_embeddings": old_ctx}
    raise ModelLoadError(f"{path}: the rope_freqs tensor is not a Llama 3 RoPE scaling mlx_tune knows "
                         f"(factor {factor}, low 1 / high 4 / original context 4096, 8192 or 131072)")


def _moe(get: Callable, config: dict, names: set[str]) -> dict:
    out = {
        "num_experts": int(get("expert_count")),
        "num_experts_per_tok": int(get("expert_used_count")),
        "moe_intermediate_size": int(get("expert_feed_forward_length") or config["intermediate_size"]),
    }
    if get("expert_shared_feed_forward_length") is not None:
        out["shared_expert_intermediate_size"] = int(get("expert_shared_feed_forward_length"))
    return out


def _qwen3moe(get: Callable, config: dict, names: set[str]) -> dict:
    # llama.cpp's qwen3moe makes every layer an MoE layer and normalizes the top-k weights.
    return {**_moe(get, config, names), "decoder_sparse_step": 1, "mlp_only_layers": [],
            "norm_topk_prob": bool(get("expert_weights_norm", True))}


def _query_scalar(get: Callable, config: dict, layers_27b: int) -> float:
    """Gemma's attention scale 1/sqrt(query_pre_attn_scalar): llama.cpp uses the head size,
    except for the 27B models (recognised by layer count) where it is hidden / heads."""
    if get("attention.scale"):
        return 1.0 / float(get("attention.scale")) ** 2
    if config["num_hidden_layers"] == layers_27b:
        return config["hidden_size"] / config["num_attention_heads"]
    return float(config["head_dim"])


def _gemma2(get: Callable, config: dict, names: set[str]) -> dict:
    return {"attn_logit_softcapping": float(get("attn_logit_softcapping", 50.0)),
            "final_logit_softcapping": float(get("final_logit_softcapping", 30.0)),
            "query_pre_attn_scalar": _query_scalar(get, config, 46)}


def _gemma3(get: Callable, config: dict, names: set[str]) -> dict:
    pattern = get("attention.sliding_window_pattern", 6)  # llama.cpp's gemma3 default
    if isinstance(pattern, list):  # per layer: is it a sliding-window layer
        pattern = next((i + 1 for i, swa in enumerate(pattern) if not swa), len(pattern))
    return {"sliding_window": int(get("attention.sliding_window", 512)), "sliding_window_pattern": int(pattern),
            "rope_local_base_freq": float(get("rope.freq_base_swa", 10000.0)),
            "query_pre_attn_scalar": _query_scalar(get, config, 62)}


def _phi3(get: Callable, config: dict, names: set[str]) -> dict:
    rope_dims = get("rope.dimension_count") or config["head_dim"]
    out: dict[str, Any] = {"partial_rotary_factor": int(rope_dims) / config["head_dim"]}
    if get("rope.scaling.original_context_length"):
        out["original_max_position_embeddings"] = int(get("rope.scaling.original_context_length"))
    return out


def _granite(get: Callable, config: dict, names: set[str]) -> dict:
    return {"logits_scaling": float(get("logit_scale", 1.0)), "attention_multiplier": float(get("attention.scale", 1.0)),
            "embedding_multiplier": float(get("embedding_scale", 1.0)),
            "residual_multiplier": float(get("residual_scale", 1.0)),
            "attention_bias": "blk.0.attn_q.bias" in names, "mlp_bias": "blk.0.ffn_up.bias" in names}


def _starcoder2(get: Callable, config: dict, names: set[str]) -> dict:
    return {"norm_epsilon": float(get("attention.layer_norm_epsilon", 1e-5))}


def _olmo2(get: Callable, config: dict, names: set[str]) -> dict:
    return {"attention_bias": "blk.0.attn_q.bias" in names}


def _deepseek2(get: Callable, config: dict, names: set[str]) -> dict:
    """MLA and experts. Newer llama.cpp files store ``key_length`` / ``value_length`` of the
    absorbed form (kv_lora_rank + rope, kv_lora_rank) and the per-head sizes as ``*_mla``."""
    if int(get("expert_gating_func", 1)) != 1:
        raise ModelLoadError("DeepSeek GGUF with sigmoid expert routing (DeepSeek V3 / R1) is not supported; "
                             "DeepSeek V2 / V2-Lite files are")
    rope = int(get("rope.dimension_count"))
    key = int(get("attention.key_length_mla") or get("attention.key_length"))
    groups = int(get("expert_group_count", 1) or 1)
    yarn_mult = float(get("rope.scaling.yarn_log_multiplier", 0.0) or 0.0)
    return {
        "kv_lora_rank": int(get("attention.kv_lora_rank")),
        "q_lora_rank": int(get("attention.q_lora_rank")) if get("attention.q_lora_rank") else None,
        "qk_rope_head_dim": rope, "qk_nope_head_dim": key - rope,
        "v_head_dim": int(get("attention.value_length_mla") or get("attention.value_length")),
        "n_routed_experts": int(get("expert_count")), "n_shared_experts": int(get("expert_shared_count", 0)) or None,
        "num_experts_per_tok": int(get("expert_used_count")),
        "moe_intermediate_size": int(get("expert_feed_forward_length")),
        "first_k_dense_replace": int(get("leading_dense_block_count", 0)),
        "routed_scaling_factor": float(get("expert_weights_scale", 1.0)),
        "topk_method": "group_limited_greedy" if groups > 1 else "greedy",
        "n_group": groups, "topk_group": int(get("expert_group_used_count", 1) or 1),
        # llama.cpp keeps 0.1 * mscale_all_dim as yarn_log_multiplier; DeepSeek sets mscale = mscale_all_dim
        "rope_scaling": {"type": "yarn", "factor": float(get("rope.scaling.factor", 1.0) or 1.0),
                         "original_max_position_embeddings": int(get("rope.scaling.original_context_length")
                                                                 or config["max_position_embeddings"]),
                         "beta_fast": 32, "beta_slow": 1, "mscale": yarn_mult / 0.1, "mscale_all_dim": yarn_mult / 0.1},
    }


_EXTRA: dict[str, Callable[[Callable, dict, set[str]], dict]] = {
    "qwen2moe": _moe, "qwen3moe": _qwen3moe, "gemma2": _gemma2, "gemma3": _gemma3, "phi3": _phi3,
    "granite": _granite, "starcoder2": _starcoder2, "olmo2": _olmo2, "deepseek2": _deepseek2,
}


def name_map(arch_name: str, param_names: list[str], n_blocks: int) -> dict[str, str]:
    """GGUF module name (``blk.0.attn_q``) -> mlx-lm module name, for the model's parameters."""
    # An arch name gguf-py does not list (older "mistral" files) is named like llama.
    arch = next((a for a, n in MODEL_ARCH_NAMES.items() if n == arch_name), MODEL_ARCH.LLAMA)
    tmap = gguf.get_tensor_name_map(MODEL_ARCH(arch), n_blocks)
    out: dict[str, str] = {}
    for param in param_names:
        module = param.rsplit(".", 1)[0]
        name = tmap.get_name(module.replace(".switch_mlp.", ".experts."))
        if name is not None:
            out[name] = module
    return out


def unpermute(w: Any, n_heads: int) -> Any:
    """Undo llama.cpp's rotary row permutation.

    llama.cpp wrote ``w.reshape(h, 2, d/2, ...).swapaxes(1, 2)`` (per head, halves
    interleaved); the inverse reads rows as ``(h, d/2, 2)`` and swaps back.
    """
    rows = w.shape[0]
    rest = w.shape[1:]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *rest).swapaxes(1, 2).reshape(rows, *rest)


def merge_mla_kv_b(tensors: dict[str, Any], config: dict) -> dict[str, Any]:
    """Newer llama.cpp files split DeepSeek's ``kv_b_proj`` into per-head ``attn_k_b``
    (heads, kv_lora_rank, nope), transposed, and ``attn_v_b`` (heads, v_dim, kv_lora_rank);
    join them back into ``attn_kv_b`` rows ``[k_nope | v]`` per head."""
    import mlx.core as mx

    from mlx_tune.model.gguf_quants import Dequantized

    quantized = False

    def dense(name: str) -> Any:
        nonlocal quantized
        value = tensors.pop(f"{name}.weight")
        if f"{name}.scales" in tensors:  # exact Q4/Q8 blocks (groups of 32): dequantize for the join
            scales, biases = tensors.pop(f"{name}.scales"), tensors.pop(f"{name}.biases")
            quantized = True
            bits = value.shape[-1] * 32 // (scales.shape[-1] * 32)
            return mx.dequantize(value, scales, biases, group_size=32, bits=bits)
        quantized = quantized or isinstance(value, Dequantized)
        return value.array if isinstance(value, Dequantized) else value

    for k_name in [n[: -len(".weight")] for n in list(tensors) if n.endswith(".attn_k_b.weight")]:
        v_name = k_name.replace("attn_k_b", "attn_v_b")
        heads, nope, v_dim = config["num_attention_heads"], config["qk_nope_head_dim"], config["v_head_dim"]
        rank = config["kv_lora_rank"]
        k_b = dense(k_name).astype(mx.float32).reshape(heads, rank, nope).swapaxes(1, 2)
        v_b = dense(v_name).astype(mx.float32).reshape(heads, v_dim, rank)
        kv_b = mx.concatenate([k_b, v_b], axis=1).reshape(heads * (nope + v_dim), rank)
        tensors[k_name.replace("attn_k_b", "attn_kv_b") + ".weight"] = Dequantized(kv_b) if quantized else kv_b
    return tensors


def is_skipped(gguf_name: str) -> bool:
    """Tensors read elsewhere or not part of the text model: RoPE tables, and the vision tower
    and projector (``v.*``, ``mm.*``) that Ollama's Gemma 3 files carry in the same file."""
    return gguf_name in _SKIP or gguf_name.startswith(("v.", "mm."))
