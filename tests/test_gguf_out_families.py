"""GGUF out for Gemma 2/3, Phi-3, Granite and OLMo 2, read back with the gguf package's reader.

Every tensor of the tiny model is in the file under llama.cpp's name with the value
llama.cpp expects (Gemma norms as 1 + w, Granite's Q/K rows permuted, Phi-3's fused
QKV and gate/up as they are), and each family's own metadata keys are there.
"""

from __future__ import annotations

import gguf
import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_tune.errors import UserError
from mlx_tune.export.gguf import ARCHS, check_exportable, gguf_name, permute, write_gguf
from mlx_tune.export.writers import gguf_tensors
from mlx_tune.model.gguf import field_value
from mlx_tune.testing.families import FAMILIES
from mlx_tune.testing.tiny import tiny_config, tiny_hf_tokenizer, tiny_model

NEW = ["gemma2", "gemma3_text", "phi3", "granite", "olmo2"]


def _written(tmp_path, model_type: str, gguf_type: str = "f16"):
    overrides = FAMILIES[model_type].overrides
    model = tiny_model(model_type, seed=3, **overrides)
    config = tiny_config(model_type, **overrides)
    path = tmp_path / f"{model_type}.gguf"
    write_gguf(path, config, gguf_tensors(model, gguf_type, None), gguf_type, tiny_hf_tokenizer())
    reader = gguf.GGUFReader(str(path))
    meta = {k: field_value(f) for k, f in reader.fields.items()}
    return model, config, {t.name: t for t in reader.tensors}, meta


@pytest.mark.parametrize("model_type", NEW)
def test_every_tensor_under_llama_cpps_name_with_llama_cpps_values(tmp_path, model_type):
    model, config, tensors, meta = _written(tmp_path, model_type)
    arch = ARCHS[model_type]
    assert meta["general.architecture"] == arch.gguf_arch
    weights = {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())}
    if ARCHS[model_type].needs_output and "lm_head.weight" not in weights:  # tied: llama.cpp wants a copy
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    assert set(tensors) == {gguf_name(k, model_type) for k in weights}
    # Every name is one llama.cpp loads for this architecture (the gguf package's MODEL_TENSORS).
    known = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[next(
        a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch.gguf_arch)]}
    for name in tensors:
        base = name.rsplit(".", 1)[0]
        assert any(base == k.format(bid=b) for k in known for b in (0, 1)), name
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    for key, want in weights.items():
        got = np.asarray(tensors[gguf_name(key, model_type)].data, dtype=np.float32).reshape(want.shape)
        if arch.norm_shift and key.endswith("norm.weight"):
            want = want + arch.norm_shift
        if arch.permute_qk and key.endswith(("q_proj.weight", "k_proj.weight")):
            want = permute(want, heads if "q_proj" in key else kv_heads)
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3, err_msg=key)


def test_family_names_llama_cpp_distinguishes(tmp_path):
    """The names that differ between families (the converter's per-architecture table)."""
    assert gguf_name("model.layers.4.post_attention_layernorm.weight", "llama") == "blk.4.ffn_norm.weight"
    assert gguf_name("model.layers.4.post_attention_layernorm.weight", "gemma2") == "blk.4.post_attention_norm.weight"
    assert gguf_name("model.layers.4.pre_feedforward_layernorm.weight", "gemma3_text") == "blk.4.ffn_norm.weight"
    assert gguf_name("model.layers.4.post_feedforward_layernorm.weight", "olmo2") == "blk.4.post_ffw_norm.weight"
    assert gguf_name("model.layers.12.self_attn.qkv_proj.weight", "phi3") == "blk.12.attn_qkv.weight"
    assert gguf_name("model.layers.0.mlp.gate_up_proj.weight", "phi3") == "blk.0.ffn_up.weight"
    assert gguf_name("model.layers.0.mlp.experts.weight", "olmo2") is None


def test_family_metadata(tmp_path):
    _, cfg, _, meta = _written(tmp_path, "gemma2")
    assert meta["gemma2.attn_logit_softcapping"] == cfg["attn_logit_softcapping"]
    assert meta["gemma2.final_logit_softcapping"] == cfg["final_logit_softcapping"]
    assert meta["gemma2.attention.sliding_window"] == 4096  # mlx-lm's gemma2 attends to everything it is given
    _, cfg, _, meta = _written(tmp_path, "gemma3_text")
    assert meta["gemma3.attention.sliding_window"] == cfg["sliding_window"]
    # pattern 2: layer 0 local (sliding), layer 1 global, as mlx-lm's (i + 1) % pattern rule
    assert meta["gemma3.attention.sliding_window_pattern"] == [True, False]
    assert meta["gemma3.rope.freq_base_swa"] == 10000.0
    _, cfg, _, meta = _written(tmp_path, "granite")
    assert (meta["granite.attention.scale"], meta["granite.embedding_scale"], meta["granite.residual_scale"],
            meta["granite.logit_scale"]) == (0.25, 2.0, 0.5, 2.0)
    _, cfg, _, meta = _written(tmp_path, "phi3", "q8_0")
    assert meta["phi3.rope.dimension_count"] == cfg["head_dim"] // 2  # partial_rotary_factor 0.5
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0


def test_longrope_is_refused_before_writing():
    config = tiny_config("phi3", rope_scaling={"type": "longrope", "long_factor": [1.0] * 8,
                                               "short_factor": [1.0] * 8})
    with pytest.raises(UserError, match="LongRoPE"):
        check_exportable(config, [], "f16")


@pytest.mark.parametrize("model_type", NEW)
def test_our_reader_loads_what_the_writer_wrote(tmp_path, model_type):
    """Written as f16 and loaded back by ``load_model``: the same logits as the model written."""
    from mlx_tune.model.loading import load_model

    model, _, _, _ = _written(tmp_path, model_type)
    back, _, info = load_model(tmp_path / f"{model_type}.gguf")
    assert info.kind == "gguf"
    ids = mx.array([[1, 5, 9, 2, 7, 3, 11, 4]])
    want, got = model(ids).astype(mx.float32), back(ids).astype(mx.float32)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-2, atol=1e-2)
