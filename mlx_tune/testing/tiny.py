"""Tiny real models for tests, benchmarks and docs: mlx-lm architectures, random weights.

``tiny_tokenizer()`` is a byte-level BPE tokenizer with ChatML special tokens and a
chat template, built in memory (no network). ``tiny_model()`` builds a real mlx-lm
architecture with random weights; ``save_tiny_folder()`` writes both as a Hugging
Face style folder (config.json, model.safetensors, tokenizer files) that the loader
reads like any downloaded model. Per-family overrides (sliding windows, sinks, MLA,
experts, recurrent layers) are in ``families.FAMILIES``.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tiny_config(model_type: str = "llama", **overrides) -> dict:
    """An HF-style config.json dict for a small model of a real mlx-lm architecture."""
    cfg = {
        "model_type": model_type,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-5,
        "vocab_size": 256 + len(SPECIAL_TOKENS),
        "rope_theta": 10000.0,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": model_type != "qwen2",
        "bos_token_id": None,
        "eos_token_id": 2,
    }
    cfg.update(overrides)
    return cfg


def tiny_tokenizer():
    """A byte-level BPE tokenizer (every byte one token) wrapped for mlx-lm.

    Ids: 0 <|endoftext|>, 1 <|im_start|>, 2 <|im_end|>, then the 256 byte symbols.
    """
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    return TokenizerWrapper(tiny_hf_tokenizer(), eos_token_ids=[2])


def tiny_hf_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_symbols = list(pre_tokenizers.ByteLevel.alphabet())
    byte_symbols.sort()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for sym in byte_symbols:
        vocab[sym] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None
    )
    hf.chat_template = CHATML_TEMPLATE
    return hf


def tiny_model(model_type: str = "llama", seed: int = 0, **overrides) -> nn.Module:
    """A real mlx-lm model of ``model_type`` with small random weights (float32)."""
    from mlx_lm.utils import _get_classes

    cfg = tiny_config(model_type, **overrides)
    model_class, args_class = _get_classes(cfg)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(cfg))
    mx.eval(model.parameters())
    return model


def save_tiny_folder(path: str | Path, model_type: str = "llama", seed: int = 0, *, chat_template: bool = True,
                     **overrides) -> Path:
    """Write a tiny model as a Hugging Face folder and return its path.

    ``chat_template=False`` writes a tokenizer without a template, like most base models.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config(model_type, **overrides)
    model = tiny_model(model_type, seed=seed, **overrides)
    from mlx.utils import tree_flatten

    weights = dict(tree_flatten(model.parameters()))
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    hf = tiny_hf_tokenizer()
    if not chat_template:
        hf.chat_template = None
    hf.save_pretrained(str(path))
    return path
