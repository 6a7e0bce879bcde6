"""Write tiny GGUF files in tests, the way llama.cpp's converter does (Q/K rows permuted)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T
from mlx.utils import tree_flatten

from mlx_tune.testing.gguf_files import add_tiny_tokenizer
from mlx_tune.testing.tiny import tiny_config, tiny_model

NAMES = {
    "model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf: str) -> str:
    module, suffix = hf.rsplit(".", 1)
    if module.startswith("model.layers."):
        _, _, idx, rest = module.split(".", 3)
        return f"blk.{idx}.{NAMES[rest]}.{suffix}"
    return f"{NAMES[module]}.{suffix}"


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of Q/K rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, qtype=T.Q8_0, special: dict | None = None, **overrides):
    """Write a tiny llama GGUF; returns (path, dense reference weights as the file holds them).

    ``special`` maps HF weight names to a GGUF type for that tensor (e.g. Q6_K bytes).
    """
    cfg = tiny_config("llama", **overrides)
    model = tiny_model("llama", **overrides)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    add_tiny_tokenizer(w)
    reference = {}
    special = special or {}
    for name, arr in tree_flatten(model.parameters()):
        a = np.array(arr, dtype=np.float32)
        if name.endswith("q_proj.weight"):
            a = permute(a, cfg["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            a = permute(a, cfg["num_key_value_heads"])
        t = special.get(name, qtype if a.ndim == 2 else T.F32)
        if t == T.F32:
            data = a
        elif t == T.Q6_K:
            data = random_q6_k(a.shape)
        else:
            data = gguf.quants.quantize(a, t)
        w.add_tensor(gguf_name(name), data, raw_dtype=t)
        reference[name] = gguf.quants.dequantize(data, t) if t != T.F32 else a
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, reference, cfg


def random_q6_k(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Valid Q6_K bytes (256 weights per 210-byte block): random codes, small fp16 scale."""
    rows, cols = shape
    assert cols % 256 == 0
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows, cols // 256, 210), dtype=np.uint8)
    blocks[..., 192:208] = rng.integers(1, 8, size=(rows, cols // 256, 16), dtype=np.int8).view(np.uint8)
    blocks[..., 208:210] = np.full((rows, cols // 256, 1), 0.0005, dtype=np.float16).view(np.uint8)
    return blocks.reshape(rows, -1)
