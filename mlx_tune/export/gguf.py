"""Write a model as a GGUF file for llama.cpp / Ollama: the inverse of ``mlx_tune.model.gguf``.

Tensor names are llama.cpp's (``blk.N.attn_q.weight``, ...; per architecture in
``export.gguf_arch``, with Gemma's norm offset and each family's own metadata), the Q
and K rows of llama-family models are permuted back to llama.cpp's rotary layout::

    w.reshape(heads, 2, head_dim / 2, in).swapaxes(1, 2).reshape(out, in)

(what ``convert_hf_to_gguf.py`` does; ``gguf._unpermute`` undoes it), and 2-D weights are
stored as F16, Q8_0 (``w = d * q``, q int8, 32 per block) or Q4_0 (``w = d * (q - 8)``)
through ``gguf.quants.quantize``; 1-D tensors (norms, biases) stay F32. The tokenizer
(tokens, token types, merges, special ids, pre-tokenizer) and the chat template go into
the metadata. Tensors are streamed: the header is written from shapes alone, then each
tensor is computed, quantized, written and dropped, so only one dense layer is in memory.

K-quant outputs (q4_k_m, q6_k) are not offered: the gguf package dequantizes K-quants but
has no quantizer for them (``gguf.quants.Q4_K`` has no ``quantize_blocks``), and a
home-made K-quant that llama.cpp's own ``llama-quantize`` would not write is not an option.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlx_tune.errors import UserError
from mlx_tune.export.gguf_arch import ARCHS, Arch, default_rope_theta, extra_metadata, gguf_name, rope_dimensions
from mlx_tune.model import gguf as G

# ARCHS and gguf_name are re-exported: the writer's architecture list and names (families table, LoRA export).
__all__ = ["ARCHS", "GGUFTensor", "check_exportable", "gguf_name", "permute", "write_gguf"]


def _types() -> dict:
    from gguf import GGMLQuantizationType as T

    return {"f16": T.F16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}


def _file_types() -> dict:
    from gguf import LlamaFileType as F

    return {"f16": F.MOSTLY_F16, "q8_0": F.MOSTLY_Q8_0, "q4_0": F.MOSTLY_Q4_0}


BLOCK_WIDTH = {"f16": 1, "q8_0": 32, "q4_0": 32}  # weights per block along a row


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's Q/K row permutation (inverse of ``gguf._unpermute``)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass
class GGUFTensor:
    """One tensor to write: HF name, logical shape, GGUF type name, and how to compute it."""

    hf_name: str
    shape: tuple[int, ...]
    qtype: str  # "f32" for 1-D tensors, else one of BLOCK_WIDTH
    dense: Callable[[], Iterable[np.ndarray]]  # float32 blocks of rows, HF layout


def check_exportable(config: dict, tensors: Iterable[tuple[str, tuple[int, ...]]], gguf_type: str) -> Arch:
    """Raise a one-line UserError when the architecture or a shape cannot be written as ``gguf_type``."""
    if gguf_type not in BLOCK_WIDTH:
        raise UserError(f"fuse.gguf_type: {gguf_type!r} is not supported; use one of {', '.join(BLOCK_WIDTH)}")
    model_type = config.get("model_type")
    if model_type not in ARCHS:
        raise UserError(
            f"GGUF export: model_type {model_type!r} is not supported; supported: {', '.join(sorted(ARCHS))} "
            "(use --format mlx or --format hf)"
        )
    width = BLOCK_WIDTH[gguf_type]
    scaling = config.get("rope_scaling") or {}
    if (scaling.get("type") or scaling.get("rope_type")) in ("longrope", "su"):
        raise UserError("GGUF export: LongRoPE scaling (its long/short factor tensors) is not written; "
                        "use --format hf and llama.cpp's convert_hf_to_gguf.py")
    for name, shape in tensors:
        if gguf_name(name, model_type) is None:
            raise UserError(f"GGUF export: tensor {name} has no llama.cpp name for {model_type}; use --format mlx or hf")
        if len(shape) == 2 and shape[-1] % width:
            raise UserError(
                f"GGUF export: {gguf_type} stores blocks of {width} weights per row, but {name} has rows of "
                f"{shape[-1]}; use --gguf-type f16"
            )
    return ARCHS[model_type]


def _tokenizer_metadata_from_gguf(source: Path) -> list[tuple[str, object, object, object]]:
    """(key, value, type, sub_type) of every ``tokenizer.*`` field of an existing GGUF file."""
    import gguf

    reader = gguf.GGUFReader(str(source))
    out = []
    for key, fld in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        types = list(fld.types)
        sub = types[-1] if types and types[0] == gguf.GGUFValueType.ARRAY else None
        out.append((key, G.field_value(fld), types[0], sub))
    return out


def _pre_tokenizer_name(spec: dict | None) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` name for a tokenizers pre-tokenizer (what our loader reads)."""
    if not spec:
        return "default"
    items = spec.get("pretokenizers", [spec]) if spec.get("type") == "Sequence" else [spec]
    kinds = [p.get("type") for p in items]
    if kinds == ["Digits", "ByteLevel"] and items[0].get("individual_digits"):
        return "smollm"
    split = next((p for p in items if p.get("type") == "Split"), None)
    if split is not None:
        regex = (split.get("pattern") or {}).get("Regex", "")
        if regex == G.LLAMA3_PRETOKENIZER_RE:
            return "llama-bpe"
        if regex == G.QWEN2_PRETOKENIZER_RE:
            return "qwen2"
    return "default"


def _tokenizer_metadata_from_hf(hf_tokenizer, vocab_rows: int) -> list[tuple[str, object, object, object]]:
    """GGUF tokenizer fields for a byte-level BPE (gpt2-style) Hugging Face tokenizer."""
    import gguf

    V = gguf.GGUFValueType
    spec = json.loads(hf_tokenizer.backend_tokenizer.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise UserError(
            "GGUF export: only byte-level BPE tokenizers (Llama 3, Qwen, SmolLM, GPT-2 style) can be written from a "
            "Hugging Face folder; export --format hf and convert with llama.cpp's convert_hf_to_gguf.py"
        )
    vocab = hf_tokenizer.get_vocab()
    size = max(vocab_rows, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [5] * size  # UNUSED until filled
    added = {t.content: t for t in hf_tokenizer.added_tokens_decoder.values()}
    for tok, idx in vocab.items():
        tokens[idx] = tok
        types[idx] = (3 if added[tok].special else 4) if tok in added else 1  # CONTROL / USER_DEFINED / NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    fields = [
        ("tokenizer.ggml.model", "gpt2", V.STRING, None),
        ("tokenizer.ggml.pre", _pre_tokenizer_name(spec.get("pre_tokenizer")), V.STRING, None),
        ("tokenizer.ggml.tokens", tokens, V.ARRAY, V.STRING),
        ("tokenizer.ggml.token_type", types, V.ARRAY, V.INT32),
        ("tokenizer.ggml.merges", merges, V.ARRAY, V.STRING),
    ]
    for key, tok in (("bos", hf_tokenizer.bos_token), ("eos", hf_tokenizer.eos_token),
                     ("unknown", hf_tokenizer.unk_token), ("padding", hf_tokenizer.pad_token)):
        if tok is not None and tok in vocab:
            fields.append((f"tokenizer.ggml.{key}_token_id", vocab[tok], V.UINT32, None))
    probe = hf_tokenizer("a").input_ids
    adds_bos = bool(probe) and hf_tokenizer.bos_token_id is not None and probe[0] == hf_tokenizer.bos_token_id
    fields.append(("tokenizer.ggml.add_bos_token", adds_bos, V.BOOL, None))
    if hf_tokenizer.chat_template:
        template = hf_tokenizer.chat_template
        fields.append(("tokenizer.chat_template", template if isinstance(template, str) else json.dumps(template),
                       V.STRING, None))
    return fields


def write_gguf(path: Path, config: dict, tensors: list[GGUFTensor], gguf_type: str, hf_tokenizer,
               source_gguf: Path | None = None, name: str | None = None) -> None:
    """Stream ``tensors`` into a GGUF file at ``path`` (tensor info first, then data)."""
    import gguf
    from gguf import GGMLQuantizationType as T

    arch = check_exportable(config, [(t.hf_name, t.shape) for t in tensors], gguf_type)
    model_type = str(config["model_type"])
    names = {t.hf_name for t in tensors}
    if arch.needs_output and "lm_head.weight" not in names and "model.embed_tokens.weight" in names:
        embed = next(t for t in tensors if t.hf_name == "model.embed_tokens.weight")
        tensors = [*tensors, GGUFTensor("lm_head.weight", embed.shape, embed.qtype, embed.dense)]
    types = {**_types(), "f32": T.F32}
    w = gguf.GGUFWriter(str(path), arch.gguf_arch)
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    w.add_name(name or config.get("_name_or_path") or "mlx_tune fused model")
    w.add_block_count(int(config["num_hidden_layers"]))
    w.add_context_length(int(config.get("max_position_embeddings", 4096)))
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(int(config["intermediate_size"]))
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(rope_dimensions(config, head_dim))
    if head_dim != hidden // heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_rope_freq_base(float(config.get("rope_theta") or default_rope_theta(model_type)))
    w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    w.add_vocab_size(int(config["vocab_size"]))
    scaling = config.get("rope_scaling") or {}
    if (scaling.get("type") or scaling.get("rope_type")) == "linear" and scaling.get("factor"):
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(scaling["factor"]))
    extra_metadata(w, model_type, config)
    w.add_file_type(_file_types()[gguf_type])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    fields = (_tokenizer_metadata_from_gguf(source_gguf) if source_gguf is not None
              else _tokenizer_metadata_from_hf(hf_tokenizer, int(config["vocab_size"])))
    for key, value, vtype, sub in fields:
        if isinstance(value, list) and not value:
            continue  # GGUF cannot hold an empty array (a BPE tokenizer without merges); readers default to none
        w.add_key_value(key, value, vtype, sub_type=sub)

    for t in tensors:
        qt = types[t.qtype]
        nbytes_shape = gguf.quants.quant_shape_to_byte_shape(t.shape, qt) if t.qtype not in ("f16", "f32") else t.shape
        dtype = {"f16": np.float16, "f32": np.float32}.get(t.qtype, np.uint8)
        nbytes = int(np.prod(nbytes_shape)) * np.dtype(dtype).itemsize
        w.add_tensor_info(gguf_name(t.hf_name, model_type), nbytes_shape, np.dtype(dtype), nbytes,
                          raw_dtype=qt if dtype is np.uint8 else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for t in tensors:
        heads_of = {"q_proj": heads, "k_proj": kv_heads}
        rotary = next((h for k, h in heads_of.items() if t.hf_name.endswith((f"{k}.weight", f"{k}.bias"))), None)
        blocks = list(t.dense()) if arch.permute_qk and rotary else t.dense()
        if arch.permute_qk and rotary:  # the permutation mixes rows: Q / K are one (small) block
            blocks = [permute(np.concatenate(blocks), rotary)]
        if arch.norm_shift and t.hf_name.endswith("norm.weight"):
            blocks = [b + arch.norm_shift for b in blocks]
        # Quantize block by block (GGUF blocks run along rows), keeping only the packed bytes.
        data = np.concatenate([_encode(np.ascontiguousarray(b, dtype=np.float32), t.qtype, types) for b in blocks])
        w.write_tensor_data(data)
    w.close()


def _encode(a: np.ndarray, qtype: str, types: dict) -> np.ndarray:
    import gguf

    if qtype == "f32":
        return a
    if qtype == "f16":
        return a.astype(np.float16)
    return gguf.quants.quantize(a, types[qtype])
