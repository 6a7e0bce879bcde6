"""Tiny GGUF files of each architecture, written the way llama.cpp's converter writes them.

``write_family_gguf`` takes a tiny mlx-lm model (``tiny.tiny_model``) and does what
``convert_hf_to_gguf.py`` does for its architecture: gguf-py's ``TensorNameMap`` names,
Q/K rows permuted for llama-family models, Gemma norms stored as ``1 + w``, experts as
``(experts, out, in)`` stacks, no ``output`` tensor for a tied head, and the metadata
keys llama.cpp reads. The reading tests load the file back and compare it with the same
weights loaded from a Hugging Face folder.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

# mlx-lm model type -> (GGUF architecture, Q/K permuted, norm offset)
GGUF_ARCH = {
    "llama": ("llama", True, 0.0), "mistral": ("llama", True, 0.0), "granite": ("granite", True, 0.0),
    "qwen2": ("qwen2", False, 0.0), "qwen3": ("qwen3", False, 0.0), "qwen2_moe": ("qwen2moe", False, 0.0),
    "qwen3_moe": ("qwen3moe", False, 0.0), "gemma2": ("gemma2", False, 1.0), "gemma3_text": ("gemma3", False, 1.0),
    "phi3": ("phi3", False, 0.0), "olmo2": ("olmo2", False, 0.0), "starcoder2": ("starcoder2", False, 0.0),
    "deepseek_v2": ("deepseek2", False, 0.0),
}


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of Q/K rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_freqs(cfg: dict) -> np.ndarray:
    """The ``rope_freqs`` tensor llama.cpp's converter writes for Llama 3 RoPE scaling (its code, transcribed)."""
    rs, dim = cfg["rope_scaling"], cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    freqs = 1.0 / (cfg["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, low, high = rs.get("factor", 8.0), rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
    old = rs.get("original_max_position_embeddings", 8192)
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def _metadata(arch: str, cfg: dict) -> list[tuple[str, str, Any]]:
    """(key, kind, value) for the hyperparameters llama.cpp's converter writes for ``arch``."""
    heads, hd = cfg["num_attention_heads"], cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    meta = [
        ("block_count", "u32", cfg["num_hidden_layers"]), ("context_length", "u32", cfg["max_position_embeddings"]),
        ("embedding_length", "u32", cfg["hidden_size"]), ("feed_forward_length", "u32", cfg["intermediate_size"]),
        ("attention.head_count", "u32", heads), ("attention.head_count_kv", "u32", cfg["num_key_value_heads"]),
        ("rope.freq_base", "f32", cfg["rope_theta"]), ("vocab_size", "u32", cfg["vocab_size"]),
    ]
    if arch == "starcoder2":
        meta.append(("attention.layer_norm_epsilon", "f32", cfg["norm_epsilon"]))
    else:
        meta.append(("attention.layer_norm_rms_epsilon", "f32", cfg["rms_norm_eps"]))
    if arch == "deepseek2":  # llama.cpp's MLA form: absorbed sizes, per-head sizes as *_mla, one KV head
        rank, rope, nope, v = cfg["kv_lora_rank"], cfg["qk_rope_head_dim"], cfg["qk_nope_head_dim"], cfg["v_head_dim"]
        rs = cfg["rope_scaling"]
        meta = [m for m in meta if m[0] != "attention.head_count_kv"] + [
            ("attention.head_count_kv", "u32", 1), ("attention.key_length", "u32", rank + rope),
            ("attention.value_length", "u32", rank), ("attention.key_length_mla", "u32", nope + rope),
            ("attention.value_length_mla", "u32", v), ("rope.dimension_count", "u32", rope),
            ("attention.kv_lora_rank", "u32", rank), ("leading_dense_block_count", "u32", cfg["first_k_dense_replace"]),
            ("expert_count", "u32", cfg["n_routed_experts"]), ("expert_shared_count", "u32", cfg["n_shared_experts"]),
            ("expert_used_count", "u32", cfg["num_experts_per_tok"]),
            ("expert_feed_forward_length", "u32", cfg["moe_intermediate_size"]),
            ("expert_weights_scale", "f32", cfg.get("routed_scaling_factor", 1.0)), ("expert_gating_func", "u32", 1),
            ("rope.scaling.type", "str", "yarn"), ("rope.scaling.factor", "f32", rs["factor"]),
            ("rope.scaling.original_context_length", "u32", rs["original_max_position_embeddings"]),
            ("rope.scaling.yarn_log_multiplier", "f32", 0.1 * rs["mscale_all_dim"])]
        if cfg.get("q_lora_rank"):
            meta.append(("attention.q_lora_rank", "u32", cfg["q_lora_rank"]))
        return [(f"{arch}.{key}", kind, value) for key, kind, value in meta]
    if arch == "phi3":  # head size is hidden / heads; the rotary part is rope.dimension_count
        meta.append(("rope.dimension_count", "u32", int(hd * cfg.get("partial_rotary_factor", 1.0))))
        meta.append(("rope.scaling.original_context_length", "u32", cfg.get("original_max_position_embeddings", 4096)))
    else:
        meta += [("attention.key_length", "u32", hd), ("attention.value_length", "u32", hd)]
    if arch in ("qwen2moe", "qwen3moe"):
        meta += [("expert_count", "u32", cfg["num_experts"]), ("expert_used_count", "u32", cfg["num_experts_per_tok"]),
                 ("expert_feed_forward_length", "u32", cfg["moe_intermediate_size"])]
        if arch == "qwen2moe":
            meta.append(("expert_shared_feed_forward_length", "u32", cfg["shared_expert_intermediate_size"]))
    if arch == "gemma2":
        meta += [("attn_logit_softcapping", "f32", cfg["attn_logit_softcapping"]),
                 ("final_logit_softcapping", "f32", cfg["final_logit_softcapping"]),
                 ("attention.sliding_window", "u32", 4096)]
    if arch == "gemma3":  # llama.cpp's gemma3: every 6th layer global, local rope base 10000
        meta.append(("attention.sliding_window", "u32", cfg["sliding_window"]))
    if arch == "granite":
        meta += [("attention.scale", "f32", cfg["attention_multiplier"]), ("embedding_scale", "f32",
                 cfg["embedding_multiplier"]), ("residual_scale", "f32", cfg["residual_multiplier"]),
                 ("logit_scale", "f32", cfg["logits_scaling"])]
    return [(f"{arch}.{key}", kind, value) for key, kind, value in meta]


def add_tiny_tokenizer(w: Any) -> None:
    """The tiny test tokenizer (testing.tiny) into a GGUFWriter's metadata, as llama.cpp's converter writes a BPE one."""
    from mlx_tune.testing.tiny import CHATML_TEMPLATE, SPECIAL_TOKENS, tiny_hf_tokenizer

    vocab = tiny_hf_tokenizer().get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIAL_TOKENS else 1 for t in tokens])
    w.add_token_merges([])
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML_TEMPLATE)


def random_blocks(ttype: Any, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Valid bytes of a block type the gguf package reads but cannot write: random codes,
    small scales (Q4_K, Q5_K: fp16 d and dmin first; IQ4_NL, IQ4_XS: fp16 d first; Q6_K:
    16 int8 sub-block scales, then fp16 d, last). A ``(rows, bytes)`` uint8 array."""
    import gguf
    from gguf import GGMLQuantizationType as T

    block, size = gguf.GGML_QUANT_SIZES[ttype]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    if ttype == T.Q6_K:
        blocks[..., 192:208] = rng.integers(1, 8, size=(rows, cols // block, 16), dtype=np.int8).view(np.uint8)
        blocks[..., 208:210] = np.full((rows, cols // block, 1), 0.0005, dtype=np.float16).view(np.uint8)
    elif ttype in (T.Q4_K, T.Q5_K, T.IQ4_NL, T.IQ4_XS):
        blocks[..., 0:2] = np.full((rows, cols // block, 1), 0.002, dtype=np.float16).view(np.uint8)
        if ttype in (T.Q4_K, T.Q5_K):
            blocks[..., 2:4] = np.full((rows, cols // block, 1), 0.001, dtype=np.float16).view(np.uint8)
    else:
        raise ValueError(f"random_blocks: no layout known for {ttype.name}")
    return blocks.reshape(rows, -1)


def write_family_gguf(path: Path, model_type: str, seed: int = 0, types: dict | None = None, tied: bool = False,
                      raw: dict | None = None, **overrides) -> Path:
    """Write the tiny ``model_type`` model (``tiny_model(model_type, seed, **overrides)``) as a
    GGUF file. ``types`` maps a GGUF tensor-name suffix (``ffn_down_exps.weight``) to a GGML
    type to store it in (default F32); 1-D tensors stay F32. ``tied`` leaves out the
    ``output`` tensor (the converter's tied head) even where the model has an lm_head.
    ``raw`` maps full GGUF tensor names to ``(bytes, type)`` written in place of the model's
    weights (types gguf can read but not write, e.g. ``random_blocks``)."""
    import gguf
    from gguf.constants import MODEL_ARCH, MODEL_ARCH_NAMES
    from mlx.utils import tree_flatten

    from mlx_tune.testing.tiny import tiny_config, tiny_model

    arch, permuted, offset = GGUF_ARCH[model_type]
    cfg = tiny_config(model_type, **overrides)
    model = tiny_model(model_type, seed=seed, **overrides)
    n_layers = cfg["num_hidden_layers"]
    tmap = gguf.get_tensor_name_map(next(MODEL_ARCH(a) for a, n in MODEL_ARCH_NAMES.items() if n == arch), n_layers)
    w = gguf.GGUFWriter(str(path), arch)
    kinds: dict[str, Any] = {"u32": w.add_uint32, "f32": w.add_float32, "str": w.add_string}
    for key, kind, value in _metadata(arch, cfg):
        kinds[kind](key, value)
    add_tiny_tokenizer(w)
    flat: Any = tree_flatten(model.parameters())
    for name, arr in flat:
        module, suffix = name.rsplit(".", 1)
        gname = tmap.get_name(module.replace(".switch_mlp.", ".experts."))
        if gname is None:
            raise ValueError(f"{model_type}: no GGUF name for {name}")
        if tied and gname == "output":
            continue
        a = np.array(arr, dtype=np.float32)
        if permuted and module.endswith(".q_proj") and suffix == "weight":
            a = permute(a, cfg["num_attention_heads"])
        elif permuted and module.endswith(".k_proj") and suffix == "weight":
            a = permute(a, cfg["num_key_value_heads"])
        if offset and gname.endswith("norm") and suffix == "weight":
            a = a + offset
        if arch == "deepseek2" and gname.endswith("attn_kv_b"):  # split per head as the converter does
            heads, nope = cfg["num_attention_heads"], cfg["qk_nope_head_dim"]
            kv_b = a.reshape(heads, nope + cfg["v_head_dim"], a.shape[-1])
            w.add_tensor(gname.replace("attn_kv_b", "attn_k_b") + ".weight",
                         np.ascontiguousarray(kv_b[:, :nope].transpose(0, 2, 1)))
            w.add_tensor(gname.replace("attn_kv_b", "attn_v_b") + ".weight", np.ascontiguousarray(kv_b[:, nope:]))
            continue
        full = f"{gname}.{suffix}"
        if full in (raw or {}):
            data, rtype = raw[full]  # type: ignore[index]
            w.add_tensor(full, data, raw_dtype=rtype)
            continue
        ttype = next((t for end, t in (types or {}).items() if full.endswith(end)), gguf.GGMLQuantizationType.F32)
        if a.ndim == 1 or ttype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(full, a)
        else:
            w.add_tensor(full, gguf.quants.quantize(a, ttype), raw_dtype=ttype)
    if permuted and (cfg.get("rope_scaling") or {}).get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_rope_freqs(cfg))
    if arch == "phi3" and (cfg.get("rope_scaling") or {}).get("type") in ("longrope", "su"):
        w.add_tensor("rope_factors_long.weight", np.array(cfg["rope_scaling"]["long_factor"], dtype=np.float32))
        w.add_tensor("rope_factors_short.weight", np.array(cfg["rope_scaling"]["short_factor"], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
