"""GGUF in, per family: a tiny model written as llama.cpp writes it loads to the same logits
as the same weights from a Hugging Face folder; unreadable files fail from the header alone."""

from __future__ import annotations

import gguf
import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from mlx_tune.config import QuantizeConfig
from mlx_tune.errors import ModelLoadError
from mlx_tune.model.loading import load_model
from mlx_tune.testing.families import FAMILIES
from mlx_tune.testing.gguf_files import random_blocks, write_family_gguf
from mlx_tune.testing.tiny import save_tiny_folder

# Not in the accelerator suite: these compare two loadings of the same fp32 weights to 1e-4, which
# the accelerator branch's float16 compute (and its float32-only CPU GatherMM for experts) cannot.

IDS = [5, 60, 71, 3, 99, 140, 7, 33, 250, 12, 1, 2]  # longer than the sliding windows

_MOE2 = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
         "shared_expert_intermediate_size": 48, "tie_word_embeddings": False}
_DSV2 = {"num_key_value_heads": 4, "kv_lora_rank": 16, "q_lora_rank": 24, "qk_rope_head_dim": 8, "v_head_dim": 12,
         "qk_nope_head_dim": 16, "n_routed_experts": 4, "n_shared_experts": 1, "num_experts_per_tok": 2,
         "moe_intermediate_size": 32, "first_k_dense_replace": 1, "topk_method": "greedy", "routed_scaling_factor": 1.5,
         "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512, "beta_fast": 32,
                          "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}, "tie_word_embeddings": False}
CASES = {
    "llama": FAMILIES["llama"].overrides,  # Llama 3.2: tied head, llama3 RoPE scaling (rope_freqs tensor)
    "mistral": {"tie_word_embeddings": False},
    "qwen2": {},
    "qwen3": {},
    "qwen2_moe": _MOE2,
    "qwen3_moe": FAMILIES["qwen3_moe"].overrides,
    "gemma2": {**FAMILIES["gemma2"].overrides, "query_pre_attn_scalar": 16},  # an int, as transformers checks
    # llama.cpp's gemma3 has a global layer every 6th; the local layers use rope base 10000
    "gemma3_text": {**FAMILIES["gemma3_text"].overrides, "sliding_window_pattern": 6, "num_hidden_layers": 6,
                    "rope_theta": 1e6},
    "gemma3_text:tied": {**FAMILIES["gemma3_text"].overrides, "sliding_window_pattern": 6, "num_hidden_layers": 6},
    "phi3": FAMILIES["phi3"].overrides,
    # Phi-3.5 / Phi-4-mini: longrope factors as rope_factors_long/short tensors; a short original
    # context so the test prompt runs past it
    "phi3:longrope": {**FAMILIES["phi3"].overrides, "original_max_position_embeddings": 8,
                      "max_position_embeddings": 64, "rope_scaling": {
                          "type": "longrope", "long_factor": [1.0, 2.0, 4.0, 8.0], "short_factor": [1.0, 1.0, 1.5, 2.0]}},
    "granite": FAMILIES["granite"].overrides,
    "olmo2": FAMILIES["olmo2"].overrides,
    "starcoder2": FAMILIES["starcoder2"].overrides,
    "deepseek_v2": _DSV2,
    "deepseek_v2:lite": {**_DSV2, "q_lora_rank": None},  # V2-Lite: a plain q_proj
}


def _logits(model) -> np.ndarray:
    return np.array(model(mx.array([IDS]))[0].astype(mx.float32))


@pytest.mark.parametrize("model_type", list(CASES))
def test_family_gguf_matches_hf_folder(tmp_path, model_type):
    overrides = CASES[model_type]
    model_type, _, variant = model_type.partition(":")
    path = write_family_gguf(tmp_path / "m.gguf", model_type, tied=variant == "tied", **overrides)
    folder = save_tiny_folder(tmp_path / "hf", model_type, **overrides)
    if variant == "tied":  # Gemma 3 as published: no lm_head, the embeddings are the head
        weights = mx.load(str(folder / "model.safetensors"))
        del weights["lm_head.weight"]
        mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
    from_gguf, tok, info = load_model(path)
    from_hf, _, _ = load_model(folder)
    assert info.kind == "gguf" and info.quantization is None
    got, want = _logits(from_gguf), _logits(from_hf)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    assert tok.encode("hi") == [74, 75]


def test_mistral_arch_name_and_a_vision_tower_are_read_as_text_llama(tmp_path):
    """Older Mistral files say "mistral"; Ollama's Gemma 3 files carry v.* / mm.* vision tensors."""
    from mlx_tune.model.gguf import read_gguf_header

    path = write_family_gguf(tmp_path / "m.gguf", "mistral", **CASES["mistral"])
    reader = gguf.GGUFReader(str(path))
    out = gguf.GGUFWriter(str(tmp_path / "mistral.gguf"), "mistral")
    for name, fld in reader.fields.items():
        if not name.startswith("GGUF.") and name != "general.architecture":
            _copy_field(out, name.replace("llama.", "mistral."), fld)
    for t in reader.tensors:
        out.add_tensor(t.name, np.asarray(t.data).reshape(tuple(int(x) for x in reversed(t.shape.tolist()))))
    out.add_tensor("v.blk.0.attn_q.weight", np.zeros((8, 8), np.float32))
    out.add_tensor("mm.input_projection.weight", np.zeros((8, 8), np.float32))
    out.write_header_to_file(), out.write_kv_data_to_file(), out.write_tensors_to_file(), out.close()
    assert read_gguf_header(tmp_path / "mistral.gguf").metadata["general.architecture"] == "mistral"
    got, _, _ = load_model(tmp_path / "mistral.gguf")
    want, _, _ = load_model(path)
    np.testing.assert_allclose(_logits(got), _logits(want), atol=1e-6)


def test_expert_stacks_in_q8_0_map_exactly(tmp_path):
    """3-D expert stacks in a block type go through the memory-mapped reader, block for block."""
    overrides = FAMILIES["qwen3_moe"].overrides
    path = write_family_gguf(tmp_path / "q.gguf", "qwen3_moe", types={"_exps.weight": T.Q8_0}, **overrides)
    model, _, info = load_model(path)
    assert info.quantization == {"mode": "affine", "bits": 8, "group_size": 32}
    gate = model.model.layers[0].mlp.switch_mlp.gate_proj
    assert gate.weight.shape[0] == 4 and gate.bits == 8
    ref, _, _ = load_model(save_tiny_folder(tmp_path / "hf", "qwen3_moe", **overrides))
    want = np.array(ref.model.layers[0].mlp.switch_mlp.gate_proj.weight)
    got = np.array(mx.dequantize(gate.weight, gate.scales, gate.biases, group_size=32, bits=8).astype(mx.float32))
    blocks = gguf.quants.dequantize(gguf.quants.quantize(want, T.Q8_0), T.Q8_0)
    np.testing.assert_allclose(got, blocks, atol=1e-4)  # the same codes; fp16 output rounding only


@pytest.mark.parametrize("ttype", [T.Q4_K, T.Q5_K, T.IQ4_NL, T.IQ4_XS])
def test_block_type_tensor_is_dequantized_and_requantized(tmp_path, ttype):
    """Types the gguf package can read but not write: dequantized as it does, re-quantized to the request."""
    from mlx_tune.model.gguf import read_gguf

    raw = random_blocks(ttype, 64, 256)
    write_family_gguf(tmp_path / "k4.gguf", "qwen3", raw={"blk.0.ffn_down.weight": (raw, ttype)},
                      intermediate_size=256)
    want = gguf.quants.dequantize(raw, ttype)
    assert want.shape == (64, 256) and np.isfinite(want).all()
    tensors, _ = read_gguf(tmp_path / "k4.gguf")
    np.testing.assert_array_equal(np.array(tensors["blk.0.ffn_down.weight"].array), want)
    model, _, info = load_model(tmp_path / "k4.gguf", QuantizeConfig(bits=8, group_size=32))
    down = model.model.layers[0].mlp.down_proj
    assert down.bits == 8 and any("re-quantized to affine 8-bit" in n for n in info.notes)
    got = np.array(mx.dequantize(down.weight, down.scales, down.biases, group_size=32, bits=8))
    assert np.abs(got - want).max() < 0.01 * np.abs(want).max()


def _copy_field(out, name, fld):
    from mlx_tune.model.gguf import field_value

    vtype = fld.types[0]
    value = field_value(fld)
    if vtype == gguf.GGUFValueType.ARRAY:
        out.add_array(name, value)
    elif vtype == gguf.GGUFValueType.STRING:
        out.add_string(name, value)
    else:
        out.add_key_value(name, value, vtype)


def _big_file(tmp_path, arch: str, ttype=T.F16, n=4096):
    """A file whose tensor data would take long to read: ~n*n elements per tensor."""
    w = gguf.GGUFWriter(str(tmp_path / f"{arch}.gguf"), arch)
    w.add_tensor_info("token_embd.weight", (n, n), np.dtype(np.float16), n * n * 2, raw_dtype=ttype)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_ti_data_to_file()
    w.close()
    with open(tmp_path / f"{arch}.gguf", "ab") as fh:  # sparse data: the size of a real file, no writing
        fh.truncate(fh.tell() + 32 + n * n * 2)
    return tmp_path / f"{arch}.gguf"


def test_unsupported_arch_fails_from_the_header(tmp_path):
    path = _big_file(tmp_path, "rwkv7")
    with pytest.raises(ModelLoadError, match=r"architecture 'rwkv7' is not supported; supported: .*gemma3"):
        load_model(path)


def test_unsupported_tensor_type_fails_from_the_header(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    block, size = gguf.GGML_QUANT_SIZES[T.Q8_1]
    nbytes = 256 * 256 // block * size
    w.add_tensor_info("token_embd.weight", (256, 256 // block * size), np.dtype(np.uint8), nbytes, raw_dtype=T.Q8_1)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_ti_data_to_file()
    w.close()
    with open(tmp_path / "t.gguf", "ab") as fh:
        fh.truncate(fh.tell() + 32 + nbytes)
    with pytest.raises(ModelLoadError, match=r"GGUF type Q8_1, which mlx_tune cannot read; readable types: .*Q4_K"):
        load_model(tmp_path / "t.gguf")


def test_readme_gguf_in_cell_is_what_these_tests_load():
    """The family table's "GGUF in" column claims exactly the families tested above."""
    from mlx_tune.testing.families import cells

    for model_type, family in FAMILIES.items():
        assert (cells(family)["GGUF in"] == "yes") == (model_type in CASES), model_type
