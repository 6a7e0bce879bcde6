"""GGUF files (llama.cpp, Ollama, LM Studio) to mlx-lm weights, config and tokenizer.

Reading happens in two steps. The header (``gguf_header``) gives the metadata and the
tensor directory; from it alone the architecture and every tensor type are checked, so
a file mlx_tune cannot use fails in well under a second, before any weight is read.
Then the tensors are read: ``mx.load`` for files holding only F32/F16/BF16/Q4_0/Q4_1/
Q8_0 (its native, exact mapping), else a memory-mapped read through ``gguf_quants``,
which maps Q4_0/Q4_1/Q8_0 exactly and dequantizes every other type for re-quantizing.

``gguf_names`` turns GGUF tensor names and llama.cpp's conventions (Q/K permutation,
Gemma's norm offset, stacked experts) back into the mlx-lm model's parameters. The
tokenizer is rebuilt from the metadata (vocab, merges, special tokens, pre-tokenizer,
chat template).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from mlx_tune.errors import ModelLoadError
from mlx_tune.model import gguf_quants as Q
from mlx_tune.model.gguf_header import Header, read_header
from mlx_tune.model.gguf_names import (
    ARCHS,
    GGUFArch,
    check_arch,
    gguf_config,
    is_skipped,
    merge_mla_kv_b,
    name_map,
    unpermute,
)
from mlx_tune.model.gguf_quants import Dequantized

__all__ = ["ARCHS", "GGUFArch", "Dequantized", "gguf_config", "read_gguf", "read_gguf_header", "gguf_weights",
           "build_tokenizer", "eos_token_ids", "field_value", "rope_tensors"]

# llama-family GGUF tensor-name pieces -> Hugging Face names (the export side writes with these).
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

# Pre-tokenizer regexes by `tokenizer.ggml.pre` (from llama.cpp's llama-vocab.cpp).
LLAMA3_PRETOKENIZER_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_PRETOKENIZER_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def read_gguf_header(path: Path) -> Header:
    """The header of ``path``, with the architecture and every tensor type checked."""
    try:
        header = read_header(path, archs=ARCHS)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: not a readable GGUF file ({str(exc).splitlines()[0]})") from None
    check_arch(header.metadata, path)
    size = path.stat().st_size
    for t in header.tensors:
        if t.type not in Q.READABLE:
            raise ModelLoadError(
                f"{path}: tensor {t.name} has GGUF type {Q.type_name(t.type)}, which mlx_tune cannot read; "
                f"readable types: {Q.readable_names()}"
            )
        if t.offset + Q.nbytes(t) > size:
            raise ModelLoadError(f"{path}: not a readable GGUF file (tensor {t.name} lies past the end; truncated?)")
    return header


def read_gguf(path: Path, header: Header | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Tensors (GGUF names; exact-affine ones as ``name.weight/.scales/.biases``, others
    dense or ``Dequantized``) and metadata. Checks the header first (``read_gguf_header``)."""
    header = header or read_gguf_header(path)
    native = Q.DENSE + Q.EXACT_AFFINE
    if all(t.type in native and (t.type in Q.DENSE or len(t.shape) == 2) for t in header.tensors):
        try:
            loaded: Any = mx.load(str(path))
            return dict(loaded), header.metadata
        except Exception:  # mx.load's reader refused it; the memory-mapped path below may not
            pass
    buf = np.memmap(path, dtype=np.uint8, mode="r")
    tensors: dict[str, Any] = {}
    try:
        for t in header.tensors:
            tensors.update(Q.read_tensor(buf, t))
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelLoadError(f"{path}: not a readable GGUF file ({reason})") from None
    return tensors, header.metadata


ROPE_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


def rope_tensors(path: Path, header: Header) -> dict[str, list[float]]:
    """The small RoPE tensors (Llama 3's ``rope_freqs``, Phi-3's long/short factors), read alone."""
    out: dict[str, list[float]] = {}
    buf = None
    for info in header.tensors:
        if info.name in ROPE_TENSORS:
            buf = np.memmap(path, dtype=np.uint8, mode="r") if buf is None else buf
            (value,) = Q.read_tensor(buf, info).values()
            arr = value.array if isinstance(value, Dequantized) else value
            out[info.name] = [float(x) for x in np.array(arr, dtype=np.float32).reshape(-1)]
    return out


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


def gguf_weights(tensors: dict[str, Any], config: dict, arch: GGUFArch, metadata: dict[str, Any],
                 params: dict[str, tuple[int, ...]]) -> tuple[dict, list[str]]:
    """GGUF tensors as the mlx-lm model's parameters ``params`` (name -> shape) name them,
    with llama.cpp's conventions undone. Returns the weights and the names left unplaced."""
    modules = name_map(metadata["general.architecture"], list(params), config["num_hidden_layers"])
    if arch.model_type == "deepseek_v2":
        tensors = merge_mla_kv_b(dict(tensors), config)
    weights: dict[str, Any] = {}
    unknown: list[str] = []
    for name, value in tensors.items():
        base, _, suffix = name.rpartition(".")
        module = modules.get(base)
        if module is None:
            if not is_skipped(name):
                unknown.append(name)
            continue
        target = f"{module}.{suffix}"
        array = value.array if isinstance(value, Dequantized) else value
        if arch.permute_qk and module.endswith((".q_proj", ".k_proj")):
            heads = config["num_attention_heads"] if module.endswith(".q_proj") else config["num_key_value_heads"]
            array = unpermute(array, heads)
        if arch.norm_offset and base.endswith("norm") and suffix == "weight":
            array = array.astype(mx.float32) - arch.norm_offset
        shape = params.get(target)
        if shape is not None and suffix in ("weight", "bias") and array.shape != shape and array.size == np.prod(shape):
            array = array.reshape(shape)  # e.g. a (1, hidden) router gate llama.cpp keeps as (hidden,)
        weights[target] = Dequantized(array) if isinstance(value, Dequantized) else array
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
