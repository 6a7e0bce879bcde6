"""GGUF files (llama.cpp, Ollama, LM Studio) to mlx-lm weights, config and tokenizer.

Q4_0, Q4_1 and Q8_0 blocks are affine quantizations with 32 weights per group, so they
map to MLX's ``(weight, scales, biases)`` exactly, with no re-quantization:

    Q4_0: w = d * (q - 8)  -> scale d, bias -8d      (q in 0..15)
    Q4_1: w = d * q + m    -> scale d, bias m
    Q8_0: w = d * q        -> scale d, bias -128d    (q + 128 in 0..255)

``mx.load`` does this natively; files holding other types (K-quants such as Q4_K, Q5_K,
Q6_K) go through the ``gguf`` package instead: those tensors are dequantized and then
re-quantized to the requested MLX format, the others converted as above.

llama.cpp stores the Q and K projections of llama-family models with their rows
permuted for its rotary embedding layout; ``_unpermute`` undoes it so the weights fit
mlx-lm's (Hugging Face) architecture. The tokenizer is rebuilt from the metadata
(vocab, merges, special tokens, pre-tokenizer, chat template).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from mlx_tune.errors import ModelLoadError


@dataclass(frozen=True)
class GGUFArch:
    """How one GGUF architecture maps onto an mlx-lm model type."""

    model_type: str
    permute_qk: bool  # llama.cpp permuted Q/K rows for this arch at conversion


ARCHS: dict[str, GGUFArch] = {
    "llama": GGUFArch("llama", permute_qk=True),  # Llama 1-3, Mistral 7B, SmolLM/SmolLM2
    "mistral": GGUFArch("llama", permute_qk=True),
    "qwen2": GGUFArch("qwen2", permute_qk=False),
    "qwen3": GGUFArch("qwen3", permute_qk=False),
}

# GGUF tensor-name pieces -> mlx-lm (Hugging Face) names.
TOP_LEVEL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_SKIP = {"rope_freqs.weight"}  # recomputed by mlx-lm's rope from the config

# Pre-tokenizer regexes by `tokenizer.ggml.pre` (from llama.cpp's llama-vocab.cpp).
LLAMA3_PRETOKENIZER_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_PRETOKENIZER_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _meta_value(value: Any) -> Any:
    if isinstance(value, mx.array):
        return value.item() if value.ndim == 0 else value.tolist()
    return value


def read_gguf(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Tensors (GGUF names; quantized ones as ``name.weight/.scales/.biases``) and metadata."""
    try:
        tensors, metadata = mx.load(str(path), return_metadata=True)
    except Exception as exc:  # the gguf package reads what mx.load cannot
        first_error = exc
    else:
        # mx.load silently dequantizes K-quants to float16; mark them for re-quantizing.
        try:
            k_quants = _k_quant_names(path)
        except Exception as exc:
            raise ModelLoadError(f"{path}: not a readable GGUF file ({str(exc).splitlines()[0]})") from None
        for name in k_quants:
            if name in tensors:
                tensors[name] = Dequantized(tensors[name].astype(mx.float32))
        return tensors, {k: _meta_value(v) for k, v in metadata.items()}
    try:
        return _read_with_gguf_package(path)
    except ModelLoadError:
        raise
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelLoadError(
            f"{path}: not a readable GGUF file ({reason}; mlx: {str(first_error).splitlines()[0]})"
        ) from None


def _k_quant_names(path: Path) -> list[str]:
    """Names of tensors stored in a type that MLX has no exact layout for."""
    import gguf
    from gguf import GGMLQuantizationType as T

    exact = {T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q8_0}
    return [t.name for t in gguf.GGUFReader(str(path)).tensors if t.tensor_type not in exact]


def _read_with_gguf_package(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    import gguf
    from gguf import GGMLQuantizationType as T

    reader = gguf.GGUFReader(str(path))
    metadata: dict[str, Any] = {}
    for name, fld in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        metadata[name] = field_value(fld)
    tensors: dict[str, Any] = {}
    for t in reader.tensors:
        rows_cols = tuple(int(x) for x in reversed(t.shape.tolist()))
        if t.tensor_type in (T.F32, T.F16):
            tensors[t.name] = mx.array(np.asarray(t.data).reshape(rows_cols))
        elif t.tensor_type == T.BF16:
            raw = np.asarray(t.data).view(np.uint16).astype(np.uint32) << 16
            tensors[t.name] = mx.array(raw.view(np.float32).reshape(rows_cols))
        elif t.tensor_type in _EXACT_AFFINE:
            w, s, b = _EXACT_AFFINE[t.tensor_type](np.asarray(t.data).reshape(rows_cols[0], -1))
            base = t.name[: -len(".weight")] if t.name.endswith(".weight") else t.name
            tensors[f"{base}.weight"], tensors[f"{base}.scales"], tensors[f"{base}.biases"] = w, s, b
        else:
            try:
                dense = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
            except NotImplementedError:
                raise ModelLoadError(
                    f"{path}: tensor {t.name} has GGUF type {t.tensor_type.name}, which mlx_tune cannot read; "
                    "use a file with Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K, F16 or F32 tensors"
                ) from None
            # Marked so the loader re-quantizes it to the requested MLX format.
            tensors[t.name] = Dequantized(mx.array(dense.reshape(rows_cols).astype(np.float32)))
    return tensors, metadata


class Dequantized:
    """A tensor that was stored in a K-quant and needs re-quantizing."""

    def __init__(self, array: mx.array):
        self.array = array


def field_value(fld: Any) -> Any:
    """The Python value of a ``gguf.GGUFReader`` metadata field (string, number or list)."""
    import gguf

    types = list(fld.types)
    if not types:
        return None
    if types[0] == gguf.GGUFValueType.ARRAY:
        if len(types) > 1 and types[1] == gguf.GGUFValueType.STRING:
            return [bytes(fld.parts[i]).decode("utf-8", errors="replace") for i in fld.data]
        return [fld.parts[i].tolist()[0] for i in fld.data]
    if types[0] == gguf.GGUFValueType.STRING:
        return bytes(fld.parts[fld.data[0]]).decode("utf-8", errors="replace")
    return fld.parts[fld.data[0]].tolist()[0]


def _pack4(q: np.ndarray) -> np.ndarray:
    """uint8 codes (rows, n) in 0..15 -> MLX uint32 words, element i at bits 4*(i%8)."""
    q = q.astype(np.uint32).reshape(q.shape[0], -1, 8)
    return (q << (4 * np.arange(8, dtype=np.uint32))).sum(axis=-1, dtype=np.uint32)


def _q4_0(blocks: np.ndarray):
    rows = blocks.shape[0]
    b = blocks.reshape(rows, -1, 18)
    d = b[..., :2].copy().view(np.float16)[..., 0]
    qs = b[..., 2:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(rows, -1)
    return mx.array(_pack4(q)), mx.array(d), mx.array((-8 * d.astype(np.float32)).astype(np.float16))


def _q4_1(blocks: np.ndarray):
    rows = blocks.shape[0]
    b = blocks.reshape(rows, -1, 20)
    d = b[..., :2].copy().view(np.float16)[..., 0]
    m = b[..., 2:4].copy().view(np.float16)[..., 0]
    qs = b[..., 4:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(rows, -1)
    return mx.array(_pack4(q)), mx.array(d), mx.array(m)


def _q8_0(blocks: np.ndarray):
    rows = blocks.shape[0]
    b = blocks.reshape(rows, -1, 34)
    d = b[..., :2].copy().view(np.float16)[..., 0]
    q = (b[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint32).reshape(rows, -1, 4)
    words = (q << (8 * np.arange(4, dtype=np.uint32))).sum(axis=-1, dtype=np.uint32)
    return mx.array(words), mx.array(d), mx.array((-128 * d.astype(np.float32)).astype(np.float16))


def _exact_affine_table() -> dict:
    from gguf import GGMLQuantizationType as T

    return {T.Q4_0: _q4_0, T.Q4_1: _q4_1, T.Q8_0: _q8_0}


try:
    _EXACT_AFFINE = _exact_affine_table()
except ImportError:  # gguf is a hard dependency; this only keeps import errors readable
    _EXACT_AFFINE = {}


def gguf_config(metadata: dict[str, Any], tensor_names: set[str], path: Path) -> tuple[dict, GGUFArch]:
    """A Hugging Face style config.json dict from GGUF metadata."""
    arch_name = metadata.get("general.architecture")
    if arch_name not in ARCHS:
        raise ModelLoadError(
            f"{path}: GGUF architecture {arch_name!r} is not supported; supported: {', '.join(sorted(ARCHS))}"
        )
    arch = ARCHS[arch_name]

    def get(key: str, default: Any = None) -> Any:
        return metadata.get(f"{arch_name}.{key}", default)

    n_heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    tokens = metadata.get("tokenizer.ggml.tokens") or []
    config = {
        "model_type": arch.model_type,
        "hidden_size": hidden,
        "num_hidden_layers": int(get("block_count")),
        "intermediate_size": int(get("feed_forward_length")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(get("attention.head_count_kv", n_heads)),
        "head_dim": int(get("attention.key_length", get("rope.dimension_count", hidden // n_heads))),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "vocab_size": int(get("vocab_size", len(tokens))),
        "max_position_embeddings": int(get("context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
    }
    scaling = get("rope.scaling.type")
    if scaling == "linear" and get("rope.scaling.factor"):
        config["rope_scaling"] = {"type": "linear", "factor": float(get("rope.scaling.factor"))}
    return config, arch


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _SKIP:
        return None
    base, _, suffix = gguf_name.rpartition(".")
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if m and m.group(2) in BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{BLOCK_NAMES[m.group(2)]}.{suffix}"
    if base in TOP_LEVEL_NAMES:
        return f"{TOP_LEVEL_NAMES[base]}.{suffix}"
    return None


def _unpermute(w: Any, n_heads: int) -> Any:
    """Undo llama.cpp's rotary row permutation.

    llama.cpp wrote ``w.reshape(h, 2, d/2, ...).swapaxes(1, 2)`` (per head, halves
    interleaved); the inverse reads rows as ``(h, d/2, 2)`` and swaps back.
    """
    rows = w.shape[0]
    rest = w.shape[1:]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *rest).swapaxes(1, 2).reshape(rows, *rest)


def gguf_weights(tensors: dict[str, Any], config: dict, arch: GGUFArch, path: Path) -> tuple[dict, list[str]]:
    """Rename (and un-permute) GGUF tensors for mlx-lm. Returns weights and unknown names."""
    weights: dict[str, Any] = {}
    unknown: list[str] = []
    for name, value in tensors.items():
        hf = _hf_name(name)
        if hf is None:
            if name not in _SKIP:
                unknown.append(name)
            continue
        if arch.permute_qk and (".q_proj." in hf or ".k_proj." in hf):
            heads = config["num_attention_heads"] if ".q_proj." in hf else config["num_key_value_heads"]
            if isinstance(value, Dequantized):
                value = Dequantized(_unpermute(value.array, heads))
            else:
                value = _unpermute(value, heads)
        weights[hf] = value
    return weights, unknown


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------


def build_tokenizer(metadata: dict[str, Any], path: Path):
    """A transformers ``PreTrainedTokenizerFast`` equivalent to the file's tokenizer."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    kind = metadata.get("tokenizer.ggml.model")
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ModelLoadError(f"{path}: the GGUF file has no tokenizer (tokenizer.ggml.tokens is missing)")
    types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {tok: i for i, tok in enumerate(tokens)}

    if kind == "gpt2":
        merges_raw = metadata.get("tokenizer.ggml.merges") or []
        merges = [tuple(m.split(" ", 1)) for m in merges_raw]
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
        pre = metadata.get("tokenizer.ggml.pre", "default")
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        if pre in ("llama-bpe", "llama3", "smaug-bpe", "dbrx"):
            split = pre_tokenizers.Split(Regex(LLAMA3_PRETOKENIZER_RE), behavior="isolated", invert=False)
            tok.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
        elif pre in ("qwen2", "deepseek-llm"):
            split = pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZER_RE), behavior="isolated", invert=False)
            tok.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
        elif pre in ("smollm", "starcoder", "refact", "codeshell"):
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ])
        else:
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
    elif kind == "llama":
        scores = metadata.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        merges = _spm_merges(tokens, scores, vocab)
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, fuse_unk=True,
                                   unk_token=tokens[int(metadata.get("tokenizer.ggml.unknown_token_id", 0))]))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence([
            decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
        ])
    else:
        raise ModelLoadError(
            f"{path}: tokenizer type {kind!r} cannot be built; supported: gpt2 (byte-level BPE) and llama (SentencePiece)"
        )

    special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty in (3, 4)]
    tok.add_special_tokens(special)

    def token(key: str) -> str | None:
        idx = metadata.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(idx)] if idx is not None and 0 <= int(idx) < len(tokens) else None

    bos, eos = token("bos"), token("eos")
    if metadata.get("tokenizer.ggml.add_bos_token", kind == "llama") and bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=token("unknown"),
        pad_token=token("padding") or eos,
    )
    template = metadata.get("tokenizer.chat_template")
    if template:
        hf.chat_template = template
    return hf


def _spm_merges(tokens: list[str], scores: list[float], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocab: a merge for every split of a token whose
    halves are both tokens, ordered by the merged token's score (higher merges first)."""
    found = []
    for tok, score in zip(tokens, scores):
        for i in range(1, len(tok)):
            left, right = tok[:i], tok[i:]
            if left in vocab and right in vocab:
                found.append((-score, vocab[left], vocab[right], left, right))
    found.sort()
    return [(left, right) for _, _, _, left, right in found]


def eos_token_ids(metadata: dict[str, Any]) -> list[int]:
    ids = [metadata.get("tokenizer.ggml.eos_token_id")]
    tokens = metadata.get("tokenizer.ggml.tokens") or []
    # Chat models end turns with an end-of-turn token that GGUF's single eos may not name.
    for name in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        if name in tokens:
            ids.append(tokens.index(name))
    return sorted({int(i) for i in ids if i is not None})
