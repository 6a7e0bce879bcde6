"""The model families mlx_tune is tested on: tiny configs of real mlx-lm architectures.

``FAMILIES`` maps a family name to its ``model_type`` and the config overrides (on top
of ``tiny.tiny_config``) that make a model of a few thousand parameters which still has
the family's features: sliding-window layers smaller than a test row, attention sinks,
softcapping, grouped or single KV heads, MLA, experts, recurrent layers. The tests build
every family from it (``tests/test_families.py``), and ``scripts/family_table.py`` renders
the README's table from the same registry and the checks those tests assert.
"""

from __future__ import annotations

from dataclasses import dataclass, field

WINDOW = 5  # sliding windows shorter than the test examples, so the window matters


@dataclass(frozen=True)
class Family:
    """One row of the family table: a display name, the mlx-lm ``model_type``, tiny overrides."""

    name: str
    model_type: str
    overrides: dict = field(default_factory=dict)
    features: str = ""
    recurrent: bool = False  # state runs across tokens: packing falls back to unpacked rows
    slow: bool = False  # heavier tiny model: its test is marked slow
    # The serve cell. "yes": the server's batched decoder answers concurrent requests of any
    # lengths; else why not (an upstream mlx-lm limitation the tests pin down)
    serve: str = "yes"


def _moe(**kw) -> dict:
    return {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, **kw}


_FAMILIES = [
    Family("Llama 3.2", "llama", {"tie_word_embeddings": True, "rope_scaling": {
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}}, "tied embeddings, llama3 RoPE scaling"),
    Family("Mistral", "mistral", {"tie_word_embeddings": False}, "GQA"),
    Family("Qwen2", "qwen2", {}, "QKV bias"),
    Family("Qwen3", "qwen3", {}, "q/k norms"),
    Family("Qwen3 MoE", "qwen3_moe", _moe(decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
                                          tie_word_embeddings=False), "experts"),
    Family("Gemma 2", "gemma2", {"num_key_value_heads": 2, "query_pre_attn_scalar": 16.0,
                                 "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
           "softcapped attention and logits",
           # mlx-lm's gemma2 broadcasts a batched (B, 1, L, S) mask against (B, kv, repeats, L, S) scores
           serve="one request at a time"),
    Family("Gemma 3", "gemma3_text", {"num_key_value_heads": 1, "sliding_window": WINDOW, "sliding_window_pattern": 2,
                                      "query_pre_attn_scalar": 16},
           "local/global layers (sliding window), MQA"),
    Family("Phi-3 / Phi-4", "phi3", {"num_key_value_heads": 4, "partial_rotary_factor": 0.5}, "fused QKV, partial RoPE"),
    Family("Granite", "granite", {"logits_scaling": 2.0, "attention_multiplier": 0.25, "embedding_multiplier": 2.0,
                                  "residual_multiplier": 0.5, "attention_bias": False, "mlp_bias": False},
           "scaled residuals and logits"),
    Family("OLMo 2", "olmo2", {}, "q/k norms on full width"),
    Family("Cohere", "cohere", {"layer_norm_eps": 1e-5, "logit_scale": 0.5, "use_qk_norm": True},
           "parallel block, LayerNorm, logit scale"),
    Family("StarCoder2", "starcoder2", {"norm_epsilon": 1e-5, "sliding_window": WINDOW, "tie_word_embeddings": True},
           "LayerNorm, biases, sliding window"),
    Family("SmolLM3", "smollm3", {"no_rope_layer_interval": 2}, "layers without RoPE"),
    Family("Mixtral", "mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2, "tie_word_embeddings": False},
           "experts"),
    Family("gpt-oss", "gpt_oss", {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": WINDOW,
                                  "layer_types": ["sliding_attention", "full_attention"]},
           "attention sinks, alternating sliding window, experts"),
    Family("DeepSeek V3", "deepseek_v3", {"num_key_value_heads": 4, "kv_lora_rank": 16, "q_lora_rank": 24,
                                          "qk_rope_head_dim": 8, "v_head_dim": 12, "qk_nope_head_dim": 16,
                                          "n_routed_experts": 4, "n_shared_experts": 1, "num_experts_per_tok": 2,
                                          "moe_intermediate_size": 32, "first_k_dense_replace": 1,
                                          "topk_method": "noaux_tc", "n_group": 1, "topk_group": 1},
           "MLA, experts"),
    Family("Cohere2", "cohere2", {"layer_norm_eps": 1e-5, "logit_scale": 0.5, "sliding_window": WINDOW,
                                  "sliding_window_pattern": 2, "head_dim": 16}, "local/global layers, parallel block"),
    Family("Qwen3-Next", "qwen3_next", _moe(
        linear_num_value_heads=2, linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
        linear_conv_kernel_dim=4, decoder_sparse_step=1, shared_expert_intermediate_size=32, mlp_only_layers=[],
        partial_rotary_factor=0.5, full_attention_interval=2, tie_word_embeddings=False),
           "GatedDelta linear attention + full attention", recurrent=True),
    Family("Mamba", "mamba", {"state_size": 8, "conv_kernel": 4, "use_bias": False, "use_conv_bias": True,
                              "time_step_rank": 8, "intermediate_size": 128}, "selective SSM", recurrent=True),
]

FAMILIES: dict[str, Family] = {f.model_type: f for f in _FAMILIES}


# ---------------------------------------------------------------------------
# The README table: every cell is a claim a test in tests/test_families.py asserts
# ---------------------------------------------------------------------------

COLUMNS = ("train", "pack", "GGUF in", "fuse", "GGUF out", "serve")
TABLE_START, TABLE_END = "<!-- family-table:start -->", "<!-- family-table:end -->"


def gguf_in_types() -> set[str]:
    from mlx_tune.model.gguf import ARCHS

    return set(ARCHS) | {a.model_type for a in ARCHS.values()}  # a Mistral GGUF is read as llama


def gguf_out_types() -> set[str]:
    from mlx_tune.export.gguf import ARCHS

    return set(ARCHS)


def cells(f: Family) -> dict[str, str]:
    """The table row of ``f``: train, fuse and serve are tested for every family; pack is
    exact packing, or unpacked rows after one warning; GGUF columns follow the readers and writers."""
    return {
        "train": "yes",
        "pack": "unpacked rows" if f.recurrent else "yes",
        "GGUF in": "yes" if f.model_type in gguf_in_types() else "-",
        "fuse": "yes",
        "GGUF out": "yes" if f.model_type in gguf_out_types() else "-",
        "serve": f.serve,
    }


def table() -> str:
    """The markdown table between the README's family-table markers."""
    head = "| family (`model_type`) | what the tiny test model has | " + " | ".join(COLUMNS) + " |"
    rule = "| --- | --- | " + " | ".join(":-:" for _ in COLUMNS) + " |"
    rows = [f"| {f.name} (`{f.model_type}`) | {f.features} | " + " | ".join(cells(f).values()) + " |"
            for f in _FAMILIES]
    return "\n".join([head, rule, *rows])


def readme_with_table(readme: str) -> str:
    """``readme`` with the text between the family-table markers replaced by ``table()``."""
    start, end = readme.index(TABLE_START) + len(TABLE_START), readme.index(TABLE_END)
    return readme[:start] + "\n" + table() + "\n" + readme[end:]
