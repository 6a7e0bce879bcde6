"""Published ``config.json`` values of popular bases, so ``mlx-tune plan`` works offline.

Written from the models' Hugging Face repos (only the keys that shapes depend on, plus the
ones mlx-lm's model classes read): 7B-class Mistral / Llama 3.1 / Qwen2.5, and Gemma 3
(270M, 1B, 4B, 12B, 27B; the 4B+ repos are multimodal and keep the language model in
``text_config``, which is all mlx-lm loads), Qwen3 (0.6B .. 32B dense and 30B-A3B MoE),
Llama 3.2 (1B, 3B), Phi-4, Mistral Small 3 (24B), gpt-oss-20b and SmolLM3-3B.
``planning.arch.read_source_config`` prefers the local hub cache, then these, then the network.
"""

from __future__ import annotations

KNOWN_CONFIGS: dict[str, dict] = {
    "mistralai/Mistral-7B-Instruct-v0.3": {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 32768,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
    },
    "meta-llama/Llama-3.1-8B-Instruct": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-05,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009],
        "torch_dtype": "bfloat16",
    },
    "Qwen/Qwen2.5-7B-Instruct": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "max_position_embeddings": 32768,
        "max_window_layers": 28,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 131072,
        "use_sliding_window": False,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "torch_dtype": "bfloat16",
    },
}


def _qwen3(hidden: int, intermediate: int, layers: int, heads: int, tied: bool, **extra) -> dict:
    return {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "max_position_embeddings": 40960,
        "max_window_layers": layers, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "rope_scaling": None,
        "sliding_window": None, "use_sliding_window": False, "attention_bias": False, "tie_word_embeddings": tied,
        "hidden_act": "silu", "bos_token_id": 151643, "eos_token_id": 151645, "torch_dtype": "bfloat16", **extra,
    }


for _name, _args in {
    "Qwen/Qwen3-0.6B": (1024, 3072, 28, 16, True),
    "Qwen/Qwen3-1.7B": (2048, 6144, 28, 16, True),
    "Qwen/Qwen3-4B": (2560, 9728, 36, 32, True),
    "Qwen/Qwen3-8B": (4096, 12288, 36, 32, False),
    "Qwen/Qwen3-14B": (5120, 17408, 40, 40, False),
    "Qwen/Qwen3-32B": (5120, 25600, 64, 64, False),
}.items():
    KNOWN_CONFIGS[_name] = _qwen3(*_args)

KNOWN_CONFIGS["Qwen/Qwen3-30B-A3B"] = {
    **_qwen3(2048, 6144, 48, 32, False),
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "num_key_value_heads": 4,
    "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768, "decoder_sparse_step": 1,
    "mlp_only_layers": [], "norm_topk_prob": True, "output_router_logits": False, "router_aux_loss_coef": 0.001,
}


def _gemma3_text(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, head_dim: int,
                 vocab: int, window: int, **extra) -> dict:
    """Gemma 3's language model: five sliding-window layers, then one global one."""
    return {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": head_dim, "vocab_size": vocab,
        "max_position_embeddings": 32768, "query_pre_attn_scalar": head_dim, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "rope_scaling": None,
        "sliding_window": window, "sliding_window_pattern": 6,
        "layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)],
        "attn_logit_softcapping": None, "final_logit_softcapping": None, "attention_bias": False,
        "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True,
        "bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0, "torch_dtype": "bfloat16", **extra,
    }


KNOWN_CONFIGS["google/gemma-3-270m"] = _gemma3_text(640, 2048, 18, 4, 1, 256, 262144, 512)
KNOWN_CONFIGS["google/gemma-3-1b-pt"] = _gemma3_text(1152, 6912, 26, 4, 1, 256, 262144, 512)
for _size, _args, _extra in (
    ("4b", (2560, 10240, 34, 8, 4, 256), {}),
    ("12b", (3840, 15360, 48, 16, 8, 256), {}),
    ("27b", (5376, 21504, 62, 32, 16, 128), {"query_pre_attn_scalar": 168}),
):
    KNOWN_CONFIGS[f"google/gemma-3-{_size}-pt"] = {
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
        "text_config": _gemma3_text(*_args, 262208, 1024, max_position_embeddings=131072,
                                    rope_scaling={"factor": 8.0, "rope_type": "linear"}, **_extra),
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152, "image_size": 896,
                          "intermediate_size": 4304, "num_attention_heads": 16, "num_hidden_layers": 27,
                          "patch_size": 14},
        "mm_tokens_per_image": 256, "boi_token_index": 255999, "eoi_token_index": 256000,
        "image_token_index": 262144, "eos_token_id": [1, 106], "torch_dtype": "bfloat16",
    }


def _llama32(hidden: int, layers: int, heads: int, head_dim: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": 8192, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": 8, "head_dim": head_dim, "vocab_size": 128256, "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
        "rope_scaling": {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": True, "hidden_act": "silu",
        "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "torch_dtype": "bfloat16",
    }


KNOWN_CONFIGS["meta-llama/Llama-3.2-1B-Instruct"] = _llama32(2048, 16, 32, 64)
KNOWN_CONFIGS["meta-llama/Llama-3.2-3B-Instruct"] = _llama32(3072, 28, 24, 128)

KNOWN_CONFIGS["microsoft/phi-4"] = {
    "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_size": 5120, "intermediate_size": 17920,
    "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 10, "vocab_size": 100352,
    "max_position_embeddings": 16384, "original_max_position_embeddings": 16384, "rms_norm_eps": 1e-05,
    "rope_theta": 250000.0, "rope_scaling": None, "partial_rotary_factor": 1.0, "sliding_window": None,
    "tie_word_embeddings": False, "hidden_act": "silu", "bos_token_id": 100257, "eos_token_id": 100265,
    "pad_token_id": 100349, "torch_dtype": "bfloat16",
}
KNOWN_CONFIGS["mistralai/Mistral-Small-24B-Instruct-2501"] = {
    "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 5120,
    "intermediate_size": 32768, "num_hidden_layers": 40, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 128, "vocab_size": 131072, "max_position_embeddings": 32768, "rms_norm_eps": 1e-05,
    "rope_theta": 100000000.0, "sliding_window": None, "tie_word_embeddings": False, "hidden_act": "silu",
    "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
}
KNOWN_CONFIGS["openai/gpt-oss-20b"] = {
    "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "hidden_size": 2880, "intermediate_size": 2880,
    "num_hidden_layers": 24, "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64,
    "vocab_size": 201088, "num_local_experts": 32, "num_experts_per_tok": 4, "experts_per_token": 4,
    "sliding_window": 128, "layer_types": ["sliding_attention", "full_attention"] * 12,
    "max_position_embeddings": 131072, "initial_context_length": 4096, "rms_norm_eps": 1e-05,
    "rope_theta": 150000.0,
    "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                     "original_max_position_embeddings": 4096},
    "attention_bias": True, "swiglu_limit": 7.0, "tie_word_embeddings": False, "hidden_act": "silu",
    "router_aux_loss_coef": 0.9, "output_router_logits": False,
    "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]},
    "eos_token_id": 200002, "pad_token_id": 199999, "torch_dtype": "bfloat16",
}
KNOWN_CONFIGS["HuggingFaceTB/SmolLM3-3B"] = {
    "architectures": ["SmolLM3ForCausalLM"], "model_type": "smollm3", "hidden_size": 2048,
    "intermediate_size": 11008, "num_hidden_layers": 36, "num_attention_heads": 16, "num_key_value_heads": 4,
    "head_dim": 128, "vocab_size": 128256, "max_position_embeddings": 65536, "rms_norm_eps": 1e-06,
    "rope_theta": 5000000.0, "rope_scaling": None, "no_rope_layer_interval": 4,
    "no_rope_layers": [0 if (i + 1) % 4 == 0 else 1 for i in range(36)], "use_sliding_window": False,
    "sliding_window": None, "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": True,
    "hidden_act": "silu", "bos_token_id": None, "eos_token_id": 128012, "pad_token_id": 128004,
    "torch_dtype": "bfloat16",
}

# The base (non-instruct) repos share the shapes of their instruct versions.
KNOWN_CONFIGS["mistralai/Mistral-7B-v0.3"] = KNOWN_CONFIGS["mistralai/Mistral-7B-Instruct-v0.3"]
KNOWN_CONFIGS["meta-llama/Llama-3.1-8B"] = KNOWN_CONFIGS["meta-llama/Llama-3.1-8B-Instruct"]
KNOWN_CONFIGS["Qwen/Qwen2.5-7B"] = KNOWN_CONFIGS["Qwen/Qwen2.5-7B-Instruct"]
for _alias, _same in (("google/gemma-3-1b-it", "google/gemma-3-1b-pt"), ("google/gemma-3-270m-it", "google/gemma-3-270m"),
                         ("google/gemma-3-4b-it", "google/gemma-3-4b-pt"), ("google/gemma-3-12b-it", "google/gemma-3-12b-pt"),
                         ("google/gemma-3-27b-it", "google/gemma-3-27b-pt"),
                         ("meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-1B-Instruct"),
                         ("meta-llama/Llama-3.2-3B", "meta-llama/Llama-3.2-3B-Instruct"),
                         ("mistralai/Mistral-Small-24B-Base-2501", "mistralai/Mistral-Small-24B-Instruct-2501"),
                         ("Qwen/Qwen3-0.6B-Base", "Qwen/Qwen3-0.6B"), ("Qwen/Qwen3-1.7B-Base", "Qwen/Qwen3-1.7B"),
                         ("Qwen/Qwen3-4B-Base", "Qwen/Qwen3-4B"), ("Qwen/Qwen3-8B-Base", "Qwen/Qwen3-8B"),
                         ("Qwen/Qwen3-14B-Base", "Qwen/Qwen3-14B"), ("Qwen/Qwen3-30B-A3B-Base", "Qwen/Qwen3-30B-A3B")):
    KNOWN_CONFIGS[_alias] = KNOWN_CONFIGS[_same]
